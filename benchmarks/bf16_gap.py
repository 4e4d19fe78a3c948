"""Val-loss gap of bfloat16 training to float32 on the baby run, with and without f32 masters.

    python benchmarks/bf16_gap.py [--steps 2000] [--out benchmarks/results/bf16_gap.json]

Trains the packaged default config (nanoGPT's baby shape) three times through the Trainer:
float32; use_bf16 (the seed's pure bfloat16 params and first moments); use_bf16 with
master_weights (float32 params and update, bfloat16 forward/backward). Each run's final
checkpoint is scored over the WHOLE validation split (no sampling noise, float32 scoring).
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from dantinox_eqx.config import Config
from dantinox_eqx.data.corpus import default_corpus_path
from dantinox_eqx.data.sampling import prepare_data
from dantinox_eqx.data.tokenizer import load_tokenizer
from dantinox_eqx.model import Transformer
from dantinox_eqx.run import checkpoint as ckpt
from dantinox_eqx.train.step import make_eval_step
from dantinox_eqx.train.trainer import Trainer, default_config_path

ROOT = Path(__file__).resolve().parents[1]


def full_val_loss(run: Path, corpus: Path) -> float:
    config = Config.from_yaml(run / "config.yaml")
    data = prepare_data(corpus, tokenizer_type=config.tokenizer_type, max_context=config.max_context,
                        val_fraction=config.val_fraction, tokenizer=load_tokenizer(run / "tokenizer.json"))
    params, static = eqx.partition(Transformer(config, key=jax.random.key(0)), eqx.is_array)
    _, params, _ = ckpt.restore(run, ckpt.LATEST, params)  # restored into float32
    W = config.max_context + 1
    n = (len(data.val) // W) // 64 * 64
    batches = jnp.asarray(np.asarray(data.val[: n * W], np.int32).reshape(-1, 64, W))
    return float(make_eval_step(static)(params, batches)["loss"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--data_path", type=Path, default=None, help="a text file (default: the default corpus)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "bf16_gap.json")
    args = ap.parse_args()
    base = Config.from_yaml(default_config_path()).replace(max_steps=args.steps, eval_iters=20)
    variants = {"float32": {}, "bf16 (pure, seed)": {"use_bf16": True},
                "bf16 + f32 master weights": {"use_bf16": True, "master_weights": True}}
    out = {"steps": args.steps, "jax": jax.__version__, "results": {}}
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "corpus.txt"  # a copy: the token cache is written beside it
        shutil.copy(args.data_path or default_corpus_path(), corpus)
        for i, (name, kw) in enumerate(variants.items()):
            run = Path(tmp) / f"run{i}"
            t = time.perf_counter()
            Trainer(base.replace(**kw), progress=False).fit(corpus, run_dir=run)
            wall = time.perf_counter() - t
            out["results"][name] = {"val_loss_full": round(full_val_loss(run, corpus), 4), "wall_s": round(wall, 1)}
            print(name, out["results"][name], flush=True)
    f32 = out["results"]["float32"]["val_loss_full"]
    for r in out["results"].values():
        r["gap_to_float32"] = round(r["val_loss_full"] - f32, 4)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
