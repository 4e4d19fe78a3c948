"""Chat templates (issue 22 item 4): rendering, the end-of-turn token, Generator.chat, the
`generate --chat` and `chat` commands, and bad input. The comparison with transformers'
apply_chat_template is in test_chat_hf.py."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import pytest
from tokenizers import AddedToken

from dantinox_eqx.config import Config
from dantinox_eqx.data.chat import ChatMessageError, ChatTemplateError, end_of_turn, render_chat
from dantinox_eqx.infer.generate import Generator
from dantinox_eqx.model import Transformer
from dantinox_eqx.run.chat_template import chat_template_file, read_chat_template, write_chat_template

from .chat_templates import DEFAULT_SYSTEM, LLAMA3, SMOLLM2
from .hf_runs import special_tokenizer
from .runs import write_run

EXE = Path(sys.executable).parent / "dantinox-eqx"
SPECIALS = ["<|im_start|>", "<|im_end|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
TOKENS = dict(bos_token="<s>", eos_token="</s>")
# ChatML with the number of messages after the assistant's opening: the model below answers
# from it, so an answer shows how much history the prompt held.
COUNTING = SMOLLM2.replace("{{ '<|im_start|>assistant\n' }}",
                           "{{ '<|im_start|>assistant ' + messages | length | string }}")
assert COUNTING != SMOLLM2
# The forced model's next token after each token (every other token: id 0).
NEXT = {"\n": "h", "h": "i", "i": "<|im_end|>", "<|im_end|>": "x", "x": "x", "1": "a", "2": "c", "3": "b",
        "a": "<|im_end|>", "b": "<|im_end|>", "c": "<|im_end|>"}


def cli(*args: str | Path, stdin: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "JAX_PLATFORMS": "cpu"}
    return subprocess.run([str(EXE), *map(str, args)], env=env, capture_output=True, text=True, timeout=300,
                          input=stdin)


def chat_tokenizer():
    """A char tokenizer with <s> (prepended to every encoding, like Llama's), </s> and the chat specials."""
    tok = special_tokenizer("".join(map(chr, range(32, 127))) + "\n")
    tok.add_special_tokens([AddedToken(t, special=True) for t in SPECIALS])
    return tok


def forced_model(tok) -> tuple[Config, Transformer]:
    """A model whose greedy next token is NEXT[current token]: blocks zeroed (each block adds 0
    to the residual), embedding = identity rows (dim >= vocab), head = the NEXT table x 10."""
    V = tok.get_vocab_size()
    cfg = Config(dim=128, n_heads=4, head_size=32, num_blocks=1, max_context=256, expansion=2, weight_tying=False,
                 vocab_size=V)
    model = Transformer(cfg, key=jax.random.key(0))
    model = eqx.tree_at(lambda m: m.blocks, model, jax.tree.map(jnp.zeros_like, model.blocks))
    head = jnp.zeros((cfg.dim, V))
    for a, b in NEXT.items():
        head = head.at[tok.token_to_id(a), tok.token_to_id(b)].set(10.0)
    model = eqx.tree_at(lambda m: (m.embedding, m.head.weight), model, (jnp.eye(V, cfg.dim), head))
    return cfg, model


@pytest.fixture(scope="module")
def chat_run(tmp_path_factory) -> Path:
    tok = chat_tokenizer()
    cfg, model = forced_model(tok)
    run = write_run(tmp_path_factory.mktemp("chat") / "run", cfg, tok, eqx.filter(model, eqx.is_array), 1)
    write_chat_template(run, COUNTING)
    return run


CONVERSATION = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"},
                {"role": "assistant", "content": " Hello! "}, {"role": "user", "content": "Bye"}]


def test_render_chat_known_texts():
    """The exact strings the templates must give (test_chat_hf.py checks them against transformers)."""
    assert render_chat(SMOLLM2, CONVERSATION[1:2], add_generation_prompt=True) == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n")
    assert render_chat(LLAMA3, CONVERSATION[:3], **TOKENS) == (
        "<s><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|><|start_header_id|>user<|end_header_id|>"
        "\n\nHi there<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\nHello!<|eot_id|>")
    # tojson keeps non-ASCII and HTML characters (Jinja's own filter would escape them).
    assert render_chat(DEFAULT_SYSTEM, CONVERSATION[1:3], **TOKENS) == (
        '<s>[SYS] {"system": "You are terse. <b>Kurz & bündig</b>.", "turns": 2}\n'
        "[INST] Hi there [/INST]\n Hello!</s>\n")


def test_bad_messages_and_templates_name_the_index_field_and_source():
    for messages, message in [
        ("hi", r"^messages: expected a list"),
        ([{"role": "user", "content": "a"}, "b"], r"^messages\[1\]: expected a \{role, content\} dict"),
        ([{"role": "user"}], r"^messages\[0\]\.content: missing"),
        ([{"content": "a"}], r"^messages\[0\]\.role: missing"),
        ([{"role": "user", "content": 3}], r"^messages\[0\]\.content: expected a string, got int"),
        ([{"role": "robot", "content": "a"}], r"^messages\[0\]\.role: unknown role 'robot'"),
    ]:
        with pytest.raises(ChatMessageError, match=message):
            render_chat(SMOLLM2, messages)
    with pytest.raises(ChatTemplateError, match=r"^t\.jinja: line 1: unexpected '}'"):
        render_chat("{{ messages }", CONVERSATION, source="t.jinja")
    with pytest.raises(ChatTemplateError, match="^t.jinja: rendering failed: TemplateError: Only user and assistant"):
        render_chat(DEFAULT_SYSTEM, [{"role": "tool", "content": "x"}], source="t.jinja", **TOKENS)
    with pytest.raises(ChatTemplateError, match="^chat template: rendering failed: SecurityError"):
        render_chat("{{ messages.append(1) }}", CONVERSATION)  # ImmutableSandbox: no mutation


def test_end_of_turn_token_by_rendering():
    assert end_of_turn(SMOLLM2, SPECIALS, **TOKENS) == "<|im_end|>"
    assert end_of_turn(LLAMA3, SPECIALS, **TOKENS) == "<|eot_id|>"
    assert end_of_turn(DEFAULT_SYSTEM, SPECIALS + ["</s>"], **TOKENS) == "</s>"  # written after each answer
    # A template that writes no special token after the answer: the end-of-text token.
    assert end_of_turn("{% for m in messages %}{{ m['content'] }}\n{% endfor %}", SPECIALS, **TOKENS) == "</s>"


@pytest.mark.slow
def test_generator_chat_stops_at_the_end_of_turn_token():
    tok = chat_tokenizer()
    cfg, model = forced_model(tok)
    gen = Generator.from_model(model, tok, cfg, chat_template=SMOLLM2)
    assert gen.special_tokens == {**TOKENS, "unk_token": "[UNK]"}  # guessed by name from the specials
    messages = [{"role": "user", "content": "hi"}]
    ids, end_ids = gen.chat_prompt(messages)
    assert tok.decode(ids, skip_special_tokens=False) == render_chat(SMOLLM2, messages, add_generation_prompt=True)
    assert ids[0] == tok.token_to_id("<|im_start|>")  # the template has no BOS: the tokenizer's is not added
    assert end_ids[0] == tok.token_to_id("<|im_end|>")
    # Greedy: "\n" -> h -> i -> <|im_end|> -> x x x ...: the answer is "hi", without the end token.
    assert gen.chat(messages, max_new_tokens=20, temperature=0.0) == "hi"
    assert gen.generate(render_chat(SMOLLM2, messages, add_generation_prompt=True), max_new_tokens=6,
                        temperature=0.0) == "hixxx"  # plain generate goes on past it
    # A template that writes bos_token: one BOS, not the template's and the tokenizer's.
    gen = Generator.from_model(model, tok, cfg, chat_template=LLAMA3)
    ids, end_ids = gen.chat_prompt(messages)
    assert ids[:2] == [tok.token_to_id("<s>"), tok.token_to_id("<|start_header_id|>")]
    assert ids.count(tok.token_to_id("<s>")) == 1 and tok.encode("a").ids[0] == tok.token_to_id("<s>")
    assert end_ids[0] == tok.token_to_id("<|eot_id|>")


def test_generator_chat_without_a_template_is_refused(tmp_path):
    tok = chat_tokenizer()
    cfg, model = forced_model(tok)
    with pytest.raises(ChatTemplateError, match="^chat_template: this run has no chat template"):
        Generator.from_model(model, tok, cfg).chat([{"role": "user", "content": "hi"}])


@pytest.mark.slow
def test_generate_chat_and_the_chat_loop_on_a_run(tmp_path, chat_run):
    res = cli("generate", chat_run, "--chat", "hello", "--temperature", "0")
    assert res.returncode == 0, res.stderr
    assert res.stdout == "a\n"  # 1 message -> "1" -> a -> <|im_end|>
    res = cli("generate", chat_run, "--chat", "hello", "--system", "Be brief.", "--temperature", "0")
    assert res.returncode == 0 and res.stdout == "c\n", res.stderr  # 2 messages -> "2" -> c
    # The loop keeps the history: the second prompt holds 3 messages (user, assistant, user).
    res = cli("chat", chat_run, "--temperature", "0", stdin="hello\nagain\n/exit\nnot read\n")
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines() == ["a", "b"]
    # --chat_template overrides the run's: SmolLM2's opening ends with "\n" -> h i.
    (tmp_path / "t.jinja").write_text(SMOLLM2, encoding="utf-8")
    res = cli("chat", chat_run, "--temperature", "0", "--chat_template", tmp_path / "t.jinja", stdin="hello\n")
    assert res.returncode == 0 and res.stdout == "hi\n", res.stderr


@pytest.mark.slow
def test_bad_chat_input_exits_2_with_one_line(tmp_path, chat_run):
    bad = tmp_path / "bad.jinja"
    bad.write_text("{% for m in messages %}{{ m['content'] }", encoding="utf-8")
    cases = [
        (("generate", chat_run, "--chat", "hi", "--chat_template", bad), f"--chat_template {bad}: line 1:"),
        (("chat", chat_run, "--chat_template", bad), f"--chat_template {bad}: line 1:"),
        (("generate", chat_run, "--chat", "hi", "--chat_template", tmp_path / "none.jinja"),
         "--chat_template: "),
        (("generate", chat_run, "--system", "x"), "--system: only with --chat"),
    ]
    for args, message in cases:
        res = cli(*args, stdin="")
        last = res.stderr.strip().splitlines()[-1]
        assert res.returncode == 2 and "Traceback" not in res.stderr and len(res.stderr.strip().splitlines()) == 1, \
            res.stderr
        assert last.startswith("Error: ") and message in last, last


def test_read_chat_template_follows_the_base_chain(tmp_path, chat_run):
    """A fine-tune without its own file finds its base's; its own file wins."""
    ft = tmp_path / "ft"
    ft.mkdir()
    Config(init_from=str(chat_run), vocab_size=4).to_yaml(ft / "config.yaml")
    assert read_chat_template(ft) == COUNTING and chat_template_file(ft) == chat_run / "chat_template.jinja"
    write_chat_template(ft, SMOLLM2)
    assert read_chat_template(ft) == SMOLLM2
    assert read_chat_template(tmp_path) is None  # not a run: nothing
