"""dantinox-eqx: train, fine-tune and sample GPT-style language models in JAX with Equinox.

The front door is `Config`, `Trainer`, `Transformer` and `Generator`; the pure pieces live in
their modules (`model`, `step`, `optim`, `data`, `tokenizer`) for research code to compose.
"""

from .config import Config, ConfigError
from .model import Transformer

__version__ = "0.1.0"


def _from_pretrained(cls: type, run_dir: str, best: bool = True, *, dtype: object = None) -> Transformer:
    """Load a trained run directory's model (best checkpoint, or latest with best=False) in the
    dtype it was saved in; see `run.pretrained.from_pretrained`."""
    from .run.pretrained import from_pretrained  # orbax is imported on first use, not with the package

    return from_pretrained(run_dir, best, dtype=dtype)


# The front door attaches the loader: the model layer stays below the run layer (no import
# from model.py upwards), and every import of the package runs this before any submodule.
Transformer.from_pretrained = classmethod(_from_pretrained)

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
