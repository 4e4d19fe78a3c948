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
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp

from ..config import Config, ConfigError
from ..data import tokenizer as tk
from ..files import atomic_write_text
from ..hostmem import keep_freed_memory
from ..lora import has_lora, lora_summary
from ..model import Transformer, cast_floating
from ..parallel import distributed, sharding
from ..run import checkpoint as ckpt
from ..run import finetune
from ..run.layout import CONFIG_FILE, CURSOR_FILE, EXPERT_COUNTS_FILE, LOG_COLUMNS, TOKENIZER_FILE, read_log, write_log
from ..run.rundir import check_resumable, remove_created, resolve_run_dir, topmost_new_dir
from ..run.summary import model_summary
from . import hooks
from .expert_log import ExpertCountsLog
from .inputs import initial_model, resolve_vocab, trainable_mask, training_data
from .loop import train_loop
from .lr_finder import _check_args, find_lr
from .optim import make_optimizer, make_schedule
from .programs import build_programs
from .progress import Progress, StopFlag, TrainingDiverged, TrainingInterrupted
from .state import TrainState
from .step import init_opt_state
from .wandb_logger import make_wandb_logger

__all__ = ["Trainer", "TrainingInterrupted", "TrainingDiverged", "LOG_COLUMNS", "CURSOR_FILE", "CONFIG_FILE",
           "read_log", "default_config_path"]

Logger = Callable[[dict[str, Any]], Any]


def default_config_path() -> Path:
    """The packaged default config (`configs/default_config.yaml` in the repository links to it)."""
    from importlib.resources import files

    return Path(str(files("dantinox_eqx") / "configs" / "default_config.yaml"))


def write_run_files(run_dir: Path, config: Config, dataset: Any, summary: dict[str, Any],
                    rows: list[dict[str, Any]], *, resume: bool, base: dict[str, Any] | None = None) -> None:
    """A run directory's files before training: config.yaml, tokenizer.json, model_summary.json,
    the base pointer (adapter-only LoRA) and the training log (`rows`: those kept on resume).
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
        run_dir = resolve_run_dir(run_dir, resume)
        saved = Config.from_yaml(run_dir / CONFIG_FILE) if resume else None
        data_path, dataset = training_data(config, data_path, run_dir, resume)
        config = resolve_vocab(config, dataset.vocab_size)
        if config.init_from:  # recorded absolute: resume and loading work from any directory
            config = config.replace(init_from=str(Path(config.init_from).expanduser().resolve()))
        if saved is not None:
            check_resumable(saved, config, run_dir)
        total = config.total_steps(len(dataset.train))
        mesh = sharding.make_mesh(config.n_devices, batch_size=config.batch_size)

        root = jax.random.key(config.seed)
        model, base = initial_model(config, jax.random.split(root, 4)[0], self.model)
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
        if resume:
            state = self._restore(run_dir, state, trainable, base, mesh)
            if (run_dir / config.log_file).is_file():
                rows = [r for r in read_log(run_dir / config.log_file) if r["step"] <= state.step]
        summary = self._summary(config, model, state, mesh, base)

        # ---- nothing was written before this point: every input check has passed, in every
        # process (the barrier: process 0 must not create the run directory while another
        # process still checks that it is new).
        distributed.barrier("inputs_checked")
        self.run_dir = run_dir
        loggers = self._start_loggers(config, run_dir, summary, resume)
        if distributed.is_primary():
            write_run_files(run_dir, config, dataset, summary, rows, resume=resume, base=base)
        try:
            self._train(config, run_dir, data_path, total, static, optimizer, trainable, dataset, mesh,
                        state, rows, loggers, adapter_only=base is not None)
        finally:
            for logger in loggers:
                if hasattr(logger, "finish"):
                    logger.finish()
        return run_dir

    def _train(self, config: Config, run_dir: Path, data_path: Path, total: int, static: Any, optimizer: Any,
               trainable: Any, dataset: Any, mesh: Any, state: TrainState, rows: list[dict[str, Any]],
               loggers: list[Logger], *, adapter_only: bool) -> TrainState:
        """Build the programs and the hooks, then run the loop from `state`."""
        primary = distributed.is_primary()
        progress = Progress(total, state.step, self.progress, quiet=not primary)
        step_fn, evaluate = build_programs(config, static, optimizer, trainable, dataset, mesh, state.key,
                                           state.params, state.opt_state)
        if state.step >= total:
            progress.close()
            progress.message(f"run {run_dir} is already at step {state.step}/{total}; nothing to do")
            return state
        c = config
        schedule = jax.jit(make_schedule(c.lr_schedule, c.lr, c.warmup_steps, total, c.min_lr_ratio,
                                         c.wsd_stable_fraction))
        # An adapter-only LoRA run checkpoints the trained arrays only (the base is in its run).
        checkpointer = hooks.Checkpointer(run_dir, mesh, total, data_path, primary=primary,
                                          saved=(lambda p: eqx.filter(p, trainable)) if adapter_only else (lambda p: p))
        experts = ExpertCountsLog(run_dir / EXPERT_COUNTS_FILE, keep_upto=state.step) if c.use_moe else None
        clock = hooks.Clock()
        loop_hooks = [hooks.Timer(clock), hooks.ProgressBar(progress),
                      hooks.Evaluate(c, evaluate, schedule, clock, checkpointer, rows, run_dir / c.log_file,
                                     primary=primary, experts=experts),
                      hooks.Checkpoint(c.checkpoint_interval or c.eval_interval, checkpointer),
                      hooks.Report(progress, loggers, clock)]
        try:
            with StopFlag() as stop:
                return train_loop(state, step_fn, loop_hooks, total=total, checkpointer=checkpointer, stop=stop,
                                  run_dir=run_dir)
        finally:
            progress.close()

    def _restore(self, run_dir: Path, state: TrainState, trainable: Any, base: dict[str, Any] | None,
                 mesh: Any) -> TrainState:
        """The state of the latest checkpoint. An adapter-only LoRA run restores its adapters
        into the params (whose frozen part is the base, reloaded) after checking that the base
        is still the one it was trained on."""
        like = state.checkpoint_tree(mesh)
        if base is None:
            _, params, tree = ckpt.restore(run_dir, ckpt.LATEST, state.params, like)
            return TrainState.from_checkpoint(params, tree)
        pointer = finetune.read_pointer(run_dir)
        if pointer is None or pointer["params_sha256"] != base["params_sha256"]:
            raise ckpt.CheckpointError(
                f"init_from: the base run {base['base_run']!r} is not the one the LoRA run in "
                f"{str(run_dir)!r} was trained on ({finetune.BASE_FILE} differs: base checkpoint step "
                f"{None if pointer is None else pointer.get('step')} then, {base['step']} now); "
                "the adapter cannot be resumed on other base weights")
        adapter, frozen = eqx.partition(state.params, trainable)
        _, adapter, tree = ckpt.restore(run_dir, ckpt.LATEST, adapter, like)
        return TrainState.from_checkpoint(eqx.combine(adapter, frozen), tree)

    @staticmethod
    def _summary(config: Config, model: Transformer, state: TrainState, mesh: Any,
                 base: dict[str, Any] | None) -> dict[str, Any]:
        summary = model_summary(config, state.params, state.opt_state)
        if has_lora(model):  # the trainable share; optimizer_mem_MB above is the adapter's state
            lora = lora_summary(model)
            summary |= {"trainable_params": lora["trainable"], "trainable_percent": round(lora["percent"], 4),
                        "lora_rank": config.lora_rank, "lora_targets": config.lora_targets,
                        "lora_base_run": base["base_run"] if base else None}
        # Measured from the arrays' shardings: under fsdp about 1/devices of the dp figures.
        summary["bytes_per_device"] = {"params": sharding.bytes_per_device(state.params)["max"],
                                       "opt_state": sharding.bytes_per_device(state.opt_state)["max"],
                                       "devices": sharding.num_devices(mesh), "sharding": config.sharding}
        return summary

    def _start_loggers(self, config: Config, run_dir: Path, summary: dict[str, Any], resume: bool) -> list[Logger]:
        """Create the run directory and start the loggers (the given ones, then W&B's when
        `config.wandb` or `config.wandb_project` is set): process 0 only; other processes get
        no loggers. If one cannot start (e.g. W&B is not logged in), the started ones are
        finished, what this call created of a new run directory is removed (nothing else was
        written yet), and every process raises."""
        started: list[Logger] = []
        failure: Exception | None = None
        if distributed.is_primary():
            created = topmost_new_dir(run_dir)
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
        model, _ = initial_model(config, jax.random.split(jax.random.key(config.seed), 4)[0], self.model)
        trainable = trainable_mask(model)
        if config.use_bf16:
            model = cast_floating(model, jnp.bfloat16)
        return find_lr(config, dataset, min_lr, max_lr, num_steps, smoothing=smoothing,
                       diverge_factor=diverge_factor, model=model, trainable=trainable)
