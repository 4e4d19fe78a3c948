"""Reading a run directory's weights: its config, the model's skeleton, checkpoint arrays in
their saved dtypes. The low half of loading; `run/pretrained.py` (from_pretrained) and
`run/finetune.py` (LoRA bases) build on it."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import equinox as eqx
import jax
import orbax.checkpoint as ocp

from ..config import Config, ConfigError
from ..model import Transformer
from . import checkpoint
from .checkpoint import CheckpointError
from .layout import CONFIG_FILE

__all__ = ["load_config", "restore_arrays", "saved_dtypes", "skeleton", "which"]


def _run_dir(run_dir: str | os.PathLike) -> Path:
    path = Path(run_dir)
    if not path.is_dir():
        raise FileNotFoundError(f"run directory {str(path)!r} does not exist; pass a directory written by "
                                "`dantinox-eqx train`")
    return path


def load_config(run_dir: str | os.PathLike) -> Config:
    """The run's `Config` from `run_dir/config.yaml`; it must name `vocab_size`."""
    path = _run_dir(run_dir) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"run directory {str(run_dir)!r} has no config.yaml; it is not a "
                                "complete run directory")
    try:
        config = Config.from_yaml(path)
    except ConfigError as e:
        raise ConfigError(f"run directory {str(run_dir)!r}: broken config.yaml: {e}") from None
    if config.vocab_size is None:
        raise ConfigError(f"run directory {str(run_dir)!r}: config.yaml has no vocab_size; it was not "
                          "written by a finished training run")
    return config


def skeleton(config: Config) -> Transformer:
    """The model with `jax.ShapeDtypeStruct` leaves instead of arrays: no compute, no memory."""
    return eqx.filter_eval_shape(Transformer, config, key=jax.random.key(0))


def _is_struct(x: Any) -> bool:
    return isinstance(x, jax.ShapeDtypeStruct)


def which(best: bool) -> str:
    return checkpoint.BEST if best else checkpoint.LATEST


def saved_dtypes(run_dir: str | os.PathLike, which: str, step: int | None = None) -> dict[str, Any]:
    """`{array name: dtype}` of checkpoint `which`'s params (at `step`; None = the newest that
    passes its check), read from orbax's metadata."""
    if step is None:
        step = _good_step(run_dir, which)
    path = checkpoint.checkpoint_dir(run_dir, which) / str(step) / "params"
    try:
        tree = ocp.StandardCheckpointHandler().metadata(path.absolute()).tree
    except (FileNotFoundError, ValueError, KeyError) as e:
        raise CheckpointError(f"run directory {str(run_dir)!r}: the {which!r} checkpoint at step {step} "
                              f"is unreadable: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
                              ) from None
    return {name: meta.dtype for name, meta in tree.items()}


def _good_step(run_dir: str | os.PathLike, which: str) -> int:
    """The newest step of `which` that passes its digest check (newer failing ones are skipped
    with a CheckpointWarning): a checkpoint that fails it is never loaded."""
    step = checkpoint.good_step(run_dir, which)
    if step is None:
        raise CheckpointError(f"run directory {str(run_dir)!r} has no {which!r} checkpoint "
                              f"(looked in {str(checkpoint.checkpoint_dir(run_dir, which))!r})")
    return step


def restore_arrays(run_dir: str | os.PathLike, which: str, like: Any) -> Any:
    """Restore checkpoint `which` (the newest that passes its check) into a tree shaped like
    `like` (ShapeDtypeStruct leaves; other leaves are kept). Each array comes back in its saved
    dtype, whole on the default device."""
    step = _good_step(run_dir, which)
    dtypes = saved_dtypes(run_dir, which, step)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    arrays, rest = eqx.partition(like, _is_struct)
    names = checkpoint.flatten(arrays)
    missing = sorted(set(names) - set(dtypes))
    if missing:
        raise CheckpointError(f"run directory {str(run_dir)!r}: the {which!r} checkpoint lacks "
                              f"{len(missing)} array(s) the model needs, e.g. {missing[0]!r}")
    targets = checkpoint.unflatten(
        {n: jax.ShapeDtypeStruct(s.shape, dtypes[n], sharding=device) for n, s in names.items()}, arrays)
    _, restored, _ = checkpoint.restore(run_dir, which, targets, step=step)
    return eqx.combine(restored, rest)
