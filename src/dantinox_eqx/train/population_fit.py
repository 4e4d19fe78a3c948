"""Train a population's members together, each into an ordinary run directory.

    run_dirs = train_population(base, [{"lr": 1e-3}, {"lr": 3e-3, "seed": 7}], "corpus.txt", "runs/pop")
    results = fit_population(configs, "corpus.txt", run_dirs)       # MemberResult per member
    results = fit_population(configs, "corpus.txt", run_dirs, resume=True)

Member k's run directory holds what `Trainer(configs[k]).fit(data_path, run_dirs[k])` writes:
config.yaml, tokenizer.json, model_summary.json (plus a "population" entry), training_log.csv,
the cursor and the latest and best checkpoints in the ordinary format, so `generate`, `eval`,
`export` and `train --resume` use it like any other run. The rows agree with the separate run's
to float32 rounding (train/population.py says why not bitwise).

The loop: one vmapped step for every member still training (train/population.py), then each
member's own hooks, those a `fit` runs (train/hooks.py: evaluation and its row, the best
checkpoint, early stopping, the latest checkpoint, the report), fed with that member's slice of
one evaluation of the whole population. The ms_per_step column is the population's step: the
wall time in which every member took one step.

Members end on their own: at the last step, when stopping early, or when they diverge (status
"failed": its directory keeps its last good checkpoint, as a diverged `fit` does; the others go
on). Every member counts its own steps, so a resume from checkpoints saved at different steps
(a kill while saving) first brings the members that lag up to the others, then continues: each
member's batches and keys depend on its own step only, so the resume is exact.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import signal
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from ..config import Config, ConfigError
from ..data.feeds import choose_feed
from ..hostmem import keep_freed_memory
from ..model import cast_floating
from ..parallel import distributed
from ..parallel.sharding import DATA
from ..run import checkpoint as ckpt
from ..run import runlock
from ..run.layout import CONFIG_FILE, EXPERT_COUNTS_FILE, read_log
from ..run.rundir import check_resumable, is_empty_dir
from . import hooks
from . import population as pop
from .expert_log import ExpertCountsLog
from .inputs import absolute_paths, chat_template_text, initial_model, resolve_vocab, trainable_mask, training_data
from .optim import make_optimizer, make_schedule
from .programs import run_keys
from .progress import Progress, StopFlag, TrainingDiverged, TrainingInterrupted
from .state import TrainState
from .step import init_opt_state
from .trainer import Trainer, write_run_files

__all__ = ["MemberResult", "fit_population", "train_population"]


@dataclasses.dataclass
class MemberResult:
    run_dir: Path
    status: str  # "complete" (finished or stopped early) | "failed" (diverged)
    reason: str = ""


def train_population(base_config: Config, members: Sequence[Mapping[str, Any]], data_path: str | os.PathLike | None,
                     out_dir: str | os.PathLike, *, resume: bool = False, shared_batches: bool = False,
                     progress: bool | None = None) -> list[Path]:
    """Train `base_config` with each member's overrides (e.g. {"lr": 1e-3, "seed": 1}) as one
    population, member k into `out_dir/member_000k`; returns those run directories. Raises
    ConfigError for members that cannot share a program (train/population.py: check_members)
    and TrainingDiverged, after the others finished, naming the members that diverged."""
    configs = [base_config.replace(**dict(m)) for m in members]
    run_dirs = [Path(out_dir) / f"member_{k:04d}" for k in range(len(configs))]
    results = fit_population(configs, data_path, run_dirs, resume=resume, shared_batches=shared_batches,
                             progress=progress)
    failed = [f"{r.run_dir}: {r.reason}" for r in results if r.status != "complete"]
    if failed:
        raise TrainingDiverged("; ".join(failed))
    return run_dirs


def _check_run_dir(path: Path, resuming: bool, resume: bool) -> None:
    """A member's directory: resumed (a checkpoint and its files), or new: absent, empty, or
    (with `resume`) a member directory a population wrote before its first checkpoint."""
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"run_dir: {str(path)!r} exists and is not a directory")
    if resuming:
        if not (path / CONFIG_FILE).is_file():
            raise ckpt.CheckpointError(f"run_dir: {str(path / CONFIG_FILE)!r} is missing; cannot resume")
    elif path.exists() and not is_empty_dir(path) and not (resume and (path / CONFIG_FILE).is_file()):
        raise FileExistsError(f"run_dir: {str(path)!r} is not empty; pass resume to continue that population, "
                              "or choose new run directories")


class _Prefixed(Progress):
    """The population's progress display (one bar), each member's lines prefixed with its name."""

    def __init__(self, progress: Progress | None, prefix: str):  # no bar of its own
        self.progress, self.prefix = progress, prefix

    def row(self, row: dict[str, Any], total: int) -> None:
        self.progress.row(row, total, prefix=self.prefix)

    def message(self, text: str) -> None:
        self.progress.message(self.prefix + text)


class _MemberClock(hooks.Clock):
    """A member's view of the population's clock: ms per population step (the hooks' restarts
    are the population's business, after every member's hooks ran)."""

    def __init__(self, population: _Population):
        super().__init__()
        self.population = population

    def ms_per_step(self, step: int) -> float:
        return self.population.ms_per_step()

    def restart(self, step: int) -> None:
        pass


@dataclasses.dataclass
class _Member:
    config: Config
    run_dir: Path
    state: TrainState  # params and opt_state only while its hooks run (the population holds them)
    hooks: list[hooks.Hook] = dataclasses.field(default_factory=list)
    checkpointer: hooks.Checkpointer | None = None
    active: bool = True
    saved_at: int = 0
    result: MemberResult | None = None
    display: _Prefixed | None = None
    summary: dict[str, Any] = dataclasses.field(default_factory=dict)
    rows: list[dict[str, Any]] = dataclasses.field(default_factory=list)  # the log (Evaluate appends)


def fit_population(configs: Sequence[Config], data_path: str | os.PathLike | None,
                   run_dirs: Sequence[str | os.PathLike], *, resume: bool = False, shared_batches: bool = False,
                   progress: bool | None = None, memory_flag: str = "--population") -> list[MemberResult]:
    """Train `configs` (check_members) as one population into `run_dirs` (see the module doc).

    - resume: members whose directory holds a checkpoint continue from it; the others start
      (in a new directory, or one a population wrote before its first checkpoint).
    - shared_batches: every member trains and evaluates on member 0's batches (default: each its
      own seed's, which makes member k a separate run of configs[k]).
    Every member directory is locked (`run/runlock.py`) while the population writes it: one
    that another process trains gets RunLockedError (a ConfigError) naming the holder.
    Raises ConfigError/DataError/FileExistsError/CheckpointError before writing anything
    (a population larger than the devices' memory names `memory_flag`), and TrainingInterrupted
    (every member's latest checkpoint saved) on SIGINT/SIGTERM.
    """
    keep_freed_memory()
    configs, run_dirs = list(configs), [Path(d) for d in run_dirs]
    pop.check_members(configs)
    if len(run_dirs) != len(configs):
        raise ConfigError(f"run_dirs: {len(run_dirs)} directories for {len(configs)} members")
    if distributed.process_count() > 1:
        raise ConfigError("population: trains in one process (its members spread over that process's devices)")
    if len({d.resolve() for d in run_dirs}) != len(run_dirs):
        raise ConfigError("run_dirs: two members share a run directory; give each its own")
    locks = [runlock.RunLock(d) for d in run_dirs]
    with contextlib.ExitStack() as held:
        for d, lock in zip(run_dirs, locks):
            held.callback(lock.release)
            if d.is_dir():  # an existing member directory is locked before it is read, and its
                lock.acquire(record=False)  # run.lock rewritten only once the population is accepted
                if resume:
                    ckpt.clean(d)  # what an interrupted writer left (as the Trainer's resume does)
        return _fit_locked(configs, data_path, run_dirs, locks, resume, shared_batches, progress, memory_flag)


def _fit_locked(configs: list[Config], data_path: str | os.PathLike | None, run_dirs: list[Path],
                locks: list[runlock.RunLock], resume: bool, shared_batches: bool, progress: bool | None,
                memory_flag: str) -> list[MemberResult]:
    resuming = [resume and ckpt.latest_step(d, ckpt.LATEST) is not None for d in run_dirs]
    for d, r in zip(run_dirs, resuming):
        _check_run_dir(d, r, resume)
    source = next((d for d, r in zip(run_dirs, resuming) if r), None)  # one tokenizer for every member
    data_path, dataset = training_data(configs[0], data_path, source, source is not None)
    configs = [absolute_paths(resolve_vocab(c, dataset.vocab_size)) for c in configs]
    for c, d, r in zip(configs, run_dirs, resuming):
        if r:
            check_resumable(Config.from_yaml(d / CONFIG_FILE), c, d)
    total = configs[0].total_steps(len(dataset.train))
    mesh = pop.population_mesh(len(configs), configs[0].n_devices)
    population = _Population(configs, run_dirs, resuming, dataset, Path(data_path), total, mesh, memory_flag,
                             shared_batches, progress, locks)
    return population.run()


class _Population:
    def __init__(self, configs: list[Config], run_dirs: list[Path], resuming: list[bool], dataset: Any,
                 data_path: Path, total: int, mesh: Mesh, memory_flag: str, shared_batches: bool,
                 progress: bool | None, locks: list[runlock.RunLock]):
        self.total, self.mesh, self.data_path, self.show = total, mesh, data_path, progress
        # loss -> bits per byte, per split (as the Trainer's Evaluate hook reports them)
        self.bits_per_nat = {"train": dataset.train.tokens_per_byte / math.log(2),
                             "val": dataset.val.tokens_per_byte / math.log(2)}
        first = configs[0]
        mu_dtype = pop.mu_dtype(first)
        pop.check_population_memory(first, len(configs), dataset, what=memory_flag)  # before N models exist
        feed = choose_feed(dataset)  # the feed a separate run of each member uses (fit's choice)
        self.progress_start = total
        self.members = [self._member(k, c, d, r, mu_dtype)
                        for k, (c, d, r) in enumerate(zip(configs, run_dirs, resuming))]
        templates = [chat_template_text(c, r) for c, r in zip(configs, resuming)]  # checked before writing
        for k, m in enumerate(self.members):  # every member built (restored, checked): now write
            m.summary["data"] = dataset.describe(feed)
            m.summary["population"] = {"members": len(configs), "member": k, "devices": int(mesh.devices.size)}
            m.run_dir.mkdir(parents=True, exist_ok=True)
            locks[k].acquire()  # locked once it exists (held already: only records pid and host)
            write_run_files(m.run_dir, m.config, dataset, m.summary, m.rows, resume=resuming[k],
                            chat_template=templates[k])  # as fit writes it
        states = [m.state for m in self.members]
        data_roots = [states[0].key if shared_batches else s.key for s in states]
        self.programs = pop.build_population_programs(first, self.static, self.trainable, dataset, mesh, total,
                                                      data_roots, mu_dtype=mu_dtype)
        self.params = pop.stack([s.params for s in states], mesh)
        self.opt_state = pop.stack([s.opt_state for s in states], mesh)
        self.values = pop.place(pop.member_values(configs), mesh)
        self.roots = pop.stack([s.key for s in states], mesh)
        for m in self.members:
            m.state = m.state.replace(params=None, opt_state=None)
        self.clock, self.iteration, self._ms, self._eval = hooks.Clock(), 0, None, None

    def _member(self, k: int, c: Config, run_dir: Path, resuming: bool, mu_dtype: Any) -> _Member:
        """Member k built as `fit` builds a run: model, optimizer state, restored state, hooks."""
        root = jax.random.key(c.seed)
        model, _ = initial_model(c, run_keys(root)[0])
        params, static = eqx.partition(model, eqx.is_array)
        if k == 0:  # the program's: members differ only in their dropout rates' values (population.py)
            self.static, self.trainable = static, trainable_mask(model)
        if mu_dtype is not None:
            params = cast_floating(params, jnp.bfloat16)
        opt_state = init_opt_state(make_optimizer(c, self.total, mu_dtype=mu_dtype), params)
        state = TrainState.initial(params, opt_state, key=root)
        rows: list[dict[str, Any]] = []
        if resuming:
            _, params, tree = ckpt.restore(run_dir, ckpt.LATEST, params, state.checkpoint_tree(self.mesh))
            state = TrainState.from_checkpoint(params, tree)
            if (run_dir / c.log_file).is_file():
                rows = [r for r in read_log(run_dir / c.log_file) if r["step"] <= state.step]
        one = Mesh(np.asarray(jax.devices()[:1]), (DATA,))  # a member's arrays sit on one device
        member = _Member(c, run_dir, state, saved_at=state.step, summary=Trainer._summary(c, model, state, one, None),
                         rows=rows)
        member.checkpointer = hooks.Checkpointer(run_dir, self.mesh, self.total, self.data_path, primary=True,
                                                 keep=c.keep_checkpoints)
        schedule = jax.jit(make_schedule(c.lr_schedule, c.lr, c.warmup_steps, self.total, c.min_lr_ratio,
                                         c.wsd_stable_fraction))  # the log's lr column, as fit computes it
        experts = ExpertCountsLog(run_dir / EXPERT_COUNTS_FILE, keep_upto=state.step) if c.use_moe else None
        clock = _MemberClock(self)
        self.progress_start = min(self.progress_start, state.step)
        member.display = _Prefixed(None, f"[{run_dir.name}] ")
        member.hooks = [hooks.Evaluate(c, lambda params, step, k=k: self.evaluation(k), schedule, clock,
                                       member.checkpointer, rows, run_dir / c.log_file, primary=True,
                                       experts=experts,
                                       bits_per_nat=self.bits_per_nat),
                        hooks.Checkpoint(c.checkpoint_interval or c.eval_interval, member.checkpointer),
                        hooks.Report(member.display, [], clock)]
        if state.step >= self.total:
            member.active, member.result = False, MemberResult(run_dir, "complete")
        return member

    # -- what the members' hooks read
    def ms_per_step(self) -> float:
        if self._ms is None:
            self._ms = self.clock.ms_per_step(self.iteration)
        return self._ms

    def evaluation(self, k: int) -> Any:
        """Member k's (train, val, finite, counts) from one evaluation of the whole population."""
        if self._eval is None:
            steps = np.asarray([m.state.step for m in self.members], np.int32)
            self._eval = jax.device_get(self.programs.evaluate(self.params, steps))
        return jax.tree.map(lambda x: x[k], self._eval)

    # -- the loop
    def run(self) -> list[MemberResult]:
        progress = Progress(self.total, self.progress_start, self.show)
        for m in self.members:
            m.display.progress = progress
        self.programs.start(np.asarray([m.state.step for m in self.members]), self.total)  # host feed: read ahead
        try:
            with StopFlag() as stop:
                while any(m.active for m in self.members):
                    self._step(progress)
                    if stop.signum is not None:
                        self._interrupt(stop.signum)
        finally:
            self.programs.close()
            progress.close()
        return [m.result for m in self.members]

    def _step(self, progress: Progress) -> None:
        steps = np.asarray([m.state.step for m in self.members], np.int32)
        active = np.asarray([m.active for m in self.members])
        self.params, self.opt_state, metrics = self.programs.step(
            self.params, self.opt_state, self.values, self.roots, steps, active)
        self.iteration += 1
        if self.clock.started is None:  # the first step's compilation is not timed
            jax.block_until_ready(metrics)
            self.clock.restart(self.iteration)
        progress.advance()
        self._ms, self._eval = None, None
        for m in self.members:  # every step counted before any evaluation reads them
            if m.active:
                m.state = m.state.replace(step=m.state.step + 1)
        for k, m in enumerate(self.members):
            if m.active:
                self._member_hooks(k, m, metrics)
        if self._ms is not None:  # some member evaluated or saved: restart after all of them
            self.clock.restart(self.iteration)

    def _member_hooks(self, k: int, m: _Member, metrics: Any) -> None:
        event = hooks.StepEvent(m.state.step, self.total, None)
        try:
            for hook in m.hooks:
                if hook.due(event):
                    if event.metrics is None:  # this member's arrays, only when a hook needs them
                        jax.block_until_ready(metrics)  # the step timed to its end
                        self.ms_per_step()
                        m.state = self._with_arrays(k, m.state)
                        event.metrics = pop.take(metrics, k)
                    m.state = hook(m.state, event)
        except TrainingDiverged as e:
            m.active, m.result = False, MemberResult(m.run_dir, "failed", str(e))
        if event.saved:
            m.saved_at = m.state.step
        if m.active and (event.stop_early or event.last):
            m.active, m.result = False, MemberResult(m.run_dir, "complete")
        m.state = m.state.replace(params=None, opt_state=None)

    def _with_arrays(self, k: int, state: TrainState) -> TrainState:
        return state.replace(params=pop.take(self.params, k), opt_state=pop.take(self.opt_state, k))

    def _interrupt(self, signum: int) -> None:
        """SIGINT/SIGTERM: every training member's latest checkpoint at its current step, then stop."""
        for k, m in enumerate(self.members):
            if m.active and m.saved_at != m.state.step:
                state = self._with_arrays(k, m.state)
                m.checkpointer.check_finite(state.step, state.params, {})
                m.checkpointer.save_latest(state)
        step = max(m.state.step for m in self.members)
        parent = Path(os.path.commonpath([str(m.run_dir.absolute()) for m in self.members]))
        raise TrainingInterrupted(signum or signal.SIGTERM, step, parent)
