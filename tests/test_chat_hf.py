"""Chat templates against transformers (issue 22 item 4): our render_chat equals
apply_chat_template(tokenize=False); import-hf keeps a folder's template, a LoRA fine-tune
inherits it, export --format hf writes it and transformers' tokenizer reads it back."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

pytestmark = pytest.mark.hf
REASON = "needs the test-only transformers and torch: run `nox -s hf`"
transformers = pytest.importorskip("transformers", reason=REASON)
torch = pytest.importorskip("torch", reason=REASON)

from dantinox_eqx.config import Config  # noqa: E402
from dantinox_eqx.data.chat import render_chat  # noqa: E402
from dantinox_eqx.run.chat_template import read_chat_template  # noqa: E402
from dantinox_eqx.run.hf import import_hf  # noqa: E402
from dantinox_eqx.train.trainer import Trainer  # noqa: E402

from .chat_templates import DEFAULT_SYSTEM, LLAMA3, SMOLLM2  # noqa: E402
from .hf_runs import TEXT, special_tokenizer  # noqa: E402

EXE = Path(sys.executable).parent / "dantinox-eqx"
TEMPLATES = {"smollm2_chatml": SMOLLM2, "llama3": LLAMA3, "default_system": DEFAULT_SYSTEM}
CONVERSATIONS = {
    "user": [{"role": "user", "content": "Who wrote Hamlet?"}],
    "system_multi_turn": [{"role": "system", "content": "Answer in one word. ünïcode <ok>"},
                          {"role": "user", "content": "  Who wrote Hamlet?  "},
                          {"role": "assistant", "content": "Shakespeare."},
                          {"role": "user", "content": "And Faust?"}],
}


def cli(*args: str | Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "JAX_PLATFORMS": "cpu"}
    return subprocess.run([str(EXE), *map(str, args)], env=env, capture_output=True, text=True, timeout=600)


def _fast(template: str | None = None):
    return transformers.PreTrainedTokenizerFast(tokenizer_object=special_tokenizer(), bos_token="<s>",
                                                eos_token="</s>", chat_template=template)


@pytest.mark.parametrize("conversation", list(CONVERSATIONS))
@pytest.mark.parametrize("template", list(TEMPLATES))
@pytest.mark.parametrize("add_generation_prompt", [False, True])
def test_render_chat_equals_apply_chat_template(template, conversation, add_generation_prompt):
    messages = CONVERSATIONS[conversation]
    theirs = _fast().apply_chat_template(messages, chat_template=TEMPLATES[template], tokenize=False,
                                         add_generation_prompt=add_generation_prompt)
    ours = render_chat(TEMPLATES[template], messages, add_generation_prompt=add_generation_prompt,
                       bos_token="<s>", eos_token="</s>")
    assert ours == theirs


def _hf_folder(folder: Path, template: str | None) -> None:
    """A tiny Llama saved by transformers, with `template` saved by its tokenizer."""
    tok = special_tokenizer()
    config = transformers.LlamaConfig(vocab_size=tok.get_vocab_size(), hidden_size=32, num_hidden_layers=2,
                                      num_attention_heads=4, intermediate_size=48, max_position_embeddings=64,
                                      bos_token_id=tok.token_to_id("<s>"), eos_token_id=tok.token_to_id("</s>"))
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    _fast(template).save_pretrained(folder)


@pytest.mark.slow
def test_import_fine_tune_export_keeps_the_template(tmp_path):
    _hf_folder(tmp_path / "hf", SMOLLM2)
    assert (tmp_path / "hf" / "chat_template.jinja").is_file()  # how transformers 5 saves it
    res = cli("import-hf", tmp_path / "hf", tmp_path / "base", "--max_context", "64")
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "base" / "chat_template.jinja").read_text(encoding="utf-8") == SMOLLM2

    # A LoRA fine-tune at a shorter window (issue 22 item 3) copies its base's template.
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(TEXT * 40, encoding="utf-8")
    res = cli("train", "--config", tmp_path / "base" / "config.yaml", "--use_lora", "True", "--max_context", "16",
              "--data_path", corpus, "--run_dir", tmp_path / "ft", "--max_steps", "4", "--eval_interval", "2",
              "--eval_iters", "1", "--batch_size", "4")
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "ft" / "chat_template.jinja").read_text(encoding="utf-8") == SMOLLM2
    assert Config.from_yaml(tmp_path / "ft" / "config.yaml").max_context == 16

    res = cli("export", tmp_path / "ft", tmp_path / "out", "--format", "hf")
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "out" / "chat_template.jinja").read_text(encoding="utf-8") == SMOLLM2
    assert json.loads((tmp_path / "out" / "tokenizer_config.json").read_text())["chat_template"] == SMOLLM2
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
    assert theirs.chat_template == SMOLLM2
    messages = CONVERSATIONS["system_multi_turn"]
    assert theirs.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == render_chat(
        read_chat_template(tmp_path / "out"), messages, add_generation_prompt=True, bos_token="<s>",
        eos_token="</s>")


def test_import_named_templates_keeps_default_and_says_so(tmp_path):
    _hf_folder(tmp_path / "hf", None)
    path = tmp_path / "hf" / "tokenizer_config.json"
    data = json.loads(path.read_text())
    data["chat_template"] = [{"name": "default", "template": LLAMA3}, {"name": "tool_use", "template": SMOLLM2}]
    path.write_text(json.dumps(data))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        import_hf(tmp_path / "hf", tmp_path / "run")
    assert any("kept the 'default' chat template of 2 named ones (not kept: tool_use)" in str(w.message)
               for w in caught)
    assert read_chat_template(tmp_path / "run") == LLAMA3
    record = json.loads((tmp_path / "run" / "hf_import.json").read_text())
    assert record["chat_template"].startswith("kept the 'default'")
    # No template in the folder: none in the run.
    _hf_folder(tmp_path / "plain", None)
    import_hf(tmp_path / "plain", tmp_path / "plain_run")
    assert read_chat_template(tmp_path / "plain_run") is None


def test_train_chat_template_option_sets_and_bad_one_exits_2(tmp_path):
    _hf_folder(tmp_path / "hf", None)
    import_hf(tmp_path / "hf", tmp_path / "base", max_context=32)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(TEXT * 40, encoding="utf-8")
    bad = tmp_path / "bad.jinja"
    bad.write_text("{% if messages %}", encoding="utf-8")
    res = cli("train", "--config", tmp_path / "base" / "config.yaml", "--use_lora", "True", "--chat_template", bad,
              "--data_path", corpus, "--run_dir", tmp_path / "ft", "--max_steps", "2")
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith(f"Error: chat_template: {bad}: line 1:") and "endif" in last, last
    assert not (tmp_path / "ft").exists()
    good = tmp_path / "good.jinja"
    good.write_text(LLAMA3, encoding="utf-8")
    cfg = Config.from_yaml(tmp_path / "base" / "config.yaml").replace(
        init_from=str(tmp_path / "base"), use_lora=True, chat_template=str(good), max_steps=2, eval_interval=2,
        eval_iters=1, batch_size=2)
    ft = Trainer(cfg).fit(corpus, tmp_path / "ft")
    assert read_chat_template(ft) == LLAMA3 and read_chat_template(tmp_path / "base") is None
