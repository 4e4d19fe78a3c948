"""`dantinox-eqx eval RUN_DIR --data_path PATH`: loss, perplexity, bits per character and per byte."""

from __future__ import annotations

import json
from pathlib import Path

import click

from .common import handle_errors


@click.command("eval")
@click.argument("run_dir", type=click.Path(file_okay=False))
@click.option("--data_path", required=True,
              help="The data: any source `train` takes (a UTF-8 text file, a prepared dataset directory made "
                   "with the run's tokenizer, a folder, glob, .jsonl or .parquet file). Chat data (conversations "
                   "or prompt/completion JSONL, or a prepared chat directory): the loss over the trained "
                   "(answer) tokens, rendered with the run's chat template and train_on.")
@click.option("--batches", type=click.IntRange(min=1), default=None,
              help="Score this many batches of random windows (fixed --seed) instead of the whole text.")
@click.option("--batch_size", type=click.IntRange(min=1), default=8, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the random windows.")
@click.option("--max_context", "--max-context", "max_context", type=click.IntRange(min=1), default=None,
              help="Window / KV-cache size instead of the run's (RoPE models: any; a learned position "
                   "table: at most its rows).")
@click.option("--latest", is_flag=True, help="Use the latest checkpoint instead of the best one.")
@click.option("--unknown_chars", type=click.Choice(["error", "drop"]), default="error", show_default=True,
              help="Characters outside a char vocabulary: refuse the text, or drop them.")
@click.option("--chat_template", type=click.Path(dir_okay=False), default=None,
              help="Chat data: render with this Jinja chat template instead of the run's (for a run without one).")
@click.option("--json", "as_json", is_flag=True, help="Print the results as one JSON object.")
@handle_errors
def eval_command(run_dir: str, data_path: str, batches: int | None, batch_size: int, seed: int,
                 latest: bool, max_context: int | None, unknown_chars: str, chat_template: str | None,
                 as_json: bool) -> None:
    """Evaluate the model of RUN_DIR on the data at --data_path (one it was not trained on)."""
    from dantinox_eqx.config import Config
    from dantinox_eqx.data.tokenizer import load_tokenizer
    from dantinox_eqx.infer.evaluate import evaluate_source
    from dantinox_eqx.run.chat_template import read_chat_template, read_template_file
    from dantinox_eqx.run.layout import CONFIG_FILE, TOKENIZER_FILE
    from dantinox_eqx.run.pretrained import from_pretrained

    template = read_template_file(chat_template, "--chat_template") if chat_template else read_chat_template(run_dir)
    model = from_pretrained(run_dir, best=not latest, max_context=max_context)
    tokenizer_file = Path(run_dir) / TOKENIZER_FILE
    tokenizer = load_tokenizer(tokenizer_file)
    # chat data is rendered with the run's template and train_on (config.yaml), as training renders it
    result = evaluate_source(model, tokenizer, data_path, Config.from_yaml(Path(run_dir) / CONFIG_FILE),
                             tokenizer_source=str(tokenizer_file), batch_size=batch_size, n_batches=batches,
                             seed=seed, unknown_chars=unknown_chars, chat_template=template)
    if as_json:
        click.echo(json.dumps(result.to_dict()))
        return
    what = {"text": "token", "documents": "token", "chat": "trained (answer) token"}[result.scored]
    if result.mode == "all":
        how = f"all {result.n_windows} windows of {result.seq_len} tokens (every {what} scored once)"
    else:
        how = f"{result.n_windows} random windows of {result.seq_len} tokens (seed {seed})"
    if result.scored == "chat":
        how += ", examples packed as training packs them"
    click.echo(f"{'checkpoint':<15}{'latest' if latest else 'best'} of {run_dir}")
    click.echo(f"{'scored':<15}{result.n_tokens} {what}s, {result.n_chars:.0f} chars, {result.n_bytes:.0f} bytes: "
               f"{how}")
    click.echo(f"{'loss':<15}{result.loss:.4f} nats/token")
    click.echo(f"{'perplexity':<15}{result.perplexity:.3f}")
    click.echo(f"{'bits/token':<15}{result.bits_per_token:.4f}")
    click.echo(f"{'bits/char':<15}{result.bits_per_char:.4f}")
    click.echo(f"{'bits/byte':<15}{result.bits_per_byte:.4f}")  # issue 14: compare across tokenizers


COMMANDS = [eval_command]
