"""`dantinox-eqx export RUN_DIR OUT_DIR`: a self-contained run directory plus model.safetensors,
with `--format hf` a Hugging Face model folder (dantinox_eqx/run/hf.py), with `--format gguf`
one llama.cpp .gguf file (dantinox_eqx/run/gguf_export.py)."""

from __future__ import annotations

from pathlib import Path

import click

from .common import fail, handle_errors


@click.command()
@click.argument("run_dir", type=click.Path(file_okay=False, path_type=Path))
@click.argument("out_dir", type=click.Path(path_type=Path))
@click.option("--merge-lora", is_flag=True,
              help="Merge a LoRA run's adapters into the base weights (required for LoRA runs).")
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "f32", "bf16", "f16", "q8_0"]), default=None,
              help="Cast the exported weights (default: keep the run's dtype). f16 and q8_0 (GGUF's 8-bit "
                   "blocks) only with --format gguf; f32 = float32, bf16 = bfloat16.")
@click.option("--format", "fmt", type=click.Choice(["run", "hf", "gguf"]), default="run", show_default=True,
              help="run: our run directory + model.safetensors; hf: a Hugging Face folder "
                   "(llama / mistral / qwen2 / mixtral / gpt2; LoRA merged); gguf: OUT_DIR is one .gguf "
                   "file for llama.cpp / ollama / LM Studio (llama / qwen2 / gpt2; LoRA merged).")
@handle_errors
def export(run_dir: Path, out_dir: Path, merge_lora: bool, dtype: str | None, fmt: str) -> None:
    """Write OUT_DIR: config (use_lora: false), tokenizer, checkpoints and model.safetensors.

    OUT_DIR loads with from_pretrained / generate without any reference to RUN_DIR or its base
    run. OUT_DIR must not exist or be empty. With --format hf, OUT_DIR is a Hugging Face folder
    (config.json, model.safetensors, tokenizer files) that AutoModelForCausalLM loads; a config
    Hugging Face cannot express is refused naming the field.
    """
    from dantinox_eqx.config import Config
    from dantinox_eqx.data.tokenizer import load_tokenizer
    from dantinox_eqx.lora import has_lora
    from dantinox_eqx.run.export import export_run
    from dantinox_eqx.run.layout import CONFIG_FILE, TOKENIZER_FILE

    if fmt == "gguf":  # issue 22: one file, not a folder
        from dantinox_eqx.run.gguf_export import export_gguf

        if not (run_dir / CONFIG_FILE).is_file():
            fail(f"RUN_DIR {str(run_dir)!r} is not a run directory (no config.yaml)")
        out = export_gguf(run_dir, out_dir, dtype={"float32": "f32", "bfloat16": "bf16"}.get(dtype, dtype))
        click.echo(f"exported {run_dir} -> {out} (GGUF)")
        return
    if dtype in ("f16", "q8_0"):
        fail(f"--dtype {dtype} is a GGUF type: use it with --format gguf (run and hf take float32 or bfloat16)")
    dtype = {"f32": "float32", "bf16": "bfloat16"}.get(dtype, dtype)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        fail(f"OUT_DIR {str(out_dir)!r} exists and is not empty; export never overwrites, choose a new directory")
    if not (run_dir / CONFIG_FILE).is_file():
        fail(f"RUN_DIR {str(run_dir)!r} is not a run directory (no config.yaml)")
    if fmt == "hf":  # issue 15
        from dantinox_eqx.run.hf import export_hf

        out = export_hf(run_dir, out_dir, dtype=dtype)
        click.echo(f"exported {run_dir} -> {out} (Hugging Face: config.json, model.safetensors, tokenizer)")
        return
    try:
        from dantinox_eqx.run.pretrained import from_pretrained
    except ModuleNotFoundError as e:
        if e.name != "dantinox_eqx.run.pretrained":
            raise
        fail("export needs dantinox_eqx.run.pretrained.from_pretrained, which this installation lacks")
    model = from_pretrained(run_dir)
    if has_lora(model) and not merge_lora:
        fail(f"{str(run_dir)!r} is a LoRA run: pass --merge-lora to export its merged weights")
    config = Config.from_yaml(run_dir / CONFIG_FILE)
    tokenizer = load_tokenizer(run_dir / TOKENIZER_FILE)
    from dantinox_eqx.run.chat_template import read_chat_template

    out = export_run(model, config, tokenizer, out_dir, dtype, chat_template=read_chat_template(run_dir))
    click.echo(f"exported {run_dir} -> {out} (model.safetensors, checkpoints, config.yaml, tokenizer.json)")


COMMANDS = [export]
