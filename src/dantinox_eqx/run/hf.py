"""Hugging Face format: import a local Hugging Face checkpoint folder, export a run as one.

    run = import_hf("llama_dir", "runs/llama")        # a run directory (generate, eval, fine-tune)
    model, config, tokenizer = from_hf("llama_dir")   # or the model in memory
    export_hf("runs/my_run", "my_run_hf")             # AutoModelForCausalLM.from_pretrained loads it

Nothing here imports `transformers` or `torch`: the files are read and written with
`safetensors`, `tokenizers` and `json` (the tests check the results against `transformers`).

Families (`model_type`), and the configs they correspond to:

    llama    RMSNorm, RoPE, SwiGLU MLP, GQA; Llama's attention_bias = qkv_bias + o_bias, mlp_bias
    mistral  llama + sliding_window (ours: sliding_window: true, no_sink: true, context_window: W)
    qwen2    llama + qkv_bias (q, k and v biased, o not)
    mixtral  llama attention + dropless top-k SwiGLU experts (use_moe, capacity_factor: 0)
    gpt2     LayerNorm, learned absolute positions, non-gated MLP (gelu = GPT-2's gelu_new,
             tanh form), biases on every projection (ours: qkv_bias, o_bias, mlp_bias; an export
             of a run without them writes zeros, an import keeps only the non-zero ones)

Export picks the family from the config and refuses, naming the field, what Hugging Face cannot
express: mla, a sliding window with its attention sink (no_sink: false), capacity_factor > 0,
shared_expert, sinusoidal absolute positions, NoPE, LayerNorm with RoPE or SwiGLU, a non-gated
MLP with RMSNorm, an o bias without qkv biases, biases on mixtral or mistral. Import refuses any
other model_type, RoPE scaling other than plain (`rope_type: default`), head_dim * heads != hidden,
non-SiLU gated MLPs and GPT-2 variants with other attention scaling, naming the config.json key.

Weight layouts (ours -> Hugging Face; ours are stacked over blocks, block i is row i):

    ours (in, out), y = x @ W              Llama / Mixtral: nn.Linear (out, in), y = x @ W.T
    blocks.attn.qkv.weight (D, (H+2K)E)    q_proj = W[:, :HE].T, k_proj = W[:, HE:(H+K)E].T,
                                           v_proj = W[:, (H+K)E:].T (heads contiguous, no permutation:
                                           both RoPEs rotate half of each whole head)
    blocks.attn.qkv_bias ((H+2K)E,)        q_proj.bias | k_proj.bias | v_proj.bias
    blocks.attn.o.weight (HE, D)           o_proj = W.T
    blocks.mlp.up.weight (D, 2F)           gate_proj = W[:, :F].T, up_proj = W[:, F:].T
    blocks.mlp.down.weight (F, D)          down_proj = W.T
    blocks.mlp.router.weight (D, E)        block_sparse_moe.gate = W.T
    blocks.mlp.up.weight (E, D, 2F)        experts.{j}.w1 = W[j][:, :F].T (gate), w3 = W[j][:, F:].T (up)
    blocks.mlp.down.weight (E, F, D)       experts.{j}.w2 = W[j].T
    blocks.{attn,mlp}_norm.scale, norm.scale   input_layernorm, post_attention_layernorm, model.norm
    embedding (V, D), head.weight (D, V)   model.embed_tokens (V, D), lm_head = head.T (absent when tied)

    GPT-2's Conv1D stores (in, out) like ours: c_attn = qkv (q | k | v), c_proj = o, c_fc = up,
    mlp.c_proj = down, ln_1 / ln_2 / ln_f = the norms (weight = scale, bias), wte = embedding,
    wpe = pos_embedding (its rows = max_context).

Our RoPE base is rope_theta (10000 when null) * rope_scale_factor^(E / (E - 2)) (NTK scaling);
it exports as one `rope_theta`. RMSNorm epsilon is norm_eps (1e-6 by default; Llama's 1e-5
changes logits by ~3e-3, so it travels in the config).

An imported run directory holds config.yaml, tokenizer.json (the folder's file, byte for byte),
checkpoints best + latest (step 0), hf_import.json (source folder, model_type and the
bos / eos / pad / unk tokens, which our tokenizer.json alone does not name) and, when the folder
has one, chat_template.jinja (its chat_template.jinja, else tokenizer_config.json's
chat_template; run/chat_template.py). An export writes config.json, generation_config.json,
model.safetensors (one file), tokenizer.json (the run's, byte for byte), tokenizer_config.json
(PreTrainedTokenizerFast with those special tokens, model_max_length = max_context and the
run's chat_template) and chat_template.jinja. A run fine-tuned from an imported one finds the
special tokens through its init_from chain.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from tokenizers import Tokenizer, models

from ..config import Config
from ..data.tokenizer import TokenizerError, load_tokenizer, save_tokenizer
from ..files import atomic_dir, atomic_write_text
from ..model import Transformer, with_max_context
from . import checkpoint
from .chat_template import CHAT_TEMPLATE_FILE, read_chat_template, read_template_file, write_chat_template
from .export import parse_dtype, plain_model
from .hf_format import (
    BUFFER_SUFFIXES,
    CONFIG_JSON,
    FAMILIES,
    IMPORT_FILE,
    INDEX,
    ROLE_GUESSES,
    ROLES,
    TOKENIZER,
    WEIGHTS,
    HFFormatError,
    HFModel,
    config_from_hf,
    expanded_config,
    hf_config,
    hf_model_type,
    hf_tensors,
    our_arrays,
    parts_of,
    shapes_of,
)
from .pretrained import from_pretrained, load_config

__all__ = ["HFFormatError", "HFModel", "from_hf", "import_hf", "to_hf", "export_hf", "hf_model_type",
           "hf_config", "config_from_hf", "FAMILIES", "IMPORT_FILE", "folder_chat_template", "guess_special_tokens",
           "run_special_tokens"]

# --------------------------------------------------------------------------- reading a folder
class _Weights:
    """The safetensors of a Hugging Face folder (one file, or shards with their index): shapes
    without reading data, tensors as numpy arrays on demand."""

    def __init__(self, folder: Path):
        self._folder = folder
        if (folder / INDEX).is_file():
            try:
                weight_map = json.loads((folder / INDEX).read_text(encoding="utf-8"))["weight_map"]
            except (ValueError, KeyError, TypeError):
                raise HFFormatError(f"{INDEX}: unreadable (it must hold a weight_map)") from None
            missing = sorted({f for f in weight_map.values() if not (folder / f).is_file()})
            if missing:
                raise HFFormatError(f"{INDEX}: shard {missing[0]!r} is missing from {str(folder)!r} "
                                    f"({len(missing)} of {len(set(weight_map.values()))} missing); "
                                    "download every shard")
            self.files = dict(weight_map)
        elif (folder / WEIGHTS).is_file():
            with self._open(WEIGHTS) as f:
                self.files = dict.fromkeys(f.keys(), WEIGHTS)
        elif any(folder.glob("*.bin")) or any(folder.glob("*.pth")):
            raise HFFormatError(f"{WEIGHTS}: {str(folder)!r} has only PyTorch pickle weights; only safetensors "
                                "import (transformers: model.save_pretrained(dir, safe_serialization=True))")
        else:
            raise HFFormatError(f"{WEIGHTS}: {str(folder)!r} has no {WEIGHTS} or {INDEX}")
        self.shapes: dict[str, tuple[int, ...]] = {}
        for file in sorted(set(self.files.values())):
            with self._open(file) as f:
                present = set(f.keys())
                for name in (n for n, fn in self.files.items() if fn == file):
                    if name not in present:
                        raise HFFormatError(f"{INDEX}: tensor {name!r} is not in its shard {file!r}")
                    self.shapes[name] = tuple(f.get_slice(name).get_shape())

    def _open(self, file: str) -> Any:
        """safe_open of one file; HFFormatError naming it when it is not a safetensors file."""
        from safetensors import SafetensorError, safe_open  # noqa: PLC0415 (only these paths need it)

        try:
            return safe_open(str(self._folder / file), framework="numpy")
        except (SafetensorError, OSError) as e:
            raise HFFormatError(f"{file}: not a readable safetensors file: {e}") from None

    def get(self, name: str) -> np.ndarray:
        with self._open(self.files[name]) as f:
            return f.get_tensor(name)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise HFFormatError(f"{path.name}: unreadable JSON in {str(path.parent)!r}: {e}") from None
    if not isinstance(data, dict):
        raise HFFormatError(f"{path.name}: must hold a JSON object")
    return data


def _token_text(value: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or {"content": ...}."""
    return value.get("content") if isinstance(value, dict) else value if isinstance(value, str) else None


def _folder_special_tokens(folder: Path, hf: dict[str, Any], tok: Tokenizer) -> dict[str, str]:
    """{role: token} from tokenizer_config.json / special_tokens_map.json, else config.json's
    *_token_id; only tokens the tokenizer has."""
    found: dict[str, str] = {}
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        if (folder / name).is_file():
            data = _read_json(folder / name)
            for role in ROLES:
                found.setdefault(role, _token_text(data.get(role)))
    for role in ROLES:
        token_id = hf.get(f"{role}_id")
        if found.get(role) is None and isinstance(token_id, int):
            found[role] = tok.id_to_token(token_id)
    return {role: t for role, t in found.items() if t is not None and tok.token_to_id(t) is not None}


def folder_chat_template(folder: Path) -> tuple[str | None, str | None]:
    """(the folder's chat template, a note or None): chat_template.jinja (how transformers 5
    saves it), else tokenizer_config.json's `chat_template`; a list of named templates keeps
    the one named "default" (the note says so and names the others)."""
    if (folder / CHAT_TEMPLATE_FILE).is_file():
        return read_template_file(folder / CHAT_TEMPLATE_FILE, CHAT_TEMPLATE_FILE), None
    if not (folder / "tokenizer_config.json").is_file():
        return None, None
    value = _read_json(folder / "tokenizer_config.json").get("chat_template")
    if value is None or isinstance(value, str):
        return value, None
    named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)} if isinstance(value, list) else {}
    if not isinstance(named.get("default"), str):
        raise HFFormatError("tokenizer_config.json: chat_template must be a string or a list of "
                            '{"name", "template"} with one named "default"')
    others = sorted(str(n) for n in named if n != "default")
    return named["default"], (f"kept the 'default' chat template of {len(named)} named ones (not kept: "
                              f"{', '.join(others)})")


def _check_folder(folder: Path) -> dict[str, Any]:
    if not folder.is_dir():
        raise FileNotFoundError(f"HF_DIR: {str(folder)!r} is not a directory")
    if not (folder / CONFIG_JSON).is_file():
        raise HFFormatError(f"{CONFIG_JSON}: {str(folder)!r} has none; pass a Hugging Face model folder "
                            "(config.json, model.safetensors, tokenizer.json)")
    return _read_json(folder / CONFIG_JSON)


def _load(folder: str | os.PathLike, dtype: Any, max_context: int | None
          ) -> tuple[Transformer, Config, Tokenizer, dict[str, Any]]:
    """Check everything, then read: (model with numpy arrays, config, tokenizer, hf_import.json)."""
    folder = Path(folder)
    hf = _check_folder(folder)
    cfg, family = config_from_hf(hf, max_context=max_context)
    if not (folder / TOKENIZER).is_file():
        raise HFFormatError(f"{TOKENIZER}: {str(folder)!r} has none; runs need a fast tokenizer "
                            "(transformers: AutoTokenizer.from_pretrained(dir).save_pretrained(dir) writes it)")
    try:
        tok = load_tokenizer(folder / TOKENIZER)
    except TokenizerError as e:
        raise HFFormatError(f"{TOKENIZER}: {e}") from None
    if tok.get_vocab_size() > cfg.vocab_size:
        raise HFFormatError(f"{TOKENIZER}: {tok.get_vocab_size()} tokens, more than config.json's "
                            f"vocab_size={cfg.vocab_size}")
    dtype = parse_dtype(dtype or "float32")
    cfg = cfg.replace(tokenizer_type="char" if isinstance(tok.model, models.WordLevel) else "bpe",
                      use_bf16=dtype == jnp.bfloat16)
    weights = _Weights(folder)
    full = expanded_config(cfg, family)
    ours_like = checkpoint.flatten(shapes_of(full)[0])
    parts = parts_of(full, family)
    n_experts = full.n_experts if full.use_moe else 0
    expected = jax.eval_shape(lambda p: hf_tensors(p, parts, full.num_blocks, n_experts), ours_like)
    aliases = _aliases(weights.shapes, expected)
    for name, want in expected.items():
        got = weights.shapes.get(aliases.get(name, name))
        if got is None:
            raise HFFormatError(f"{WEIGHTS}: tensor {name!r} is missing; config.json describes a {family} model "
                                "that has it")
        if got != want.shape:
            raise HFFormatError(f"{WEIGHTS}: tensor {name!r} has shape {got}, config.json implies {want.shape}")
    used = {aliases.get(n, n) for n in expected}
    extra = sorted(n for n in weights.shapes if n not in used and not n.endswith(BUFFER_SUFFIXES)
                   and not (n == "lm_head.weight" and cfg.weight_tying))
    if extra:
        raise HFFormatError(f"{WEIGHTS}: tensor {extra[0]!r} has no place in the {family} model config.json "
                            f"describes ({len(extra)} such); check attention_bias / mlp_bias / tie_word_embeddings")
    np_dtype = np.dtype(ml_dtypes.bfloat16) if dtype == jnp.bfloat16 else np.dtype(np.float32)
    ours = our_arrays(lambda n: weights.get(aliases.get(n, n)).astype(np_dtype), parts, full.num_blocks, n_experts)
    if family == "gpt2":  # keep only the biases that are not all zero (an export of ours has none)
        flags = {"qkv_bias": ["blocks.attn.qkv_bias"], "o_bias": ["blocks.attn.o_bias"],
                 "mlp_bias": ["blocks.mlp.up_bias", "blocks.mlp.down_bias"]}
        keep = {flag: any(np.any(ours[n] != 0) for n in names) for flag, names in flags.items()}
        for flag, names in flags.items():
            for n in names if not keep[flag] else []:
                del ours[n]
        cfg = cfg.replace(**keep)
    like, static = shapes_of(cfg)
    model = eqx.combine(checkpoint.unflatten(ours, like), static)
    if max_context is not None and max_context < cfg.max_context:  # gpt2: the table's first rows
        model, cfg = with_max_context(model, max_context), cfg.replace(max_context=max_context)
    record = {"source": str(folder.resolve()), "model_type": family,
              "special_tokens": _folder_special_tokens(folder, hf, tok)}
    return model, cfg, tok, record


def _aliases(present: dict[str, Any], expected: dict[str, Any]) -> dict[str, str]:
    """Our expected name -> the file's name, for files that spell names differently: GPT-2
    checkpoints saved without the `transformer.` prefix (e.g. the original gpt2)."""
    out = {}
    for name in expected:
        if name not in present and name.startswith("transformer.") and name[len("transformer."):] in present:
            out[name] = name[len("transformer."):]
    return out


def from_hf(path: str | os.PathLike, *, dtype: Any = "float32", max_context: int | None = None) -> HFModel:
    """The model of a local Hugging Face folder (config.json, model.safetensors or shards with
    model.safetensors.index.json, tokenizer.json): (model, config, tokenizer).

    dtype "float32" (default; exact for bfloat16 files) or "bfloat16" (config.use_bf16 set).
    max_context: see `config_from_hf`. HFFormatError (a ConfigError) names the file or field
    of anything that does not fit: unsupported model_type, RoPE scaling, tensor shapes that
    disagree with config.json, a missing shard, tensors left over.
    """
    model, cfg, tok, _ = _load(path, dtype, max_context)
    return HFModel(jax.tree.map(jnp.asarray, model), cfg, tok)


def _check_new(out: Path, field: str) -> None:
    """FileExistsError naming `field` unless `out` is absent or an empty directory."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{field}: {str(out)!r} exists and is not empty; nothing is overwritten, "
                              "choose a new directory")


@contextmanager
def _new_dir(out: Path, field: str) -> Iterator[Path]:
    """A temporary directory beside `out`, renamed to `out` when the block succeeds (removed
    when it fails): nothing half-written. FileExistsError naming `field` when `out` is taken."""
    _check_new(out, field)
    with atomic_dir(out) as tmp:  # the umask's mode, as every other folder a run writes
        yield tmp


def import_hf(path: str | os.PathLike, run_dir: str | os.PathLike, *, dtype: Any = "float32",
              max_context: int | None = None) -> Path:
    """Write the run directory `run_dir` (module docstring) from the Hugging Face folder `path`;
    every check of `from_hf` runs before anything is written. Returns its path."""
    run_dir = Path(run_dir)
    _check_new(run_dir, "RUN_DIR")
    model, cfg, tok, record = _load(path, dtype, max_context)
    template, note = folder_chat_template(Path(path))
    if template is not None:
        record["chat_template"] = note or f"kept as {CHAT_TEMPLATE_FILE}"
    if note:
        warnings.warn(f"{Path(path) / 'tokenizer_config.json'}: {note}", stacklevel=2)
    params = eqx.filter(model, eqx.is_array)
    with _new_dir(run_dir, "RUN_DIR") as tmp:
        if template is not None:
            write_chat_template(tmp, template)
        cfg.to_yaml(tmp / "config.yaml")
        save_tokenizer(tok, tmp / TOKENIZER, source=Path(path) / TOKENIZER)
        checkpoint.save(tmp, checkpoint.BEST, 0, params)
        checkpoint.save(tmp, checkpoint.LATEST, 0, params)
        atomic_write_text(tmp / IMPORT_FILE, json.dumps(record, indent=2) + "\n")
    return run_dir


# --------------------------------------------------------------------------- export
def guess_special_tokens(tok: Tokenizer) -> dict[str, str]:
    """{"bos_token": ..., "eos_token": ..., ...} from the tokenizer's special tokens, by name."""
    specials = {t.content for t in tok.get_added_tokens_decoder().values() if t.special}
    found = {}
    for role, names in ROLE_GUESSES.items():
        hit = next((n for n in names if n in specials), None)
        if hit is not None:
            found[role] = hit
    return found


def run_special_tokens(run_dir: Path, tok: Tokenizer) -> dict[str, str]:
    """The special tokens recorded by an import in `run_dir` or in the run it was fine-tuned
    from (its init_from chain), else guessed by name from the tokenizer's special tokens."""

    seen: set[Path] = set()
    path: Path | None = run_dir
    while path is not None and path not in seen and (path / "config.yaml").is_file():
        seen.add(path)
        if (path / IMPORT_FILE).is_file():
            recorded = _read_json(path / IMPORT_FILE).get("special_tokens") or {}
            return {r: t for r, t in recorded.items() if r in ROLES and tok.token_to_id(t) is not None}
        init_from = load_config(path).init_from
        path = Path(init_from).resolve() if init_from else None
    return guess_special_tokens(tok)


def _tokenizer_config(special: dict[str, str], max_context: int, chat_template: str | None = None
                      ) -> dict[str, Any]:
    out = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": max_context,
           "clean_up_tokenization_spaces": False, **special}
    if chat_template is not None:  # transformers 4.x reads it here, 5.x from chat_template.jinja too
        out["chat_template"] = chat_template
    return out


def to_hf(model: Any, config: Config, tokenizer: Tokenizer, out_dir: str | os.PathLike, *, dtype: Any = None,
          special_tokens: dict[str, str] | None = None, tokenizer_file: str | os.PathLike | None = None,
          chat_template: str | None = None) -> Path:
    """Write the Hugging Face folder `out_dir` (module docstring) for `model` under `config`.

    LoRA adapters are merged; dtype "float32" | "bfloat16" | None (as the weights are).
    special_tokens: {"eos_token": "</s>", ...}, None = guessed from the tokenizer's special
    tokens. tokenizer_file: the file `tokenizer` was read from, copied byte for byte when it
    still describes it. chat_template: Jinja text written as chat_template.jinja and
    tokenizer_config.json's chat_template (None: none). HFFormatError naming the field when
    Hugging Face cannot express the model; FileExistsError when `out_dir` exists and is not empty. Nothing half-written.
    """
    from safetensors.numpy import save_file  # noqa: PLC0415

    out = Path(out_dir)
    _check_new(out, "out_dir")
    plain = plain_model(model, dtype)
    cfg = config.replace(use_lora=False, init_from="", vocab_size=plain.vocab_size, chat_template=None)
    family = hf_model_type(cfg)
    full = expanded_config(cfg, family)
    ours = {k: np.asarray(jax.device_get(v)) for k, v in checkpoint.flatten(eqx.filter(plain, eqx.is_array)).items()}
    weight_dtype = ours["embedding"].dtype
    if full != cfg:  # GPT-2 biases the run does not have: zeros
        shapes = checkpoint.flatten(shapes_of(full)[0])
        ours |= {n: np.zeros(s.shape, weight_dtype) for n, s in shapes.items() if n not in ours}
    tensors = hf_tensors(ours, parts_of(full, family), cfg.num_blocks, cfg.n_experts if cfg.use_moe else 0)
    tensors = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
    special = guess_special_tokens(tokenizer) if special_tokens is None else dict(special_tokens)
    ids = {role: tokenizer.token_to_id(t) for role, t in special.items()}
    dtype_name = "bfloat16" if weight_dtype == np.dtype(ml_dtypes.bfloat16) else str(weight_dtype)
    hf = hf_config(cfg, ids, dtype_name)
    generation = {k: v for k, v in hf.items() if k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    with _new_dir(out, "out_dir") as tmp:
        atomic_write_text(tmp / CONFIG_JSON, json.dumps(hf, indent=2) + "\n")
        atomic_write_text(tmp / "generation_config.json", json.dumps(generation, indent=2) + "\n")
        save_file(tensors, str(tmp / WEIGHTS), metadata={"format": "pt"})  # transformers needs format "pt"
        save_tokenizer(tokenizer, tmp / TOKENIZER, source=tokenizer_file)
        atomic_write_text(tmp / "tokenizer_config.json",
                          json.dumps(_tokenizer_config(special, cfg.max_context, chat_template), indent=2) + "\n")
        if chat_template is not None:
            write_chat_template(tmp, chat_template)
    return out


def export_hf(run_dir: str | os.PathLike, out_dir: str | os.PathLike, *, dtype: Any = None) -> Path:
    """`to_hf` for a run directory (best checkpoint; a LoRA run merged): refuses a config that
    Hugging Face cannot express, or a taken `out_dir`, before loading any weights."""

    run_dir, out = Path(run_dir), Path(out_dir)
    _check_new(out, "out_dir")
    config = load_config(run_dir)
    hf_model_type(config)
    tokenizer = load_tokenizer(run_dir / TOKENIZER)
    model = from_pretrained(run_dir, merge_lora=True)
    return to_hf(model, config, tokenizer, out, dtype=dtype, special_tokens=run_special_tokens(run_dir, tokenizer),
                 tokenizer_file=run_dir / TOKENIZER, chat_template=read_chat_template(run_dir))

