"""Weights & Biases logging of a training run, and a reader for offline run files.

    logger = WandbLogger("my-project", config, run_dir)
    logger.start(config, model_summary)   # wandb.init; the config and summary go to the run
    logger(row)                           # every eval row: {"step": 100, "val_loss": ..., ...}
    logger.finish()

`wandb: true` or `wandb_project: P` in the Config turns it on (`make_wandb_logger`). It works
with `WANDB_MODE=offline` (no network, no account): wandb then writes
`run_dir/wandb/offline-run-*/run-<id>.wandb`, which `wandb sync` uploads later. wandb 0.31 can
not read an offline run back through its API, so every logged row is also kept in a file of
ours, `run_dir/wandb_metrics.jsonl` (one JSON object per row, rewritten atomically), and
`read_wandb_file` decodes the records of a `.wandb` file (history, config, summary).

Inside a W&B sweep agent a run is already active: the logger then logs into that run (the sweep
needs the metric there) and leaves finishing it to its owner.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Any

from ..config import Config, ConfigError
from ..files import atomic_write_text

__all__ = ["WandbLogger", "WandbError", "make_wandb_logger", "read_wandb_file", "read_metrics_file",
           "DEFAULT_PROJECT", "METRICS_FILE"]

DEFAULT_PROJECT = "dantinox-eqx"
METRICS_FILE = "wandb_metrics.jsonl"
RUN_ID_FILE = "wandb_run.json"


class WandbError(ConfigError):
    """wandb could not start a run (not logged in, no network): the message says how to fix it."""


def _plain(value: Any) -> Any:
    """Numbers (numpy / JAX scalars included) as Python floats or ints; other values unchanged."""
    if isinstance(value, bool | int | str) or value is None:
        return value
    try:
        return float(value)
    except (TypeError, ValueError):
        return value


class WandbLogger:
    """Logs eval rows, the config and the model summary of one run to W&B (see module doc).

    - project: the W&B project; entity, name, group, tags, mode: passed to `wandb.init` (mode
      None lets WANDB_MODE decide; "offline" writes only local files).
    - run_dir: where wandb writes its files (`run_dir/wandb/`) and we write `wandb_metrics.jsonl`.
      A logger restarted on the same run_dir (a resumed run) continues the same W&B run id.
    The logger is a callable: `logger(row)` is `logger.log(row)`.
    """

    def __init__(self, project: str = DEFAULT_PROJECT, config: Config | None = None,
                 run_dir: str | os.PathLike = ".", *, entity: str | None = None, name: str | None = None,
                 group: str | None = None, tags: list[str] | None = None, mode: str | None = None):
        self.project, self.config, self.run_dir = project, config, Path(run_dir)
        self.entity, self.name, self.group, self.tags, self.mode = entity, name, group, tags, mode
        self.run: Any = None
        self.owns_run = False
        self.rows: list[dict[str, Any]] = read_metrics_file(self.run_dir / METRICS_FILE)

    # --------------------------------------------------------------------------------------
    def start(self, config: Config | None = None, summary: dict[str, Any] | None = None) -> None:
        """Start (or join, inside a sweep agent) the W&B run and record `config` and `summary`."""
        import wandb

        config = config if config is not None else self.config
        config_dict = config.to_dict() if config is not None else {}
        if wandb.run is not None:  # a sweep agent's run: log into it, its owner finishes it
            self.run, self.owns_run = wandb.run, False
            self.run.config.update({k: v for k, v in config_dict.items() if k not in self.run.config},
                                   allow_val_change=True)
        else:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            run_id = self._saved_run_id()
            try:
                self.run = wandb.init(project=self.project, entity=self.entity, dir=str(self.run_dir),
                                      name=self.name or self.run_dir.resolve().name, group=self.group,
                                      tags=self.tags, mode=self.mode, config=config_dict, id=run_id,
                                      resume="allow" if run_id else None,
                                      settings=wandb.Settings(silent=True, console="off"))
            except Exception as e:  # wandb raises many types (UsageError, CommError, ...)
                raise WandbError(
                    f"wandb: could not start a W&B run ({str(e).splitlines()[0] if str(e) else type(e).__name__}); "
                    "run `wandb login`, set WANDB_MODE=offline, or set wandb: false"
                ) from None
            self.owns_run = True
            atomic_write_text(self.run_dir / RUN_ID_FILE, json.dumps({"id": self.run.id, "project": self.project}))
        if summary:
            self.run.config.update({"model_summary": summary}, allow_val_change=True)
            self.run.summary.update({f"model/{k}": _plain(v) for k, v in summary.items()
                                     if isinstance(_plain(v), int | float)})

    def log(self, row: dict[str, Any]) -> None:
        """Log one eval row (its "step" is the W&B step) to W&B and to `wandb_metrics.jsonl`."""
        row = {k: _plain(v) for k, v in row.items()}
        step = row.get("step")
        if self.run is not None:
            values = {k: v for k, v in row.items() if k != "step"}
            self.run.log(values, step=int(step) if step is not None else None)
        self.rows.append(row)
        atomic_write_text(self.run_dir / METRICS_FILE, "".join(json.dumps(r) + "\n" for r in self.rows))

    __call__ = log

    def finish(self) -> None:
        """Finish the run if this logger started it (a sweep agent finishes its own).

        Then shut wandb's service down: in offline mode `run.finish()` can return before the
        service has written the run file, and the teardown waits for it (measured on 0.31).
        """
        if self.run is not None and self.owns_run:
            import wandb

            self.run.finish()
            wandb.teardown()
        self.run = None

    def _saved_run_id(self) -> str | None:
        path = self.run_dir / RUN_ID_FILE
        if not path.is_file():
            return None
        try:
            saved = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        return saved.get("id") if saved.get("project") == self.project else None


def make_wandb_logger(config: Config, run_dir: str | os.PathLike) -> WandbLogger | None:
    """The run's W&B logger when `config.wandb` or `config.wandb_project` is set, else None."""
    if not (config.wandb or config.wandb_project):
        return None
    return WandbLogger(config.wandb_project or DEFAULT_PROJECT, config, run_dir)


def read_metrics_file(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The rows of a `wandb_metrics.jsonl` (empty when the file does not exist)."""
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


# ------------------------------------------------------------------------------------------
# The .wandb file is a LevelDB-style log: a 7-byte header (":W&B", magic 0xBEE1, version 0),
# then 32 KiB blocks of chunks, each `crc32 (4) | length (2) | type (1) | data`; a record is
# one FULL chunk or FIRST, MIDDLE..., LAST. Each record is a protobuf `wandb_internal.Record`.
_HEADER, _BLOCK, _CHUNK = 7, 32768, 7
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def _records(data: bytes) -> list[bytes]:
    if data[:4] != b":W&B":
        raise ValueError("not a .wandb file (bad header)")
    out, pending, pos = [], b"", _HEADER
    while pos + _CHUNK <= len(data):
        left = _BLOCK - pos % _BLOCK
        if left < _CHUNK:  # block trailer: padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + _CHUNK])
        pos += _CHUNK
        chunk = data[pos:pos + length]
        pos += length
        if kind == _FULL:
            out.append(chunk)
        elif kind == _FIRST:
            pending = chunk
        elif kind == _MIDDLE:
            pending += chunk
        elif kind == _LAST:
            out.append(pending + chunk)
        elif kind == 0 and length == 0:  # zero padding to the end of a block
            pos += _BLOCK - pos % _BLOCK if pos % _BLOCK else 0
    return out


def _items(updates: Any) -> dict[str, Any]:
    out = {}
    for item in updates:
        key = item.key or "/".join(item.nested_key)
        try:
            out[key] = json.loads(item.value_json)
        except ValueError:
            out[key] = item.value_json
    return out


def read_wandb_file(path: str | os.PathLike) -> dict[str, Any]:
    """Decode an offline run's `run-<id>.wandb`: {"history": [row, ...] (each with "_step"),
    "config": {...}, "summary": {...} (the last value of each key)}."""
    from wandb.proto import wandb_internal_pb2 as pb

    history: list[dict[str, Any]] = []
    config: dict[str, Any] = {}
    summary: dict[str, Any] = {}
    for raw in _records(Path(path).read_bytes()):
        record = pb.Record()
        record.ParseFromString(raw)
        kind = record.WhichOneof("record_type")
        if kind == "history":
            history.append(_items(record.history.item))
        elif kind == "run":
            config.update({k: v.get("value", v) if isinstance(v, dict) else v
                           for k, v in _items(record.run.config.update).items()})
        elif kind == "config":
            config.update({k: v.get("value", v) if isinstance(v, dict) else v
                           for k, v in _items(record.config.update).items()})
        elif kind == "summary":
            summary.update(_items(record.summary.update))
    return {"history": history, "config": config, "summary": summary}
