"""Recipe benchmark (issue 16): AdamW vs Muon vs Muon + the block options, steps to a val loss.

    python benchmarks/recipe.py --data_path tinyshakespeare.txt          # 3 seeds x 3 recipes
    python benchmarks/recipe.py --quick                                  # 1 seed, 300 steps
    python benchmarks/recipe.py --data_path F --tune 0.01 0.02 0.04      # muon_lr sweep, seed 0
    python benchmarks/recipe.py --data_path F --seeds 1 --tag s1         # one seed (in parallel) ...
    python benchmarks/recipe.py --merge results/recipe_*-s?.json         # ... then the table

Shape: the packaged default config, which is nanoGPT's shakespeare_char "baby" shape (4 blocks,
dim 128, context 64, batch 12, lr 1e-3 with 100 warmup steps and cosine decay, 2000 steps, AdamW
(0.9, 0.99), weight decay 0.1, clip 1.0, float32), so the baby rows are the default config's.
Corpus: `--data_path` (the issue's numbers are on tiny Shakespeare), else the package's default
corpus (`corpus.default_corpus_path()`: all of Shakespeare, a larger and different text).

Recipes: `adamw` (the default config), `muon` (optimizer: muon, muon_lr), `muon+options`
(muon plus qk_norm, activation relu2, logit_softcap 30, zero_init_proj).

Each run follows the Trainer's randomness (init, data and dropout keys split from key(seed), the
batch of step s drawn with fold_in(data, s)) in a plain loop, and every `--eval_every` steps
scores the WHOLE validation split (consecutive windows of max_context + 1 tokens, as
`full_val_loss.py` does): no sampling noise in the curves. Reported per recipe: val loss at
fixed steps (mean and spread over seeds), the first evaluated step with val <= `--target`
(1.88, nanoGPT's baby result), and the first step at which each run reaches AdamW's mean final
val loss (the issue's aim: <= 70 % of AdamW's steps).

Results: benchmarks/results/recipe_<machine>[-quick|-tune].json; the table in
benchmarks/README.md (between the recipe markers) is rebuilt from the full results file.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from bench_readme import README, write_section
from dantinox_eqx.config import Config, atomic_write_text
from dantinox_eqx.data import prepare_data, sample_batch
from dantinox_eqx.data.corpus import cache_dir, default_corpus_path
from dantinox_eqx.hostmem import keep_freed_memory
from dantinox_eqx.model import Transformer
from dantinox_eqx.train.optim import make_optimizer
from dantinox_eqx.train.step import init_opt_state, make_eval_step, make_train_step
from dantinox_eqx.train.trainer import default_config_path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
OPTIONS = dict(qk_norm=True, activation="relu2", use_swiglu=False, logit_softcap=30.0, zero_init_proj=True)
REPORT_STEPS = (250, 500, 1000, 1500, 2000)


def recipes(muon_lr: float) -> dict[str, dict]:
    return {"adamw": {}, "muon": {"optimizer": "muon", "muon_lr": muon_lr},
            "muon+options": {"optimizer": "muon", "muon_lr": muon_lr, **OPTIONS}}


def machine_name() -> str:
    import os

    dev = jax.devices()[0]
    if dev.platform == "gpu":
        return f"gpu-{dev.device_kind.replace('NVIDIA ', '').split()[0].lower()}"
    return f"cpu-{os.cpu_count()}core"


def val_batches(val: np.ndarray, context: int, per: int = 128) -> jax.Array:
    """The whole validation split as consecutive windows of context + 1 tokens, (n, per, W);
    the ragged tail (< per windows) is dropped."""
    W = context + 1
    n = len(val) // W
    windows = np.asarray(val[: n * W], dtype=np.int32).reshape(n, W)
    return jnp.asarray(windows[: (n // per) * per].reshape(-1, per, W))


def train_one(config: Config, data, val: jax.Array, eval_every: int) -> dict:
    """One run of `config` (its seed, max_steps); the val curve every `eval_every` steps."""
    total = config.max_steps
    root = jax.random.key(config.seed)
    init_key, data_key, dropout_key, _ = jax.random.split(root, 4)
    params, static = eqx.partition(Transformer(config, key=init_key), eqx.is_array)
    optimizer = make_optimizer(config, total)
    opt_state = init_opt_state(optimizer, params)
    step_fn = make_train_step(static, optimizer, alpha_balance=config.alpha_balance)
    eval_fn = make_eval_step(static)
    train = jnp.asarray(data.train, jnp.int32)
    sample = jax.jit(lambda s: sample_batch(train, jax.random.fold_in(data_key, s), config.batch_size,
                                            config.max_context, accum=config.grad_accum))
    curve, train_s = [], 0.0
    t = time.perf_counter()
    for s in range(total):
        params, opt_state, metrics = step_fn(params, opt_state, sample(s), jax.random.fold_in(dropout_key, s))
        if s == 0:  # the first step compiles: the clock starts after it
            jax.block_until_ready(metrics)
            t = time.perf_counter()
        if (s + 1) % eval_every == 0 or s + 1 == total:
            jax.block_until_ready(metrics)
            train_s += time.perf_counter() - t
            loss = float(eval_fn(params, val)["loss"])
            curve.append([s + 1, round(loss, 5)])
            print(f"    step {s + 1:5d} val {loss:.4f}", flush=True)
            t = time.perf_counter()
            if not np.isfinite(loss):
                break
    return {"curve": curve, "ms_per_step": round(1e3 * train_s / max(total - 1, 1), 2)}


def first_step(curve: list, threshold: float) -> int | None:
    return next((s for s, v in curve if v <= threshold), None)


def at(curve: list, step: int) -> float | None:
    return next((v for s, v in curve if s == step), None)


def summarise(runs: dict[str, list[dict]], steps: int, target: float) -> dict[str, dict]:
    """Per recipe: mean/min/max val at REPORT_STEPS, steps to `target`, steps to AdamW's final."""
    adamw_final = statistics.mean(at(r["curve"], steps) for r in runs["adamw"]) if "adamw" in runs else None
    out = {}
    for name, rs in runs.items():
        row: dict = {"seeds": [r["seed"] for r in rs], "muon_lr": rs[0].get("muon_lr")}
        for s in (*[x for x in REPORT_STEPS if x < steps], steps):
            vals = [at(r["curve"], s) for r in rs]
            if all(v is not None for v in vals):
                row[f"val@{s}"] = {"mean": round(statistics.mean(vals), 4), "min": min(vals), "max": max(vals)}
        row["steps_to_target"] = [first_step(r["curve"], target) for r in rs]
        if adamw_final is not None:
            row["adamw_final_val"] = round(adamw_final, 4)
            row["steps_to_adamw_final"] = [first_step(r["curve"], adamw_final) for r in rs]
        row["ms_per_step"] = round(statistics.mean(r["ms_per_step"] for r in rs), 2)
        out[name] = row
    return out


def _fmt_steps(values: list) -> str:
    shown = ", ".join("-" if v is None else str(v) for v in values)
    if any(v is None for v in values):
        return shown
    return f"{statistics.mean(values):.0f} ({shown})"


def write_table(result: dict) -> None:
    """The recipe table: section "recipe" of benchmarks/README.md."""
    steps, summary = result["steps"], result["summary"]
    cols = [s for s in (*REPORT_STEPS, steps) if f"val@{s}" in summary["adamw"]]
    cols = list(dict.fromkeys(cols))
    head = ("| recipe | " + " | ".join(f"val @ {s}" for s in cols)
            + f" | steps to val <= {result['target']} | steps to AdamW's final val | ms/step |")
    lines = [head, "|" + "---|" * (len(cols) + 4)]
    for name, row in summary.items():
        cells = [f"{row[f'val@{s}']['mean']:.4f} ({row[f'val@{s}']['min']:.3f}-{row[f'val@{s}']['max']:.3f})"
                 for s in cols]
        lr = f" (muon_lr {row['muon_lr']})" if row.get("muon_lr") else ""
        lines.append(f"| {name}{lr} | " + " | ".join(cells) + f" | {_fmt_steps(row['steps_to_target'])} | "
                     f"{_fmt_steps(row.get('steps_to_adamw_final', []))} | {row['ms_per_step']} |")
    n_seeds = len(next(iter(summary.values()))["seeds"])
    table = "\n".join(lines) + (
        f"\n\n{result['corpus']}, {steps} steps ({result['schedule']}), {n_seeds} seeds each (mean, and the "
        f"range over seeds in brackets); val = the whole validation split every {result['curve_every']} steps; "
        f"steps: the first evaluation at or below the threshold, per seed (- = not reached); options = "
        f"{', '.join(f'{k} {v}' for k, v in result['options'].items())}; ms/step: training steps only, as "
        f"measured on {result['machine']} ({result['date']}) while other jobs shared it (indicative only).\n")
    write_section("recipe", table)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data_path", default=None, help="training text (default: the package's default corpus)")
    ap.add_argument("--quick", action="store_true", help="1 seed, 300 steps (a smoke run, minutes on CPU)")
    ap.add_argument("--seeds", type=int, nargs="*", default=None, help="default: 0 1 2 (quick: 0)")
    ap.add_argument("--steps", type=int, default=None, help="default: the config's max_steps (quick: 300)")
    ap.add_argument("--muon_lr", type=float, default=Config.muon_lr,
                    help="Muon's peak lr in both muon recipes (default: the config's)")
    ap.add_argument("--recipes", nargs="*", default=None, help="a subset of adamw, muon, muon+options")
    ap.add_argument("--tune", type=float, nargs="*", default=None,
                    help="instead: a muon_lr sweep of the muon recipe (first seed only)")
    ap.add_argument("--eval_every", type=int, default=100)
    ap.add_argument("--target", type=float, default=1.88)
    ap.add_argument("--set", nargs="*", default=[], metavar="FIELD=VALUE",
                    help="config overrides for every recipe (e.g. lr=0.002 for an AdamW lr check)")
    ap.add_argument("--tag", default=None, help="results file suffix (runs of other seeds in parallel)")
    ap.add_argument("--merge", nargs="*", default=None, type=Path,
                    help="instead: merge these results files' runs into the full results and table")
    args = ap.parse_args()
    keep_freed_memory()
    if args.merge:
        return merge(args.merge)

    base = Config.from_yaml(default_config_path())
    steps = args.steps or (300 if args.quick else base.max_steps)
    seeds = args.seeds if args.seeds is not None else ([0] if args.quick else [0, 1, 2])
    data_path = Path(args.data_path) if args.data_path else default_corpus_path()
    data = prepare_data(data_path, tokenizer_type=base.tokenizer_type, max_context=base.max_context,
                        val_fraction=base.val_fraction, max_train_tokens=base.max_train_tokens,
                        cache_dir=cache_dir())
    sets = dict(item.split("=", 1) for item in args.set)
    base = base.replace(vocab_size=data.vocab_size, max_steps=steps,
                        **{name: Config.coerce(name, value) for name, value in sets.items()})
    val = val_batches(np.asarray(data.val), base.max_context)
    print(f"corpus {data_path} ({len(data.train)} train / {len(data.val)} val tokens, "
          f"{val.shape[0] * val.shape[1]} val windows scored); {steps} steps, seeds {seeds}", flush=True)

    if args.tune:
        plan = [(f"muon lr {lr}", {"optimizer": "muon", "muon_lr": lr}) for lr in args.tune]
        seeds = seeds[:1]
    else:
        plan = [(n, o) for n, o in recipes(args.muon_lr).items() if not args.recipes or n in args.recipes]
    runs: dict[str, list[dict]] = {}
    for seed in seeds:  # seeds outermost: a slow spell of the machine hits every recipe alike
        for name, overrides in plan:
            config = base.replace(seed=seed, **overrides)
            print(f"  {name} seed {seed}", flush=True)
            run = train_one(config, data, val, args.eval_every)
            runs.setdefault(name, []).append({"seed": seed, "muon_lr": overrides.get("muon_lr"), **run})

    result = {"machine": machine_name(), "device": jax.devices()[0].device_kind, "jax": jax.__version__,
              "date": time.strftime("%Y-%m-%d %H:%M"), "corpus": data_path.name,
              "schedule": f"{base.lr_schedule}, warmup {base.warmup_steps}, lr {base.lr}", "steps": steps,
              "target": args.target, "options": OPTIONS, "quick": args.quick, "tune": args.tune,
              "curve_every": args.eval_every, "set": sets,
              "runs": runs}
    if not args.tune and "adamw" in runs:
        result["summary"] = summarise(runs, steps, args.target)
        print(json.dumps(result["summary"], indent=1))
    suffix = f"-{args.tag}" if args.tag else "-tune" if args.tune else "-quick" if args.quick else ""
    out = RESULTS / f"recipe_{machine_name()}{suffix}.json"
    atomic_write_text(out, json.dumps(result, indent=1) + "\n")
    if "summary" in result and not args.quick and not args.tag:
        write_table(result)
    print(f"wrote {out}")


def merge(files: list[Path]) -> None:
    """One results file and table from runs written by several processes (`--tag`)."""
    parts = [json.loads(f.read_text()) for f in files]
    result = {"curve_every": 100, **parts[0], "runs": {}, "merged_from": [f.name for f in files]}
    for part in parts:
        if part["steps"] != result["steps"] or part["corpus"] != result["corpus"]:
            raise SystemExit(f"cannot merge runs of other steps or corpus: {part['steps']} {part['corpus']}")
        for name, runs in part["runs"].items():
            result["runs"].setdefault(name, []).extend(runs)
    for runs in result["runs"].values():
        runs.sort(key=lambda r: r["seed"])
    result["summary"] = summarise(result["runs"], result["steps"], result["target"])
    out = RESULTS / f"recipe_{result['machine']}.json"
    atomic_write_text(out, json.dumps(result, indent=1) + "\n")
    write_table(result)
    print(json.dumps(result["summary"], indent=1))
    print(f"wrote {out} and the table in {README}")


if __name__ == "__main__":
    main()
