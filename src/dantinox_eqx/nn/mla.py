"""Multi-head latent attention (`mla: true`), as in DeepSeek-V2, with its two computations.

Shapes: B batch, T new tokens, S key slots, D = dim, H = n_heads, E = head_size,
Q = down_dim_q, C = down_dim_kv (the latent), R = rope_dim.

    c_q  = norm(x @ q_down)                       (B, T, Q)
    q    = c_q @ q_up -> per head [q_nope E | q_rope R], RoPE on q_rope
    [c | k_rope] = x @ kv_down;  c = norm(c)       (B, T, C) latent, (B, T, R) key shared by heads
    k_nope, v = c @ kv_up (per head, E each);  k = [k_nope | RoPE(k_rope)]
    out  = softmax(q . k / sqrt(E + R)) v,  y = out @ o

kv_heads is ignored: every head has its own k_nope and v, all decompressed from one latent.
The cache holds only c and the rotated k_rope per token ((C + R) numbers per layer, against
2 * kv_heads * E for GQA) and `pos` (-1 = empty slot), in a ring buffer like `attention.KVCache`.

`inference` picks the computation, never the parameters:
- False (naive, for training): decompress K and V for every key slot, then attention with H
  heads of width E + R (from the cached latent when a cache is passed).
- True (absorbed, for generation): fold k_up into the query, q_lat[h] = q_nope[h] @ k_up[h]^T
  (C wide), so scores read the cached latent directly (one shared "key" [c | k_rope] for all
  heads, multi-query style), and apply v_up after the attention-weighted sum of latents instead
  of to every slot; k_up and v_up are never applied per cached token. The folds are applied as
  two small matmuls per call rather than pre-multiplied weights, so the parameter pytree is
  identical in both forms.
Use `for_inference(model)` to switch a built model (what a Generator does for MLA configs), or
build from `config.replace(inference=True)`: both give the same parameters.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int, PRNGKeyArray

from .attention import attend, cached_mask, segment_mask
from .functional import fold_key
from .linear import Linear
from .norm import Norm
from .rope import rope

__all__ = ["MLAttention", "MLACache", "for_inference"]


class MLACache(eqx.Module):
    """The compressed KV cache of one layer (stacked over layers): the normalised latent and
    the rotated RoPE key per slot; slot p % S holds position `pos` (-1 = empty)."""

    c_kv: Float[Array, "B S C"]
    k_rope: Float[Array, "B S R"]
    pos: Int[Array, "B S"]


class MLAttention(eqx.Module):
    """DeepSeek-V2 multi-head latent attention; same call contract as `model.Attention`."""

    q_down: Linear  # D -> Q
    q_norm: Norm
    q_up: Linear  # Q -> H * (E + R): per head, E no-position dims then R rotary dims
    kv_down: Linear  # D -> C + R: the latent, then the shared RoPE key
    kv_norm: Norm
    kv_up: Linear  # C -> 2 * H * E: all heads' k_nope, then all heads' v
    o: Linear  # H * E -> D
    n_heads: int = eqx.field(static=True)
    head_size: int = eqx.field(static=True)
    rope_dim: int = eqx.field(static=True)
    latent_dim: int = eqx.field(static=True)
    rope_base: float | None = eqx.field(static=True)  # None: rope parts are not rotated
    window: int | None = eqx.field(static=True)
    sink: bool = eqx.field(static=True)
    dropout_rate: float = eqx.field(static=True)
    absorbed: bool = eqx.field(static=True)  # config.inference

    def __init__(self, dim: int, n_heads: int, head_size: int, rope_dim: int, down_dim_q: int,
                 down_dim_kv: int, *, key: PRNGKeyArray, norm_type: str = "rmsnorm", norm_eps: float = 1e-6,
                 rope_base: float | None = 10000.0, window: int | None = None, sink: bool = False,
                 dropout_rate: float = 0.0, absorbed: bool = False, out_std: float = 0.02):
        """Sizes as in the module docstring; `rope_base` None: the rope parts are not rotated;
        `absorbed` picks the computation (config.inference), never the parameters."""
        keys = jax.random.split(key, 5)
        H, E, R, Q, C = n_heads, head_size, rope_dim, down_dim_q, down_dim_kv
        self.q_down, self.q_norm = Linear(dim, Q, key=keys[0]), Norm(Q, norm_type, norm_eps)
        self.q_up = Linear(Q, H * (E + R), key=keys[1])
        self.kv_down, self.kv_norm = Linear(dim, C + R, key=keys[2]), Norm(C, norm_type, norm_eps)
        self.kv_up = Linear(C, 2 * H * E, key=keys[3])
        self.o = Linear(H * E, dim, key=keys[4], std=out_std)
        self.n_heads, self.head_size, self.rope_dim, self.latent_dim = H, E, R, C
        self.rope_base, self.window, self.sink = rope_base, window, sink
        self.dropout_rate, self.absorbed = dropout_rate, absorbed

    def init_cache(self, batch: int, size: int, dtype: Any) -> MLACache:
        return MLACache(jnp.zeros((batch, size, self.latent_dim), dtype),
                        jnp.zeros((batch, size, self.rope_dim), dtype),
                        jnp.full((batch, size), -1, jnp.int32))

    def __call__(self, x: Float[Array, "B T D"], positions: Int[Array, "*pb T"],
                 cache: MLACache | None = None, *, key: PRNGKeyArray | None = None,
                 segment_ids: Int[Array, "B T"] | None = None) -> tuple[Float[Array, "B T D"], MLACache | None]:
        B, T, _ = x.shape
        H, E, C = self.n_heads, self.head_size, self.latent_dim
        q = self.q_up(self.q_norm(self.q_down(x, key=fold_key(key, 1))), key=fold_key(key, 2)).reshape(B, T, H, -1)
        q_nope, q_rope = q[..., :E], q[..., E:]
        kv = self.kv_down(x, key=fold_key(key, 3))
        c, k_rope = self.kv_norm(kv[..., :C]), kv[..., C:]
        if self.rope_base is not None:
            q_rope = rope(q_rope, positions, self.rope_base)
            k_rope = rope(k_rope[:, :, None], positions, self.rope_base)[:, :, 0]
        if segment_ids is not None:  # a packed window (no cache): attention inside each segment
            mask = segment_mask(positions, segment_ids, self.window, self.sink)
        else:
            mask, cache = cached_mask(positions, cache, self.window, self.sink, c_kv=c, k_rope=k_rope)
        if cache is not None:
            c, k_rope = cache.c_kv, cache.k_rope
        attn = self._absorbed if self.absorbed else self._naive
        out = attn(q_nope, q_rope, c.astype(x.dtype), k_rope.astype(x.dtype), mask, key)
        return self.o(out.reshape(B, T, H * E), key=fold_key(key, 5)), cache

    def _naive(self, q_nope: Float[Array, "B T H E"], q_rope: Float[Array, "B T H R"],
               c: Float[Array, "B S C"], k_rope: Float[Array, "B S R"], mask: Array,
               key: PRNGKeyArray | None) -> Float[Array, "B T H E"]:
        B, S, _ = c.shape
        H, E, R = self.n_heads, self.head_size, self.rope_dim
        k_nope, v = jnp.split(self.kv_up(c, key=fold_key(key, 4)).reshape(B, S, 2, H, E), 2, axis=2)
        k = jnp.concatenate([k_nope[:, :, 0], jnp.broadcast_to(k_rope[:, :, None], (B, S, H, R))], -1)
        q = jnp.concatenate([q_nope, q_rope], -1)
        out = attend(q[:, :, :, None], k, v[:, :, 0], mask, dropout_rate=self.dropout_rate, key=key)
        return out[:, :, :, 0]

    def _absorbed(self, q_nope: Float[Array, "B T H E"], q_rope: Float[Array, "B T H R"],
                  c: Float[Array, "B S C"], k_rope: Float[Array, "B S R"], mask: Array,
                  key: PRNGKeyArray | None) -> Float[Array, "B T H E"]:
        H, E, R, C = self.n_heads, self.head_size, self.rope_dim, self.latent_dim
        w = _matrix(self.kv_up, C, q_nope.dtype).reshape(C, 2, H, E)
        q_lat = jnp.einsum("bthe,che->bthc", q_nope, w[:, 0])  # k_up folded into the query
        # attend scales scores by 1/sqrt(C + R); the naive form's scale is 1/sqrt(E + R).
        q = jnp.concatenate([q_lat, q_rope], -1) * math.sqrt((C + R) / (E + R))
        k = jnp.concatenate([c, k_rope], -1)[:, :, None]  # one key "head" shared by all heads
        lat = attend(q[:, :, None], k, c[:, :, None], mask, dropout_rate=self.dropout_rate, key=key)
        return jnp.einsum("bthc,che->bthe", lat[:, :, 0], w[:, 1])  # v_up after the weighted sum


def _matrix(linear: Any, d_in: int, dtype: Any) -> Array:
    """The (d_in, d_out) matrix of a linear map: a `Linear`'s weight, or for any other linear
    module (e.g. an unmerged LoRA wrapper) its image of the identity: correct, but a
    d_in x d_in x d_out matmul per call, so merge adapters before fast generation."""
    if type(linear) is Linear:
        return linear.weight.astype(dtype)
    return linear(jnp.eye(d_in, dtype=dtype))


def for_inference(model: Any, inference: bool = True) -> Any:
    """`model` with its MLA blocks switched to the absorbed (`inference=True`) or naive form.
    Same parameter arrays (not copied); a model without MLA is returned unchanged."""
    if not isinstance(model.blocks.attn, MLAttention):
        return model

    def switch(attn: MLAttention) -> MLAttention:
        new = copy.copy(attn)
        object.__setattr__(new, "absorbed", inference)  # a static field: not reachable by tree_at
        return new

    return eqx.tree_at(lambda m: m.blocks.attn, model, replace_fn=switch)
