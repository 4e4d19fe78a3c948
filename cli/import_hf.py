"""`dantinox-eqx import-hf HF_DIR RUN_DIR`: a local Hugging Face model folder as a run directory."""

from __future__ import annotations

from pathlib import Path

import click

from .common import handle_errors


@click.command(name="import-hf")
@click.argument("hf_dir", type=click.Path(path_type=Path))
@click.argument("run_dir", type=click.Path(path_type=Path))
@click.option("--dtype", type=click.Choice(["float32", "bfloat16"]), default="float32", show_default=True,
              help="Weights of the run (bfloat16 also sets use_bf16).")
@click.option("--max_context", "--max-context", "max_context", type=click.IntRange(min=1), default=None,
              help="Training window and KV-cache size (default: config.json's max_position_embeddings; "
                   "GPT-2: at most n_positions, its position table's first rows).")
@handle_errors
def import_hf(hf_dir: Path, run_dir: Path, dtype: str, max_context: int | None) -> None:
    """Write RUN_DIR from HF_DIR (config.json, model.safetensors or shards with their index,
    tokenizer.json): llama, mistral, qwen2, mixtral or gpt2.

    RUN_DIR then works as a trained run: generate, eval, `train --init_from RUN_DIR` and LoRA
    (`train --config RUN_DIR/config.yaml --use_lora True --data_path ...`). RUN_DIR must not
    exist or be empty; nothing is written when HF_DIR does not fit.
    """
    from dantinox_eqx.run.hf import import_hf as run_import

    out = run_import(hf_dir, run_dir, dtype=dtype, max_context=max_context)
    extra = ", chat_template.jinja" if (out / "chat_template.jinja").is_file() else ""
    click.echo(f"imported {hf_dir} -> {out} (config.yaml, tokenizer.json, checkpoints{extra})")


COMMANDS = [import_hf]
