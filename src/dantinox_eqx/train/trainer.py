"""`Trainer(config).fit(data_path)`: train a model into a self-describing run directory.

    run_dir = Trainer(config).fit("corpus.txt")                      # runs/run_YYYYMMDD_HHMMSS/
    Trainer(config).fit("corpus.txt", run_dir=run_dir, resume=True)  # continue it exactly

`fit` checks every input, builds the model, optimizer and placement, writes the run directory's
files, then runs the loop (train/loop.py) with its hooks (train/hooks.py). Everything random is a
pure function of `config.seed` and the step number (train/programs.py), so a resumed run (its
`TrainState` restored from the latest checkpoint) writes the same log rows as an uninterrupted one.

Devices: the step runs on a mesh of `n_devices` devices (parallel/sharding.py): the batch is
split over them and the parameters and optimizer state are replicated (`sharding: dp`) or
sharded (`sharding: fsdp`). Under multi-process JAX (`distributed.initialize`, before the
Trainer is built) every process runs `fit` with the same arguments: only process 0 writes the
run directory's files, prints and calls the loggers (W&B included); checkpoints are saved and
restored collectively by every process. A checkpoint resumes on any device count.
"""

from __future__ import annotations

import json
import math
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp

from ..config import Config, ConfigError
from ..data import feeds
from ..data import tokenizer as tk
from ..data.tokens import Splits
from ..files import atomic_write_text
from ..hostmem import keep_freed_memory
from ..lora import has_lora, lora_summary
from ..model import Transformer, cast_floating
from ..parallel import distributed, sharding
from ..run import checkpoint as ckpt
from ..run import finetune, runlock
from ..run.chat_template import write_chat_template
from ..run.layout import CONFIG_FILE, CURSOR_FILE, EXPERT_COUNTS_FILE, LOG_COLUMNS, TOKENIZER_FILE, read_log, write_log
from ..run.rundir import (
    check_resumable,
    is_empty_dir,
    not_empty,
    open_for_resume,
    remove_created,
    resolve_run_dir,
    topmost_new_dir,
)
from ..run.save_guard import fault
from ..run.summary import model_summary
from . import hooks
from .expert_log import ExpertCountsLog
from .inputs import absolute_paths, chat_template_text, initial_model, resolve_vocab, trainable_mask, training_data
from .layer_layout import restack_blocks, restack_state, unstack_model, unstack_state, unstacked_training
from .loop import train_loop
from .lr_finder import _check_args, find_lr
from .muon import param_groups
from .optim import make_optimizer, make_schedule
from .programs import build_programs, run_keys
from .progress import Progress, StopFlag, TrainingDiverged, TrainingInterrupted, TrainingWriteError
from .state import TrainState
from .step import init_opt_state
from .wandb_logger import make_wandb_logger

__all__ = ["Trainer", "TrainingInterrupted", "TrainingDiverged", "TrainingWriteError", "LOG_COLUMNS", "CURSOR_FILE",
           "CONFIG_FILE",
           "read_log", "default_config_path"]

Logger = Callable[[dict[str, Any]], Any]


def _warn(message: str) -> None:
    """A one-line warning on stderr (process 0), e.g. a checkpoint skipped by resume."""
    if distributed.is_primary():
        print(f"warning: {message}", file=sys.stderr, flush=True)


def default_config_path() -> Path:
    """The packaged default config (`configs/default_config.yaml` in the repository links to it)."""
    from importlib.resources import files

    return Path(str(files("dantinox_eqx") / "configs" / "default_config.yaml"))


def write_run_files(run_dir: Path, config: Config, dataset: Any, summary: dict[str, Any],
                    rows: list[dict[str, Any]], *, resume: bool, base: dict[str, Any] | None = None,
                    chat_template: str | None = None) -> None:
    """A run directory's files before training: config.yaml, tokenizer.json, model_summary.json,
    the base pointer (adapter-only LoRA), the chat template (`chat_template`: its text, None =
    none written) and the training log (`rows`: those kept on resume).
    `fit` and a population's members (train/population_fit.py) write the same files."""
    config.to_yaml(run_dir / CONFIG_FILE)
    # The file the tokenizer was read from (as in training_data) is kept byte for byte: an
    # imported Hugging Face tokenizer.json survives fine-tuning and export unchanged.
    source = (run_dir / TOKENIZER_FILE if resume else config.tokenizer_path
              or (Path(config.init_from) / TOKENIZER_FILE if config.init_from else None))
    tk.save_tokenizer(dataset.tokenizer, run_dir / TOKENIZER_FILE, source=source)
    atomic_write_text(run_dir / config.summary_file, json.dumps(summary, indent=2) + "\n")
    if base is not None:
        finetune.write_pointer(run_dir, base)
    if chat_template is not None:
        write_chat_template(run_dir, chat_template)
    write_log(run_dir / config.log_file, rows)


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

    @staticmethod
    def _resolve_run_dir(run_dir: str | os.PathLike | None, resume: bool) -> Path:
        return resolve_run_dir(run_dir, resume)

    # ---------------------------------------------------------------- fit
    def fit(self, data_path: str | os.PathLike | None = None, run_dir: str | os.PathLike | None = None,
            resume: bool = False) -> Path:
        """Train, writing the run directory; returns its path. See the module docstring.

        - data_path: a UTF-8 text file, a prepared dataset directory (`dantinox-eqx prepare`)
          or any source prepare takes (prepared into the cache on first use: data/cached.py);
          None = on resume the data the run was trained on, else with dataset_source hf the
          dataset_* fields' dataset, else the default Shakespeare corpus (`data/corpus.py`).
        - run_dir: None = runs/run_YYYYMMDD_HHMMSS. A non-empty run_dir needs resume=True.
        - resume: continue from the latest checkpoint that passes its check (exactly: same rows
          as never stopping; a newer one that fails it is skipped with a warning), or from step 0
          when the run was stopped before its first checkpoint.
        The run directory is locked (`run/runlock.py`) while fit writes it: a second writer gets
        RunLockedError (a ConfigError) naming the holder.
        Raises ConfigError/DataError/FileExistsError/CheckpointError before writing anything,
        TrainingInterrupted on SIGINT/SIGTERM (checkpoint saved; during start-up: nothing to
        save), TrainingDiverged on a NaN/inf loss (nothing saved past the last good checkpoint)
        and TrainingWriteError when writing the run directory fails (e.g. a full disk).
        """
        keep_freed_memory()  # XLA:CPU's per-step buffers reused, not re-faulted (hostmem.py)
        lock = None
        with StopFlag(starting=True) as stop:  # start-up: a signal stops at once (the loop has its own)
            try:
                run_dir = resolve_run_dir(run_dir, resume)
                stop.run_dir = run_dir
                lock = runlock.RunLock(run_dir) if distributed.is_primary() else None
                return self._fit(data_path, run_dir, resume, stop, lock)
            finally:
                stop.starting = False  # the loop has ended (or never began): a signal now is only noted
                if lock is not None:
                    lock.release()

    def _fit(self, data_path: str | os.PathLike | None, run_dir: Path, resume: bool, stop: StopFlag,
             lock: runlock.RunLock | None) -> Path:
        config = self.config
        fresh = open_for_resume(run_dir, lock) if resume else False  # True: no checkpoint yet
        saved = Config.from_yaml(run_dir / CONFIG_FILE) if resume and (run_dir / CONFIG_FILE).is_file() else None
        data_path, dataset = training_data(config, data_path, run_dir, resume)
        config = resolve_vocab(config, dataset.vocab_size)
        config = absolute_paths(config)  # recorded absolute: resume and loading work from any directory
        chat_template = chat_template_text(config, resume)
        if saved is not None:
            check_resumable(saved, config, run_dir)
        total = config.total_steps(len(dataset.train))
        if config.warmup_steps >= total:  # e.g. a short fine-tune of an import (the library's warmup of 400)
            _warn(f"warmup_steps: {config.warmup_steps} is not below the run's {total} steps, so the lr rises to "
                  f"{config.lr * total / config.warmup_steps:.2e} at most and never reaches lr={config.lr:g}; "
                  f"set --warmup_steps {max(total // 10, 1)} or so")
        mesh = sharding.make_mesh(config.n_devices, batch_size=config.batch_size)

        root = jax.random.key(config.seed)
        model, base = initial_model(config, run_keys(root)[0], self.model)
        trainable = trainable_mask(model)
        params, static = eqx.partition(model, eqx.is_array)
        mu_dtype = None
        if config.use_bf16 and not config.master_weights:  # the seed: bf16 params and first moments
            params, mu_dtype = cast_floating(params, jnp.bfloat16), jnp.bfloat16
        optimizer = make_optimizer(config, total, mu_dtype=mu_dtype)
        opt_state = init_opt_state(optimizer, params, trainable)
        params, opt_state = sharding.place(params, opt_state, mesh, config.sharding)
        state = TrainState.initial(params, opt_state, key=root)
        rows: list[dict[str, Any]] = []
        if resume and not fresh:
            state = self._restore(run_dir, state, trainable, base, mesh)
            if (run_dir / config.log_file).is_file():
                rows = [r for r in read_log(run_dir / config.log_file) if r["step"] <= state.step]
        summary = self._summary(config, model, state, mesh, base)
        # How batches are made (a function of the data only: data/feeds.choose_feed) and the
        # splits' sizes in tokens and bytes (bits per byte).
        feed = feeds.choose_feed(dataset)
        summary["data"] = dataset.describe(feed)

        # ---- nothing was written before this point: every input check has passed, in every
        # process (the barrier: process 0 must not create the run directory while another
        # process still checks that it is new).
        distributed.barrier("inputs_checked")
        self.run_dir = run_dir
        stop.step = state.step
        loggers = self._start_loggers(config, run_dir, summary, resume, lock)
        fault("startup", 0, "locked", run_dir)  # test seam (a no-op unless DANTINOX_EQX_TEST_FAULT says)
        try:
            if distributed.is_primary():
                write_run_files(run_dir, config, dataset, summary, rows, resume=resume, base=base,
                                chat_template=chat_template)
        except OSError as e:
            raise TrainingWriteError(state.step, e, run_dir) from e
        if stop.signum is not None:  # a start-up signal whose exception some library swallowed
            raise TrainingInterrupted(stop.signum, state.step, run_dir, saved=False)
        if unstacked_training(config):  # deep models: per-layer arrays in the step (layer_layout.py)
            del model, params, opt_state  # the stacked arrays: the state holds the only copy
            state = unstack_state(state, config.num_blocks)
            static, trainable = unstack_model(static, trainable, config.num_blocks)
        try:
            self._train(config, run_dir, data_path, total, static, optimizer, trainable, dataset, feed, mesh,
                        state, rows, loggers, adapter_only=base is not None)
        finally:
            for logger in loggers:
                if hasattr(logger, "finish"):
                    logger.finish()
        return run_dir

    def _train(self, config: Config, run_dir: Path, data_path: Path, total: int, static: Any, optimizer: Any,
               trainable: Any, dataset: Splits, feed_kind: str, mesh: Any, state: TrainState,
               rows: list[dict[str, Any]], loggers: list[Logger], *, adapter_only: bool) -> TrainState:
        """Build the programs and the hooks, then run the loop from `state`."""
        primary = distributed.is_primary()
        progress = Progress(total, state.step, self.progress, quiet=not primary)
        step_fn, evaluate, feed = build_programs(config, static, optimizer, trainable, dataset, feed_kind, mesh,
                                                 state.key, state.params, state.opt_state)
        if state.step >= total:
            progress.close()
            progress.message(f"run {run_dir} is already at step {state.step}/{total}; nothing to do")
            return state
        c = config
        schedule = jax.jit(make_schedule(c.lr_schedule, c.lr, c.warmup_steps, total, c.min_lr_ratio,
                                         c.wsd_stable_fraction))
        # An adapter-only LoRA run checkpoints the trained arrays only (the base is in its run),
        # picked from the params in their on-disk (stacked) form by the mask in that form.
        on_disk_mask = restack_blocks(trainable) if adapter_only else None
        saved = (lambda p: eqx.filter(p, on_disk_mask)) if adapter_only else (lambda p: p)
        checkpointer = hooks.Checkpointer(run_dir, mesh, total, data_path, primary=primary, keep=c.keep_checkpoints,
                                          saved=saved, on_disk=restack_state)
        experts = ExpertCountsLog(run_dir / EXPERT_COUNTS_FILE, keep_upto=state.step) if c.use_moe else None
        clock = hooks.Clock()
        loop_hooks = [hooks.Timer(clock), hooks.ProgressBar(progress),
                      hooks.Evaluate(c, evaluate, schedule, clock, checkpointer, rows, run_dir / c.log_file,
                                     primary=primary, experts=experts,
                                     bits_per_nat={"train": dataset.train.tokens_per_byte / math.log(2),
                                                   "val": dataset.val.tokens_per_byte / math.log(2)}),
                      hooks.Checkpoint(c.checkpoint_interval or c.eval_interval, checkpointer),
                      hooks.Report(progress, loggers, clock)]
        fault("startup", 0, "built", run_dir)  # test seam: the last moment of start-up
        feed.start(state.step, total)  # the host feed starts reading ahead from here
        try:
            with StopFlag() as stop:
                return train_loop(state, step_fn, loop_hooks, total=total, checkpointer=checkpointer, stop=stop,
                                  run_dir=run_dir)
        finally:
            feed.close()
            progress.close()

    def _restore(self, run_dir: Path, state: TrainState, trainable: Any, base: dict[str, Any] | None,
                 mesh: Any) -> TrainState:
        """The state of the latest checkpoint. An adapter-only LoRA run restores its adapters
        into the params (whose frozen part is the base, reloaded) after checking that the base
        is still the one it was trained on."""
        like = state.checkpoint_tree(mesh)
        if base is None:
            _, params, tree = ckpt.restore(run_dir, ckpt.LATEST, state.params, like, warn=_warn)
            return TrainState.from_checkpoint(params, tree)
        pointer = finetune.read_pointer(run_dir)
        if pointer is None or pointer["params_sha256"] != base["params_sha256"]:
            raise ckpt.CheckpointError(
                f"init_from: the base run {base['base_run']!r} is not the one the LoRA run in "
                f"{str(run_dir)!r} was trained on ({finetune.BASE_FILE} differs: base checkpoint step "
                f"{None if pointer is None else pointer.get('step')} then, {base['step']} now); "
                "the adapter cannot be resumed on other base weights")
        adapter, frozen = eqx.partition(state.params, trainable)
        _, adapter, tree = ckpt.restore(run_dir, ckpt.LATEST, adapter, like, warn=_warn)
        return TrainState.from_checkpoint(eqx.combine(adapter, frozen), tree)

    @staticmethod
    def _summary(config: Config, model: Transformer, state: TrainState, mesh: Any,
                 base: dict[str, Any] | None) -> dict[str, Any]:
        summary = model_summary(config, state.params, state.opt_state)
        summary |= param_groups(config, state.params, trainable_mask(model))  # optimizer: muon's groups
        if has_lora(model):  # the trainable share; optimizer_mem_MB above is the adapter's state
            lora = lora_summary(model)
            summary |= {"trainable_params": lora["trainable"], "trainable_percent": round(lora["percent"], 4),
                        "lora_rank": config.lora_rank, "lora_targets": config.lora_targets,
                        "lora_base_run": base["base_run"] if base else None}
        # How the step runs the layers: one array per layer for deep models (layer_layout.py).
        summary["layer_loop"] = "per_layer" if unstacked_training(config) else "scan"
        # Measured from the arrays' shardings: under fsdp about 1/devices of the dp figures.
        summary["bytes_per_device"] = {"params": sharding.bytes_per_device(state.params)["max"],
                                       "opt_state": sharding.bytes_per_device(state.opt_state)["max"],
                                       "devices": sharding.num_devices(mesh), "sharding": config.sharding}
        return summary

    def _start_loggers(self, config: Config, run_dir: Path, summary: dict[str, Any], resume: bool,
                       lock: runlock.RunLock | None = None) -> list[Logger]:
        """Create the run directory, lock it (a new run; `lock`), and start the loggers (the
        given ones, then W&B's when `config.wandb` or `config.wandb_project` is set): process 0
        only; other processes get no loggers. If one cannot start (e.g. W&B is not logged in),
        the started ones are finished, what this call created of a new run directory is removed
        (nothing else was written yet), and every process raises. If the directory is locked by
        another run, or another run wrote it since it was found empty, every process raises and
        nothing is removed."""
        started: list[Logger] = []
        failure: Exception | None = None
        if distributed.is_primary():
            created = topmost_new_dir(run_dir)
            existed = run_dir.exists()
            run_dir.mkdir(parents=True, exist_ok=True)
            claimed = resume or lock is None  # a resumed run was locked by open_for_resume
            try:
                if not claimed:  # a new run: locked once its directory exists,
                    lock.acquire(record=False)
                    if not is_empty_dir(run_dir):  # and still empty (another run may have begun)
                        raise not_empty(run_dir)
                    claimed = True
                if lock is not None:  # accepted: only now does run.lock name this process
                    lock.record()
                wandb_logger = make_wandb_logger(config, run_dir)
                for logger in [*self.loggers, *([wandb_logger] if wandb_logger is not None else [])]:
                    if hasattr(logger, "start"):
                        logger.start(config, summary)
                    started.append(logger)
            except Exception as e:
                failure = e
                for logger in started:
                    if hasattr(logger, "finish"):
                        logger.finish()
                if not resume and claimed:  # a new run: the directory was absent or empty before this call
                    remove_created(run_dir, created, existed)
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
        model (fit's init key, in bfloat16 with `use_bf16`) and trainable leaves, and the
        config's optimizer with its schedule replaced by the exponential ramp.

        Returns `(suggested_lr, lr_history, smoothed_loss_history)`. Writes no run directory,
        checkpoint or log (preparing the data may cache token ids, as `fit` does). Runs on one
        device. Raises ConfigError for bad arguments.
        """
        _check_args(min_lr, max_lr, num_steps, smoothing, diverge_factor)  # before preparing the data
        _, dataset = training_data(self.config, data_path, None, resume=False)
        config = resolve_vocab(self.config, dataset.vocab_size)
        model, _ = initial_model(config, run_keys(jax.random.key(config.seed))[0], self.model)
        trainable = trainable_mask(model)
        if config.use_bf16:
            model = cast_floating(model, jnp.bfloat16)
        return find_lr(config, dataset, min_lr, max_lr, num_steps, smoothing=smoothing,
                       diverge_factor=diverge_factor, model=model, trainable=trainable)
