"""dantinox-eqx: train, fine-tune and sample GPT-style language models in JAX with Equinox.

The front door is `Config`, `Trainer`, `Transformer` and `Generator`; the pure pieces live in
their modules (`model`, `step`, `optim`, `data`, `tokenizer`) for research code to compose.
"""

from .config import Config, ConfigError
from .model import Transformer

__version__ = "0.1.0"

__all__ = ["Config", "ConfigError", "Transformer", "Trainer", "Generator", "__version__"]


def __getattr__(name: str):
    # Trainer and Generator pull in orbax, rich and tokenizers: import them on first use.
    if name == "Trainer":
        from .train.trainer import Trainer

        return Trainer
    if name == "Generator":
        from .infer.generate import Generator

        return Generator
    raise AttributeError(f"module 'dantinox_eqx' has no attribute {name!r}")
