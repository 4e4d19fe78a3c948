"""What the training loop costs on top of the pure step, at the baby shape, interleaved.

    PYTHONPATH=src python benchmarks/loop_overhead.py [--steps 150] [--rounds 2]

Each round times, in this one process and in turn:
- harness: benchmarks/run.py's pure step (`prepare_config` / `time_round`: the donated jitted
  step, one sync per step): its median and mean ms/step;
- fit: `Trainer(config).fit` on the default corpus for `steps` steps with one evaluation at
  the end, without and with the rich progress bar: the ms/step it logs (training_log.csv; the
  first step's compilation and the evaluation excluded, as always).
Results: benchmarks/results/loop_overhead_<machine>.json.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from dantinox_eqx.config import Config  # noqa: E402
from dantinox_eqx.data.corpus import default_corpus_path  # noqa: E402
from dantinox_eqx.files import atomic_write_text  # noqa: E402
from dantinox_eqx.train.trainer import Trainer  # noqa: E402
from run import BABY, prepare_config, time_round  # noqa: E402


def fit_ms(steps: int, bar: bool) -> float:
    cfg = Config(**{**BABY, "vocab_size": None, "max_steps": steps, "eval_interval": steps, "eval_iters": 1,
                    "warmup_steps": 10})  # vocab_size: the corpus tokenizer's (86 with its special tokens)
    with tempfile.TemporaryDirectory() as tmp:
        Trainer(cfg, progress=bar).fit(default_corpus_path(), Path(tmp) / "run")
        with open(Path(tmp) / "run" / cfg.log_file) as f:
            return float(list(csv.DictReader(f))[-1]["ms_per_step"])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--label", default="")
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args()
    entry = prepare_config("baby", Config(**BABY))
    res = {"harness_median": [], "harness_mean": [], "fit": [], "fit_bar": []}
    for _ in range(a.rounds):
        time_round(entry, a.steps)
        res["harness_median"].append(round(1e3 * statistics.median(entry["rounds"][-1]), 2))
        res["harness_mean"].append(round(1e3 * statistics.mean(entry["rounds"][-1]), 2))
        res["fit"].append(round(fit_ms(a.steps, False), 2))
        res["fit_bar"].append(round(fit_ms(a.steps, True), 2))
    out = {"what": "baby shape ms/step: harness pure step vs Trainer.fit's logged ms/step, interleaved rounds",
           "label": a.label, "steps": a.steps, **res,
           "fit_over_harness_mean": [round(f / h, 3) for f, h in zip(res["fit"], res["harness_mean"])]}
    path = a.out or ROOT / "benchmarks" / "results" / f"loop_overhead_cpu-{os.cpu_count()}core{a.label}.json"
    atomic_write_text(path, json.dumps(out, indent=1) + "\n")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
