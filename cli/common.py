"""What every command shares: turning our errors into one line and exit code 2."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import click

from dantinox_eqx.config import ConfigError

# Errors that mean "the user's input is wrong": one line, exit code 2, no traceback.
USER_ERRORS: tuple[type[BaseException], ...] = (ConfigError, FileNotFoundError, FileExistsError)


def user_errors(*extra: type[BaseException]) -> tuple[type[BaseException], ...]:
    """USER_ERRORS plus the library's own ValueError subclasses for bad input."""
    from dantinox_eqx.data.chat import ChatError
    from dantinox_eqx.data.sampling import DataError
    from dantinox_eqx.data.tokenizer import TokenizerError
    from dantinox_eqx.run.checkpoint import CheckpointError

    return USER_ERRORS + (DataError, TokenizerError, CheckpointError, ChatError) + extra


def fail(message: str) -> None:
    """Print `Error: message` to stderr and exit with code 2 (Click's usage-error code)."""
    raise click.UsageError(message)


def handle_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Decorator for commands: known input errors become a one-line message and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except user_errors() as e:
            fail(str(e).splitlines()[0] if str(e) else type(e).__name__)

    return wrapper
