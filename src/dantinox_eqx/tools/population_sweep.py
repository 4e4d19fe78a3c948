"""The population backend of sweeps: trials of one shape train together, in one compiled program.

    records = run_population_sweep(sweep, base, "data.txt", "runs/sweep1", count=16, population=8)

`count` trials are drawn as the local backend draws them (optuna: grid, random or TPE; TPE draws
the whole batch before any result comes back, as a parallel sweep does), each turned into its
Config by the same rules (`build_trial_config`: the GQA rule, invalid trials skipped). The
trials are then grouped by everything but the population fields (train/population.py:
lr, warm-up, weight decay, betas, clipping value, dropout rate, seed, ...): a swept shape field
(dim, num_blocks, ...) or any other field splits the sweep into groups, one population per
group, trained one after the other; `population` caps the members of one program (a larger
group is split into chunks). Each trial's run directory (`trials/trial_NNNN/`), its record and
the sweep's `sweep_results.csv` and `sweep.png` are those of the local backend (tools/sweep.py);
a record also says which population it trained in and the population's wall time.

Continuing: a trial's record is written ("running") before its population trains. Running the
same sweep directory again first resumes those trials from their checkpoints, exactly (each
member's batches and keys depend on its own seed and step only), then draws `count` new ones.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..config import Config, ConfigError
from ..files import atomic_write_text
from ..train.inputs import resolve_vocab
from ..train.population import check_population_memory, structure_key
from ..train.population_fit import fit_population
from ..train.progress import TrainingInterrupted
from . import sweep as sw
from .sweep_config import SweepConfig, build_trial_config

__all__ = ["run_population_sweep"]

FLAG = "--population"


def run_population_sweep(sweep: SweepConfig, base_config: Config, data_path: str | os.PathLike,
                         sweep_dir: str | os.PathLike, count: int, *, population: int | None = None,
                         seed: int | None = None, log: Any = print) -> list[dict[str, Any]]:
    """Resume the sweep's unfinished trials, then run `count` new ones as populations of at
    most `population` members (None: a whole group at once). Returns every record, best first.
    Raises ConfigError before anything is written for a bad count or population, or when
    `population` members of the base config's shape exceed the devices' memory."""
    import optuna

    if count < 1:
        raise ConfigError(f"count: must be positive, got {count}")
    if population is not None and population < 1:
        raise ConfigError(f"{FLAG}: members trained at once must be at least 1, got {population}")
    sweep_dir, data_path = Path(sweep_dir), str(data_path)
    dataset = sw.read_data(base_config, data_path)
    check_population_memory(resolve_vocab(base_config, dataset.vocab_size), min(count, population or count),
                            dataset, what=FLAG)
    sw._prepare_sweep_dir(sweep_dir, sweep, base_config, data_path, "population")
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        with sw._Lock(sweep_dir):
            study = sw._open_study(sweep_dir, sweep, base_config.seed if seed is None else seed)
            pending = _pending(study, sweep_dir, base_config, log)
            if pending:
                log(f"resuming {len(pending)} unfinished trial(s)")
                _train(pending, sweep, data_path, sweep_dir, study, population, log)
            fresh = _draw(study, sweep, base_config, sweep_dir, count, log)
            _train(fresh, sweep, data_path, sweep_dir, study, population, log)
            return sw.write_results(sweep_dir, sweep)
    finally:
        optuna.logging.set_verbosity(verbosity)


def _record(number: int, values: Mapping[str, Any], derived: dict[str, Any], status: str, reason: str = ""
            ) -> dict[str, Any]:
    return {"trial": number, "status": status, "metric": None, "metrics": {}, "params": dict(values),
            "derived": derived, "reason": reason, "run_dir": "", "seconds": 0.0}


def _write(sweep_dir: Path, record: dict[str, Any]) -> None:
    text = json.dumps(record, indent=1, default=str)
    atomic_write_text(sweep_dir / "records" / f"{sw._trial_name(record['trial'])}.json", text)
    run_dir = sweep_dir / "trials" / sw._trial_name(record["trial"])
    if run_dir.is_dir():
        atomic_write_text(run_dir / "sweep_trial.json", text)


def _pending(study: Any, sweep_dir: Path, base: Config, log: Any) -> list[tuple[dict[str, Any], Config]]:
    """Trials a stopped run left "running" (to resume), after closing those it left no record of."""
    from optuna.trial import TrialState

    records = {r["trial"]: r for r in sw.read_records(sweep_dir)}
    out = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        record = records.get(t.number)
        config = build_trial_config(base, record["params"])[0] if record else None
        if record is None or record["status"] != "running" or config is None:
            study.tell(t.number, state=TrialState.FAIL)
            _write(sweep_dir, _record(t.number, {}, {}, "interrupted", "the sweep process stopped during this trial"))
            log(f"trial {t.number}: marked interrupted (its process stopped)")
            continue
        out.append((record, config))
    return out


def _draw(study: Any, sweep: SweepConfig, base: Config, sweep_dir: Path, count: int, log: Any
          ) -> list[tuple[dict[str, Any], Config]]:
    """`count` new trials (fewer at run_cap or the end of a grid): invalid ones recorded as
    skipped, the others recorded as running."""
    from optuna.trial import TrialState

    grid = (math.prod(len(p.grid_values()) for p in sweep.parameters.values() if p.distribution != "constant")
            if sweep.method == "grid" else None)
    out = []
    for _ in range(count):
        if sweep.run_cap is not None and len(study.trials) >= sweep.run_cap:
            log(f"run_cap {sweep.run_cap} reached")
            break
        if grid is not None and len(study.trials) >= grid:  # every point drawn (running ones count)
            log("grid exhausted: every grid point has run")
            break
        trial = study.ask()
        values = sweep.sample(trial)
        config, derived, reason = build_trial_config(base, values)
        if config is None:
            study.tell(trial, state=TrialState.FAIL)
            _write(sweep_dir, _record(trial.number, values, derived, "skipped", reason))
            log(f"trial {trial.number}: skipped: {reason}")
            continue
        record = _record(trial.number, values, derived, "running")
        _write(sweep_dir, record)
        out.append((record, config))
    return out


def _groups(trials: list[tuple[dict[str, Any], Config]], population: int | None) -> list[list]:
    """Trials grouped by what a population shares, each group cut into chunks of `population`."""
    groups: dict[tuple, list] = {}
    for trial in trials:
        groups.setdefault(structure_key(trial[1]), []).append(trial)
    size = population or max((len(g) for g in groups.values()), default=1)
    return [g[i:i + size] for g in groups.values() for i in range(0, len(g), size)]


def _train(trials: list[tuple[dict[str, Any], Config]], sweep: SweepConfig, data_path: str, sweep_dir: Path,
           study: Any, population: int | None, log: Any) -> None:
    from optuna.trial import TrialState

    chunks = _groups(trials, population)
    for i, chunk in enumerate(chunks):
        numbers = [r["trial"] for r, _ in chunk]
        log(f"population {i + 1}/{len(chunks)}: trials {', '.join(map(str, numbers))}")
        dirs = [sweep_dir / "trials" / sw._trial_name(n) for n in numbers]
        t0 = time.perf_counter()
        try:
            results = fit_population([c for _, c in chunk], data_path, dirs, resume=True, memory_flag=FLAG)
            outcomes = [(r.status, r.reason) for r in results]
        except TrainingInterrupted:
            raise  # the records stay "running": the next run resumes them
        except ConfigError as e:  # this population's config or size was refused
            outcomes = [("skipped", str(e).splitlines()[0])] * len(chunk)
        except Exception as e:  # one bad population must not end the sweep; the records keep why
            outcomes = [("failed", e)] * len(chunk)  # each member's folder gets the traceback
        seconds = round(time.perf_counter() - t0, 3)
        for (record, config), run_dir, (status, reason) in zip(chunk, dirs, outcomes):
            if isinstance(reason, BaseException):
                record.update(sw.record_failure(reason, run_dir, sweep_dir))
            else:
                record.update(status=status, reason=reason)
            record.update(seconds=seconds, population={"index": i, "trials": numbers},
                          run_dir=str(run_dir.relative_to(sweep_dir)) if run_dir.is_dir() else "")
            if status == "complete":
                try:
                    found = sw.metrics_from_run_dir(run_dir, config.log_file)
                    metric, metrics = sw._extract_metric(found, sweep.metric)
                    record.update(metric=metric, metrics=metrics)
                except (OSError, ValueError, KeyError, FloatingPointError) as e:
                    record.update(sw.record_failure(e, run_dir, sweep_dir))
            _write(sweep_dir, record)
            if record["status"] == "complete":
                study.tell(record["trial"], record["metric"])
                log(f"trial {record['trial']}: {sweep.metric} = {record['metric']:.6g}")
            else:
                study.tell(record["trial"], state=TrialState.FAIL)
                where = f" (traceback: {sweep_dir / record['error_file']})" if record.get("error_file") else ""
                log(f"trial {record['trial']}: {record['status']}: {record['reason']}{where}")
        sw.write_results(sweep_dir, sweep)
