"""`dantinox-eqx`: the command group. Each subcommand lives in its own module of `cli/`."""

from __future__ import annotations

import importlib
import importlib.util
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

from dantinox_eqx import __version__  # issue 16: dantinox_eqx no longer imports JAX eagerly
from dantinox_eqx.compile_cache import enable_compile_cache
from dantinox_eqx.hostmem import keep_freed_memory, restart_with_huge_pages

# issue 16: command name -> its module in cli/, imported only when the command is looked up
# (run, or listed by --help); every cli module imports JAX (and the rest) inside its command.
LAZY_COMMANDS = {"train": "train", "prepare": "prepare", "generate": "generate", "eval": "evaluate",
                 "export": "export", "import-hf": "import_hf", "import-gguf": "import_gguf", "find-lr": "find_lr",
                 "plot-lr-schedule": "find_lr", "sweep": "sweep", "plot": "plot", "chat": "chat"}


class LazyGroup(click.Group):
    """A Click group that imports a subcommand's module (LAZY_COMMANDS) on first use. A module
    that does not exist yet simply does not appear in --help."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        present = [n for n, m in LAZY_COMMANDS.items() if importlib.util.find_spec(f"cli.{m}") is not None]
        return sorted({*super().list_commands(ctx), *present})

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in self.commands and name in LAZY_COMMANDS:
            if importlib.util.find_spec(f"cli.{LAZY_COMMANDS[name]}") is None:
                return None
            for command in importlib.import_module(f"cli.{LAZY_COMMANDS[name]}").COMMANDS:
                self.add_command(command)
        return super().get_command(ctx, name)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="dantinox-eqx")
@click.option("--no-compile-cache", is_flag=True,
              help="Do not keep compiled XLA programs on disk (default: ~/.cache/dantinox-eqx/jax-cache; "
                   "DANTINOX_EQX_COMPILE_CACHE=0 or =PATH turns it off or moves it; an existing "
                   "JAX_COMPILATION_CACHE_DIR is respected).")
def app(no_compile_cache: bool) -> None:
    """Train, fine-tune and sample GPT-style language models in JAX with Equinox.

    \b
    dantinox-eqx train                      train the default config on Shakespeare
    dantinox-eqx train --config C --data_path FILE [--FIELD VALUE ...]
    dantinox-eqx generate RUN_DIR --prompt "..."
    """
    enable_compile_cache(not no_compile_cache)  # issue 16: before anything compiles


def _one_line_warning(message: Warning | str, category: type[Warning], *args: object, **kwargs: object) -> str:
    return f"warning: {message}\n"


def _restart_with_huge_pages() -> None:
    """Start this very command again with glibc's huge-page tunable in its environment (glibc
    reads it only at start-up; dantinox_eqx/hostmem.py: SmolLM2's LoRA step 3095 -> 2777 ms).
    Only when run as the installed command itself (the interpreter's own arguments are this
    command's), never inside another program that calls `main()` (a test); once at most, since the
    restarted process finds the tunable set."""
    if sys.orig_argv[1:] == sys.argv:
        restart_with_huge_pages(sys.orig_argv)


def main() -> None:
    """Run the app. Every usage error (ours or Click's: unknown option, bad value) prints ONE
    line, `Error: ...`, and exits with code 2; no usage dump, no traceback. Warnings (e.g. a
    checkpoint that failed its check, skipped for an older one) print one line each."""
    _restart_with_huge_pages()
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
