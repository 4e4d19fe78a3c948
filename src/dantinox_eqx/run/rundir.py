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
import sys
import time
from datetime import datetime
from pathlib import Path

from ..config import MODEL_SHAPE_FIELDS, Config, ConfigError
from ..parallel import distributed
from . import checkpoint as ckpt
from . import runlock
from .layout import CONFIG_FILE, TOKENIZER_FILE

__all__ = ["resolve_run_dir", "check_resumable", "is_empty_dir", "not_empty", "take_lock", "open_for_resume",
           "topmost_new_dir", "remove_created"]


def is_empty_dir(path: Path) -> bool:
    # run.lock alone: a new run stopped right after locking its directory, before writing anything
    return path.is_dir() and all(p.name == runlock.LOCK_FILE for p in path.iterdir())


def not_empty(path: Path) -> FileExistsError:
    return FileExistsError(f"run_dir: {str(path)!r} is not empty; pass --resume to continue that run, or "
                           "choose a new --run_dir")


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
        if not path.is_dir():  # what it holds is checked under its lock (`open_for_resume`)
            raise ckpt.CheckpointError(f"run_dir: no checkpoint to resume in {str(path)!r}: it does not "
                                       "exist; start a new run without --resume")
    elif path.exists() and not is_empty_dir(path):
        raise not_empty(path)
    return path


def take_lock(lock: runlock.RunLock | None, run_dir: Path) -> None:
    """Process 0 takes the run directory's lock (`lock`; None in other processes) without
    recording itself in run.lock yet (the run is not accepted until its inputs are checked:
    `RunLock.record`); every process raises if it could not (RunLockedError names the holder)."""
    failure = None
    if lock is not None:
        try:
            lock.acquire(record=False)
        except ConfigError as e:
            failure = e
    if distributed.any_process(failure is not None):
        raise failure or runlock.RunLockedError(f"run_dir: process 0 could not lock {str(run_dir)!r}; "
                                                "see its error message")


def open_for_resume(run_dir: Path, lock: runlock.RunLock | None) -> bool:
    """Lock the run directory, remove what an interrupted writer left in it (`checkpoint.clean`),
    and return whether it has no checkpoint yet: a run stopped during its start-up, which then
    starts again at step 0 (with its saved config.yaml, if it got that far)."""
    take_lock(lock, run_dir)
    if lock is not None:
        ckpt.clean(run_dir)
    distributed.barrier("run_dir_cleaned")
    if ckpt.steps(run_dir, ckpt.LATEST):
        for name in (CONFIG_FILE, TOKENIZER_FILE):  # written before any checkpoint
            if not (run_dir / name).is_file():
                raise ckpt.CheckpointError(f"run_dir: {str(run_dir / name)!r} is missing; cannot resume")
        return False
    if distributed.is_primary():
        how = "its saved config.yaml" if (run_dir / CONFIG_FILE).is_file() else "the given config"
        print(f"{run_dir} has no checkpoint yet (it was stopped during its start-up): starting it at "
              f"step 0 with {how}", file=sys.stderr, flush=True)
    return True


def check_resumable(saved: Config, config: Config, run_dir: Path) -> None:
    """Refuse a resume whose config cannot continue the saved state (ConfigError naming the
    field); everything else (max_steps, patience, lr, eval_interval, ...) may change."""
    why = {name: "a resumed run keeps the model's shape (start a new run_dir to change it)"
           for name in MODEL_SHAPE_FIELDS}
    # Simpler than safe-by-proof: a changed window changes every batch after the resume point
    # (and a learned position table's shape), so a resume keeps it; a new run with init_from may change it.
    why["max_context"] = ("a resumed run keeps its training window (fine-tune into a new run_dir with "
                          "init_from to change it)")
    why["optimizer"] = "its optimizer state cannot be resumed with another optimizer"
    why["grad_clip"] = "its optimizer state cannot be resumed with clipping switched on or off"
    if config.optimizer == "muon":  # the groups fix the optimizer state's arrays
        why["muon_params"] = "its optimizer state holds these parameter groups"
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
