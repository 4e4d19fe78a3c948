"""`--FIELD VALUE` options for every Config field, shared by every command that takes a config.

    @click.command()
    @click.option("--config", "config_path", ...)
    @field_options(exclude=("seed",))          # the command's own options keep their names
    @handle_errors
    def cmd(config_path, ..., **fields):
        config = load_config(config_path, fields)

Each field becomes a real Click option (listed in `--help`, with the comment after the field in
config.py as its help text; an unknown flag is Click's one-line "No such option" error with
suggestions). Values arrive as strings and are parsed for the field's type by `Config.coerce`
(booleans: True/False, "None" for unset), so a bad value is a ConfigError naming the field.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
from collections.abc import Callable, Iterable
from functools import cache
from pathlib import Path
from typing import Any

import click

from dantinox_eqx.config import Config

__all__ = ["field_options", "given_overrides", "load_config"]


@cache
def _field_comments() -> dict[str, str]:
    """The `# comment` after each field in config.py: the help text of its option."""
    from dantinox_eqx import config as config_module

    found = {}
    for line in inspect.getsource(config_module.Config).splitlines():
        m = re.match(r"\s+(\w+): [^=]+=.*?#\s*(.+)$", line)
        if m:
            found[m.group(1)] = m.group(2).strip()
    return found


def _field_option(field: dataclasses.Field) -> Callable:
    default = field.default
    kind = str(field.type).replace("typing.", "").replace("<class '", "").replace("'>", "")
    text = _field_comments().get(field.name, "")
    help_text = f"{text + '. ' if text else ''}[{kind}; default {default!r}]"
    return click.option(f"--{field.name}", field.name, type=str, default=None, metavar="VALUE",
                        help=help_text)


def field_options(exclude: Iterable[str] = ()) -> Callable:
    """Decorator: one `--FIELD VALUE` option per Config field, except the names in `exclude`
    (the command's own options, which are never shadowed). The command receives them as
    keyword arguments: None when not given, else the raw string."""
    skip = set(exclude)

    def decorate(fn: Callable) -> Callable:
        for field in reversed(dataclasses.fields(Config)):
            if field.name not in skip:
                fn = _field_option(field)(fn)
        return fn

    return decorate


def given_overrides(values: dict[str, str | None]) -> dict[str, Any]:
    """The options that were given, parsed for their field's type: `{"lr": "1e-3", "dim": None}`
    -> `{"lr": 0.001}` (ConfigError naming the field for a bad value)."""
    return {name: Config.coerce(name, value) for name, value in values.items() if value is not None}


def load_config(path: str | Path | None, values: dict[str, str | None], default: str | Path | None = None) -> Config:
    """The config at `path` (else, with `--init_from RUN` given, RUN's own config.yaml, else the
    one at `default`, else the library defaults) with the given `--FIELD VALUE` options applied.

    A fine-tune keeps its base's shape, so `--init_from RUN` without `--config` starts from the
    base's config (as `--config RUN/config.yaml` does): the packaged default's shape would be
    refused for any base not of that shape (an imported model)."""
    overrides = given_overrides(values)
    source = path if path is not None else _init_from_config(overrides.get("init_from")) or default
    config = Config.from_yaml(source) if source is not None else Config()
    return config.replace(**overrides) if overrides else config


def _init_from_config(init_from: str | None) -> Path | None:
    """`init_from`'s config.yaml when `init_from` names a run directory, said on stderr; None
    otherwise (a bad `init_from` is then refused by the trainer, naming the field)."""
    from dantinox_eqx.run.layout import CONFIG_FILE

    if not init_from:
        return None
    found = Path(init_from).expanduser() / CONFIG_FILE
    if not found.is_file():
        return None
    click.echo(f"config: {found}, the init_from run's (--config YAML picks another)", err=True)
    return found
