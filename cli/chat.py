"""`dantinox-eqx chat RUN_DIR`: a conversation with a run's model at the terminal (or piped stdin)."""

from __future__ import annotations

import sys

import click

from .common import handle_errors

EXIT = "/exit"


@click.command()
@click.argument("run_dir", type=click.Path(file_okay=False))
@click.option("--system", default=None, metavar="TEXT", help="A system message that opens the conversation.")
@click.option("--chat_template", "--chat-template", "chat_template", default=None, metavar="FILE",
              type=click.Path(dir_okay=False), help="A Jinja chat template file instead of the run's.")
@click.option("--max_new_tokens", type=click.IntRange(min=1), default=256, show_default=True,
              help="The longest answer, in tokens.")
@click.option("--temperature", type=click.FloatRange(min=0.0), default=0.7, show_default=True, help="0 = greedy.")
@click.option("--top_k", type=click.IntRange(min=1), default=None, help="Sample among the k most likely tokens.")
@click.option("--top_p", type=click.FloatRange(min=0.0, max=1.0, min_open=True), default=None,
              help="Nucleus sampling: the smallest set of tokens with this total probability.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the first answer (then +1 per turn).")
@click.option("--max_context", "--max-context", "max_context", type=click.IntRange(min=1), default=None,
              help="Window / KV-cache size instead of the run's; a longer history keeps its last tokens.")
@click.option("--latest", is_flag=True, help="Use the latest checkpoint instead of the best one.")
@handle_errors
def chat(run_dir: str, system: str | None, chat_template: str | None, max_new_tokens: int, temperature: float,
         top_k: int | None, top_p: float | None, seed: int, max_context: int | None, latest: bool) -> None:
    """Talk with the model of RUN_DIR: each line read from stdin is the user's turn, the answer
    is printed after it; the conversation is kept. Ends at EOF (Ctrl-D) or a line `/exit`.
    Needs a chat template (the run's chat_template.jinja, or --chat_template FILE)."""
    from dantinox_eqx.infer.generate import Generator
    from dantinox_eqx.run.chat_template import read_template_file

    template = None if chat_template is None else read_template_file(chat_template, "--chat_template")
    gen = Generator(run_dir, best=not latest, max_context=max_context, chat_template=template)
    if template is not None:
        gen.template_source = f"--chat_template {chat_template}"
    messages = [{"role": "system", "content": system}] if system is not None else []
    gen.chat_prompt(messages + [{"role": "user", "content": "?"}])  # a template that cannot render fails first
    interactive = sys.stdin.isatty()
    for turn, line in enumerate(_lines(interactive)):
        if line.strip() == EXIT:
            break
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line})
        answer = gen.chat(messages, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                          top_p=top_p, seed=seed + turn)
        messages.append({"role": "assistant", "content": answer})
        click.echo(answer)


def _lines(interactive: bool):
    """The user's lines (without their newline), with a `> ` prompt at a terminal."""
    while True:
        if interactive:
            click.echo("> ", nl=False, err=True)
        line = sys.stdin.readline()
        if not line:
            return
        yield line.rstrip("\n")


COMMANDS = [chat]
