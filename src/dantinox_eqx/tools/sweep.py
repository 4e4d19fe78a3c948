"""Hyperparameter sweeps from a W&B-format sweep YAML: on a W&B server, or offline with optuna.

    sweep = load_sweep_config("configs/sweep.yaml")         # validated: ConfigError if bad
    records = run_local_sweep(sweep, base, "data.txt", "runs/sweep1", count=20, train_fn=fn)
    run_wandb_sweep(sweep, base, "data.txt", "runs/sweep1", count=20, train_fn=fn, project="P")

The YAML format, its validation and the GQA shape rule of trials are in `sweep_config`.

The local backend samples with optuna (bayes: TPE, random: RandomSampler, grid: GridSampler)
and keeps optuna's JournalStorage file in the sweep directory, so running the same sweep
directory again continues the sweep (`count` more trials). Both backends share the trial
function (`run_trial`): build the trial's Config, train with `train_fn(config, data_path,
run_dir) -> metric` (a number, or a mapping holding the metric), and record the trial.

A trial whose Config is invalid (after the GQA rule) is skipped with the reason logged and
recorded (status "skipped"); a trial whose training raises is recorded as "failed" with the
error's first line, its whole traceback in `trials/trial_NNNN/error.txt` (`record_failure`).
Either way the sweep goes on: it never crashes on one trial (`dantinox-eqx sweep` then exits
1, naming the failed trials).

Sweep directory (one process at a time: `.lock` holds its pid):
  sweep.yaml, base_config.yaml, sweep_state.json   what was asked (a resume must match them)
  optuna.journal                                   optuna's storage (local backend)
  records/trial_NNNN.json                          our per-trial record (params, metrics, status)
  trials/trial_NNNN/                               each trial's run directory (+ error.txt: a failure's traceback)
  sweep_results.csv                                every trial, best first (goal-aware)
  sweep.png                                        the metric per trial and the best so far
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import time
import traceback
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import yaml

from ..config import Config, ConfigError
from ..files import atomic_write_text
from ..run.layout import DEFAULT_LOG_FILE
from ..train.wandb_logger import WandbError
from .sweep_config import SweepConfig, build_trial_config, load_sweep_config, parse_sweep_config

__all__ = ["SweepConfig", "load_sweep_config", "parse_sweep_config", "build_trial_config", "run_trial",
           "run_local_sweep", "run_wandb_sweep", "read_data", "write_results", "read_records", "metrics_from_run_dir",
           "trainer_train_fn", "record_failure", "failed_trials", "ERROR_FILE"]

STUDY_NAME = "sweep"
ERROR_FILE = "error.txt"  # in a failed trial's folder: the whole traceback

TrainFn = Callable[[Config, str, Path], Any]
Log = Callable[[str], None]


def metrics_from_run_dir(run_dir: str | os.PathLike, log_file: str = DEFAULT_LOG_FILE) -> dict[str, float]:
    """The last eval row of a run's training_log.csv (as floats) plus `best_val_loss`."""
    path = Path(run_dir) / log_file
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: the run wrote no training log")
    with open(path, newline="", encoding="utf-8") as f:
        rows = [r for r in csv.DictReader(f) if r.get("val_loss") not in (None, "")]
    if not rows:
        raise ValueError(f"{path} holds no evaluated row")
    out = {k: float(v) for k, v in rows[-1].items() if v not in (None, "")}
    out["best_val_loss"] = min(float(r["val_loss"]) for r in rows)
    return out


def trainer_train_fn(config: Config, data_path: str, run_dir: Path) -> dict[str, float]:
    """The sweeps' default training: `Trainer(config).fit(data_path, run_dir)`, then the run's
    last eval row (and best val_loss) read back from its training log."""
    from ..train.trainer import Trainer

    Trainer(config).fit(data_path, run_dir=run_dir)
    return metrics_from_run_dir(run_dir, config.log_file)


def _trial_name(number: int) -> str:
    return f"trial_{number:04d}"


def run_trial(number: int, values: Mapping[str, Any], *, sweep: SweepConfig, base: Config, data_path: str,
              sweep_dir: Path, train_fn: TrainFn, log: Log = print, overrides: Mapping[str, Any] | None = None,
              extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Build, train and record trial `number` (both backends run this). Returns its record,
    also written to `sweep_dir/records/trial_NNNN.json` (and into the trial's run dir).

    `overrides` are applied after the sweep's values (the W&B backend turns wandb on with it).
    """
    name = _trial_name(number)
    run_dir = sweep_dir / "trials" / name
    record: dict[str, Any] = {"trial": number, "status": "skipped", "metric": None, "metrics": {},
                              "params": dict(values), "derived": {}, "reason": "", "run_dir": "",
                              "seconds": 0.0, **(extra or {})}
    config, derived, reason = build_trial_config(base, values)
    record["derived"] = derived
    if config is not None and overrides:
        try:
            config = config.replace(**overrides)
        except ConfigError as e:
            config, reason = None, str(e)
    if config is None:
        record["reason"] = reason
        log(f"trial {number}: skipped: {reason}")
    else:
        if derived:
            log(f"trial {number}: derived {', '.join(f'{k}={v}' for k, v in derived.items())}")
        t0 = time.perf_counter()
        try:
            result = train_fn(config, data_path, run_dir)
            metric, metrics = _extract_metric(result, sweep.metric)
            record.update(status="complete", metric=metric, metrics=metrics)
        except ConfigError as e:  # the trainer refused this trial's config
            record.update(status="skipped", reason=str(e).splitlines()[0])
            log(f"trial {number}: skipped: {record['reason']}")
        except Exception as e:  # one bad trial must not end the sweep; the record keeps why
            record.update(record_failure(e, run_dir, sweep_dir))
            log(f"trial {number}: failed: {record['reason']} (traceback: {sweep_dir / record['error_file']})")
        record["seconds"] = round(time.perf_counter() - t0, 3)
        if run_dir.is_dir():
            record["run_dir"] = str(run_dir.relative_to(sweep_dir))
    text = json.dumps(record, indent=1, default=str)
    atomic_write_text(sweep_dir / "records" / f"{name}.json", text)
    if run_dir.is_dir():
        atomic_write_text(run_dir / "sweep_trial.json", text)
    if record["status"] == "complete":
        log(f"trial {number}: {sweep.metric} = {record['metric']:.6g}")
    return record


def record_failure(error: BaseException, run_dir: Path, sweep_dir: Path) -> dict[str, Any]:
    """A failed trial: its whole traceback written to `run_dir/error.txt` (the folder created if
    the trial never got to), and the record's fields: status "failed", the reason (the error's
    first line) and `error_file` (that file, relative to `sweep_dir`)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run_dir / ERROR_FILE, "".join(traceback.format_exception(error)))
    first = str(error).splitlines()[0] if str(error) else ""
    return {"status": "failed", "reason": f"{type(error).__name__}: {first}",
            "error_file": str((run_dir / ERROR_FILE).relative_to(sweep_dir))}


def failed_trials(records: list[dict[str, Any]], since: set[int] | None = None) -> list[dict[str, Any]]:
    """The records of failed trials (those not numbered in `since`: trials run before)."""
    return [r for r in records if r["status"] == "failed" and r["trial"] not in (since or set())]


def _extract_metric(result: Any, metric: str) -> tuple[float, dict[str, float]]:
    if isinstance(result, Mapping):
        if metric not in result:
            raise KeyError(f"the training reported no {metric!r} (got {', '.join(result) or 'nothing'})")
        metrics = {k: float(v) for k, v in result.items()}
        value = metrics[metric]
    else:
        value = float(result)
        metrics = {metric: value}
    if not math.isfinite(value):
        raise FloatingPointError(f"{metric} is {value}")
    return value, metrics


# ------------------------------------------------------------------------------------------
def read_records(sweep_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """Every recorded trial of a sweep directory, by trial number."""
    folder = Path(sweep_dir) / "records"
    records = [json.loads(p.read_text(encoding="utf-8")) for p in sorted(folder.glob("trial_*.json"))]
    return sorted(records, key=lambda r: r["trial"])


def _sorted_records(records: list[dict[str, Any]], sweep: SweepConfig) -> list[dict[str, Any]]:
    sign = 1.0 if sweep.goal == "minimize" else -1.0
    done = sorted((r for r in records if r["status"] == "complete"), key=lambda r: (sign * r["metric"], r["trial"]))
    rest = sorted((r for r in records if r["status"] != "complete"), key=lambda r: r["trial"])
    return done + rest


def write_results(sweep_dir: str | os.PathLike, sweep: SweepConfig) -> list[dict[str, Any]]:
    """Rewrite `sweep_results.csv` (best first, then skipped/failed trials) and `sweep.png` from
    the records; returns the records in that order."""
    from .lr_plots import plot_sweep

    sweep_dir = Path(sweep_dir)
    records = _sorted_records(read_records(sweep_dir), sweep)
    params = list(sweep.parameters)
    # A metric named like a swept parameter (the training log's `lr` column) would make a second
    # column of that name: the parameter's column (the trial's value) wins.
    extra_metrics = sorted({k for r in records for k in r["metrics"]} - {sweep.metric} - set(params))
    header = ["rank", "trial", "status", sweep.metric, *params, *extra_metrics, "derived", "run_dir",
              "seconds", "reason"]
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    for rank, r in enumerate(records, 1):
        done = r["status"] == "complete"
        writer.writerow([rank if done else "", r["trial"], r["status"], r["metric"] if done else "",
                         *[r["params"].get(p, "") for p in params],
                         *[r["metrics"].get(m, "") for m in extra_metrics],
                         " ".join(f"{k}={v}" for k, v in r["derived"].items()), r["run_dir"], r["seconds"],
                         r["reason"]])
    atomic_write_text(sweep_dir / "sweep_results.csv", buf.getvalue())
    done = [r for r in records if r["status"] == "complete"]
    plot_sweep([r["trial"] for r in done], [r["metric"] for r in done], sweep.metric, sweep.goal,
               sweep_dir / "sweep.png")
    return records


# ------------------------------------------------------------------------------------------
def read_data(base: Config, data_path: str) -> Any:
    """The base config's train/val `Splits` of `data_path`, read as `train` reads it
    (train/inputs.training_data: a text file, a prepared directory, a folder, a glob, a .jsonl
    or .parquet file, prepared into the cache on first use, which the trials then reuse).
    DataError naming data_path for a source training refuses, before the sweep writes anything."""
    from ..train.inputs import training_data

    return training_data(base, data_path, None, resume=False)[1]


def _prepare_sweep_dir(sweep_dir: Path, sweep: SweepConfig, base: Config, data_path: str, backend: str,
                       state: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Create the sweep directory, or check that an existing one holds this same sweep (the
    data checked before: `read_data`)."""
    wanted = {"backend": backend, "data_path": str(Path(data_path).resolve()), **(state or {})}
    state_path = sweep_dir / "sweep_state.json"
    if state_path.is_file():
        saved = json.loads(state_path.read_text(encoding="utf-8"))
        stored_sweep = yaml.safe_load((sweep_dir / "sweep.yaml").read_text(encoding="utf-8"))
        stored_base = Config.from_yaml(sweep_dir / "base_config.yaml")
        for what, old, new in (("sweep config", stored_sweep, sweep.raw), ("base config", stored_base, base),
                               ("backend", saved.get("backend"), backend),
                               ("data_path", saved.get("data_path"), wanted["data_path"])):
            if old != new:
                raise ConfigError(f"sweep_dir: {str(sweep_dir)!r} holds a sweep with a different {what}; "
                                  "continue it with the same inputs, or pass a new --sweep_dir")
        return saved
    if sweep_dir.exists() and any(sweep_dir.iterdir()):
        raise ConfigError(f"sweep_dir: {str(sweep_dir)!r} exists and is not a sweep directory; pass a new "
                          "or empty --sweep_dir")
    sweep_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(sweep_dir / "sweep.yaml", yaml.safe_dump(sweep.raw, sort_keys=False))
    base.to_yaml(sweep_dir / "base_config.yaml")
    atomic_write_text(state_path, json.dumps(wanted, indent=1))
    return wanted


class _Lock:
    """One process per sweep directory: `sweep_dir/.lock` holds the owner's pid."""

    def __init__(self, sweep_dir: Path):
        self.path = sweep_dir / ".lock"

    def __enter__(self) -> _Lock:
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                try:
                    pid = int(self.path.read_text().strip() or 0)
                except (OSError, ValueError):
                    pid = 0
                if pid and _alive(pid):
                    raise ConfigError(f"sweep_dir: {str(self.path.parent)!r} is in use by process {pid}; "
                                      "wait for it or pass another --sweep_dir") from None
                self.path.unlink(missing_ok=True)  # a stale lock of a dead process
                continue
            with os.fdopen(fd, "w") as f:
                f.write(str(os.getpid()))
            return self
        raise ConfigError(f"sweep_dir: could not lock {str(self.path)!r}")

    def __exit__(self, *exc: Any) -> None:
        self.path.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _make_sampler(sweep: SweepConfig, seed: int) -> Any:
    import optuna

    if sweep.method == "grid":

        class AskTellGridSampler(optuna.samplers.GridSampler):
            # optuna's GridSampler calls study.stop() after the last point, which raises outside
            # study.optimize; with ask/tell the loop checks is_exhausted() before each ask.
            def after_trial(self, study: Any, trial: Any, state: Any, values: Any) -> None:
                return None

        space = {name: p.grid_values() for name, p in sweep.parameters.items() if p.distribution != "constant"}
        return AskTellGridSampler(space, seed=seed)
    if sweep.method == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed)


def _open_study(sweep_dir: Path, sweep: SweepConfig, seed: int) -> Any:
    """optuna's study in `sweep_dir/optuna.journal`. The sampler is seeded with `seed` plus the
    number of trials already run, so a resumed random search does not replay its first draws."""
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    storage = JournalStorage(JournalFileBackend(str(sweep_dir / "optuna.journal")))
    kw = dict(storage=storage, study_name=STUDY_NAME, direction=sweep.goal, load_if_exists=True)
    n_done = len(optuna.create_study(**kw).trials)
    return optuna.create_study(sampler=_make_sampler(sweep, seed + n_done), **kw)


def _close_interrupted(study: Any, sweep_dir: Path, log: Log) -> None:
    """Trials left RUNNING by a killed process: mark them failed in optuna and in our records."""
    from optuna.trial import TrialState

    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        study.tell(t.number, state=TrialState.FAIL)
        path = sweep_dir / "records" / f"{_trial_name(t.number)}.json"
        if not path.is_file():
            run_dir = sweep_dir / "trials" / _trial_name(t.number)
            record = {"trial": t.number, "status": "interrupted", "metric": None, "metrics": {},
                      "params": {}, "derived": {}, "reason": "the sweep process stopped during this trial",
                      "run_dir": str(run_dir.relative_to(sweep_dir)) if run_dir.is_dir() else "", "seconds": 0.0}
            atomic_write_text(path, json.dumps(record, indent=1))
        log(f"trial {t.number}: marked interrupted (its process stopped)")


def run_local_sweep(sweep: SweepConfig, base_config: Config, data_path: str | os.PathLike,
                    sweep_dir: str | os.PathLike, count: int, train_fn: TrainFn, *, seed: int | None = None,
                    log: Log = print) -> list[dict[str, Any]]:
    """Run `count` more trials of `sweep` offline with optuna, in `sweep_dir` (created, or
    continued when it holds this sweep). Returns every trial's record, best first.

    Fewer than `count` trials run when a grid is exhausted or `run_cap` is reached.
    """
    import optuna

    if count < 1:
        raise ConfigError(f"count: must be positive, got {count}")
    sweep_dir, data_path = Path(sweep_dir), str(data_path)
    read_data(base_config, data_path)
    _prepare_sweep_dir(sweep_dir, sweep, base_config, data_path, "local")
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # our log lines say what each trial did
    try:
        with _Lock(sweep_dir):
            return _local_trials(sweep, base_config, data_path, sweep_dir, count, train_fn,
                                 base_config.seed if seed is None else seed, log)
    finally:
        optuna.logging.set_verbosity(verbosity)


def _local_trials(sweep: SweepConfig, base_config: Config, data_path: str, sweep_dir: Path, count: int,
                  train_fn: TrainFn, seed: int, log: Log) -> list[dict[str, Any]]:
    import optuna
    from optuna.trial import TrialState

    study = _open_study(sweep_dir, sweep, seed)
    _close_interrupted(study, sweep_dir, log)
    for _ in range(count):
        if sweep.run_cap is not None and len(study.trials) >= sweep.run_cap:
            log(f"run_cap {sweep.run_cap} reached")
            break
        if isinstance(study.sampler, optuna.samplers.GridSampler) and study.sampler.is_exhausted(study):
            log("grid exhausted: every grid point has run")
            break
        trial = study.ask()
        values = sweep.sample(trial)
        record = run_trial(trial.number, values, sweep=sweep, base=base_config, data_path=data_path,
                           sweep_dir=sweep_dir, train_fn=train_fn, log=log)
        if record["status"] == "complete":
            study.tell(trial, record["metric"])
        else:
            study.tell(trial, state=TrialState.FAIL)
        write_results(sweep_dir, sweep)
    return write_results(sweep_dir, sweep)


def run_wandb_sweep(sweep: SweepConfig, base_config: Config, data_path: str | os.PathLike,
                    sweep_dir: str | os.PathLike, count: int, train_fn: TrainFn, *, project: str,
                    entity: str | None = None, sweep_id: str | None = None, log: Log = print) -> list[dict[str, Any]]:
    """Run a W&B sweep agent for `count` trials (needs a W&B server and login).

    The sweep is created from `sweep.raw` (or `sweep_id` joins an existing one; a sweep
    directory remembers its id, so running it again adds an agent to the same sweep). W&B's
    controller picks each trial's values; the trial then runs exactly as a local one
    (`run_trial`), with wandb turned on so the trainer logs its eval rows into the agent's run,
    and the metric is also set in the run's summary.
    """
    import wandb

    if count < 1:
        raise ConfigError(f"count: must be positive, got {count}")
    sweep_dir, data_path = Path(sweep_dir), str(data_path)
    read_data(base_config, data_path)
    state = _prepare_sweep_dir(sweep_dir, sweep, base_config, data_path, "wandb")
    if os.environ.get("WANDB_MODE", "").lower() in ("offline", "disabled", "dryrun"):
        raise WandbError(f"backend wandb: WANDB_MODE={os.environ['WANDB_MODE']} has no W&B server to run a "
                         "sweep; use --backend local (offline, with optuna)")
    try:
        sweep_id = sweep_id or state.get("sweep_id") or wandb.sweep(sweep=sweep.raw, project=project, entity=entity)
    except wandb.errors.Error as e:
        raise WandbError(f"backend wandb: could not create the sweep ({str(e).splitlines()[0]}); run "
                         "`wandb login`, or use --backend local") from None
    atomic_write_text(sweep_dir / "sweep_state.json", json.dumps({**state, "sweep_id": sweep_id}, indent=1))

    def trial() -> None:
        run = wandb.init(dir=str(sweep_dir))  # the agent has set run.config to the trial's values
        values = {name: run.config[name] for name in sweep.parameters if name in run.config}
        records = read_records(sweep_dir)
        number = max((r["trial"] for r in records), default=-1) + 1
        record = run_trial(number, values, sweep=sweep, base=base_config, data_path=data_path,
                           sweep_dir=sweep_dir, train_fn=train_fn, log=log,
                           overrides={"wandb": True, "wandb_project": project}, extra={"wandb_run_id": run.id})
        if record["status"] == "complete":
            run.summary[sweep.metric] = record["metric"]
        run.summary["sweep_status"] = record["status"]
        if record["reason"]:
            run.summary["sweep_reason"] = record["reason"]
        write_results(sweep_dir, sweep)

    with _Lock(sweep_dir):
        wandb.agent(sweep_id, function=trial, count=count, project=project, entity=entity)
        return write_results(sweep_dir, sweep)
