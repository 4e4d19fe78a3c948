"""Sweep YAML (W&B's format) -> a validated `SweepConfig`; a trial's values -> a `Config`.

The YAML holds `method` (grid | random | bayes), `metric` {name, goal}, and `parameters`, each a
Config field with `value`, `values`, or a `distribution` (constant, categorical, int_uniform,
uniform, q_uniform, log_uniform, log_uniform_values, q_log_uniform_values, normal, q_normal)
with `min`/`max`/`q`/`mu`/`sigma`, drawn as W&B draws them. Everything is checked before any
trial runs (ConfigError naming the parameter): an unknown field (with a did-you-mean), an
unknown key or distribution, a missing or inverted bound, a value the field rejects, or a
continuous distribution on an integer field. `run_cap` caps the total number of trials.

GQA shape rule (dim must equal n_heads * head_size). A trial's values are applied over the base
config; when the three disagree, the fields the sweep did not set are derived, in this order:
  1. head_size not swept: head_size = dim // n_heads   (a swept dim keeps its meaning: width)
  2. else dim not swept:  dim = n_heads * head_size
  3. else n_heads not swept: n_heads = dim // head_size
  4. else (all three swept and inconsistent): the trial is skipped.
A derivation that does not divide exactly, a kv_heads that does not divide n_heads, or any other
ConfigError of the trial's Config skips the trial (`build_trial_config` returns the reason).
"""

from __future__ import annotations

import json
import math
import os
import statistics
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..config import Config, ConfigError, as_number, closest, read_yaml_mapping

__all__ = ["SweepConfig", "Param", "load_sweep_config", "parse_sweep_config", "build_trial_config",
           "METHODS", "GOALS", "DISTRIBUTIONS", "METRICS"]

METHODS = ("grid", "random", "bayes")
GOALS = ("minimize", "maximize")
DISTRIBUTIONS = ("constant", "categorical", "int_uniform", "uniform", "q_uniform", "log_uniform",
                 "log_uniform_values", "q_log_uniform_values", "normal", "q_normal")
# What a trial reports (the columns of training_log.csv, plus the best val_loss of the run).
METRICS = ("val_loss", "best_val_loss", "train_loss", "val_bal", "train_bal", "tokens_per_s", "ms_per_step")
TOP_LEVEL_KEYS = ("method", "metric", "parameters", "name", "description", "program", "command",
                  "early_terminate", "project", "entity", "run_cap")
PARAM_KEYS = ("value", "values", "distribution", "min", "max", "q", "mu", "sigma")
SHAPE_FIELDS = ("dim", "n_heads", "head_size", "kv_heads")
CONTINUOUS = ("uniform", "log_uniform", "log_uniform_values", "normal")


def _did_you_mean(name: str, options: Any) -> str:
    close = closest(name, options)
    return f"; did you mean {close!r}?" if close else ""


def _config_fields() -> dict[str, Any]:
    from ..config import _hints

    return _hints()


def _field_base_type(name: str) -> type:
    from ..config import _unwrap_optional

    return _unwrap_optional(_config_fields()[name])[0]


# ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Param:
    """One swept Config field and how its values are drawn (W&B semantics)."""

    name: str
    distribution: str
    values: tuple = ()  # categorical choices; constant: the one value
    min: int | float | None = None
    max: int | float | None = None
    q: int | float | None = None
    mu: int | float = 0.0
    sigma: int | float = 1.0

    def grid_values(self) -> list[Any]:
        """The discrete values a grid search walks (ConfigError for continuous distributions)."""
        if self.distribution in ("categorical", "constant"):
            return list(self.values)
        if self.distribution == "int_uniform":
            return list(range(int(self.min), int(self.max) + 1))
        if self.distribution == "q_uniform":
            n = int(math.floor((self.max - self.min) / self.q + 1e-9))
            return [_round_q(self.min + i * self.q, self.q) for i in range(n + 1)]
        raise ConfigError(f"sweep parameter {self.name}: method grid needs discrete values, got distribution "
                          f"{self.distribution}; use values, int_uniform or q_uniform, or method random/bayes")

    def suggest(self, trial: Any, grid: bool = False) -> Any:
        """The value of this field for an optuna `trial` (a W&B-equivalent draw)."""
        d, name = self.distribution, self.name
        if d == "constant":
            return self.values[0]
        if grid or d == "categorical":
            return trial.suggest_categorical(name, self.grid_values() if grid else list(self.values))
        if d == "int_uniform":
            return trial.suggest_int(name, int(self.min), int(self.max))
        if d == "uniform":
            return trial.suggest_float(name, self.min, self.max)
        if d == "q_uniform":
            if all(float(v).is_integer() for v in (self.min, self.max, self.q)):
                return trial.suggest_int(name, int(self.min), int(self.max), step=int(self.q))
            return _round_q(trial.suggest_float(name, self.min, self.max), self.q)
        if d == "log_uniform_values":
            return trial.suggest_float(name, self.min, self.max, log=True)
        if d == "log_uniform":  # W&B: min and max are natural-log exponents
            return trial.suggest_float(name, math.exp(self.min), math.exp(self.max), log=True)
        if d == "q_log_uniform_values":
            return _round_q(trial.suggest_float(name, self.min, self.max, log=True), self.q)
        if d in ("normal", "q_normal"):
            # Sample the normal's quantile uniformly and map it through the inverse CDF: the
            # random sampler then draws exactly N(mu, sigma), and TPE searches the quantile.
            u = trial.suggest_float(f"{name}:quantile", 1e-6, 1.0 - 1e-6)
            x = statistics.NormalDist(self.mu, self.sigma).inv_cdf(u)
            return _round_q(x, self.q) if d == "q_normal" else x
        raise AssertionError(d)


def _round_q(x: int | float, q: int | float) -> int | float:
    value = round(x / q) * q
    return int(round(value)) if float(q).is_integer() else round(value, 12)


@dataclass(frozen=True)
class SweepConfig:
    """A validated sweep: method, metric, goal, parameters; `raw` is the W&B-format mapping."""

    method: str
    metric: str
    goal: str
    parameters: dict[str, Param]
    raw: dict[str, Any]
    run_cap: int | None = None

    def better(self, a: float, b: float) -> bool:
        return a < b if self.goal == "minimize" else a > b

    def sample(self, trial: Any) -> dict[str, Any]:
        """The trial's values of every parameter (constants included), drawn through optuna."""
        return {name: p.suggest(trial, grid=self.method == "grid") for name, p in self.parameters.items()}


def load_sweep_config(path: str | os.PathLike) -> SweepConfig:
    """Read and validate a W&B-format sweep YAML (ConfigError naming the problem)."""
    data = read_yaml_mapping(path, "sweep_config:", "a sweep YAML file",
                             "a mapping with method, metric and parameters")
    return parse_sweep_config(data)


def parse_sweep_config(data: Mapping[str, Any]) -> SweepConfig:
    """Validate a W&B-format sweep mapping into a `SweepConfig` (see the module docstring)."""
    for key in data:
        if key not in TOP_LEVEL_KEYS:
            raise ConfigError(f"sweep config: unknown key {key!r}{_did_you_mean(key, TOP_LEVEL_KEYS)}"
                              f" (allowed: {', '.join(TOP_LEVEL_KEYS)})")
    method = data.get("method")
    if method not in METHODS:
        raise ConfigError(f"sweep method: {method!r} is not one of {', '.join(METHODS)}"
                          f"{_did_you_mean(method, METHODS)}")
    metric = data.get("metric") or {"name": "val_loss", "goal": "minimize"}
    if not isinstance(metric, dict):
        raise ConfigError("sweep metric: expected a mapping like {name: val_loss, goal: minimize}")
    for key in metric:
        if key not in ("name", "goal", "target"):
            raise ConfigError(f"sweep metric: unknown key {key!r}; use name and goal")
    metric_name = metric.get("name", "val_loss")
    if metric_name not in METRICS:
        raise ConfigError(f"sweep metric: {metric_name!r} is not a metric a trial reports"
                          f"{_did_you_mean(metric_name, METRICS)} (choose from {', '.join(METRICS)})")
    goal = metric.get("goal", "minimize")
    if goal not in GOALS:
        raise ConfigError(f"sweep metric goal: {goal!r} is not minimize or maximize")
    params = data.get("parameters")
    if not isinstance(params, dict) or not params:
        raise ConfigError("sweep parameters: expected a non-empty mapping of Config field -> spec")
    parsed = {name: _parse_param(name, spec) for name, spec in params.items()}
    if method == "grid":
        for p in parsed.values():
            p.grid_values()  # raises for continuous distributions
    run_cap = data.get("run_cap")
    if run_cap is not None and (not isinstance(run_cap, int) or isinstance(run_cap, bool) or run_cap < 1):
        raise ConfigError(f"sweep run_cap: expected a positive integer, got {run_cap!r}")
    return SweepConfig(method=method, metric=metric_name, goal=goal, parameters=parsed,
                       raw=json.loads(json.dumps(dict(data))), run_cap=run_cap)


def _number(name: str, key: str, value: Any) -> int | float:
    number = as_number(value)
    if number is not None:
        return number
    raise ConfigError(f"sweep parameter {name}: {key} must be a number, got {value!r}")


def _parse_param(name: str, spec: Any) -> Param:
    fields = _config_fields()
    if name not in fields:
        raise ConfigError(f"sweep parameter {name!r}: not a Config field{_did_you_mean(name, fields)}")
    if not isinstance(spec, dict):
        raise ConfigError(f"sweep parameter {name}: expected a mapping like {{values: [...]}} or "
                          f"{{distribution: uniform, min: .., max: ..}}, got {spec!r}")
    if "parameters" in spec:
        raise ConfigError(f"sweep parameter {name}: nested parameters are not supported (Config is flat)")
    for key in spec:
        if key not in PARAM_KEYS:
            raise ConfigError(f"sweep parameter {name}: unknown key {key!r}{_did_you_mean(key, PARAM_KEYS)}"
                              f" (allowed: {', '.join(PARAM_KEYS)})")
    dist = spec.get("distribution")
    if dist is None:  # W&B's inference
        if "value" in spec:
            dist = "constant"
        elif "values" in spec:
            dist = "categorical"
        elif "min" in spec and "max" in spec:
            both_int = all(isinstance(spec[k], int) and not isinstance(spec[k], bool) for k in ("min", "max"))
            dist = "int_uniform" if both_int else "uniform"
        else:
            raise ConfigError(f"sweep parameter {name}: give value, values, or a distribution with min and max")
    if dist not in DISTRIBUTIONS:
        raise ConfigError(f"sweep parameter {name}: unknown distribution {dist!r}{_did_you_mean(dist, DISTRIBUTIONS)}"
                          f" (supported: {', '.join(DISTRIBUTIONS)})")
    base = _field_base_type(name)
    if dist == "constant":
        if "value" not in spec:
            raise ConfigError(f"sweep parameter {name}: distribution constant needs value")
        param = Param(name, dist, values=(spec["value"],))
    elif dist == "categorical":
        values = spec.get("values")
        if not isinstance(values, list) or not values:
            raise ConfigError(f"sweep parameter {name}: values must be a non-empty list, got {values!r}")
        for v in values:
            if not (v is None or isinstance(v, str | int | float | bool)):
                raise ConfigError(f"sweep parameter {name}: values must be scalars, got {v!r}")
        param = Param(name, dist, values=tuple(values))
    else:
        if base not in (int, float):
            raise ConfigError(f"sweep parameter {name}: a {base.__name__} field takes values or value, "
                              f"not distribution {dist}")
        if dist in ("normal", "q_normal"):
            mu = _number(name, "mu", spec.get("mu", 0.0))
            sigma = _number(name, "sigma", spec.get("sigma", 1.0))
            if not sigma > 0:
                raise ConfigError(f"sweep parameter {name}: sigma must be positive, got {sigma}")
            param = Param(name, dist, mu=float(mu), sigma=float(sigma), q=_q(name, dist, spec))
        else:
            for key in ("min", "max"):
                if key not in spec:
                    raise ConfigError(f"sweep parameter {name}: distribution {dist} needs min and max ({key} missing)")
            lo, hi = _number(name, "min", spec["min"]), _number(name, "max", spec["max"])
            if not lo < hi:
                raise ConfigError(f"sweep parameter {name}: min must be below max, got min={lo} max={hi}")
            if dist == "int_uniform" and not (float(lo).is_integer() and float(hi).is_integer()):
                raise ConfigError(f"sweep parameter {name}: int_uniform needs integer min and max, got {lo}, {hi}")
            if dist in ("log_uniform_values", "q_log_uniform_values") and lo <= 0:
                raise ConfigError(f"sweep parameter {name}: {dist} needs min > 0, got {lo}")
            param = Param(name, dist, min=lo, max=hi, q=_q(name, dist, spec))
        if base is int and (dist in CONTINUOUS or (param.q is not None and not float(param.q).is_integer())):
            raise ConfigError(f"sweep parameter {name}: an integer field needs int_uniform, values, or a q_ "
                              f"distribution with an integer q, not {dist}" + (f" (q={param.q})" if param.q else ""))
    _check_values(param)
    return param


def _q(name: str, dist: str, spec: dict[str, Any]) -> int | float | None:
    if not dist.startswith("q_"):
        if "q" in spec:
            raise ConfigError(f"sweep parameter {name}: q only applies to q_ distributions, not {dist}")
        return None
    q = _number(name, "q", spec.get("q", 1))
    if not q > 0:
        raise ConfigError(f"sweep parameter {name}: q must be positive, got {q}")
    return q


def _check_values(param: Param) -> None:
    """Each fixed value (and each bound) must be valid for the field on its own: checked against
    the default Config, except shape fields, whose consistency is the trial's (module doc)."""
    if param.name in SHAPE_FIELDS:  # positive integers (kv_heads may be null)
        bounds = [param.min, param.max] if param.min is not None else []
        for v in [*param.values, *bounds]:
            if v is None and param.name == "kv_heads":
                continue
            if isinstance(v, bool) or not isinstance(v, int | float) or not float(v).is_integer() or v <= 0:
                raise ConfigError(f"sweep parameter {param.name}: expected positive integers, got {v!r}")
        return
    if param.distribution in ("constant", "categorical"):
        candidates = list(param.values)
    elif param.distribution == "log_uniform":
        candidates = [math.exp(param.min), math.exp(param.max)]
    elif param.distribution in ("q_uniform", "q_log_uniform_values"):
        candidates = [_round_q(param.min, param.q), _round_q(param.max, param.q)]
    elif param.min is not None:
        candidates = [param.min, param.max]
    else:
        candidates = []
    for v in candidates:
        try:
            Config().replace(**{param.name: v})
        except ConfigError as e:
            raise ConfigError(f"sweep parameter {param.name}: value {v!r} is invalid: {e}") from None


# ------------------------------------------------------------------------------------------
def build_trial_config(base: Config, values: Mapping[str, Any]) -> tuple[Config | None, dict[str, Any], str | None]:
    """Apply a trial's `values` over `base` with the GQA shape rule of the module docstring.

    Returns `(config, derived, None)`, `derived` holding the fields set by the rule, or
    `(None, derived, reason)` when the trial must be skipped. Never raises ConfigError.
    """
    merged = {**base.to_dict(), **values}
    derived: dict[str, Any] = {}
    dim, heads, hs = merged["dim"], merged["n_heads"], merged["head_size"]
    if all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in (dim, heads, hs)) and dim != heads * hs:
        if "head_size" not in values:
            if dim % heads:
                return None, derived, (f"dim={dim} is not divisible by n_heads={heads} (head_size is derived "
                                       "as dim // n_heads when not swept)")
            derived["head_size"] = dim // heads
        elif "dim" not in values:
            derived["dim"] = heads * hs
        elif "n_heads" not in values:
            if dim % hs:
                return None, derived, (f"dim={dim} is not divisible by head_size={hs} (n_heads is derived "
                                       "as dim // head_size when not swept)")
            derived["n_heads"] = dim // hs
        else:
            return None, derived, f"dim={dim} != n_heads * head_size = {heads} * {hs}, all three swept"
        merged.update(derived)
    try:
        return Config(**merged), derived, None
    except ConfigError as e:
        return None, derived, str(e)
