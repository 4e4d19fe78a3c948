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
@click.option("--chat", "chat_text", default=None, metavar="TEXT",
              help="Ask TEXT as the user's one turn of a conversation rendered with the run's chat template; "
                   "prints the assistant's answer (ends at the end-of-turn token).")
@click.option("--system", default=None, metavar="TEXT", help="With --chat: a system message before the question.")
@click.option("--chat_template", "--chat-template", "chat_template", default=None, metavar="FILE",
              type=click.Path(dir_okay=False), help="A Jinja chat template file instead of the run's.")
@click.option("--max_context", "--max-context", "max_context", type=click.IntRange(min=1), default=None,
              help="Window / KV-cache size instead of the run's (RoPE models: any; a learned position "
                   "table: at most its rows).")
@click.option("--latest", is_flag=True, help="Use the latest checkpoint instead of the best one.")
@click.option("--weights", type=click.Choice(["float32", "bfloat16", "int8"]), default="float32", show_default=True,
              help="How the weights are stored while generating; smaller decodes faster "
                   "(int8: about twice float32's tokens/s on CPU).")
@handle_errors
def generate(run_dir: str, prompt: str, max_new_tokens: int, temperature: float, top_k: int | None,
             top_p: float | None, seed: int, stop: tuple[str, ...], ignore_eot: bool, stream: bool,
             chat_text: str | None, system: str | None, chat_template: str | None, latest: bool,
             max_context: int | None, weights: str) -> None:
    """Continue PROMPT with the model of RUN_DIR and print the prompt and the new text; with
    --chat, print the assistant's answer to the question."""
    from dantinox_eqx.infer.generate import Generator
    from dantinox_eqx.run.chat_template import read_template_file

    if not prompt:
        fail("--prompt: empty; give at least one character to continue")
    if system is not None and chat_text is None:
        fail("--system: only with --chat (a system message opens a conversation)")
    template = None if chat_template is None else read_template_file(chat_template, "--chat_template")
    gen = Generator(run_dir, best=not latest, max_context=max_context, chat_template=template,
                    weights=weights)
    if template is not None:
        gen.template_source = f"--chat_template {chat_template}"
    if chat_text is not None:
        messages = ([{"role": "system", "content": system}] if system is not None else [])
        messages.append({"role": "user", "content": chat_text})
        click.echo(gen.chat(messages, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                            top_p=top_p, seed=seed, stop=list(stop)))
        return
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
