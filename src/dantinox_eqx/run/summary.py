"""`model_summary.json`: parameter count, memory and FLOPs of a run, from its real arrays.

`model_summary(config, params, opt_state)` is a pure function of the config and the actual
pytrees (so the optimizer memory is measured, not guessed). Other features add their own
fields by extending the returned dict (e.g. trainable parameters for LoRA).

Units: MB = 2**20 bytes. Symbols: L = num_blocks, T = max_context, D = dim, H = n_heads,
E = head_size, K = kv heads, V = vocab, B = batch_size (per micro-batch); MoE: X = n_experts,
k = top_k_mlp, c = capacity_factor; MLA: Q = down_dim_q, C = down_dim_kv, R = rope_dim.

Parameters: `n_params` counts every array (embeddings included). `n_params_active` is what one
token uses: for MoE only k of the X routed experts' weights (router and shared expert always
count); for dense models it equals `n_params` (`moe.param_counts`).

    flops_per_token   = 6 * N_active_matmul + 6 * L * T * H * (d_qk + d_v)   (PaLM appendix B: forward
                        + backward; N_active_matmul = active parameters used in matmuls per token, i.e.
                        without the embedding lookup table unless it is tied to the output head;
                        the second term is attention's scores (d_qk = E, MLA: E + R) and weighted
                        sum (d_v = E): 12 * L * T * H * E for standard attention)

This is the model's useful ("6N") work. The MoE implementation executes more: its slot buffers
run every expert on C_slots rows, so each token costs `moe_expert_rows_per_token` =
X * C_slots / N expert evaluations instead of k (N = B * T tokens per forward, C_slots =
moe.capacity(N, X, k, c): dropless (c = 0) gives X, c > 0 about c * k).
`flops_per_token_executed` replaces k by that number (equal to flops_per_token when dense).

    activation bytes  = bytes_per_element * B * T * (L * per_layer + 2 * V)    per micro-batch
        per_layer     = 6 * D + attn + H * T + mlp
                        (6 * D: block input, 2 norm outputs, attention output, o-proj and MLP
                        outputs; H * T: the T x T attention probabilities per head)
        attn          = (H + 2 * K) * E                                 (fused qkv)
                        MLA: 2Q + 2C + R + 2 * H * (E + R) + 2 * H * E  (q_down, q_norm, q_up,
                        kv_down, kv_norm, kv_up, the per-head keys)
        mlp           = F * (3 if swiglu else 2)                        (hidden units, F = config.mlp_width)
                        MoE: rows * (2 * D + F * (3|2)) + k * D  (+ F * (3|2) with a shared expert)
                        (rows = moe_expert_rows_per_token: input and output slot buffers and
                        hidden units per executed row, then the k gathered rows)
                        With remat "full" only the block inputs (L * D) stay alive plus one
                        block's worth recomputed in the backward pass. Logits count in float32.

KV cache (generation; cache dtype = the embedding's dtype, `mla.cache_summary`): bytes per
token per layer are (C + R) * itemsize for MLA (the latent and the shared RoPE key) and
2 * K * E * itemsize otherwise; `gqa_kv_cache_bytes_per_token_per_layer` is the standard
(grouped-query) cache of the same heads, for comparison.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ..config import Config
from ..model import param_counts
from ..nn.moe import MoE, capacity

__all__ = ["model_summary", "tree_bytes", "tree_size"]

MB = 2**20


def _arrays(tree: Any) -> list[Any]:
    return [x for x in jax.tree.leaves(tree) if hasattr(x, "dtype") and hasattr(x, "shape")]


def tree_size(tree: Any) -> int:
    """Number of elements over every array leaf of `tree`."""
    return int(sum(int(np.prod(x.shape)) for x in _arrays(tree)))


def tree_bytes(tree: Any) -> int:
    """Bytes held by every array leaf of `tree` (per device copy; PRNG keys count their data)."""
    total = 0
    for x in _arrays(tree):
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            x = jax.random.key_data(x)
        total += int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize
    return total


def _main_dtype(params: Any) -> str:
    """The dtype holding most parameters (e.g. "float32", "bfloat16")."""
    counts: dict[str, int] = {}
    for x in _arrays(params):
        counts[str(x.dtype)] = counts.get(str(x.dtype), 0) + int(np.prod(x.shape))
    return max(counts, key=counts.get) if counts else "float32"


def _moe_rows_per_token(config: Config) -> float:
    """Expert evaluations per token executed by the slot-buffer MoE (k for dense: no MoE)."""
    n_tokens = config.batch_size * config.max_context
    slots = capacity(n_tokens, config.n_experts, config.top_k_mlp, config.capacity_factor)
    return config.n_experts * slots / n_tokens


def _moe_fields(config: Config, params: Any) -> tuple[int, int, int, float, dict[str, Any]]:
    """(total, active, routed-expert parameters of one expert summed over blocks, executed rows
    per token, extra summary fields)."""
    total, active = param_counts(params)
    if not config.use_moe:
        return total, active, 0, 0.0, {}
    moes = [n for n in jax.tree.leaves(params, is_leaf=lambda n: isinstance(n, MoE)) if isinstance(n, MoE)]
    per_expert = sum(tree_size((m.up, m.down)) for m in moes) // config.n_experts
    rows = _moe_rows_per_token(config)
    extra = {"moe_n_experts": config.n_experts, "moe_top_k": config.top_k_mlp,
             "moe_shared_expert": config.shared_expert,
             "moe_dispatch": "dropless" if config.capacity_factor <= 0 else "capacity",
             "moe_capacity_factor": config.capacity_factor,
             "moe_expert_rows_per_token": round(rows, 6)}
    return total, active, per_expert, rows, extra


def _kv_cache_fields(config: Config, params: Any) -> dict[str, Any]:
    embedding = getattr(params, "embedding", None)
    dtype = embedding.dtype if hasattr(embedding, "dtype") else _main_dtype(params)
    return cache_summary(config, dtype)


def model_summary(config: Config, params: Any, opt_state: Any) -> dict[str, Any]:
    """The summary of a model with arrays `params` trained with `opt_state` under `config`.

    `config.vocab_size` must be resolved. See the module docstring for the formulas.
    """
    L, T, D = config.num_blocks, config.max_context, config.dim
    H, E, K = config.n_heads, config.head_size, config.effective_kv_heads
    V, B = int(config.vocab_size or 0), config.batch_size
    n_params = tree_size(params)
    total, active, per_expert, rows, moe_extra = _moe_fields(config, params)
    dtype = _main_dtype(params)
    itemsize = np.dtype(dtype).itemsize if dtype != "bfloat16" else 2

    embed_table = V * D + (T * D if config.absolute_pos and config.trainable_pos else 0)
    not_matmul = (0 if config.weight_tying else V * D) + (embed_table - V * D)
    n_matmul, n_active_matmul = n_params - not_matmul, active - not_matmul
    d_qk = E + (config.rope_dim if config.mla else 0)
    attn_flops = 6 * L * T * H * (d_qk + E)
    flops_per_token = 6 * n_active_matmul + attn_flops
    k = config.top_k_mlp if config.use_moe else 0
    flops_executed = 6 * (n_active_matmul + round((rows - k) * per_expert)) + attn_flops

    hidden = config.mlp_width
    mlp_units = hidden * (3 if config.use_swiglu else 2)
    if config.mla:
        Q, C, R = config.down_dim_q, config.down_dim_kv, config.rope_dim
        attn = 2 * Q + 2 * C + R + 2 * H * (E + R) + 2 * H * E
    else:
        attn = (H + 2 * K) * E
    if config.use_moe:
        mlp = round(rows * (2 * D + mlp_units)) + k * D + (mlp_units if config.shared_expert else 0)
    else:
        mlp = mlp_units
    per_layer = 6 * D + attn + H * T + mlp
    if config.effective_remat == "full":
        layer_elems = L * D + per_layer
    else:
        layer_elems = L * per_layer
    act_bytes = B * T * (itemsize * layer_elems + 4 * 2 * V)

    return {
        "n_params": n_params,
        "n_params_total": total,
        "n_params_active": active,
        "n_params_matmul": n_matmul,
        "n_params_active_matmul": n_active_matmul,
        "dtype": dtype,
        "weights_mem_MB": round(tree_bytes(params) / MB, 3),
        "optimizer_mem_MB": round(tree_bytes(opt_state) / MB, 3),
        "activation_mem_MB": round(act_bytes / MB, 3),
        "activation_formula": "bytes_per_elem*B*T*(L*(6D+attn+HT+mlp))+4*B*T*2V per micro-batch; "
                              "attn=(H+2K)E (MLA: 2Q+2C+R+2H(E+R)+2HE); mlp=F*(3|2) (MoE: "
                              "rows*(2D+F*(3|2))+kD [+F*(3|2) shared]); remat full: L*D + one layer",
        "flops_per_token": int(flops_per_token),
        "flops_formula": "6*N_active_matmul + 6*L*T*n_heads*(d_qk+d_v), d_qk=head_size(+rope_dim for "
                         "MLA), d_v=head_size; N_active_matmul = active params minus embedding table "
                         "(MoE: top_k of n_experts routed experts)",
        "flops_per_token_executed": int(flops_executed),
        "tokens_per_step": config.tokens_per_step,
        "flops_per_step": int(flops_per_token) * config.tokens_per_step,
        **_kv_cache_fields(config, params),
        **moe_extra,
        "num_blocks": L,
        "dim": D,
        "n_heads": H,
        "kv_heads": K,
        "head_size": E,
        "vocab_size": V,
        "max_context": T,
    }


def cache_bytes_per_token(cfg: Config, dtype: Any = jnp.float32) -> int:
    """KV-cache bytes per token per layer: (down_dim_kv + rope_dim) * itemsize for MLA,
    2 * kv_heads * head_size * itemsize for (grouped-query) attention. The int32 `pos` slot
    bookkeeping, the same for both, is not counted."""
    itemsize = jnp.dtype(dtype).itemsize
    if cfg.mla:
        return (cfg.down_dim_kv + cfg.rope_dim) * itemsize
    return 2 * cfg.effective_kv_heads * cfg.head_size * itemsize


def cache_summary(cfg: Config, dtype: Any = jnp.float32) -> dict[str, Any]:
    """KV-cache sizes for model_summary.json: this model's, per token per layer and per token
    (all layers), beside the equivalent GQA cache (same heads, no MLA)."""
    own = cache_bytes_per_token(cfg, dtype)
    gqa = cache_bytes_per_token(cfg.replace(mla=False), dtype)
    return {"kv_cache_dtype": jnp.dtype(dtype).name,
            "kv_cache_bytes_per_token_per_layer": own,
            "kv_cache_bytes_per_token": own * cfg.num_blocks,
            "gqa_kv_cache_bytes_per_token_per_layer": gqa}
