"""`--FIELD VALUE` options for any Config field, for commands that take a config file.

Commands declare `context_settings=OVERRIDES` and pass `ctx.args` to `parse_overrides`; each
value is parsed for its field's type by `Config.coerce` (unknown fields get a did-you-mean).
"""

from __future__ import annotations

from typing import Any

from dantinox_eqx.config import Config, ConfigError

OVERRIDES = {"ignore_unknown_options": True, "allow_extra_args": True}


def parse_overrides(args: list[str]) -> dict[str, Any]:
    """`["--lr", "1e-3", "--use_moe=true"]` -> `{"lr": 0.001, "use_moe": True}`."""
    out: dict[str, Any] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or len(arg) == 2:
            raise ConfigError(f"unexpected argument {arg!r}; config overrides look like --FIELD VALUE")
        name, eq, value = arg[2:].partition("=")
        if not eq:
            if i + 1 >= len(args):
                raise ConfigError(f"--{name}: missing value; pass --{name} VALUE")
            value = args[i + 1]
            i += 1
        out[name] = Config.coerce(name, value)
        i += 1
    return out


def load_config(path: str | None, args: list[str]) -> Config:
    """The config at `path` (the library defaults when None) with the `--FIELD VALUE` overrides."""
    config = Config.from_yaml(path) if path else Config()
    overrides = parse_overrides(args)
    return config.replace(**overrides) if overrides else config
