"""`dantinox-eqx import-gguf FILE RUN_DIR`: a llama.cpp .gguf model as a run directory."""

from __future__ import annotations

from pathlib import Path

import click

from .common import handle_errors


@click.command(name="import-gguf")
@click.argument("file", type=click.Path(path_type=Path))
@click.argument("run_dir", type=click.Path(path_type=Path))
@click.option("--dtype", type=click.Choice(["float32", "bfloat16"]), default="float32", show_default=True,
              help="Weights of the run, dequantised (bfloat16 also sets use_bf16).")
@click.option("--max_context", "--max-context", "max_context", type=click.IntRange(min=1), default=None,
              help="Training window and KV-cache size (default: the file's context_length; GPT-2 keeps its "
                   "position table's).")
@handle_errors
def import_gguf(file: Path, run_dir: Path, dtype: str, max_context: int | None) -> None:
    """Write RUN_DIR from the GGUF FILE (llama, Mistral-as-llama, qwen2 or gpt2; any tensor type the
    gguf package dequantises; a byte-level BPE tokenizer).

    RUN_DIR then works as a trained run: generate, eval, `train --init_from RUN_DIR` and LoRA. It
    holds the file's chat template as chat_template.jinja. RUN_DIR must not exist or be empty;
    nothing is written when FILE does not fit.
    """
    from dantinox_eqx.run.gguf import import_gguf as run_import

    out = run_import(file, run_dir, dtype=dtype, max_context=max_context)
    click.echo(f"imported {file} -> {out} (config.yaml, tokenizer.json, checkpoints)")


COMMANDS = [import_gguf]
