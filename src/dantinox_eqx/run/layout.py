"""The run directory's layout: every file name, the training log and the cursor. One place.

    RUN_DIR/
      config.yaml              the resolved config (Config.from_yaml loads it)
      tokenizer.json           the tokenizer (Hugging Face `tokenizers` format)
      checkpoints/latest/<s>/  params + train_state (run/checkpoint.py)
      checkpoints/best/<s>/    params with the lowest val_loss so far
      training_log.csv         one row per evaluation (LOG_COLUMNS; name: config.log_file)
      training_cursor.json     where training stands, for people and scripts (not read to resume)
      model_summary.json       parameters, memory, FLOPs (name: config.summary_file; run/summary.py)
      lora_base.json           adapter-only LoRA runs: the base run they need (run/finetune.py)
      chat_template.jinja      the chat template (Jinja, transformers' semantics; run/chat_template.py)
      expert_counts.csv        MoE runs: tokens routed to each expert per evaluation
      loss_curve.png           `dantinox-eqx plot`
"""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path
from typing import Any

from ..files import atomic_write_text

__all__ = ["CONFIG_FILE", "TOKENIZER_FILE", "CURSOR_FILE", "LORA_BASE_FILE", "EXPERT_COUNTS_FILE",
           "LOSS_CURVE_FILE", "CHAT_TEMPLATE_FILE", "CHECKPOINTS_DIR", "DEFAULT_LOG_FILE", "LOG_COLUMNS", "read_log",
           "write_log", "read_cursor", "write_cursor"]

CONFIG_FILE = "config.yaml"
TOKENIZER_FILE = "tokenizer.json"
CURSOR_FILE = "training_cursor.json"
LORA_BASE_FILE = "lora_base.json"
EXPERT_COUNTS_FILE = "expert_counts.csv"
LOSS_CURVE_FILE = "loss_curve.png"
CHAT_TEMPLATE_FILE = "chat_template.jinja"  # the name transformers saves a template under, too
CHECKPOINTS_DIR = "checkpoints"
DEFAULT_LOG_FILE = "training_log.csv"  # config.log_file's default

LOG_COLUMNS = ("step", "train_loss", "val_loss", "train_bal", "val_bal", "lr", "ms_per_step",
               "tokens_per_s", "train_bpb", "val_bpb")  # bpb: bits per UTF-8 byte of text


def read_log(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The rows of a training_log.csv as dicts of floats (`step` as an int)."""
    with open(path, newline="", encoding="utf-8") as f:
        return [{k: (int(v) if k == "step" else float(v)) for k, v in row.items() if v not in ("", None)}
                for row in csv.DictReader(f)]  # empty cells: columns added after the row was written


def write_log(path: str | os.PathLike, rows: list[dict[str, Any]]) -> None:
    """Write every row (floats as `repr`, so a reader gets the exact values back).

    The whole file is rewritten through a temporary file and a rename at each evaluation:
    readers never see a torn row, and resume can drop rows past its checkpoint. A log holds one
    row per evaluation (thousands at most), so rewriting it costs nothing measurable.
    """
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=LOG_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: repr(row[k]) if isinstance(row.get(k), float) else row.get(k, "") for k in LOG_COLUMNS})
    atomic_write_text(path, buf.getvalue())


def read_cursor(run_dir: str | os.PathLike) -> dict[str, Any]:
    """training_cursor.json as a dict; {} when it is missing or unreadable."""
    try:
        return json.loads((Path(run_dir) / CURSOR_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def write_cursor(run_dir: str | os.PathLike, cursor: dict[str, Any]) -> None:
    atomic_write_text(Path(run_dir) / CURSOR_FILE, json.dumps(cursor, indent=2) + "\n")
