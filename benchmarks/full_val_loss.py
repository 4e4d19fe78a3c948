"""Deterministic val loss of a run's checkpoint over the WHOLE validation split.

    python benchmarks/full_val_loss.py RUN_DIR [--best] [--data_path FILE]

The training log's val_loss is a random sample (eval_iters batches); this script cuts the
validation split into consecutive non-overlapping windows of max_context + 1 tokens and reports
the mean cross-entropy over all of them (no sampling noise), for quality records.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from dantinox_eqx.config import Config
from dantinox_eqx.data.sampling import prepare_data
from dantinox_eqx.data.tokenizer import load_tokenizer
from dantinox_eqx.model import Transformer
from dantinox_eqx.run import checkpoint as ckpt
from dantinox_eqx.train.step import make_eval_step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--best", action="store_true", help="the best checkpoint (default: latest)")
    parser.add_argument("--data_path", default=None, help="default: the run's recorded corpus")
    args = parser.parse_args()
    run = args.run_dir
    config = Config.from_yaml(run / "config.yaml")
    data_path = args.data_path or json.loads((run / "training_cursor.json").read_text())["data_path"]
    data = prepare_data(data_path, tokenizer_type=config.tokenizer_type, max_context=config.max_context,
                        val_fraction=config.val_fraction, max_train_tokens=config.max_train_tokens,
                        tokenizer=load_tokenizer(run / "tokenizer.json"))
    params, static = eqx.partition(Transformer(config, key=jax.random.key(0)), eqx.is_array)
    which = ckpt.BEST if args.best else ckpt.LATEST
    step, params, _ = ckpt.restore(run, which, params)
    W = config.max_context + 1
    n = len(data.val) // W
    windows = np.asarray(data.val[: n * W], dtype=np.int32).reshape(n, W)
    per = 64  # windows per batch; the ragged tail is dropped (< 64 windows)
    batches = jnp.asarray(windows[: (n // per) * per].reshape(-1, per, W))
    loss = float(make_eval_step(static)(params, batches)["loss"])
    print(json.dumps({"run_dir": str(run), "checkpoint": which, "step": step, "windows": int(batches.shape[0] * per),
                      "tokens_scored": int(batches.shape[0] * per * (W - 1)), "val_loss_full": loss}))


if __name__ == "__main__":
    main()
