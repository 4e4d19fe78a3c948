"""dantinox-eqx: train, fine-tune and sample GPT-style language models in JAX with Equinox.

The front door is `Config`, `Trainer`, `Transformer` and `Generator`; the pure pieces live in
their modules (`model`, `step`, `optim`, `data`, `tokenizer`) for research code to compose.
"""

from .config import Config, ConfigError

__version__ = "0.1.0"


__all__ = ["Config", "ConfigError", "Transformer", "Trainer", "Generator", "__version__"]


def __getattr__(name: str):
    # Imported on first use: Transformer pulls in JAX and Equinox (issue 16: `dantinox-eqx
    # --help` and `--version` need neither), Trainer and Generator orbax and tokenizers too.
    if name == "Transformer":
        from .model import Transformer
        from .run import pretrained  # noqa: F401 (attaches Transformer.from_pretrained)

        return Transformer
    if name == "Trainer":
        from .train.trainer import Trainer

        return Trainer
    if name == "Generator":
        from .infer.generate import Generator

        return Generator
    raise AttributeError(f"module 'dantinox_eqx' has no attribute {name!r}")
