"""Subprocess driver for tests/test_trainer_prepared.py: the host feed under multi-process JAX.

Started as 2 processes x 2 simulated CPU devices (XLA_FLAGS=--xla_force_host_platform_device_count=2):

    python tests/loader_driver.py DATASET CONFIG.yaml OUT_DIR --coordinator 127.0.0.1:PORT \\
        --num_processes 2 --process_id I

1. builds the Trainer's host feed (`feeds.HostFeed`, the keys `fit` derives from the seed) on
   the global 4-device mesh and records, through its `on_read` hook, every block of windows
   this process reads (split, step, rows, window starts), and the tokens of the batch shards
   that land on its devices; written to OUT_DIR/reads_I.json;
2. trains CONFIG on DATASET with the Trainer into OUT_DIR/run (both processes, one run).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from dantinox_eqx.config import Config  # noqa: E402
from dantinox_eqx.data import feeds, tokens  # noqa: E402
from dantinox_eqx.parallel import distributed, sharding

STEPS = 3  # training batches recorded (then one evaluation's batches)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("dataset")
    ap.add_argument("config")
    ap.add_argument("out")
    ap.add_argument("--coordinator")
    ap.add_argument("--num_processes", type=int)
    ap.add_argument("--process_id", type=int)
    args = ap.parse_args()
    distributed.initialize(args.coordinator, args.num_processes, args.process_id)
    out, me = Path(args.out), jax.process_index()
    config = Config.from_yaml(args.config)
    mesh = sharding.make_mesh(0, batch_size=config.batch_size)
    splits = tokens.open_splits(args.dataset, config)
    _, data_key, _, eval_key = jax.random.split(jax.random.key(config.seed), 4)
    reads: list[dict] = []

    def on_read(which: str, step: int, rows: slice, starts: np.ndarray) -> None:
        reads.append({"split": which, "step": step, "rows": [rows.start, rows.stop], "starts": starts.tolist()})

    feed = feeds.HostFeed(splits, config, mesh, data_key, eval_key, on_read=on_read)
    placed = []

    def record(which: str, step: int, batch: jax.Array) -> None:
        for shard in batch.addressable_shards:
            rows = shard.index[1].indices(config.batch_size)[:2]
            placed.append({"split": which, "step": step, "rows": list(rows), "tokens": np.asarray(shard.data).tolist()})

    feed.start(0, STEPS)  # through the prefetch thread, as in training
    for s in range(STEPS):
        record("train", s, feed.train_arg(s))
    feed.close()
    for which, batch in zip(("eval_train", "eval_val"), feed.eval_args(STEPS)):
        record(which, STEPS, batch)
    (out / f"reads_{me}.json").write_text(json.dumps({"process": me, "reads": reads, "placed": placed}))

    from dantinox_eqx.train.trainer import Trainer

    Trainer(config, progress=False).fit(args.dataset, run_dir=out / "run")


if __name__ == "__main__":
    main()
