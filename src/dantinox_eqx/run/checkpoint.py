"""Checkpoints: orbax-checkpoint directories of plain arrays, no pickle, each with its digests.

Layout inside a run directory:

    checkpoints/latest/<step>/params        model arrays
    checkpoints/latest/<step>/train_state   optimizer state, step, PRNG key (full resume)
    checkpoints/latest/<step>/digests.json  sha256 of every file above (written last)
    checkpoints/best/<step>/params          the weights with the best val_loss so far (+ digests.json)

Saving step S (`save`) is a transaction that a kill at any moment leaves either undone or done:
orbax writes `<S>.writing/` (itself under a temporary name, renamed when complete), then the
digests of every file it wrote go into `<S>.writing/digests.json`, and a rename publishes it as
`<S>/` (an existing `<S>/`, e.g. from an interrupted earlier attempt at the same step, is first
renamed `<S>.old/` and removed after). Only then are older checkpoints pruned (renamed
`<S>.deleting/`, then removed): `keep` of them stay, so the previous good one is there to fall
back on. Steps above S (left by a run that went further and is now replaying from an older
checkpoint) are pruned too. `clean` removes what an interrupted save left behind.

Loading checks before it restores (`check`): a checkpoint whose files do not match its digests
(garbled, truncated, missing) fails, and `restore` / `good_step` skip it, with a warning naming
it, in favour of the newest one that passes; none passing is a CheckpointError. Checkpoints
written before digests existed (no digests.json) are accepted unverified.

Pytrees are stored as flat mappings `{"blocks.attn.qkv.weight": array, ...}` keyed by their
attribute paths, which makes the format readable without this library and independent of the
Python classes. Restoring needs a `like` tree (e.g. a freshly built model's arrays, or their
`jax.ShapeDtypeStruct`s) that gives the structure, dtypes and, optionally, target shardings:
a checkpoint written on 4 devices restores on 1 and vice versa.

Why not orbax's `CheckpointManager` (read in orbax-checkpoint 0.12.8) for rotation, best
tracking and temp-dir cleanup: its save renames its temporary folder to the final step folder
itself (`_finalize`), leaving no point between "every array file written" and "published" at
which `digests.json` could go in, so a published step could lack its digests; it refuses a step
it already holds (`StepAlreadyExistsError`) and `should_save` is False for any step <= its
latest, so neither the redo of an interrupted save at the same step (replaced atomically via
`<S>.old`) nor a run replaying from an older checkpoint (pruning the steps above it) fits;
its `latest_step` / `restore` take the newest step whatever its state, where ours skip one that
fails its digests for the newest that passes; and its `best_fn` ranks the same checkpoints it
keeps, where our `best/` is a separate params-only folder. The crash protocol above (temporary
name, digests, publish by rename, prune last, `clean`) is what tests/test_resume_faults.py kills
at every phase; orbax's `Checkpointer` (one folder, its own temp-and-rename) is used below it.

Multi-process JAX: `save` and `restore` are collective (every process calls them; orbax writes
each array's shards from the process holding them); process 0 alone writes the digests,
renames, prunes and checks, and tells the others which step it chose.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from jaxtyping import PyTree

from ..files import atomic_write_text, fsync_dir, remove_temp_files, sha256_file
from ..parallel import distributed
from .layout import CHECKPOINTS_DIR
from .save_guard import FAULT_ENV  # noqa: F401
from .save_guard import cause as _cause
from .save_guard import fault as _fault
from .save_guard import quiet_orbax as _quiet_orbax

__all__ = ["LATEST", "BEST", "DIGEST_FILE", "CheckpointError", "CheckpointWriteError", "CheckpointWarning",
           "flatten", "unflatten", "save", "restore", "latest_step", "good_step", "steps", "check",
           "checkpoint_dir", "clean", "intact"]

LATEST, BEST = "latest", "best"
DIGEST_FILE = "digests.json"
# Suffixes of a step's folder while it is written, replaced, or pruned (never loaded).
WRITING, OLD, DELETING = ".writing", ".old", ".deleting"
ORBAX_TMP = ".orbax-checkpoint-tmp"  # orbax's own temporary names (`<name>.orbax-checkpoint-tmp-<t>`)
_OS_ERROR_CODE = re.compile(r"os_error_code='?\d+")  # tensorstore's report of a failed OS call


class CheckpointError(ValueError):
    """No checkpoint where one was expected, one that fails its check, or one whose arrays do
    not fit the model."""


class CheckpointWriteError(OSError):
    """Saving a checkpoint failed (disk full, permissions, ...). Nothing of it was published;
    the checkpoints saved before are intact."""

    def __init__(self, message: str, which: str, step: int, path: Path):
        super().__init__(message)
        self.which, self.step, self.path = which, step, path


class CheckpointWarning(UserWarning):
    """A checkpoint failed its check and was skipped for an older one."""


def checkpoint_dir(run_dir: str | os.PathLike, which: str) -> Path:
    return Path(run_dir) / CHECKPOINTS_DIR / which


def _name(path: tuple) -> str:
    return jax.tree_util.keystr(path, simple=True, separator=".")


def _is_key(x: Any) -> bool:
    return isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def flatten(tree: PyTree) -> dict[str, Any]:
    """`{attribute.path: array}` for every array leaf; typed PRNG keys become their raw data."""
    flat = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        flat[_name(path) or "value"] = jax.random.key_data(leaf) if _is_key(leaf) else leaf
    return flat


def _abstract(x: Any) -> Any:
    if _is_key(x):
        x = jax.eval_shape(jax.random.key_data, x)
    sharding = getattr(x, "sharding", None)
    if isinstance(sharding, jax.sharding.Sharding):
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)
    return jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype if not hasattr(x, "dtype") else x.dtype)


def unflatten(flat: dict[str, Any], like: PyTree) -> PyTree:
    """Inverse of `flatten`, shaped like `like` (typed keys are re-wrapped)."""
    leaves_with_path, treedef = jax.tree_util.tree_flatten_with_path(like)
    leaves = []
    for path, ref in leaves_with_path:
        value = flat[_name(path) or "value"]
        leaves.append(jax.random.wrap_key_data(value, impl=jax.random.key_impl(ref)) if _is_key(ref) else value)
    return jax.tree_util.tree_unflatten(treedef, leaves)


# ------------------------------------------------------------------------------------------ listing
def steps(run_dir: str | os.PathLike, which: str) -> list[int]:
    """The published steps of checkpoint `which` (folders named by an integer), ascending;
    folders being written, replaced or pruned are not among them."""
    return _published(checkpoint_dir(run_dir, which))


def _published(d: Path) -> list[int]:
    if not d.is_dir():
        return []
    return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit() and p.is_dir())


def latest_step(run_dir: str | os.PathLike, which: str) -> int | None:
    """The newest published step of checkpoint `which` in `run_dir` (not checked), or None."""
    found = steps(run_dir, which)
    return found[-1] if found else None


# ------------------------------------------------------------------------------------------ digests
def _files(step_dir: Path) -> list[str]:
    """Every file under `step_dir` but the digest file, as sorted relative POSIX paths."""
    return sorted(p.relative_to(step_dir).as_posix() for p in step_dir.rglob("*")
                  if p.is_file() and p.name != DIGEST_FILE)


def _sha256_all(step_dir: Path, names: list[str]) -> list[str | None]:
    """The sha256 of each file (None: unreadable), hashed on a few threads: hashlib releases
    the GIL, and a big checkpoint is many array files, so this runs at disk speed."""

    def one(name: str) -> str | None:
        try:
            return sha256_file(step_dir / name)
        except OSError:
            return None

    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        return list(pool.map(one, names))


def _write_digests(step_dir: Path, step: int) -> None:
    names = _files(step_dir)
    digests = dict(zip(names, _sha256_all(step_dir, names), strict=True))
    unreadable = [name for name, digest in digests.items() if digest is None]
    if unreadable:
        raise OSError(errno.EIO, f"cannot read back {unreadable[0]}", str(step_dir / unreadable[0]))
    atomic_write_text(step_dir / DIGEST_FILE,
                      json.dumps({"step": step, "algorithm": "sha256", "files": digests}, indent=1) + "\n")


def check(step_dir: str | os.PathLike) -> str | None:
    """None when the checkpoint folder `step_dir` passes its check (every file listed in its
    digests.json is there with that sha256; or it predates digests: no digests.json), else
    the reason it fails, in a few words."""
    step_dir = Path(step_dir)
    record = step_dir / DIGEST_FILE
    if not record.exists():
        return None  # written before checkpoints carried digests: accepted unverified
    try:
        digests = json.loads(record.read_text(encoding="utf-8"))["files"]
    except (OSError, ValueError, KeyError, TypeError):
        digests = None
    if not isinstance(digests, dict) or not digests:
        return f"its {DIGEST_FILE} is unreadable"
    names = sorted(digests)
    for name, got in zip(names, _sha256_all(step_dir, names), strict=True):
        if got is None:
            return f"{name} is missing"
        if got != digests[name]:
            return f"{name} does not match its digest (garbled or truncated)"
    return None


def _newest_good(run_dir: str | os.PathLike, which: str,
                 warn: Callable[[str], Any] | None) -> tuple[int | None, list[str]]:
    """(the newest step of `which` that passes its check, or None; why each newer one failed).
    `warn` gets one line for each checkpoint skipped in favour of an older good one."""
    failed = []
    for step in reversed(steps(run_dir, which)):
        path = checkpoint_dir(run_dir, which) / str(step)
        why = check(path)
        if why is None:
            for bad, bad_why in failed if warn is not None else []:
                warn(f"skipping the {which} checkpoint {str(checkpoint_dir(run_dir, which) / str(bad))!r}: "
                     f"{bad_why}; using step {step}")
            break
        failed.append((step, why))
    else:
        step = None
    return step, [f"step {bad}: {why}" for bad, why in failed]


def _warn(message: str) -> None:
    warnings.warn(message, CheckpointWarning, stacklevel=4)


def good_step(run_dir: str | os.PathLike, which: str, warn: Callable[[str], Any] | None = _warn) -> int | None:
    """The newest step of checkpoint `which` that passes its check, skipping (and calling
    `warn` with a line naming) each newer one that fails; None when there is no checkpoint at
    all; CheckpointError when there are some but every one fails. Collective (process 0
    checks and tells the others)."""
    found, failures = None, []
    if distributed.is_primary():
        found, failures = _newest_good(run_dir, which, warn)
    found = distributed.broadcast_int(-1 if found is None else found)
    if found >= 0:
        return found
    if not steps(run_dir, which):
        return None
    raise CheckpointError(f"no intact {which!r} checkpoint in {str(run_dir)!r}: every one fails its check "
                          f"({'; '.join(failures) or 'see process 0'})")


def intact(run_dir: str | os.PathLike) -> str:
    """A phrase naming the newest latest checkpoint that passes its check, for error messages
    ("the checkpoint of step 20 ('run/checkpoints/latest/20') is intact"). Local, not collective."""
    step, _ = _newest_good(run_dir, LATEST, None)
    if step is None:
        return f"no checkpoint of this run is intact yet in {str(run_dir)!r}"
    return f"the checkpoint of step {step} ({str(checkpoint_dir(run_dir, LATEST) / str(step))!r}) is intact"


# ------------------------------------------------------------------------------------------ saving
def _rmtree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def _remove(d: Path, step: int) -> None:
    """Unpublish step `step` of `d` with one rename, then delete it (a kill in between leaves a
    `.deleting` folder that `clean` removes, never a half-deleted checkpoint)."""
    doomed = d / f"{step}{DELETING}"
    _rmtree(doomed)
    os.rename(d / str(step), doomed)
    _rmtree(doomed)


def _publish(which: str, step: int, tmp: Path, final: Path) -> None:
    if final.exists():  # an interrupted earlier attempt at this step: replace it, atomically
        old = final.with_name(f"{step}{OLD}")
        _rmtree(old)
        os.rename(final, old)
        _fault(which, step, "moved", final)
        os.rename(tmp, final)
        fsync_dir(final.parent)
        _rmtree(old)
    else:
        os.rename(tmp, final)
        fsync_dir(final.parent)


def _prune(d: Path, step: int, keep: int) -> None:
    """Keep the `keep` newest steps up to `step`; remove the rest and every step above it."""
    published = _published(d)
    for s in [s for s in published if s > step] + [s for s in published if s <= step][:-keep]:
        _remove(d, s)


def save(run_dir: str | os.PathLike, which: str, step: int, params: PyTree,
         train_state: PyTree | None = None, *, keep: int = 1) -> Path:
    """Save `params` (and, for full resume, `train_state`) as checkpoint `which` at `step`,
    keeping the `keep` newest checkpoints up to `step` (see the module docstring); returns its
    folder. Saving a step that exists replaces it atomically.

    Collective under multi-process JAX: every process calls it. Raises CheckpointWriteError
    (an OSError) when the file system refuses a write (`_is_write_error`: a full disk, ...);
    any other error (a bug) propagates unchanged. Either way nothing of this save is left
    published.
    """
    d = checkpoint_dir(run_dir, which)
    final, tmp = d / str(step), d / f"{step}{WRITING}"
    items = {"params": ocp.args.StandardSave(flatten(params))}
    if train_state is not None:
        items["train_state"] = ocp.args.StandardSave(flatten(train_state))
    primary = distributed.is_primary()
    try:
        _fault(which, step, "start", tmp)
        if primary:
            d.mkdir(parents=True, exist_ok=True)
            _rmtree(tmp)  # left by an interrupted attempt at this step
        distributed.barrier(f"checkpoint_{which}_{step}_start")
        with _quiet_orbax(tmp), ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as checkpointer:
            checkpointer.save(tmp.absolute(), args=ocp.args.Composite(**items))
        _fault(which, step, "written", tmp)
        if primary:
            _write_digests(tmp, step)  # last: a folder with digests.json is complete
            _fault(which, step, "digested", tmp)
            _publish(which, step, tmp, final)
            _fault(which, step, "committed", final)
            _prune(d, step, keep)
            _fault(which, step, "pruned", final)
        distributed.barrier(f"checkpoint_{which}_{step}_done")
    except Exception as e:
        if primary:  # whatever failed: nothing of this save stays
            for leftover in [tmp, *d.glob(f"{tmp.name}{ORBAX_TMP}*")]:
                _rmtree(leftover)
        if not _is_write_error(e):  # a bug: propagates as it is, with its traceback
            raise
        raise CheckpointWriteError(f"could not save the {which} checkpoint of step {step} to "
                                   f"{str(final)!r}: {_cause(e)}", which, step, final) from e
    return final


def _is_write_error(error: BaseException) -> bool:
    """Whether `error` is the file system refusing a write (a full disk, permissions, a file
    size limit): an OSError, or orbax's wrapping of one, in its cause/context chain (tensorstore
    raises a ValueError whose text carries the OS error as `[os_error_code=N]`)."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) or _OS_ERROR_CODE.search(str(error)):
            return True
        error = error.__cause__ or error.__context__
    return False


def clean(run_dir: str | os.PathLike) -> list[Path]:
    """Remove what interrupted writers left in `run_dir`: checkpoint folders being written or
    pruned, orbax's temporary folders, atomic-write temporary files; a step folder caught
    mid-replacement (`<S>.old` without `<S>`) is put back. Returns the removed paths. Only the
    process holding the run's lock may call it."""
    removed = remove_temp_files(run_dir)
    for which in (LATEST, BEST):
        d = checkpoint_dir(run_dir, which)
        if not d.is_dir():
            continue
        for child in sorted(d.iterdir()):
            stem, dot, suffix = child.name.partition(".")
            if not (stem.isdigit() and dot):
                continue
            if "." + suffix == OLD and not (d / stem).exists():
                os.rename(child, d / stem)  # killed between the two renames of a replacement
            elif "." + suffix in (WRITING, OLD, DELETING) or ORBAX_TMP in child.name:
                _rmtree(child)
                removed.append(child)
    return removed


# ------------------------------------------------------------------------------------------ loading
def restore(run_dir: str | os.PathLike, which: str, params_like: PyTree,
            train_state_like: PyTree | None = None, *, step: int | None = None,
            warn: Callable[[str], Any] | None = _warn) -> tuple[int, PyTree, PyTree | None]:
    """Restore checkpoint `which`: returns (step, params, train_state or None).

    `step`: None = the newest that passes its check (`good_step`: newer ones that fail it are
    skipped with `warn`); an explicit step is restored as it is (the caller checked it).
    `params_like` / `train_state_like` give structure, dtypes and target shardings. No
    checkpoint, none that passes its check, or one whose names or shapes do not match raise
    CheckpointError. Collective under multi-process JAX.
    """
    if step is None:
        step = good_step(run_dir, which, warn)
    if step is None:
        raise CheckpointError(f"no {which!r} checkpoint in {str(run_dir)!r}")
    items = {"params": ocp.args.StandardRestore(jax.tree.map(_abstract, flatten(params_like)))}
    if train_state_like is not None:
        items["train_state"] = ocp.args.StandardRestore(
            jax.tree.map(_abstract, flatten(train_state_like)))
    try:
        with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as checkpointer:
            restored = checkpointer.restore((checkpoint_dir(run_dir, which) / str(step)).absolute(),
                                            args=ocp.args.Composite(**items))
    except (ValueError, KeyError, FileNotFoundError) as e:
        raise CheckpointError(
            f"the {which!r} checkpoint in {str(run_dir)!r} does not fit this model: "
            f"{str(e).splitlines()[0] if str(e) else type(e).__name__}"
        ) from None
    _check_shapes(restored["params"], flatten(params_like), run_dir)
    params = unflatten(restored["params"], params_like)
    state = unflatten(restored["train_state"], train_state_like) if train_state_like is not None else None
    return step, params, state


def _check_shapes(restored: dict[str, Any], expected: dict[str, Any], run_dir: Any) -> None:
    for name, ref in expected.items():
        got = restored.get(name)
        if got is None or tuple(got.shape) != tuple(np.shape(ref)):
            raise CheckpointError(
                f"checkpoint in {str(run_dir)!r}: array {name!r} has shape "
                f"{None if got is None else tuple(got.shape)}, the model expects {tuple(np.shape(ref))}"
            )
