"""A failing checkpoint save: run/save_guard.quiet_orbax holds back orbax's reports of that
save only, and `checkpoint.save` turns only write errors into CheckpointWriteError (issue 24)."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
from pathlib import Path

import jax.numpy as jnp
import pytest

from dantinox_eqx.run import checkpoint as ckpt
from dantinox_eqx.run.save_guard import quiet_orbax

# A real failing save (tensorstore's writes fail with EFBIG under a 4 KiB file-size limit, the
# fault seam's `fsize`), in a process of its own (the limit is process-wide). Inside orbax's
# save another thread raises an unraisable exception; the script prints what reached the
# original hook and the loggers' filters before and after.
_DRIVER = r"""
import json, logging, sys, threading
import jax.numpy as jnp
import orbax.checkpoint as ocp
from dantinox_eqx.run import checkpoint as ckpt

reached = []
sys.unraisablehook = original = lambda info: reached.append(str(info.exc_value))

class Boom:
    def __del__(self):
        raise RuntimeError("another thread's error")

save = ocp.Checkpointer.save
def save_with_another_thread(self, *args, **kwargs):  # runs inside quiet_orbax
    thread = threading.Thread(target=Boom)
    thread.start()
    thread.join()
    return save(self, *args, **kwargs)
ocp.Checkpointer.save = save_with_another_thread

def filters():
    return [len(logging.getLogger(name).filters) for name in ("absl", "asyncio")]

before = filters()
try:
    ckpt.save(sys.argv[1], ckpt.LATEST, 5, {"w": jnp.arange(100_000, dtype=jnp.float32)})
except ckpt.CheckpointWriteError as e:
    error = str(e)
after = filters()
# a late report of an abandoned task, as asyncio logs it when the task is collected, and a record
# about something else: what the filter left on the asyncio logger drops and keeps
late, other = [], []
asyncio_log = logging.getLogger("asyncio")
tmp = ckpt.checkpoint_dir(sys.argv[1], ckpt.LATEST).absolute() / f"5{ckpt.WRITING}"
for message, kept in ((f"Task exception was never retrieved: writing {tmp}/params failed", late),
                      ("Task exception was never retrieved: elsewhere", other)):
    record = asyncio_log.makeRecord("asyncio", logging.ERROR, "tasks.py", 1, message, (), None)
    kept.append(asyncio_log.filter(record))
print(json.dumps({"error": error, "reached": reached, "before": before, "after": after,
                  "hook_restored": sys.unraisablehook is original, "late_kept": late, "other_kept": other}))
"""


@pytest.mark.slow
def test_a_failing_save_holds_back_only_its_own_reports(tmp_path: Path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "JAX_PLATFORMS": "cpu",
           "DANTINOX_EQX_TEST_FAULT": "latest:5:start:fsize"}
    out = subprocess.run([sys.executable, "-c", _DRIVER, str(tmp_path)], env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["error"].endswith(": [Errno 27] File too large"), result
    assert result["reached"] == ["another thread's error"]  # not swallowed with orbax's reports
    assert result["before"] == [0, 0]
    # absl's logger as before; asyncio's keeps the filter for the abandoned tasks' late reports
    assert result["after"] == [0, 1]
    assert result["late_kept"] == [False] and result["other_kept"] == [True]
    assert result["hook_restored"]
    assert "absl" not in out.stderr and "Traceback" not in out.stderr, out.stderr  # orbax's reports held back


class _Raises:
    """An object whose finalizer raises `message`: an unraisable exception when collected."""

    def __init__(self, message: str):
        self.message = message

    def __del__(self):
        raise RuntimeError(self.message)


def test_records_and_unraisables_not_about_the_save_pass_through(tmp_path: Path, caplog):
    """In-process: an absl record naming another path, and another thread's unraisable
    exception, go where they would have gone; a record or an unraisable naming the save's path
    does not."""
    reached = []
    original, sys.unraisablehook = sys.unraisablehook, lambda info: reached.append(str(info.exc_value))
    try:
        save = tmp_path / "20.writing"
        with caplog.at_level("ERROR", logger="absl"), quiet_orbax(save):
            absl = logging.getLogger("absl")
            absl.error("writing %s failed", f"{save}.orbax-checkpoint-tmp/params")
            absl.error("writing %s failed", tmp_path / "2.writing")
            thread = threading.Thread(target=_Raises, args=("elsewhere",))
            thread.start()
            thread.join()
            _Raises(f"Failed writing: {save}/params")
        assert [r.getMessage() for r in caplog.records] == [f"writing {tmp_path / '2.writing'} failed"]
        assert reached == ["elsewhere"]
    finally:
        sys.unraisablehook = original


@pytest.mark.parametrize("raised, expected", [
    (OSError(28, "No space left on device"), "[Errno 28] No space left on device"),
    # tensorstore's wrapping of a failed write (orbax re-raises it as a ValueError)
    (ValueError("OUT_OF_RANGE: Error writing ... [os_error_code='27'] [source locations=...]"),
     "[Errno 27] File too large"),
    (TypeError("a bug in the save path"), None),
])
def test_only_write_errors_become_checkpoint_write_errors(tmp_path: Path, monkeypatch, raised, expected):
    """A write error (an OSError, or one in the cause chain / tensorstore's text) is the
    CheckpointWriteError the trainer turns into "free space, then resume"; any other error is
    a bug and propagates as it is. Either way the save leaves nothing behind."""

    def fail(step_dir, step):
        raise raised

    monkeypatch.setattr(ckpt, "_write_digests", fail)
    with pytest.raises(ckpt.CheckpointWriteError if expected else type(raised)) as info:
        ckpt.save(tmp_path, ckpt.LATEST, 5, {"w": jnp.arange(8.0)})
    if expected:
        final = ckpt.checkpoint_dir(tmp_path, ckpt.LATEST) / "5"
        assert str(info.value) == f"could not save the latest checkpoint of step 5 to {str(final)!r}: {expected}"
        assert info.value.__cause__ is raised
    else:
        assert info.value is raised
    assert list(ckpt.checkpoint_dir(tmp_path, ckpt.LATEST).iterdir()) == []


def test_an_os_error_wrapped_by_another_error_is_a_write_error():
    try:
        try:
            raise OSError(13, "Permission denied")
        except OSError as e:
            raise RuntimeError("orbax: commit failed") from e
    except RuntimeError as wrapped:
        assert ckpt._is_write_error(wrapped)
    assert not ckpt._is_write_error(KeyError("params"))
