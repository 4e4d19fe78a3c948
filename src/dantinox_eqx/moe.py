"""Mixture-of-experts MLP (`use_moe`): a softmax router sends each token to `top_k_mlp` of
`n_experts` expert MLPs (plus an optional always-on shared expert) and mixes their outputs.

Shapes: N = B * T tokens, D = dim, E = n_experts, k = top_k_mlp, F = expansion * dim (width of
one expert), C = slots per expert.

Routing (float32 whatever the parameters' dtype): probs = softmax(x @ router), the top-k experts
of each token, their probabilities renormalised to sum to 1 (the gates; k = 1 gives gate 1).

Dispatch: slot buffers. The N * k (token, expert) assignments are ordered k-major (every token's
first choice before any second choice, tokens in (B, T) order within a choice); each gets a slot
= its rank among the assignments to its expert. Tokens are scattered into an (E, C, D) buffer,
the experts run as one batched matmul over the expert axis, and each assignment gathers its row
back, weighted by its gate. No loop over experts, static shapes, and the gradient flows through
a gather/scatter pair.
- Dropless (capacity_factor = 0): C = N (a token picks an expert at most once), so nothing is
  dropped; the experts compute E * N rows (E / k times the active FLOPs) and the buffer
  holds E * N * D activations: with many experts, prefer a capacity factor.
- capacity_factor = c > 0: C = ceil(c * N * k / E); an assignment ranked >= C is dropped (it
  contributes nothing; the block's residual carries the token). Compute is ~c * N * k rows, i.e.
  proportional to the active FLOPs. The capacity is per forward call (per micro-batch), so a
  token's fate depends on the other tokens of the call, including later ones of its sequence:
  a training-time device. KV-cache decoding sees other token sets than the full forward, so
  cached and full logits agree exactly only for dropless models.
Why not the alternatives (measured on XLA:CPU on a contended 2-core machine, so relative only:
train-step ms, min over interleaved runs, dim 128, 4 blocks, batch 8 x 128 tokens, E=4, k=2):
- sort + `jax.lax.ragged_dot` (grouped GEMM): exact k * N rows on GPU/TPU, but on CPU jax
  0.10.2 lowers ragged_dot to a dense masked product over all groups (E * k * N rows):
  814 ms vs 672 ms for slot buffers (E=8: 1044 vs 878). It would be the dropless choice on
  accelerators.
- all experts on all tokens, mixed by a dense (N, E) gate matrix: the FLOPs of dropless slot
  buffers without the gather/scatter, yet 818 ms (E=8: 1194).
- GShard one-hot dispatch/combine einsums: (N, E, C) tensors; one layer at c = 1.25 took
  2.6x the slot-buffer time, and dropless would need C = N (memory quadratic in N).
At tiny sizes (dim 32, 64 tokens) all are within ~20 % (slot buffers 1.37 ms, ragged_dot
1.61, all-experts 1.28). Same-step reference: dense MLP of the same active width 228 ms,
capacity_factor 1.25 405 ms.

Balance loss (Switch / GShard): E * sum_e f_e * P_e, where f_e is the fraction of the N * k
top-k assignments routed to expert e (before any capacity dropping) and P_e the mean router
probability of e over the tokens. It is 1.0 for perfectly uniform routing and reaches E / k
when every token routes to the same k experts with probability 1 / k each (E for k = 1).
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int, PRNGKeyArray, Scalar

from .config import Config
from .model import MLP, Linear, activate, normal_init, residual_std

__all__ = ["MoE", "ExpertLinear", "Routing", "capacity", "balance_loss", "expert_counts",
           "param_counts"]


class ExpertLinear(eqx.Module):
    """E independent linear maps stacked on a leading expert axis: y[e] = x[e] @ weight[e]."""

    weight: Float[Array, "n_experts d_in d_out"]

    def __init__(self, n_experts: int, d_in: int, d_out: int, *, key: PRNGKeyArray,
                 std: float = 0.02):
        self.weight = normal_init(key, (n_experts, d_in, d_out), std)  # issue 16: jit-stable

    def __call__(self, x: Float[Array, "n_experts C d_in"]) -> Float[Array, "n_experts C d_out"]:
        return jnp.einsum("ecd,edf->ecf", x, self.weight.astype(x.dtype))


class Routing(NamedTuple):
    """The router's decisions for N tokens."""

    probs: Float[Array, "N E"]  # float32 softmax over experts
    gates: Float[Array, "N k"]  # renormalised top-k probabilities
    experts: Int[Array, "N k"]  # chosen experts, best first


def capacity(n_tokens: int, n_experts: int, top_k: int, capacity_factor: float) -> int:
    """Slots per expert: N when dropless (factor 0), else ceil(factor * N * k / E), at most N."""
    if capacity_factor <= 0:
        return n_tokens
    return max(1, min(n_tokens, math.ceil(capacity_factor * n_tokens * top_k / n_experts)))


def balance_loss(probs: Float[Array, "N E"], experts: Int[Array, "N k"]) -> Scalar:
    """E * sum_e f_e * P_e (see the module docstring); 1.0 for perfectly uniform routing."""
    n_experts = probs.shape[-1]
    counts = jax.nn.one_hot(experts, n_experts, dtype=jnp.float32).sum((0, 1))
    fraction = counts / experts.size
    return n_experts * jnp.sum(fraction * probs.mean(0))


class MoE(eqx.Module):
    """Top-k routed expert MLPs (SwiGLU or `activation`, like `model.MLP`), optional shared
    expert. `__call__(x (B, T, D)) -> (y (B, T, D), balance loss scalar float32)`."""

    router: Linear  # D -> E logits
    up: ExpertLinear  # (E, D, 2F) with SwiGLU (gate then value, as model.MLP), else (E, D, F)
    down: ExpertLinear  # (E, F, D)
    shared: MLP | None  # always-on expert of the same width (shared_expert)
    n_experts: int = eqx.field(static=True)
    top_k: int = eqx.field(static=True)
    capacity_factor: float = eqx.field(static=True)
    swiglu: bool = eqx.field(static=True)
    activation: str = eqx.field(static=True)

    def __init__(self, cfg: Config, *, key: PRNGKeyArray):
        k_router, k_up, k_down, k_shared = jax.random.split(key, 4)
        E, D, F = cfg.n_experts, cfg.dim, cfg.expansion * cfg.dim
        self.router = Linear(D, E, key=k_router)
        self.up = ExpertLinear(E, D, (2 if cfg.use_swiglu else 1) * F, key=k_up)
        self.down = ExpertLinear(E, F, D, key=k_down, std=residual_std(cfg))
        self.shared = MLP(cfg, key=k_shared) if cfg.shared_expert else None
        self.n_experts, self.top_k, self.capacity_factor = E, cfg.top_k_mlp, cfg.capacity_factor
        self.swiglu, self.activation = cfg.use_swiglu, cfg.activation

    def route(self, x: Float[Array, "N D"]) -> Routing:
        """Router probabilities (float32) and each token's top-k experts and gates."""
        logits = self.router(x.astype(jnp.float32))  # Linear casts its weight to float32 too
        probs = jax.nn.softmax(logits, axis=-1)
        top, experts = jax.lax.top_k(probs, self.top_k)
        return Routing(probs, top / top.sum(-1, keepdims=True), experts)

    def _experts(self, h: Float[Array, "E C D"]) -> Float[Array, "E C D"]:
        h = self.up(h)
        if self.swiglu:
            gate, h = jnp.split(h, 2, axis=-1)
            h = jax.nn.silu(gate) * h
        else:
            # issue 16: model.activate adds relu2; gelu keeps jax.nn.gelu's autodiff (unchanged runs)
            h = jax.nn.gelu(h) if self.activation == "gelu" else activate(self.activation, h)
        return self.down(h)

    def __call__(self, x: Float[Array, "B T D"]) -> tuple[Float[Array, "B T D"], Scalar]:
        B, T, D = x.shape
        N, E, k = B * T, self.n_experts, self.top_k
        C = capacity(N, E, k, self.capacity_factor)
        flat = x.reshape(N, D)
        r = self.route(flat)
        # Assignments in k-major order: index j * N + n is token n's j-th choice.
        expert = r.experts.T.reshape(-1)  # (kN,)
        onehot = jax.nn.one_hot(expert, E, dtype=jnp.int32)
        rank = (jnp.cumsum(onehot, axis=0) * onehot).sum(-1) - 1  # rank among e's assignments
        keep = rank < C
        slot = jnp.where(keep, expert * C + rank, E * C)  # E * C: out of range, dropped
        buf = jnp.zeros((E * C, D), x.dtype).at[slot].set(jnp.tile(flat, (k, 1)), mode="drop")
        out = self._experts(buf.reshape(E, C, D)).reshape(E * C, D)
        rows = jnp.take(out, slot, axis=0, mode="fill", fill_value=0)  # (kN, D)
        weight = r.gates.T.reshape(-1) * keep
        y = (rows.astype(jnp.float32) * weight[:, None]).reshape(k, N, D).sum(0).astype(x.dtype)
        y = y.reshape(B, T, D)
        if self.shared is not None:
            y = y + self.shared(x)[0]
        return y, balance_loss(r.probs, r.experts)


# --------------------------------------------------------------------------- reporting
def expert_counts(model: Any, tokens: Int[Array, "B T"]) -> Int[Array, "L E"]:
    """Tokens routed to each expert in each block by a full (dropout-free) forward of
    `model` over `tokens`: (num_blocks, n_experts) int32; every row sums to B * T * top_k.
    Counts are top-k assignments before capacity dropping. For logging; jit it if called
    often (`eqx.filter_jit(expert_counts)`)."""
    positions = jnp.arange(tokens.shape[1])
    dynamic, static = eqx.partition(model.blocks, eqx.is_array)

    def body(x, params):
        blk = eqx.combine(params, static)
        h, _ = blk.attn(blk.attn_norm(x), positions)
        x = x + h
        m = blk.mlp_norm(x)
        r = blk.mlp.route(m.reshape(-1, m.shape[-1]))
        counts = jax.nn.one_hot(r.experts, blk.mlp.n_experts, dtype=jnp.int32).sum((0, 1))
        return x + blk.mlp(m)[0], counts

    _, counts = jax.lax.scan(body, model._embed(tokens, positions), dynamic)
    return counts


def param_counts(model_or_config: Any) -> tuple[int, int]:
    """(total, active per token) parameter counts of a model, or of the model a `Config`
    describes (shapes only, nothing allocated). Every array counts (embeddings included);
    active counts only top_k of the n_experts routed experts' weights. Dense: active = total."""
    if isinstance(model_or_config, Config):
        from .model import Transformer  # noqa: PLC0415

        model = eqx.filter_eval_shape(Transformer, model_or_config, key=jax.random.key(0))
    else:
        model = model_or_config
    size = lambda tree: sum(math.prod(a.shape) for a in jax.tree.leaves(tree) if hasattr(a, "shape"))
    total = size(model)
    active = total
    for moe in _find(model, MoE):
        routed = size(moe.up) + size(moe.down)
        active -= routed * (moe.n_experts - moe.top_k) // moe.n_experts
    return total, active


def _find(tree: Any, kind: type) -> list[Any]:
    return [n for n in jax.tree.leaves(tree, is_leaf=lambda n: isinstance(n, kind)) if isinstance(n, kind)]
