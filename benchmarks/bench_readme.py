"""benchmarks/README.md's generated sections: each lives between `<!-- NAME:start -->` and
`<!-- NAME:end -->` and is replaced whole (appended at the end the first time)."""

from __future__ import annotations

from pathlib import Path

from dantinox_eqx.config import atomic_write_text

README = Path(__file__).resolve().parent / "README.md"


def write_section(name: str, body: str, readme: Path = README) -> None:
    """Replace section `name` of `readme` by `body` (ending with a newline), atomically."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    text = readme.read_text() if readme.exists() else ""
    if start in text:
        text = text[: text.index(start) + len(start)] + "\n" + body + text[text.index(end):]
    else:
        text += f"\n{start}\n{body}{end}\n"
    atomic_write_text(readme, text)
