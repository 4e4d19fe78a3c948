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

from .functional import fold_key
from .linear import Linear, normal_init
from .mlp import MLP, activate

__all__ = ["MoE", "ExpertLinear", "Routing", "capacity", "balance_loss", "find_modules"]


class ExpertLinear(eqx.Module):
    """E independent linear maps stacked on a leading expert axis: y[e] = x[e] @ weight[e]."""

    weight: Float[Array, "n_experts d_in d_out"]

    def __init__(self, n_experts: int, d_in: int, d_out: int, *, key: PRNGKeyArray,
                 std: float = 0.02):
        self.weight = normal_init(key, (n_experts, d_in, d_out), std)  # jit-stable (Transformer.build)

    def __call__(self, x: Float[Array, "n_experts C d_in"], *, key: PRNGKeyArray | None = None
                 ) -> Float[Array, "n_experts C d_out"]:
        """`key`: unused, as for `Linear` (a LoRA adapter in its place takes it)."""
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

    def __init__(self, dim: int, hidden: int, n_experts: int, top_k: int, *, key: PRNGKeyArray,
                 capacity_factor: float = 0.0, shared_expert: bool = False, swiglu: bool = False,
                 activation: str = "gelu", out_std: float = 0.02):
        """E = `n_experts` expert MLPs D = `dim` -> F = `hidden` -> D, `top_k` per token;
        `capacity_factor` 0 = dropless; `shared_expert` adds an always-on MLP of width F."""
        k_router, k_up, k_down, k_shared = jax.random.split(key, 4)
        E, D, F = n_experts, dim, hidden
        self.router = Linear(D, E, key=k_router)
        self.up = ExpertLinear(E, D, (2 if swiglu else 1) * F, key=k_up)
        self.down = ExpertLinear(E, F, D, key=k_down, std=out_std)
        self.shared = (MLP(D, F, key=k_shared, swiglu=swiglu, activation=activation, out_std=out_std)
                       if shared_expert else None)
        self.n_experts, self.top_k, self.capacity_factor = E, top_k, capacity_factor
        self.swiglu, self.activation = swiglu, activation

    def route(self, x: Float[Array, "N D"]) -> Routing:
        """Router probabilities (float32) and each token's top-k experts and gates."""
        logits = self.router(x.astype(jnp.float32))  # Linear casts its weight to float32 too
        probs = jax.nn.softmax(logits, axis=-1)
        top, experts = jax.lax.top_k(probs, self.top_k)
        return Routing(probs, top / top.sum(-1, keepdims=True), experts)

    def _experts(self, h: Float[Array, "E C D"], key: PRNGKeyArray | None) -> Float[Array, "E C D"]:
        h = activate(self.up(h, key=fold_key(key, 1)), self.swiglu, self.activation)
        return self.down(h, key=fold_key(key, 2))

    def expert_counts(self, x: Float[Array, "B T D"]) -> Int[Array, " E"]:
        """Tokens routed to each expert (top-k assignments before capacity dropping)."""
        r = self.route(x.reshape(-1, x.shape[-1]))
        return jax.nn.one_hot(r.experts, self.n_experts, dtype=jnp.int32).sum((0, 1))

    def __call__(self, x: Float[Array, "B T D"], *, key: PRNGKeyArray | None = None
                 ) -> tuple[Float[Array, "B T D"], Scalar]:
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
        out = self._experts(buf.reshape(E, C, D), key).reshape(E * C, D)
        rows = jnp.take(out, slot, axis=0, mode="fill", fill_value=0)  # (kN, D)
        weight = r.gates.T.reshape(-1) * keep
        y = (rows.astype(jnp.float32) * weight[:, None]).reshape(k, N, D).sum(0).astype(x.dtype)
        y = y.reshape(B, T, D)
        if self.shared is not None:
            y = y + self.shared(x, key=fold_key(key, 3))[0]
        return y, balance_loss(r.probs, r.experts)


# --------------------------------------------------------------------------- reporting
def find_modules(tree: Any, kind: type) -> list[Any]:
    return [n for n in jax.tree.leaves(tree, is_leaf=lambda n: isinstance(n, kind)) if isinstance(n, kind)]
