"""`dantinox-eqx`: the command group. Each subcommand lives in its own module of `cli/`."""

from __future__ import annotations

import os
import signal
import sys
import warnings


def _terminated(signum: int, frame: object) -> None:
    # Outside the trainer's own handling (it takes the signal over for the whole of fit) no
    # training step is running and nothing is half-written: say so, exit at once with the
    # shell's code (143 for SIGTERM).
    name = signal.Signals(signum).name
    os.write(2, f"interrupted by {name} (no training step was running): nothing was lost\n".encode())
    os._exit(128 + signum)


# Installed first, before the heavy imports below (JAX takes seconds to import): from here on a
# SIGTERM ends the program with a message, not silently.
signal.signal(signal.SIGTERM, _terminated)

import click

from dantinox_eqx import __version__
from dantinox_eqx.hostmem import keep_freed_memory


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="dantinox-eqx")
def app() -> None:
    """Train, fine-tune and sample GPT-style language models in JAX with Equinox.

    \b
    dantinox-eqx train                      train the default config on Shakespeare
    dantinox-eqx train --config C --data_path FILE [--FIELD VALUE ...]
    dantinox-eqx prepare SOURCE OUT_DIR     text/folder/JSONL/Parquet/HF -> token shards
    dantinox-eqx generate RUN_DIR --prompt "..."
    dantinox-eqx import-hf HF_DIR RUN_DIR       a Hugging Face model as a run (export --format hf: back)
    """


def _register() -> None:
    # Each subcommand module is optional while the project grows: a missing one simply
    # does not appear in --help.
    import importlib

    for name in ("train", "prepare", "generate", "evaluate", "export", "import_hf", "find_lr", "sweep", "plot"):
        try:
            module = importlib.import_module(f"cli.{name}")
        except ModuleNotFoundError as e:
            if e.name != f"cli.{name}":
                raise
            continue
        for command in module.COMMANDS:
            app.add_command(command)


_register()


def _one_line_warning(message: Warning | str, category: type[Warning], *args: object, **kwargs: object) -> str:
    return f"warning: {message}\n"


def main() -> None:
    """Run the app. Every usage error (ours or Click's: unknown option, bad value) prints ONE
    line, `Error: ...`, and exits with code 2; no usage dump, no traceback. Warnings (e.g. a
    checkpoint that failed its check, skipped for an older one) print one line each."""
    keep_freed_memory()  # before JAX allocates anything (dantinox_eqx/hostmem.py)
    warnings.formatwarning = _one_line_warning  # not Python's two lines of source location
    try:
        code = app.main(prog_name="dantinox-eqx", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("Aborted.", err=True)
        sys.exit(130)
    except click.ClickException as e:
        click.echo(f"Error: {' '.join(e.format_message().split())}", err=True)
        sys.exit(e.exit_code)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    sys.exit(main())
