"""Which run directory a `fit` writes, whether it may, and undoing a new one's creation.

- A new run gets `runs/run_YYYYMMDD_HHMMSS` (process 0's clock, so every process of a
  multi-process run picks the same name; `_1`, `_2`, ... when two start in the same second),
  or the given directory, which must be absent or empty.
- `--resume` needs a run directory holding a checkpoint, config.yaml and tokenizer.json, and a
  config that can continue its saved state (`check_resumable`).
"""

from __future__ import annotations

import os
import shutil
import time
from datetime import datetime
from pathlib import Path

from ..config import MODEL_SHAPE_FIELDS, Config, ConfigError
from ..parallel import distributed
from . import checkpoint as ckpt
from .layout import CONFIG_FILE, TOKENIZER_FILE

__all__ = ["resolve_run_dir", "check_resumable", "is_empty_dir", "topmost_new_dir", "remove_created"]


def is_empty_dir(path: Path) -> bool:
    return path.is_dir() and not any(path.iterdir())


def resolve_run_dir(run_dir: str | os.PathLike | None, resume: bool) -> Path:
    """The run directory to write (nothing is created here). Raises ConfigError,
    FileExistsError or CheckpointError naming `run_dir` when it cannot be used."""
    if run_dir is None:
        if resume:
            raise ConfigError("run_dir: --resume needs the run directory to continue (--run_dir PATH)")
        now = distributed.broadcast_int(int(time.time()))
        stamp = datetime.fromtimestamp(now).strftime("run_%Y%m%d_%H%M%S")
        path, n = Path("runs") / stamp, 1
        while path.exists():  # two runs started in the same second: never share a directory
            path, n = Path("runs") / f"{stamp}_{n}", n + 1
        return path
    path = Path(run_dir)
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"run_dir: {str(path)!r} exists and is not a directory")
    if resume:
        if ckpt.latest_step(path, ckpt.LATEST) is None:
            raise ckpt.CheckpointError(f"run_dir: no checkpoint to resume in {str(path)!r}; "
                                       "start a new run without --resume")
        for name in (CONFIG_FILE, TOKENIZER_FILE):
            if not (path / name).is_file():
                raise ckpt.CheckpointError(f"run_dir: {str(path / name)!r} is missing; cannot resume")
    elif path.exists() and not is_empty_dir(path):
        raise FileExistsError(f"run_dir: {str(path)!r} is not empty; pass --resume to continue "
                              "that run, or choose a new --run_dir")
    return path


def check_resumable(saved: Config, config: Config, run_dir: Path) -> None:
    """Refuse a resume whose config cannot continue the saved state (ConfigError naming the
    field); everything else (max_steps, patience, lr, eval_interval, ...) may change."""
    why = {name: "a resumed run keeps the model's shape (start a new run_dir to change it)"
           for name in MODEL_SHAPE_FIELDS}
    why["optimizer"] = "its optimizer state cannot be resumed with another optimizer"
    why["grad_clip"] = "its optimizer state cannot be resumed with clipping switched on or off"
    why["seed"] = "a resumed run keeps its seed (its batches and dropout derive from it)"
    for name in ("use_lora", "lora_targets", "lora_rank"):
        why[name] = "a resumed run keeps its adapters (start a new run_dir to change them)"
    for name, reason in why.items():
        old, new = getattr(saved, name), getattr(config, name)
        if name == "grad_clip":
            old, new = old > 0, new > 0  # only on/off changes the state's structure
        if old != new:
            raise ConfigError(f"{name}: the run in {str(run_dir)!r} was trained with {name}="
                              f"{getattr(saved, name)!r}, this config has {getattr(config, name)!r}; "
                              f"{reason}")


def topmost_new_dir(run_dir: Path) -> Path:
    """The topmost directory that creating `run_dir` (with parents) would make."""
    created = run_dir
    while not created.parent.exists():
        created = created.parent
    return created


def remove_created(run_dir: Path, created: Path, existed: bool) -> None:
    """Undo a new run directory's creation: remove `created` (the topmost directory made for
    it) or, when `run_dir` already existed (empty, as a new run requires), its contents."""
    if not existed:
        shutil.rmtree(created, ignore_errors=True)
        return
    for child in run_dir.iterdir():
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child, ignore_errors=True)
        else:
            child.unlink(missing_ok=True)
