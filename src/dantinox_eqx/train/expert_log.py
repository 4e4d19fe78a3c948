"""Per-expert token counts of an MoE run, written at each evaluation to `expert_counts.csv`.

    counts = make_counts_fn(static)(params, batches)    # (num_blocks, n_experts) int32, traceable
    log = ExpertCountsLog(run_dir / EXPERT_COUNTS_FILE, keep_upto=step)
    log.record(step, counts)                             # one row per evaluation, atomic rewrite

The counts are taken on the evaluation's validation batches (the same `eval_iters` windows
that give `val_loss`): the tokens each block's router sends to each expert (top-k assignments
before any capacity dropping, `moe.expert_counts`), summed over the batches. Every block's
counts sum to eval_iters * batch_size * max_context * top_k_mlp. They are computed inside the
jitted evaluation and fetched with its losses, so the training loop gains no host sync.

File layout (one row per evaluation, like training_log.csv; its columns are unchanged):

    step,block0_expert0,block0_expert1,...,block{L-1}_expert{E-1}

On resume, rows after the resumed checkpoint's step are dropped (they are written again).
"""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Int, PyTree

from ..files import atomic_write_text
from ..model import expert_counts
from ..run.layout import EXPERT_COUNTS_FILE

__all__ = ["EXPERT_COUNTS_FILE", "make_counts_fn", "ExpertCountsLog", "read_expert_counts", "columns"]



def make_counts_fn(static: PyTree) -> Callable[[PyTree, Array], Array]:
    """`counts(params, batches (n, batch, seq + 1)) -> (num_blocks, n_experts)` int32: tokens
    routed to each expert over the inputs (`[..., :-1]`) of all n batches. Not jitted: call it
    inside a jitted function (the Trainer's evaluation)."""

    def counts(params: PyTree, batches: Int[Array, "n batch window"]) -> Int[Array, "L E"]:
        model = eqx.combine(params, static)

        def one(total, batch):
            return total + expert_counts(model, batch[:, :-1]), None

        L, E = model.num_blocks, model.blocks.mlp.n_experts
        total, _ = jax.lax.scan(one, jnp.zeros((L, E), jnp.int32), batches)
        return total

    return counts


def columns(num_blocks: int, n_experts: int) -> list[str]:
    """The CSV header: "step", then block{l}_expert{e} in (block, expert) order."""
    return ["step"] + [f"block{b}_expert{e}" for b in range(num_blocks) for e in range(n_experts)]


def read_expert_counts(path: str | os.PathLike) -> list[tuple[int, np.ndarray]]:
    """The rows of an expert_counts.csv as (step, counts (num_blocks, n_experts) int64)."""
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        header = next(reader)
        last = header[-1]  # block{L-1}_expert{E-1}
        L, E = (int(x) + 1 for x in last.removeprefix("block").split("_expert"))
        return [(int(r[0]), np.array([int(v) for v in r[1:]], np.int64).reshape(L, E)) for r in reader]


class ExpertCountsLog:
    """The expert_counts.csv of one run: keeps the rows in memory and rewrites the file
    atomically at each `record` (as the Trainer does for training_log.csv)."""

    def __init__(self, path: str | os.PathLike, keep_upto: int = 0):
        """Start a log at `path`; rows of an existing file with step <= keep_upto are kept."""
        self.path = Path(path)
        self.rows: list[tuple[int, np.ndarray]] = []
        if keep_upto > 0 and self.path.is_file():
            self.rows = [(s, c) for s, c in read_expert_counts(self.path) if s <= keep_upto]

    def record(self, step: int, counts: Any) -> None:
        """Append the row of `step` ((num_blocks, n_experts) counts, fetched) and rewrite the file."""
        counts = np.asarray(counts)
        self.rows.append((int(step), counts))
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(columns(*counts.shape))
        for s, c in self.rows:
            writer.writerow([s, *(int(v) for v in np.asarray(c).ravel())])
        atomic_write_text(self.path, buf.getvalue())
