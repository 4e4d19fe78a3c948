"""A run's chat template: the file `chat_template.jinja` in its directory (issue 22 item 4).

`import-hf` (and `import-gguf`) write it from the model's folder; a fine-tune copies its base's
into its own directory when it starts (so the run is complete without the base, and the
template it trained with stays with it even if the base's changes later); `--chat_template FILE`
sets or overrides it. `read_chat_template` also follows the init_from / LoRA base chain, so a
run fine-tuned before templates were kept still finds its base's.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import yaml

from ..config import ConfigError
from ..files import atomic_write_text
from .layout import CHAT_TEMPLATE_FILE, CONFIG_FILE, LORA_BASE_FILE

__all__ = ["CHAT_TEMPLATE_FILE", "read_chat_template", "write_chat_template", "chat_template_file",
           "read_template_file"]


def _parent(run_dir: Path) -> Path | None:
    """The run `run_dir` was fine-tuned from: config.yaml's init_from, else lora_base.json's base_run."""
    try:
        init_from = (yaml.safe_load((run_dir / CONFIG_FILE).read_text(encoding="utf-8")) or {}).get("init_from")
    except (OSError, yaml.YAMLError, AttributeError):
        init_from = None
    if isinstance(init_from, str) and init_from:
        return Path(init_from).expanduser().resolve()
    pointer = run_dir / LORA_BASE_FILE
    if pointer.is_file():
        try:
            base = json.loads(pointer.read_text(encoding="utf-8")).get("base_run")
        except (OSError, ValueError, AttributeError):
            base = None
        if isinstance(base, str) and base:
            return Path(base).resolve()
    return None


def chat_template_file(run_dir: str | os.PathLike) -> Path | None:
    """The chat_template.jinja that serves `run_dir`: its own, else the nearest one up its
    init_from / base chain; None when no run of the chain has one."""
    path: Path | None = Path(run_dir).resolve()
    seen: set[Path] = set()
    while path is not None and path not in seen and path.is_dir():
        seen.add(path)
        if (path / CHAT_TEMPLATE_FILE).is_file():
            return path / CHAT_TEMPLATE_FILE
        path = _parent(path)
    return None


def read_template_file(path: str | os.PathLike, field: str = "chat_template") -> str:
    """The text of a chat template file; FileNotFoundError (missing) or ConfigError (not UTF-8) naming `field`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{field}: {str(path)!r} is not a file; pass a Jinja chat template file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{field}: {str(path)!r} is not UTF-8 text; pass a Jinja chat template file") from None
    return text


def read_chat_template(run_dir: str | os.PathLike) -> str | None:
    """The chat template of `run_dir` (`chat_template_file`), or None when it has none."""
    path = chat_template_file(run_dir)
    return None if path is None else path.read_text(encoding="utf-8")


def write_chat_template(run_dir: str | os.PathLike, text: str) -> Path:
    """Write `text` as `run_dir/chat_template.jinja` (atomically: a reader never sees half a file)."""
    path = Path(run_dir) / CHAT_TEMPLATE_FILE
    atomic_write_text(path, text)
    return path
