"""Test harness for tests/test_trainer_distributed.py, not part of the library.

A subprocess started with this folder on PYTHONPATH imports this module at start-up (Python's
`sitecustomize` hook). With AUDIT_WRITES=FILE in its environment it records, through a PEP 578
audit hook, every path the process opens for writing, creates, renames to or removes: one
`event path` line per call, appended to FILE. The test uses it to check which process of a
multi-process run wrote which files of the run directory. Writes made outside Python (orbax's
tensorstore, wandb's service process) are not seen.
"""

import os
import sys

_LOG = os.environ.get("AUDIT_WRITES")
_WRITE = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
_PATH_EVENTS = {"os.mkdir": 0, "os.remove": 0, "os.rmdir": 0, "shutil.rmtree": 0, "os.rename": 1}

if _LOG:
    _out = open(_LOG, "a", buffering=1, encoding="utf-8")  # opened before the hook exists

    def _hook(event, args):
        if event == "open":
            path, mode, flags = args
            writing = any(c in mode for c in "wax+") if isinstance(mode, str) else bool((flags or 0) & _WRITE)
            if not writing:
                return
        elif event in _PATH_EVENTS:
            path = args[_PATH_EVENTS[event]]
        else:
            return
        if isinstance(path, (str, bytes, os.PathLike)):
            _out.write(f"{event} {os.path.abspath(os.fsdecode(path))}\n")

    sys.addaudithook(_hook)
