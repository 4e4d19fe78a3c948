"""`dantinox-eqx generate RUN_DIR --prompt "..."`: sample text from a trained run."""

from __future__ import annotations

import click

from .common import fail, handle_errors


@click.command()
@click.argument("run_dir", type=click.Path(file_okay=False))
@click.option("--prompt", default="\n", show_default=True, help="Text to continue.")
@click.option("--max_new_tokens", type=click.IntRange(min=0), default=256, show_default=True)
@click.option("--temperature", type=click.FloatRange(min=0.0), default=1.0, show_default=True,
              help="0 = greedy.")
@click.option("--top_k", type=click.IntRange(min=1), default=None, help="Sample among the k most likely tokens.")
@click.option("--top_p", type=click.FloatRange(min=0.0, max=1.0, min_open=True), default=None,
              help="Nucleus sampling: the smallest set of tokens with this total probability.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--stop", multiple=True, help="Stop at this string (repeatable); it is not printed.")
@click.option("--ignore_eot", is_flag=True,
              help="Go on past the end-of-text token (<|endoftext|>, </s>, ...) instead of stopping there.")
@click.option("--stream", is_flag=True, help="Print the text as it is generated.")
@click.option("--latest", is_flag=True, help="Use the latest checkpoint instead of the best one.")
@click.option("--weights", type=click.Choice(["float32", "bfloat16", "int8"]), default="float32", show_default=True,
              help="How the weights are stored while generating (weight-only: computed in float32); "
                   "smaller decodes faster.")
@handle_errors
def generate(run_dir: str, prompt: str, max_new_tokens: int, temperature: float, top_k: int | None,
             top_p: float | None, seed: int, stop: tuple[str, ...], ignore_eot: bool, stream: bool,
             latest: bool, weights: str) -> None:
    """Continue PROMPT with the model of RUN_DIR and print the prompt and the new text."""
    from dantinox_eqx.infer.generate import Generator

    if not prompt:
        fail("--prompt: empty; give at least one character to continue")
    gen = Generator(run_dir, best=not latest, weights=weights)
    options = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                   seed=seed, stop=list(stop), stop_at_eot=not ignore_eot)
    click.echo(prompt, nl=False)
    if stream:
        for piece in gen.stream(prompt, **options):
            click.echo(piece, nl=False)
    else:
        click.echo(gen.generate(prompt, **options), nl=False)
    click.echo()


COMMANDS = [generate]
