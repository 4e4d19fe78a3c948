"""`Trainer(config).fit(data_path)`: train a model into a self-describing run directory.

    run_dir = Trainer(config).fit("corpus.txt")                      # runs/run_YYYYMMDD_HHMMSS/
    Trainer(config).fit("corpus.txt", run_dir=run_dir, resume=True)  # continue it exactly

Everything random is a pure function of `config.seed` and the step number s (the number of
optimizer updates done before it):

    root = key(seed);  init, data, dropout, eval = split(root, 4)
    batch of update s    = sample_batch(train, fold_in(data, s), batch_size, max_context, grad_accum)
    dropout of update s  = fold_in(dropout, s)
    eval after s updates = eval_iters batches of each split from fold_in(eval, s)

so the "data position" is the step, and a resumed run (params, optimizer state, step, key and
early-stopping counters restored from the latest checkpoint) writes the same log rows as an
uninterrupted one. The loop never waits on the device between evaluations: metrics are
fetched only when a row is logged.

Order of writes at an evaluation (each one atomic), chosen so that a kill at any point leaves
a resumable directory: the log row, the best checkpoint (if val improved), the latest
checkpoint, then training_cursor.json. The latest checkpoint holds the early-stopping state
too, so resume never depends on the cursor being current; rows logged after the checkpoint
that is resumed from are dropped and written again.

Devices: the step runs on a mesh of `n_devices` devices (`sharding.py`): the batch is split
over them and the parameters and optimizer state are replicated (`sharding: dp`) or sharded
(`sharding: fsdp`). Under multi-process JAX (`distributed.initialize`, before the Trainer is
built) every process runs `fit` with the same arguments: only process 0 writes the run
directory's files, prints and calls the loggers (W&B included); checkpoints are saved and
restored collectively by every process. A checkpoint resumes on any device count.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from . import checkpoint as ckpt
from . import distributed, finetune, sharding
from . import tokenizer as tk
from .config import MODEL_SHAPE_FIELDS, Config, ConfigError, atomic_write_text
from .data import DataError, Dataset, prepare_data, sample_batch
from .expert_log import EXPERT_COUNTS_FILE, ExpertCountsLog, make_counts_fn
from .hostmem import keep_freed_memory
from .lora import has_lora, lora_summary, lora_trainable
from .model import Transformer, cast_floating
from .muon import param_groups
from .optim import make_optimizer, make_schedule
from .step import init_opt_state, make_eval_step, make_train_step
from .summary import model_summary
from .wandb_logger import make_wandb_logger

__all__ = ["Trainer", "TrainingInterrupted", "TrainingDiverged", "LOG_COLUMNS", "CURSOR_FILE",
           "read_log", "default_config_path"]

LOG_COLUMNS = ("step", "train_loss", "val_loss", "train_bal", "val_bal", "lr", "ms_per_step",
               "tokens_per_s")
CURSOR_FILE = "training_cursor.json"
CONFIG_FILE = "config.yaml"
TOKENIZER_FILE = "tokenizer.json"


class TrainingInterrupted(Exception):
    """SIGINT/SIGTERM stopped training after saving the latest checkpoint at `step`."""

    def __init__(self, signum: int, step: int, run_dir: Path):
        self.signum, self.step, self.run_dir = signum, step, run_dir
        name = signal.Signals(signum).name
        super().__init__(f"training interrupted by {name} at step {step}; checkpoint saved in {run_dir}")

    @property
    def exit_code(self) -> int:
        return 128 + self.signum  # the shell convention: 130 for SIGINT, 143 for SIGTERM


class TrainingDiverged(RuntimeError):
    """The loss (or the parameters) became NaN/inf; nothing was saved after the last good step."""


def default_config_path() -> Path:
    """The packaged default config (`configs/default_config.yaml` in the repository links to it)."""
    from importlib.resources import files

    return Path(str(files("dantinox_eqx") / "configs" / "default_config.yaml"))


def read_log(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The rows of a training_log.csv as dicts of floats (`step` as an int)."""
    with open(path, newline="", encoding="utf-8") as f:
        return [{k: (int(v) if k == "step" else float(v)) for k, v in row.items()}
                for row in csv.DictReader(f)]


def _write_log(path: Path, rows: list[dict[str, Any]]) -> None:
    # The whole file is rewritten through a temporary file and a rename at each evaluation:
    # readers never see a torn row, and resume can drop rows past its checkpoint. A log holds
    # one row per evaluation (thousands at most), so rewriting it costs nothing measurable.
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=LOG_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: repr(row[k]) if isinstance(row[k], float) else row[k] for k in LOG_COLUMNS})
    atomic_write_text(path, buf.getvalue())


def _is_empty_dir(path: Path) -> bool:
    return path.is_dir() and not any(path.iterdir())


@eqx.filter_jit
def _all_finite(tree: Any) -> Any:
    leaves = [jnp.isfinite(x).all() for x in jax.tree.leaves(eqx.filter(tree, eqx.is_inexact_array))]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.asarray(True)


class _StopFlag:
    """SIGINT/SIGTERM handlers that only record the signal (the loop checks it between steps).
    A second signal while stopping raises KeyboardInterrupt for an immediate exit."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def _handler(self, signum: int, frame: Any) -> None:
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum

    def __enter__(self) -> _StopFlag:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handler)
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class _Progress:
    """A rich progress bar on a terminal; one printed line per evaluation otherwise; nothing
    at all when `quiet` (the non-primary processes of a multi-process run)."""

    def __init__(self, total: int, start: int, enabled: bool | None = None, quiet: bool = False):
        self.tty = (sys.stdout.isatty() if enabled is None else enabled) and not quiet
        self.quiet = quiet
        self.bar = None
        if self.tty:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
                                TextColumn("loss {task.fields[loss]}  lr {task.fields[lr]}  "
                                           "{task.fields[tps]} tok/s"),
                                TimeRemainingColumn())
            self.task = self.bar.add_task("train", total=total, completed=start, loss="-", lr="-", tps="-")
            self.bar.start()

    def advance(self) -> None:
        if self.bar is not None:
            self.bar.advance(self.task)

    def row(self, row: dict[str, Any], total: int) -> None:
        if self.quiet:
            return
        line = (f"step {row['step']}/{total} | train {row['train_loss']:.4f} | val {row['val_loss']:.4f}"
                f" | lr {row['lr']:.2e} | {row['ms_per_step']:.1f} ms/step | {row['tokens_per_s']:.0f} tok/s")
        if self.bar is not None:
            self.bar.update(self.task, loss=f"{row['train_loss']:.4f}", lr=f"{row['lr']:.2e}",
                            tps=f"{row['tokens_per_s']:.0f}")
            self.bar.console.print(line, highlight=False)
        else:
            print(line, flush=True)

    def message(self, text: str) -> None:
        if self.quiet:
            return
        if self.bar is not None:
            self.bar.console.print(text, highlight=False)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


Logger = Callable[[dict[str, Any]], Any]


class Trainer:
    """Trains `config` (optionally starting from `model`'s weights) into a run directory.

    `loggers`: callables called with each evaluation row (a dict of LOG_COLUMNS). A logger may
    also have `start(config, summary)` (called once the run directory exists, before its files
    are written; the trainer's `run_dir` attribute is set by then) and `finish()` (called when
    fit ends, however it ends). `config.wandb` / `config.wandb_project` add a W&B logger
    (`wandb_logger.py`). Loggers run in the primary process only.
    """

    def __init__(self, config: Config, model: Transformer | None = None,
                 loggers: list[Logger] | None = None, progress: bool | None = None):
        self.config = config
        self.model = model
        self.loggers: list[Logger] = list(loggers or [])
        self.progress = progress  # None: a bar when stdout is a terminal
        self.run_dir: Path | None = None
        self._base: dict[str, Any] | None = None  # lora_base.json of an adapter-only LoRA run

    # ---------------------------------------------------------------- seams for other features
    def _build_model(self, config: Config, key: Any) -> Transformer:
        """The model to train: `self.model` if given, else the best weights of the run
        `config.init_from` (fine-tuning), else a fresh `Transformer(config)`; with `use_lora`,
        LoRA adapters are added to it. A LoRA run with a base run (init_from) saves only its
        adapters plus a pointer to the base (`finetune.py`)."""
        self._base = None
        if self.model is not None:
            if self.model.vocab_size != config.vocab_size:
                raise ConfigError(f"vocab_size: the given model has vocab_size={self.model.vocab_size}, "
                                  f"the tokenizer needs {config.vocab_size}")
            model = self.model
            if has_lora(model) and not config.use_lora:
                raise ConfigError("use_lora: the given model has LoRA adapters but use_lora is false; pass "
                                  "lora.merge_lora(model) to train all its weights")
            if config.use_lora and config.init_from:
                self._base = finetune.pointer_of(model, config.init_from, config)
        elif config.init_from:
            model, pointer = finetune.load_base(config.init_from, config)
            self._base = pointer if config.use_lora else None
        elif config.use_lora:
            raise ConfigError("use_lora: LoRA fine-tunes a trained model: set init_from to its run directory "
                              "(CLI: --init_from RUN_DIR), or pass model= to Trainer")
        else:
            model = Transformer.build(config, key=key)  # issue 16: one compiled program
        return finetune.add_adapters(model, config, jax.random.fold_in(key, 1)) if config.use_lora else model

    def _trainable(self, model: Transformer) -> Any:
        """A bool pytree like the params marking what trains; None = everything. A model with
        LoRA adapters trains only its adapters."""
        return lora_trainable(model) if has_lora(model) else None

    def _restore(self, run_dir: Path, params: Any, state: dict, trainable: Any) -> tuple[int, Any, dict]:
        """Resume from the latest checkpoint. An adapter-only LoRA run restores its adapters
        into `params` (whose frozen part is the base, reloaded) after checking that the base
        is still the one it was trained on."""
        saved = Config.from_yaml(run_dir / CONFIG_FILE)
        for name in ("use_lora", "lora_targets", "lora_rank"):  # they fix the adapters' arrays
            if getattr(saved, name) != getattr(self.config, name):
                raise ConfigError(f"{name}: the run in {str(run_dir)!r} was trained with {name}="
                                  f"{getattr(saved, name)!r}, this config has {getattr(self.config, name)!r}; "
                                  "a resumed run keeps its adapters (start a new run_dir to change them)")
        if self._base is None:
            return ckpt.restore(run_dir, ckpt.LATEST, params, state)
        pointer = finetune.read_pointer(run_dir)
        if pointer is None or pointer["params_sha256"] != self._base["params_sha256"]:
            raise ckpt.CheckpointError(
                f"init_from: the base run {self._base['base_run']!r} is not the one the LoRA run in "
                f"{str(run_dir)!r} was trained on ({finetune.BASE_FILE} differs: base checkpoint step "
                f"{None if pointer is None else pointer.get('step')} then, {self._base['step']} now); "
                "the adapter cannot be resumed on other base weights")
        adapter, frozen = eqx.partition(params, trainable)
        step, adapter, state = ckpt.restore(run_dir, ckpt.LATEST, adapter, state)
        return step, eqx.combine(adapter, frozen), state

    def _mesh(self, config: Config) -> Any:
        """The device mesh; ConfigError naming n_devices or batch_size when it cannot be built."""
        return sharding.make_mesh(config.n_devices, batch_size=config.batch_size)

    def _place(self, mesh: Any, params: Any, opt_state: Any) -> tuple[Any, Any, Any]:
        """All device placement: returns (params, opt_state, batch_sharding). Params and
        optimizer state replicated (`sharding: dp`) or sharded (`fsdp`); batches
        (accum, batch, seq+1) split on axis 1."""
        params, opt_state = sharding.place(params, opt_state, mesh, self.config.sharding)
        return params, opt_state, sharding.batch_sharding(mesh, 1)

    # ---------------------------------------------------------------- run directory
    def _resolve_run_dir(self, run_dir: str | os.PathLike | None, resume: bool) -> Path:
        if run_dir is None:
            if resume:
                raise ConfigError("run_dir: --resume needs the run directory to continue (--run_dir PATH)")
            # Process 0's clock: every process of a multi-process run must pick the same name.
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
        elif path.exists() and not _is_empty_dir(path):
            raise FileExistsError(f"run_dir: {str(path)!r} is not empty; pass --resume to continue "
                                  "that run, or choose a new --run_dir")
        return path

    @staticmethod
    def _check_resumable(saved: Config, config: Config, run_dir: Path) -> None:
        """Refuse a resume whose config cannot continue the saved state (ConfigError naming the
        field); everything else (max_steps, patience, lr, eval_interval, ...) may change."""
        why = {name: "a resumed run keeps the model's shape (start a new run_dir to change it)"
               for name in MODEL_SHAPE_FIELDS}
        why["optimizer"] = "its optimizer state cannot be resumed with another optimizer"
        why["grad_clip"] = "its optimizer state cannot be resumed with clipping switched on or off"
        if config.optimizer == "muon":  # issue 16: the groups fix the optimizer state's arrays
            why["muon_params"] = "its optimizer state holds these parameter groups"
        why["seed"] = "a resumed run keeps its seed (its batches and dropout derive from it)"
        for name, reason in why.items():
            old, new = getattr(saved, name), getattr(config, name)
            if name == "grad_clip":
                old, new = old > 0, new > 0  # only on/off changes the state's structure
            if old != new:
                raise ConfigError(f"{name}: the run in {str(run_dir)!r} was trained with {name}="
                                  f"{getattr(saved, name)!r}, this config has {getattr(config, name)!r}; "
                                  f"{reason}")

    def _data(self, config: Config, data_path: str | os.PathLike | None, run_dir: Path | None,
              resume: bool) -> tuple[Path, Dataset]:
        from .corpus import cache_dir, default_corpus_path

        if data_path is None and resume:
            recorded = self._read_cursor(run_dir).get("data_path")
            if recorded and Path(recorded).is_file():
                data_path = recorded
        path = Path(data_path) if data_path is not None else default_corpus_path()
        if resume:
            tokenizer = tk.load_tokenizer(run_dir / TOKENIZER_FILE)
        elif config.tokenizer_path:
            tokenizer = tk.load_tokenizer(config.tokenizer_path)
        elif config.init_from:  # a fine-tune keeps its base's tokenizer (never retrained)
            base_tokenizer = finetune.base_dir(config.init_from) / TOKENIZER_FILE
            if not base_tokenizer.is_file():
                raise ConfigError(f"init_from: {str(config.init_from)!r} has no {TOKENIZER_FILE}; pass the "
                                  "directory of a finished `dantinox-eqx train` run")
            tokenizer = tk.load_tokenizer(base_tokenizer)
        elif config.use_lora:
            raise ConfigError("use_lora: a LoRA fine-tune keeps its base model's tokenizer: set init_from to the "
                              "base run directory (CLI: --init_from RUN_DIR), or with model= set tokenizer_path "
                              "to the model's tokenizer.json")
        else:
            tokenizer = None
        try:
            dataset = prepare_data(path, tokenizer_type=config.tokenizer_type, max_context=config.max_context,
                                   val_fraction=config.val_fraction, max_train_tokens=config.max_train_tokens,
                                   bpe_vocab_size=config.bpe_vocab_size, tokenizer=tokenizer,
                                   cache_dir=cache_dir())
        except DataError as e:
            if tokenizer is None or "outside the char vocabulary" not in str(e):
                raise
            source = ("the run" if resume else "tokenizer_path" if config.tokenizer_path
                      else f"the base run {str(config.init_from)!r}")
            raise DataError(f"{e}; the tokenizer comes from {source} and a char vocabulary cannot grow: "
                            "remove those characters from the corpus") from None
        return path, dataset

    @staticmethod
    def _read_cursor(run_dir: Path) -> dict[str, Any]:
        try:
            return json.loads((run_dir / CURSOR_FILE).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}

    @staticmethod
    def _resolve_vocab(config: Config, vocab: int) -> Config:
        if config.vocab_size is None:
            return config.replace(vocab_size=vocab)
        if config.vocab_size < vocab:
            raise ConfigError(f"vocab_size: {config.vocab_size} is smaller than the tokenizer's {vocab} "
                              "tokens; leave vocab_size unset (null) to take it from the tokenizer")
        return config

    # ---------------------------------------------------------------- fit
    def fit(self, data_path: str | os.PathLike | None = None, run_dir: str | os.PathLike | None = None,
            resume: bool = False) -> Path:
        """Train, writing the run directory; returns its path. See the module docstring.

        - data_path: a UTF-8 text file; None = the default Shakespeare corpus (`corpus.py`), or
          on resume the corpus the run was trained on.
        - run_dir: None = runs/run_YYYYMMDD_HHMMSS. A non-empty run_dir needs resume=True.
        - resume: continue from the latest checkpoint (exactly: same rows as never stopping).
        Raises ConfigError/DataError/FileExistsError/CheckpointError before writing anything,
        TrainingInterrupted (checkpoint saved) on SIGINT/SIGTERM, and TrainingDiverged on a
        NaN/inf loss (nothing saved past the last good checkpoint).
        """
        keep_freed_memory()  # XLA:CPU's per-step buffers reused, not re-faulted (hostmem.py)
        config = self.config
        run_dir = self._resolve_run_dir(run_dir, resume)
        saved = Config.from_yaml(run_dir / CONFIG_FILE) if resume else None
        data_path, dataset = self._data(config, data_path, run_dir, resume)
        config = self._resolve_vocab(config, dataset.vocab_size)
        if config.init_from:  # recorded absolute: resume and loading work from any directory
            config = config.replace(init_from=str(Path(config.init_from).expanduser().resolve()))
        if saved is not None:
            self._check_resumable(saved, config, run_dir)
        total = config.total_steps(len(dataset.train))
        mesh = self._mesh(config)

        root = jax.random.key(config.seed)
        model = self._build_model(config, jax.random.split(root, 4)[0])
        trainable = self._trainable(model)
        params, static = eqx.partition(model, eqx.is_array)
        mu_dtype = None
        if config.use_bf16 and not config.master_weights:  # the seed: bf16 params and first moments
            params, mu_dtype = cast_floating(params, jnp.bfloat16), jnp.bfloat16
        optimizer = make_optimizer(config, total, mu_dtype=mu_dtype)
        opt_state = init_opt_state(optimizer, params, trainable)
        params, opt_state, batch_sharding = self._place(mesh, params, opt_state)

        # Scalars and the key replicated on the mesh: every process holds them, as the
        # collective checkpoint save and restore need.
        state = {"opt_state": opt_state, **sharding.replicate(
            {"step": jnp.zeros((), jnp.int32), "key": root, "best_val_loss": jnp.asarray(jnp.inf, jnp.float32),
             "best_step": jnp.zeros((), jnp.int32), "evals_without_improvement": jnp.zeros((), jnp.int32)}, mesh)}
        rows: list[dict[str, Any]] = []
        if resume:
            step, params, state = self._restore(run_dir, params, state, trainable)
            opt_state = state["opt_state"]
            if (run_dir / config.log_file).is_file():
                rows = [r for r in read_log(run_dir / config.log_file) if r["step"] <= step]
        else:
            step = 0
        summary = model_summary(config, params, opt_state)
        summary |= param_groups(config, params, trainable)  # issue 16: optimizer: muon's groups
        if has_lora(model):  # the trainable share; optimizer_mem_MB above is the adapter's state
            lora = lora_summary(model)
            summary |= {"trainable_params": lora["trainable"], "trainable_percent": round(lora["percent"], 4),
                        "lora_rank": config.lora_rank, "lora_targets": config.lora_targets,
                        "lora_base_run": self._base["base_run"] if self._base else None}
        # Measured from the arrays' shardings: under fsdp about 1/devices of the dp figures.
        summary["bytes_per_device"] = {"params": sharding.bytes_per_device(params)["max"],
                                       "opt_state": sharding.bytes_per_device(opt_state)["max"],
                                       "devices": sharding.num_devices(mesh), "sharding": config.sharding}

        # ---- nothing was written before this point: every input check has passed, in every
        # process (the barrier: process 0 must not create the run directory while another
        # process still checks that it is new).
        distributed.barrier("inputs_checked")
        self.run_dir = run_dir
        loggers = self._start_loggers(config, run_dir, summary, resume)
        if distributed.is_primary():
            config.to_yaml(run_dir / CONFIG_FILE)
            tk.save_tokenizer(dataset.tokenizer, run_dir / TOKENIZER_FILE)
            atomic_write_text(run_dir / config.summary_file, json.dumps(summary, indent=2) + "\n")
            if self._base is not None:
                finetune.write_pointer(run_dir, self._base)
            _write_log(run_dir / config.log_file, rows)

        try:
            loop = _Loop(self, config, run_dir, data_path, total, static, optimizer, trainable,
                         batch_sharding, dataset, mesh, root=state["key"], loggers=loggers)
            loop.run(params, opt_state, step, state, rows)
        finally:
            for logger in loggers:
                if hasattr(logger, "finish"):
                    logger.finish()
        return run_dir

    def _start_loggers(self, config: Config, run_dir: Path, summary: dict[str, Any], resume: bool) -> list[Logger]:
        """Create the run directory and start the loggers (the given ones, then W&B's when
        `config.wandb` or `config.wandb_project` is set): process 0 only; other processes get
        no loggers. If one cannot start (e.g. W&B is not logged in), the started ones are
        finished, what this call created of a new run directory is removed (nothing else was
        written yet), and every process raises."""
        started: list[Logger] = []
        failure: Exception | None = None
        if distributed.is_primary():
            created = run_dir
            while not created.parent.exists():  # the topmost directory this call creates
                created = created.parent
            existed = run_dir.exists()
            run_dir.mkdir(parents=True, exist_ok=True)
            wandb_logger = make_wandb_logger(config, run_dir)
            try:
                for logger in [*self.loggers, *([wandb_logger] if wandb_logger is not None else [])]:
                    if hasattr(logger, "start"):
                        logger.start(config, summary)
                    started.append(logger)
            except Exception as e:
                failure = e
                for logger in started:
                    if hasattr(logger, "finish"):
                        logger.finish()
                if not resume:  # a new run: the directory was absent or empty before this call
                    _remove_created(run_dir, created, existed)
        if distributed.any_process(failure is not None):
            if failure is not None:
                raise failure
            raise ConfigError("wandb: process 0 could not start its loggers; see its error message")
        return started

    # ---------------------------------------------------------------- LR range test
    def find_lr(self, data_path: str | os.PathLike | None = None, min_lr: float = 1e-6, max_lr: float = 1e-2,
                num_steps: int = 100, *, smoothing: float = 0.98, diverge_factor: float = 4.0
                ) -> tuple[float, list[float], list[float]]:
        """Smith's LR range test (`lr_finder.find_lr`) on what `fit` would train: the same
        tokenizer and data split (`data_path`: None = the default corpus), the same initial
        model (`_build_model` with fit's init key, in bfloat16 with `use_bf16`) and trainable
        leaves, and the config's optimizer with its schedule replaced by the exponential ramp.

        Returns `(suggested_lr, lr_history, smoothed_loss_history)`. Writes no run directory,
        checkpoint or log (preparing the data may cache token ids, as `fit` does). Runs on one
        device. Raises ConfigError for bad arguments.
        """
        from .lr_finder import _check_args, find_lr

        _check_args(min_lr, max_lr, num_steps, smoothing, diverge_factor)  # before preparing the data
        _, dataset = self._data(self.config, data_path, None, resume=False)
        config = self._resolve_vocab(self.config, dataset.vocab_size)
        model = self._build_model(config, jax.random.split(jax.random.key(config.seed), 4)[0])
        trainable = self._trainable(model)
        if config.use_bf16:
            model = cast_floating(model, jnp.bfloat16)
        return find_lr(config, dataset, min_lr, max_lr, num_steps, smoothing=smoothing,
                       diverge_factor=diverge_factor, model=model, trainable=trainable)


def _remove_created(run_dir: Path, created: Path, existed: bool) -> None:
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


def _host_key(key: Any) -> Any:
    """A process-local copy of a PRNG key (the restored one is replicated over the mesh, which
    may span other processes' devices: jit cannot close over such an array)."""
    return jax.random.wrap_key_data(np.asarray(jax.random.key_data(key)), impl=jax.random.key_impl(key))


class _Loop:
    """The training loop of one `fit` call (host-side state; the math is in step.py)."""

    def __init__(self, trainer: Trainer, config: Config, run_dir: Path, data_path: Path, total: int,
                 static: Any, optimizer: Any, trainable: Any, batch_sharding: Any, dataset: Dataset,
                 mesh: Any, root: Any, loggers: list[Logger]):
        self.trainer, self.config, self.run_dir, self.total = trainer, config, run_dir, total
        self.data_path, self.mesh, self.loggers = data_path, mesh, loggers
        self.primary = distributed.is_primary()  # the only process that writes files and logs
        self.multi = distributed.process_count() > 1
        self.root = _host_key(root)  # restored from the checkpoint on resume (equal to key(seed))
        _, data_key, dropout_key, eval_key = jax.random.split(self.root, 4)
        c = config
        self.schedule = jax.jit(make_schedule(c.lr_schedule, c.lr, c.warmup_steps, total, c.min_lr_ratio,
                                              c.wsd_stable_fraction))
        # The corpus is placed whole on every device, from host numpy (every process holds the
        # same ids); each device then gathers only the windows of its own batch rows.
        self.train_tokens = sharding.replicate(np.asarray(dataset.train), mesh)
        self.val_tokens = sharding.replicate(np.asarray(dataset.val), mesh)
        B, T = c.batch_size, c.max_context
        # Sampling is fused into the compiled step and evaluation (one dispatch per step; the
        # batch never exists on the host). The sharded wrappers (built in `run`, from the
        # placed arrays' shardings) jit them with the mesh in context, donate params and
        # optimizer state and keep them in their placement.
        # use_bf16 + master_weights: float32 params, bfloat16 compute (see make_train_step).
        compute = jnp.bfloat16 if c.use_bf16 and c.master_weights else None
        step_fn = make_train_step(static, optimizer, alpha_balance=c.alpha_balance, trainable=trainable,
                                  donate=False, compute_dtype=compute)
        eval_fn = make_eval_step(static, alpha_balance=c.alpha_balance, compute_dtype=compute)
        counts_fn = make_counts_fn(static) if c.use_moe else None  # MoE: expert_counts.csv

        def train_step(params, opt_state, tokens, step):
            batch = sample_batch(tokens, jax.random.fold_in(data_key, step), B, T, accum=c.grad_accum)
            batch = jax.lax.with_sharding_constraint(batch, batch_sharding)
            return step_fn(params, opt_state, batch, jax.random.fold_in(dropout_key, step))

        def evaluate(params, train, val, step):
            k_train, k_val = jax.random.split(jax.random.fold_in(eval_key, step))
            batches = [jax.lax.with_sharding_constraint(sample_batch(tokens, k, B, T, accum=c.eval_iters),
                                                        batch_sharding)
                       for tokens, k in ((train, k_train), (val, k_val))]
            counts = None if counts_fn is None else counts_fn(params, batches[1])
            return eval_fn(params, batches[0]), eval_fn(params, batches[1]), _all_finite(params), counts

        self._train_step, self._evaluate_fn = train_step, evaluate
        self.ckpt_every = c.checkpoint_interval or c.eval_interval
        # An adapter-only LoRA run checkpoints the trained arrays only (the base is in its run).
        self.saved = (lambda p: eqx.filter(p, trainable)) if trainer._base is not None else (lambda p: p)

    def _build_steps(self, params: Any, opt_state: Any) -> None:
        """Compile-ready sharded step and evaluation for arrays placed like `params`/`opt_state`
        (the corpus and the step number replicated)."""
        rep = NamedSharding(self.mesh, P())
        self.train_step = sharding.shard_train_step(self._train_step, self.mesh, params, opt_state,
                                                    data_shardings=(rep, rep))
        self.evaluate = sharding.shard_eval_step(self._evaluate_fn, self.mesh, params,
                                                 data_shardings=(rep, rep, rep))

    # -- saving (never called with non-finite params)
    def _train_state(self, opt_state: Any, step: int, best: float, best_step: int, waited: int) -> dict:
        return {"opt_state": opt_state, **sharding.replicate(
            {"step": jnp.asarray(step, jnp.int32), "key": self.root, "best_val_loss": jnp.asarray(best, jnp.float32),
             "best_step": jnp.asarray(best_step, jnp.int32),
             "evals_without_improvement": jnp.asarray(waited, jnp.int32)}, self.mesh)}

    def _save_latest(self, params: Any, opt_state: Any, step: int, best: float, best_step: int,
                     waited: int, finished: bool = False, stopped_early: bool = False) -> None:
        ckpt.save(self.run_dir, ckpt.LATEST, step, self.saved(params),
                  self._train_state(opt_state, step, best, best_step, waited))
        cursor = {"step": step, "total_steps": self.total,
                  "best_val_loss": None if math.isinf(best) else best, "best_step": best_step,
                  "evals_without_improvement": waited, "finished": finished,
                  "stopped_early": stopped_early, "data_path": str(Path(self.data_path).absolute())}
        if self.primary:
            atomic_write_text(self.run_dir / CURSOR_FILE, json.dumps(cursor, indent=2) + "\n")

    def _check_finite(self, step: int, params: Any, losses: dict[str, float], finite: bool | None = None) -> None:
        """Raise TrainingDiverged on a non-finite loss or parameter (`finite`: the parameters'
        check when already computed, as the evaluation does)."""
        bad = {k: v for k, v in losses.items() if not math.isfinite(v)}
        if bad or not (bool(_all_finite(params)) if finite is None else finite):
            what = ", ".join(f"{k}={v}" for k, v in bad.items()) or "non-finite parameters"
            last = ckpt.latest_step(self.run_dir, ckpt.LATEST)
            kept = (f"the last good checkpoint (step {last}) in {str(self.run_dir)!r} is intact"
                    if last is not None else f"no checkpoint was saved in {str(self.run_dir)!r}")
            raise TrainingDiverged(f"training diverged at step {step} ({what}); {kept}; "
                                   "lower lr, raise warmup_steps or set grad_clip")

    def _evaluate(self, params: Any, step: int) -> tuple[dict[str, float], bool, Any]:
        tr, va, finite, counts = jax.device_get(self.evaluate(params, self.train_tokens, self.val_tokens, step))
        return {"train_loss": float(tr["loss"]), "val_loss": float(va["loss"]),
                "train_bal": float(tr["bal"]), "val_bal": float(va["bal"])}, bool(finite), counts

    def _stopping(self, stop: _StopFlag, just_saved: bool) -> bool:
        """Whether to stop now after a SIGINT/SIGTERM. One process: as soon as it arrives.
        Several: all must stop at the same step (saving is collective), so they agree (any
        process's signal counts) at each checkpoint, where they synchronise anyway."""
        if not self.multi:
            return stop.signum is not None
        return just_saved and distributed.any_process(stop.signum is not None)

    # -- the loop
    def run(self, params: Any, opt_state: Any, step: int, state: dict, rows: list[dict[str, Any]]) -> None:
        c, total, log_path = self.config, self.total, self.run_dir / self.config.log_file
        best = float(state["best_val_loss"])
        best_step, waited = int(state["best_step"]), int(state["evals_without_improvement"])
        progress = _Progress(total, step, self.trainer.progress, quiet=not self.primary)
        self._build_steps(params, opt_state)
        if step >= total:
            progress.close()
            progress.message(f"run {self.run_dir} is already at step {step}/{total}; nothing to do")
            return
        saved_at = step
        t_start, timed_from = None, step
        experts = ExpertCountsLog(self.run_dir / EXPERT_COUNTS_FILE, keep_upto=step) if c.use_moe else None
        try:
            with _StopFlag() as stop:
                while step < total:
                    params, opt_state, metrics = self.train_step(params, opt_state, self.train_tokens, step)
                    step += 1
                    if t_start is None:  # first step of this session: compile, then start the clock
                        jax.block_until_ready(metrics)
                        t_start, timed_from = time.perf_counter(), step
                    progress.advance()

                    is_eval = step % c.eval_interval == 0 or step == total
                    stop_early = False
                    if is_eval:
                        jax.block_until_ready(metrics)
                        elapsed = time.perf_counter() - t_start
                        ms = 1000.0 * elapsed / max(step - timed_from, 1)
                        losses, finite, counts = self._evaluate(params, step)
                        self._check_finite(step, params, {"step_loss": float(metrics["loss"]), **losses}, finite)
                        row = {"step": step, **losses, "lr": float(self.schedule(step - 1)),
                               "ms_per_step": ms, "tokens_per_s": c.tokens_per_step / (ms / 1000.0)}
                        rows.append(row)
                        if self.primary:
                            _write_log(log_path, rows)
                            if experts is not None:
                                experts.record(step, counts)
                        if row["val_loss"] < best:
                            best, best_step, waited = row["val_loss"], step, 0
                            ckpt.save(self.run_dir, ckpt.BEST, step, self.saved(params))
                        else:
                            waited += 1
                        stop_early = c.patience > 0 and waited >= c.patience
                    if is_eval or step % self.ckpt_every == 0 or step == total or stop_early:
                        if not is_eval:
                            self._check_finite(step, params, {})
                        self._save_latest(params, opt_state, step, best, best_step, waited,
                                          finished=step == total or stop_early, stopped_early=stop_early)
                        saved_at = step
                    if is_eval:
                        progress.row(row, total)
                        for logger in self.loggers:
                            logger(dict(row))
                        t_start, timed_from = time.perf_counter(), step
                    if stop_early:
                        progress.message(f"early stop at step {step}: val_loss has not improved for "
                                         f"{waited} evaluations (best {best:.4f} at step {best_step})")
                        break
                    if self._stopping(stop, saved_at == step):
                        if saved_at != step:
                            self._check_finite(step, params, {})
                            self._save_latest(params, opt_state, step, best, best_step, waited)
                        raise TrainingInterrupted(stop.signum or signal.SIGTERM, step, self.run_dir)
        finally:
            progress.close()
