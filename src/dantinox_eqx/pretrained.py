"""Load a trained model from its run directory: `from_pretrained(run_dir)`.

A run directory (written by the Trainer) holds:

    config.yaml                               the resolved Config (vocab_size filled in)
    tokenizer.json                            the run's tokenizer
    checkpoints/best/<step>/params            best-val weights
    checkpoints/latest/<step>/{params,train_state}

Loading builds the model's skeleton without computing anything (`eqx.filter_eval_shape`),
reads each array's saved dtype from the checkpoint's own metadata, and restores the weights
in that dtype onto one device: a bfloat16 run loads as bfloat16 with no flag, and a run
trained on N devices loads on a machine with any number of them. A checkpoint that fails its
digest check (`checkpoint.check`) is never loaded: an older latest one is used instead (with a
CheckpointWarning naming the skipped one), and with none left loading raises CheckpointError.

Fine-tuned (LoRA) runs (`use_lora: true`) hold adapter arrays plus a pointer to their base
run (`finetune.py`): loading builds the base with `from_pretrained(base_run)`, checks that it is
the base the adapter was trained on, adds the adapters and restores their arrays with
`restore_arrays` (which works for any pytree of arrays). The model comes back unmerged
(`LoRALinear` modules), or merged into a plain Transformer with `merge_lora=True`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import equinox as eqx
import jax
import orbax.checkpoint as ocp

from . import checkpoint
from .checkpoint import CheckpointError
from .config import Config, ConfigError
from .model import Transformer, cast_floating

__all__ = ["load_config", "from_pretrained", "restore_arrays", "saved_dtypes", "skeleton"]


def _run_dir(run_dir: str | os.PathLike) -> Path:
    path = Path(run_dir)
    if not path.is_dir():
        raise FileNotFoundError(f"run directory {str(path)!r} does not exist; pass a directory written by "
                                "`dantinox-eqx train`")
    return path


def load_config(run_dir: str | os.PathLike) -> Config:
    """The run's `Config` from `run_dir/config.yaml`; it must name `vocab_size`."""
    path = _run_dir(run_dir) / "config.yaml"
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


def _which(best: bool) -> str:
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


def from_pretrained(run_dir: str | os.PathLike, best: bool = True, *, dtype: Any = None,
                    inference: bool = False, merge_lora: bool = False) -> Transformer:
    """The trained `Transformer` of `run_dir`.

    - best: load the best-validation checkpoint (True) or the latest one (False).
    - dtype: cast floating weights to this dtype after loading (None: keep the saved dtype).
    - inference: build the model for sampling. For `mla` models this switches to the absorbed,
      latent-cached attention (`config.inference=True`); the parameters are the same.
    - merge_lora: for a LoRA run, return W + (alpha / r) A @ B as plain Linears (what sampling
      wants: no adapter GEMMs); False keeps the LoRALinear modules (unmerged, trainable).
    Raises FileNotFoundError / ConfigError / CheckpointError naming the run directory when it
    is missing, incomplete or does not match its own config.
    """
    config = load_config(run_dir)
    if inference and config.mla:
        config = config.replace(inference=True)
    if config.use_lora:
        from . import finetune, lora  # noqa: PLC0415 (finetune imports this module)

        model = finetune.load_lora_run(run_dir, config, best, inference=inference)
        if merge_lora:
            model = lora.merge_lora(model)
    else:
        model = restore_arrays(run_dir, _which(best), skeleton(config))
    return model if dtype is None else cast_floating(model, dtype)
