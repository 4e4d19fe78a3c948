"""Does the LR range test point at a good LR? find_lr vs a grid of short training runs.

    PYTHONPATH=src python benchmarks/lr_finder_check.py [--steps 200] [--out benchmarks/results/lr_finder_check.json]

Runs `find_lr` on configs/default_config.yaml + tiny Shakespeare (the documented call: 1e-6 ->
1e-2 over 100 steps), then trains the same model for `--steps` steps at each LR of a grid with
the pure step (the config's optimizer and cosine schedule, warmup shortened to a tenth of the
run) and evaluates the validation loss on `eval_iters` fixed batches. Acceptance: the suggestion
is within a factor of 10 of the grid's best LR. Writes the JSON record given by --out.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp

from dantinox_eqx.config import Config, atomic_write_text
from dantinox_eqx.data.corpus import default_corpus_path
from dantinox_eqx.data.sampling import Dataset, sample_batch
from dantinox_eqx.model import Transformer
from dantinox_eqx.train.lr_finder import find_lr, prepare_config_data
from dantinox_eqx.train.optim import make_optimizer
from dantinox_eqx.train.step import init_opt_state, make_eval_step, make_train_step

ROOT = Path(__file__).resolve().parents[1]


def short_run(config: Config, data: Dataset, steps: int) -> dict[str, float]:
    """Train `steps` steps from the config's seed; return the final train and val losses."""
    mkey, dkey, skey, ekey = jax.random.split(jax.random.key(config.seed), 4)
    params, static = eqx.partition(Transformer(config, key=mkey), eqx.is_array)
    optimizer = make_optimizer(config, steps)
    opt_state = init_opt_state(optimizer, params)
    step = make_train_step(static, optimizer, alpha_balance=config.alpha_balance)
    evaluate = make_eval_step(static)
    train, val = jnp.asarray(data.train), jnp.asarray(data.val)
    losses = []
    for s in range(steps):
        batch = sample_batch(train, jax.random.fold_in(dkey, s), config.batch_size, config.max_context,
                             config.grad_accum)
        params, opt_state, metrics = step(params, opt_state, batch, jax.random.fold_in(skey, s))
        losses.append(metrics["loss"])
    val_batches = sample_batch(val, ekey, config.batch_size, config.max_context, config.eval_iters)
    val_loss = float(evaluate(params, val_batches)["loss"])
    train_loss = float(jnp.mean(jnp.stack(losses[-20:])))
    return {"val_loss": val_loss if math.isfinite(val_loss) else float("inf"), "train_loss_last20": train_loss}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(ROOT / "configs" / "default_config.yaml"))
    parser.add_argument("--data_path", default=None, help="a text file (default: the default corpus)")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--lrs", default="1e-4,3e-4,1e-3,3e-3,1e-2")
    parser.add_argument("--min_lr", type=float, default=1e-6)
    parser.add_argument("--max_lr", type=float, default=1e-2)
    parser.add_argument("--num_steps", type=int, default=100)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "lr_finder_check.json"))
    args = parser.parse_args()

    config = Config.from_yaml(args.config)
    args.data_path = args.data_path or str(default_corpus_path())
    data = prepare_config_data(config, args.data_path)
    config = config.replace(vocab_size=data.vocab_size)

    t0 = time.perf_counter()
    suggested, lrs, losses = find_lr(config, data, args.min_lr, args.max_lr, args.num_steps)
    finder_s = time.perf_counter() - t0
    print(f"find_lr: suggested {suggested:.3e} ({len(lrs)} of {args.num_steps} steps, {finder_s:.0f} s)")

    grid = {}
    short = config.replace(max_steps=args.steps, warmup_steps=max(1, args.steps // 10))
    for lr in [float(x) for x in args.lrs.split(",")]:
        t0 = time.perf_counter()
        grid[lr] = short_run(short.replace(lr=lr), data, args.steps)
        print(f"lr {lr:.0e}: val_loss {grid[lr]['val_loss']:.4f} ({time.perf_counter() - t0:.0f} s)")
    best_lr = min(grid, key=lambda k: grid[k]["val_loss"])
    ratio = max(suggested / best_lr, best_lr / suggested)
    record = {
        "what": "find_lr suggestion vs the best LR of a grid of short runs (acceptance: within 10x)",
        "config": str(Path(args.config).relative_to(ROOT)) if Path(args.config).is_relative_to(ROOT) else args.config,
        "data_path": Path(args.data_path).name,
        "find_lr": {"min_lr": args.min_lr, "max_lr": args.max_lr, "num_steps": args.num_steps,
                    "steps_run": len(lrs), "suggested_lr": suggested, "seconds": round(finder_s, 1),
                    "lr_history": lrs, "smoothed_loss": losses},
        "grid": {"steps": args.steps, "warmup_steps": short.warmup_steps, "schedule": short.lr_schedule,
                 "val_loss_by_lr": {f"{lr:g}": v["val_loss"] for lr, v in grid.items()},
                 "train_loss_last20_by_lr": {f"{lr:g}": v["train_loss_last20"] for lr, v in grid.items()}},
        "best_grid_lr": best_lr,
        "ratio": ratio,
        "within_10x": ratio <= 10.0,
        "machine": f"{platform.machine()} {jax.devices()[0].platform} (timings contended: shared CPU)",
    }
    out = Path(args.out)
    atomic_write_text(out, json.dumps(record, indent=1) + "\n")
    print(f"best grid lr {best_lr:g}; suggestion {suggested:.3e}; ratio {ratio:.2f} -> "
          f"{'within' if ratio <= 10 else 'NOT within'} 10x. Wrote {out}")


if __name__ == "__main__":
    main()
