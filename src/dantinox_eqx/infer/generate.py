"""Sampling text from a trained model: `Generator(run_dir).generate("prompt")`.

The loop: the prompts are left-padded into one (B, P) batch and prefilled in one
`model.decode` call; then tokens are sampled and fed back one at a time inside one jitted
`lax.fori_loop` (a `while_loop`) over a fixed-size KV cache. Nothing is recomputed per token,
and nothing is re-traced per token, per prompt or per request: prompt lengths are padded to
powers of two, the number of steps is a traced value, and the sampling settings (temperature,
top-k, top-p) are traced arrays. Compiled shapes are (batch, padded prompt length, cache size)
for the prefill and (batch, chunk capacity, cache size) for the decode loop; `cache_size`
slots (issue 25, benchmarks/decode_profile.py: attention reads every slot per token). The
model decodes with its blocks unstacked (`unstack_blocks`: no copies of weight slices).

Positions and the context window:
- Left padding has position -1: `model.decode` neither writes nor attends to it, so a prompt in
  a batch gives the same tokens as alone (greedy; sampled tokens use a key per row, see
  `sample_logits`).
- A prompt longer than `max_context` tokens is cut to its last `max_context` tokens (warned).
- Generation past `max_context` slides: the cache is then a ring buffer of `max_context` slots and
  position p overwrites the slot of p - max_context, so each new token attends to the last
  `max_context` tokens (itself included), whose keys and values were computed when they were
  generated (as in StreamingLLM; not a re-encoding of the window from position 0). With
  rotary positions only relative offsets matter, so positions past the training length are
  fine; `rope_scale_factor > 1` and `sliding_window` are the tools for models meant to read
  further. A `sliding_window` attention sink (position 0) is kept only until its slot is
  overwritten.

Streaming decodes in chunks of `STREAM_CHUNK` tokens per jitted call and yields the new text
after each chunk. Text is produced by decoding the growing id list and emitting its new suffix,
so byte-level BPE tokens that split a UTF-8 character are held back until complete.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int, PRNGKeyArray
from tokenizers import Tokenizer

from ..config import Config, ConfigError
from ..data.tokenizer import TokenizerError, encode, eot_id, load_tokenizer
from ..model import Transformer, unstack_blocks
from ..run.chat_template import chat_template_file
from ..run.hf import guess_special_tokens, run_special_tokens
from ..run.layout import TOKENIZER_FILE
from ..run.pretrained import from_pretrained, load_config
from .chat import chat_ids
from .storage import WEIGHTS, store_weights

__all__ = ["Generator", "top_k_filter", "top_p_filter", "sample_logits", "DecodeState", "prefill",
           "decode_steps", "left_pad", "cache_size", "generate_ids", "naive_generate", "bucket"]

STREAM_CHUNK = 16  # tokens per jitted call when streaming
STOP_CHUNK = 64  # tokens per call when stop strings may end generation early
MIN_BUCKET = 16
NEG_INF = -jnp.inf


# --------------------------------------------------------------------------- pure sampling
def top_k_filter(logits: Float[Array, "*B V"], k: Int[Array, ""] | int) -> Float[Array, "*B V"]:
    """Keep each row's `k` largest logits, set the others to -inf. `k <= 0` keeps all.

    `k` may be a traced value (it is compared against the sorted row, not used as a shape).
    """
    k = jnp.asarray(k, jnp.int32)
    desc = -jnp.sort(-logits, axis=-1)
    kth = jnp.take(desc, jnp.clip(k - 1, 0, logits.shape[-1] - 1), axis=-1)[..., None]
    return jnp.where((k <= 0) | (logits >= kth), logits, NEG_INF)


def top_p_filter(logits: Float[Array, "*B V"], p: Float[Array, ""] | float) -> Float[Array, "*B V"]:
    """Nucleus filtering: keep the smallest set of most likely tokens whose probability sums to
    at least `p` (the most likely token always stays), set the others to -inf. `p >= 1` keeps all.
    """
    p = jnp.asarray(p, jnp.float32)
    desc = -jnp.sort(-logits, axis=-1)
    probs = jax.nn.softmax(desc.astype(jnp.float32), axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    keep = mass_before < p  # index 0 has mass_before 0: always kept
    threshold = jnp.min(jnp.where(keep, desc, jnp.inf), axis=-1, keepdims=True)
    return jnp.where((p >= 1.0) | (logits >= threshold), logits, NEG_INF)


def sample_logits(logits: Float[Array, "B V"], key: PRNGKeyArray, temperature: Float[Array, ""] | float,
                  top_k: Int[Array, ""] | int = 0, top_p: Float[Array, ""] | float = 1.0
                  ) -> Int[Array, " B"]:
    """One token per row: argmax when `temperature == 0`, else a sample from
    softmax(logits / temperature) restricted by `top_k` (0 = off) then `top_p` (1 = off).

    Row r draws with `fold_in(key, r)`, so a row's sample depends on its own logits and its
    index only, not on the rest of the batch. Computed in float32.
    """
    logits = logits.astype(jnp.float32)
    temperature = jnp.asarray(temperature, jnp.float32)
    top_k, top_p = jnp.asarray(top_k, jnp.int32), jnp.asarray(top_p, jnp.float32)

    def sample(logits):
        scaled = logits / temperature
        # the filters sort the vocabulary: skip them (lax.cond runs one branch) when off
        scaled = jax.lax.cond((top_k > 0) | (top_p < 1.0),
                              lambda x: top_p_filter(top_k_filter(x, top_k), top_p), lambda x: x, scaled)
        keys = jax.vmap(lambda r: jax.random.fold_in(key, r))(jnp.arange(logits.shape[0]))
        return jax.vmap(jax.random.categorical)(keys, scaled).astype(jnp.int32)

    def greedy(logits):
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)

    return jax.lax.cond(temperature > 0, sample, greedy, logits)


# --------------------------------------------------------------------------- cached decoding
class DecodeState(eqx.Module):
    """What the decode loop carries between tokens (and between streamed chunks)."""

    cache: Any  # the model's KV cache (ring buffer of max_context slots)
    logits: Float[Array, "B V"]  # float32 logits of the next token
    pos: Int[Array, " B"]  # absolute position of the next token
    step: Int[Array, ""]  # tokens generated so far: indexes the PRNG stream


class Sampling(eqx.Module):
    """Sampling settings as arrays, so changing them does not recompile."""

    temperature: Float[Array, ""]
    top_k: Int[Array, ""]
    top_p: Float[Array, ""]
    n_valid: Int[Array, ""]  # ids >= n_valid (vocabulary padding) are never sampled

    @classmethod
    def make(cls, temperature: float, top_k: int | None, top_p: float | None, n_valid: int) -> Sampling:
        _check_sampling(temperature, top_k, top_p)
        return cls(jnp.float32(temperature), jnp.int32(top_k or 0),
                   jnp.float32(1.0 if top_p is None else top_p), jnp.int32(n_valid))


def _check_sampling(temperature: float, top_k: int | None, top_p: float | None) -> None:
    if not temperature >= 0:
        raise ConfigError(f"temperature: must be >= 0 (0 = greedy), got {temperature}")
    if top_k is not None and top_k < 1:
        raise ConfigError(f"top_k: must be >= 1 (or None for no limit), got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ConfigError(f"top_p: must be in (0, 1] (or None for no limit), got {top_p}")


@eqx.filter_jit
def prefill(model: Transformer, tokens: Int[Array, "B P"], positions: Int[Array, "B P"],
            size: int | None = None) -> DecodeState:
    """Run the left-padded prompts through the model in one call, filling a fresh cache of
    `size` slots (default max_context). The last column holds every row's last prompt token
    (left padding), so its logits predict each row's first new token."""
    cache = model.init_cache(tokens.shape[0], size)
    logits, cache = model.decode(tokens, positions, cache, last=True)
    return DecodeState(cache, logits[:, -1].astype(jnp.float32), positions.max(axis=-1) + 1,
                       jnp.zeros((), jnp.int32))


@eqx.filter_jit
def decode_steps(model: Transformer, state: DecodeState, n: Int[Array, ""], key: PRNGKeyArray,
                 sampling: Sampling, capacity: int, with_logits: bool = False
                 ) -> tuple[DecodeState, Int[Array, "B cap"], Float[Array, "B cap V"] | None]:
    """Sample `n <= capacity` tokens, one model.decode call per token, in one while_loop.

    Returns the new state, the tokens in columns [:n] of a (B, capacity) buffer and, with
    `with_logits`, the float32 logits each token was sampled from. Token number t of the
    generation uses the key `fold_in(key, t)`, so chunking does not change the samples.
    """
    B, V = state.logits.shape
    valid = jnp.arange(V) < sampling.n_valid

    def body(i, carry):
        state, out, seen = carry
        logits = jnp.where(valid, state.logits, NEG_INF)
        tok = sample_logits(logits, jax.random.fold_in(key, state.step), sampling.temperature,
                            sampling.top_k, sampling.top_p)
        out = out.at[:, i].set(tok)
        if seen is not None:
            seen = seen.at[:, i].set(state.logits)
        # Tied to the step, or XLA hoists each int8 / bfloat16 weight's conversion out of the
        # loop and every token reads float32 copies (as many bytes as float32 weights).
        params = jax.lax.optimization_barrier((eqx.filter(model, eqx.is_array), state.step))[0]
        logits, cache = eqx.combine(params, model).decode(tok[:, None], state.pos[:, None], state.cache)
        state = DecodeState(cache, logits[:, 0].astype(jnp.float32), state.pos + 1, state.step + 1)
        return state, out, seen

    out = jnp.zeros((B, capacity), jnp.int32)
    seen = jnp.zeros((B, capacity, V), jnp.float32) if with_logits else None
    return jax.lax.fori_loop(0, n, body, (state, out, seen))


def bucket(n: int, cap: int | None = None) -> int:
    """The power of two >= n (at least MIN_BUCKET), at most `cap`: compiled lengths are reused."""
    b = max(MIN_BUCKET, 1 << max(0, n - 1).bit_length())
    return b if cap is None else max(n, min(b, cap))


def cache_size(model: Transformer, prompt_len: int, max_new_tokens: int) -> int:
    """KV slots: prompt + new tokens as a power of two, at most max_context (the ring slides)."""
    return min(model.max_context, bucket(prompt_len + max_new_tokens))


def left_pad(prompts: Sequence[Sequence[int]], length: int) -> tuple[np.ndarray, np.ndarray]:
    """Left-pad id lists into (B, length) int32 tokens and positions (-1 on padding)."""
    tokens = np.zeros((len(prompts), length), np.int32)
    positions = np.full((len(prompts), length), -1, np.int32)
    for r, ids in enumerate(prompts):
        if len(ids):
            tokens[r, length - len(ids):] = ids
            positions[r, length - len(ids):] = np.arange(len(ids))
    return tokens, positions


def _fit_context(ids: list[int], max_context: int) -> list[int]:
    if not ids:
        raise ConfigError("prompt: it is empty (no tokens); give at least one character")
    if len(ids) > max_context:
        warnings.warn(f"prompt: {len(ids)} tokens exceed max_context={max_context}; keeping the last "
                      f"{max_context}", stacklevel=4)
        ids = ids[-max_context:]
    return ids


def _chunks(model: Transformer, prompts: Sequence[Sequence[int]], max_new_tokens: int, sampling: Sampling,
            seed: int, chunk: int, with_logits: bool = False
            ) -> Iterator[tuple[np.ndarray, np.ndarray | None]]:
    """Prefill, then yield (tokens (B, n), logits (B, n, V) or None) chunks of up to `chunk`."""
    if max_new_tokens < 0:
        raise ConfigError(f"max_new_tokens: must be >= 0, got {max_new_tokens}")
    if not prompts:
        raise ConfigError("prompt: the list of prompts is empty; give at least one")
    if chunk < 1:
        raise ConfigError(f"chunk: must be >= 1 token per call, got {chunk}")
    prompts = [_fit_context(list(p), model.max_context) for p in prompts]
    model = unstack_blocks(model)  # a no-op for store_weights' models (Generator's)
    tokens, positions = left_pad(prompts, bucket(max(map(len, prompts)), model.max_context))
    size = cache_size(model, max(map(len, prompts)), max_new_tokens)
    state = prefill(model, jnp.asarray(tokens), jnp.asarray(positions), size)
    key, capacity, done = jax.random.key(seed), bucket(chunk), 0
    while done < max_new_tokens:
        n = min(chunk, max_new_tokens - done)
        state, out, seen = decode_steps(model, state, jnp.int32(n), key, sampling, capacity, with_logits)
        # slice on the host: a device slice would compile once per n
        yield np.asarray(out)[:, :n], None if seen is None else np.asarray(seen)[:, :n]
        done += n


def generate_ids(model: Transformer, prompts: Sequence[Sequence[int]], max_new_tokens: int, *,
                 temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                 seed: int = 0, return_logits: bool = False
                 ) -> tuple[np.ndarray, np.ndarray | None]:
    """Token-level sampling: (new ids (B, max_new_tokens), their logits (B, n, V) or None).
    `prompts` are lists of token ids (any lengths). One prefill call, one decode call."""
    sampling = Sampling.make(temperature, top_k, top_p, model.vocab_size)
    parts = list(_chunks(model, prompts, max_new_tokens, sampling, seed, max(1, max_new_tokens),
                         return_logits))
    if not parts:
        return np.zeros((len(prompts), 0), np.int32), None
    ids = np.concatenate([p[0] for p in parts], axis=1)
    return ids, np.concatenate([p[1] for p in parts], axis=1) if return_logits else None


@eqx.filter_jit
def _last_logits(model: Transformer, window: Int[Array, "1 C"], index: Int[Array, ""]) -> Float[Array, " V"]:
    logits, _ = model(window)
    return logits[0, index]


def naive_generate(model: Transformer, prompt: Sequence[int], max_new_tokens: int) -> list[int]:
    """Greedy decoding without a cache, for reference and benchmarks: every token re-runs the
    full forward over a fixed (1, max_context) window holding the last max_context tokens
    (one compilation; O(max_context) work per token instead of O(1))."""
    C = model.max_context
    ids = list(prompt)[-C:]
    new = []
    for _ in range(max_new_tokens):
        window = ids[-C:]
        padded = np.zeros((1, C), np.int32)
        padded[0, :len(window)] = window  # right padding: causal, so it cannot affect index len-1
        tok = int(jnp.argmax(_last_logits(model, jnp.asarray(padded), jnp.int32(len(window) - 1))))
        ids.append(tok)
        new.append(tok)
    return new


# --------------------------------------------------------------------------- text
class _TextStream:
    """Turns one row's growing id list into text pieces, honouring stop strings and the
    end tokens (`end_id`: one id, several (chat: end-of-turn and end-of-text), or None): the
    text ends before the first of them."""

    def __init__(self, tokenizer: Tokenizer, stop: Sequence[str], end_id: int | Sequence[int] | None = None):
        self.tokenizer, self.stop = tokenizer, [s for s in stop if s]
        self.end_ids = set() if end_id is None else {end_id} if isinstance(end_id, int) else set(end_id)
        self.hold = max((len(s) for s in self.stop), default=1) - 1  # could be a stop's start
        self.ids: list[int] = []
        self.emitted = ""
        self.done = False

    def feed(self, ids: Sequence[int], final: bool = False) -> str:
        """Add ids; return the text that is now certain. `final` flushes everything."""
        if self.done:
            return ""
        ids = [int(i) for i in ids]
        end = next((at for at, i in enumerate(ids) if i in self.end_ids), None)
        ended = end is not None
        self.ids.extend(ids[:end] if ended else ids)
        text = self.tokenizer.decode(self.ids)
        hits = [at for at in (text.find(s) for s in self.stop) if at >= 0]
        if hits:
            text, self.done = text[:min(hits)], True
        elif ended:
            self.done = True  # all text before the end-of-text token is final
        elif not final:
            text = text.rstrip("\ufffd")  # an incomplete UTF-8 character: wait for its bytes
            text = text[:len(text) - self.hold]  # it may be the start of a stop string
        if not text.startswith(self.emitted):  # shorter than what was sent: nothing new yet
            return ""
        piece, self.emitted = text[len(self.emitted):], text
        return piece


class Generator:
    """Text in, text out, with a trained run's tokenizer and weights.

        gen = Generator("runs/my_run")                 # best checkpoint; best=False: latest
        gen.generate("ROMEO:", max_new_tokens=200, temperature=0.8, top_k=40)
        for piece in gen.stream("ROMEO:"): print(piece, end="", flush=True)

    `generate` returns only the new text (not the prompt). Or wrap a model you hold:
    `Generator.from_model(model, tokenizer)`. A LoRA run's adapters are merged at load (the
    weights `export --merge-lora` writes; no adapter GEMMs per token).

    `gen.chat([{"role": "user", "content": "..."}])` renders the run's chat template
    (`chat_template.jinja`, run/chat_template.py) and returns the assistant's answer.

    `weights` is how the projection weights are stored while generating (infer/storage.py):
    "float32", "bfloat16" or "int8" (nn/quant.py); smaller weights decode faster, since every
    token reads all of them: int8 is the fastest on CPU.
    """

    def __init__(self, run_dir: str | os.PathLike, best: bool = True, *, dtype: Any = None,
                 max_context: int | None = None, chat_template: str | None = None, weights: str = "float32"):
        """`max_context`: the KV-cache size / window instead of the run's (`from_pretrained`).
        `chat_template`: Jinja text used by `chat` instead of the run's (None: the run's, if any)."""

        config = load_config(run_dir)
        if not (Path(run_dir) / TOKENIZER_FILE).is_file():
            raise TokenizerError(f"run directory {str(run_dir)!r} has no tokenizer.json; it is not a complete "
                                 "run directory")
        tokenizer = load_tokenizer(Path(run_dir) / TOKENIZER_FILE)
        if weights not in WEIGHTS:  # before loading anything
            raise ConfigError(f"weights: unknown value {weights!r}; choose one of {', '.join(WEIGHTS)}")
        model = from_pretrained(run_dir, best, dtype=dtype, inference=True, merge_lora=True,
                                max_context=max_context)
        self._setup(model, tokenizer, config, weights)
        if chat_template is None and (found := chat_template_file(run_dir)) is not None:
            chat_template, self.template_source = found.read_text(encoding="utf-8"), str(found)
        self.chat_template = chat_template
        self.special_tokens = run_special_tokens(Path(run_dir), tokenizer)

    @classmethod
    def from_model(cls, model: Transformer, tokenizer: Tokenizer, config: Config | None = None, *,
                   chat_template: str | None = None, special_tokens: dict[str, str] | None = None,
                   weights: str = "float32") -> Generator:
        """A Generator for a model in memory. `special_tokens`: {"bos_token": "<s>", ...} as the
        chat template sees them (None: guessed by name from the tokenizer's special tokens)."""
        self = cls.__new__(cls)
        self._setup(model, tokenizer, config, weights)
        self.chat_template = chat_template
        self.special_tokens = guess_special_tokens(tokenizer) if special_tokens is None else dict(special_tokens)
        return self

    def _setup(self, model: Transformer, tokenizer: Tokenizer, config: Config | None, weights: str) -> None:
        if tokenizer.get_vocab_size() > model.vocab_size:
            raise ConfigError(f"vocab_size: the tokenizer has {tokenizer.get_vocab_size()} tokens but the "
                              f"model only {model.vocab_size}; use the run's own tokenizer.json")
        self.model, self.tokenizer, self.config = store_weights(model, weights), tokenizer, config
        self.weights = weights
        self.template_source = "chat_template"

    # -- chat
    def chat_prompt(self, messages: list[dict[str, str]]) -> tuple[list[int], list[int]]:
        """(prompt ids, ids that end the answer) of `messages` with this run's template (`chat_ids`)."""
        return chat_ids(self.tokenizer, self.chat_template, messages, self.special_tokens, self.template_source)

    def chat(self, messages: list[dict[str, str]], max_new_tokens: int = 256, temperature: float = 1.0,
             top_k: int | None = None, top_p: float | None = None, seed: int = 0,
             stop: str | Sequence[str] | None = None) -> str:
        """The assistant's answer to the conversation `messages` ([{"role", "content"}, ...];
        ChatMessageError names a bad index and field): rendered by the chat template with
        add_generation_prompt, generated until the end-of-turn token (not part of the answer),
        a stop string or `max_new_tokens`. Sampling arguments as in `generate`."""
        ids, end_ids = self.chat_prompt(messages)
        answer = ""
        for pieces in self._pieces([ids], max_new_tokens, temperature, top_k, top_p, seed, stop, end_ids, None):
            answer += pieces[0]
        return answer

    def encode(self, text: str) -> list[int]:
        return encode(self.tokenizer, text)

    def _pieces(self, prompt: str | Sequence[str] | list[list[int]], max_new_tokens: int, temperature: float,
                top_k: int | None, top_p: float | None, seed: int, stop: str | Sequence[str] | None,
                stop_at_eot: bool | list[int], chunk: int | None) -> Iterator[list[str]]:
        """Text pieces per row. `prompt`: text(s), or a list of id lists (chat); `stop_at_eot`:
        whether to end at the end-of-text token, or the list of ids that end the text."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        stop = [stop] if isinstance(stop, str) else list(stop or [])
        sampling = Sampling.make(temperature, top_k, top_p, self.tokenizer.get_vocab_size())
        ids = [p if isinstance(p, list) else self.encode(p) for p in prompts]
        if isinstance(stop_at_eot, list):
            end_id = stop_at_eot
        else:
            end_id = eot_id(self.tokenizer) if stop_at_eot else None
        if chunk is None:  # in pieces when generation may end early (the text is the same)
            chunk = STOP_CHUNK if stop or end_id else max(1, max_new_tokens)
        rows = [_TextStream(self.tokenizer, stop, end_id) for _ in prompts]
        for tokens, _ in _chunks(self.model, ids, max_new_tokens, sampling, seed, chunk):
            yield [row.feed(t.tolist()) for row, t in zip(rows, tokens)]
            if all(row.done for row in rows):
                return
        yield [row.feed([], final=True) for row in rows]

    def generate(self, prompt: str | Sequence[str], max_new_tokens: int = 256, temperature: float = 1.0,
                 top_k: int | None = None, top_p: float | None = None, seed: int = 0,
                 stop: str | Sequence[str] | None = None, stop_at_eot: bool = True) -> str | list[str]:
        """The continuation of `prompt` (a list of prompts: a list of continuations).

        temperature 0 = greedy; top_k / top_p restrict sampling (None = off); the same seed
        gives the same text. Generation ends after `max_new_tokens` tokens, at the first stop
        string, which is cut off (with the text after it), or, with `stop_at_eot`, at the
        tokenizer's end-of-text token (`<|endoftext|>`, Llama's `</s>`, ...: the end of a
        document in the training data), which is not part of the text.
        """
        rows = ["" for _ in ([prompt] if isinstance(prompt, str) else prompt)]
        for pieces in self._pieces(prompt, max_new_tokens, temperature, top_k, top_p, seed, stop, stop_at_eot,
                                   None):
            rows = [r + p for r, p in zip(rows, pieces)]
        return rows[0] if isinstance(prompt, str) else rows

    def stream(self, prompt: str | Sequence[str], max_new_tokens: int = 256, temperature: float = 1.0,
               top_k: int | None = None, top_p: float | None = None, seed: int = 0,
               stop: str | Sequence[str] | None = None, chunk: int = STREAM_CHUNK, stop_at_eot: bool = True
               ) -> Iterator[str] | Iterator[list[str]]:
        """Like `generate`, but yields text pieces as they are decoded (`chunk` tokens per
        device call): strings for one prompt, lists of strings (one per prompt) for a list.
        The pieces join to exactly `generate`'s text with the same arguments."""
        for pieces in self._pieces(prompt, max_new_tokens, temperature, top_k, top_p, seed, stop, stop_at_eot,
                                   chunk):
            if isinstance(prompt, str):
                if pieces[0]:
                    yield pieces[0]
            else:
                yield pieces
