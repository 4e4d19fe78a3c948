"""`model_summary.json`: parameter count, memory and FLOPs of a run, from its real arrays.

`model_summary(config, params, opt_state)` is a pure function of the config and the actual
pytrees (so the optimizer memory is measured, not guessed). Other features add their own
fields by extending the returned dict (e.g. active parameters for MoE, trainable ones for LoRA).

Units: MB = 2**20 bytes. Formulas (N = parameters used in matmuls per token, L = num_blocks,
T = max_context, D = dim, H = n_heads, E = head_size, K = kv heads, V = vocab, B = batch_size):

    flops_per_token   = 6 * N + 12 * L * T * H * E          (PaLM appendix B: forward + backward;
                        the second term is attention's scores and weighted sum; N excludes the
                        embedding lookup table unless it is tied to the output head)
    activation bytes  = bytes_per_element * B * T * (L * per_layer + 2 * V)    per micro-batch
        per_layer     = 6 * D + (H + 2 * K) * E + H * T + mlp_hidden * (3 if swiglu else 2)
                        (block input, 2 norm outputs, qkv, attention output, o-proj and MLP
                        outputs, the T x T attention probabilities per head, MLP hidden units);
                        with remat "full" only the block inputs (L * D) stay alive plus one
                        block's worth recomputed in the backward pass. Logits count in float32.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

from .config import Config

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


def model_summary(config: Config, params: Any, opt_state: Any) -> dict[str, Any]:
    """The summary of a model with arrays `params` trained with `opt_state` under `config`.

    `config.vocab_size` must be resolved. See the module docstring for the formulas.
    """
    L, T, D = config.num_blocks, config.max_context, config.dim
    H, E, K = config.n_heads, config.head_size, config.effective_kv_heads
    V, B = int(config.vocab_size or 0), config.batch_size
    n_params = tree_size(params)
    dtype = _main_dtype(params)
    itemsize = np.dtype(dtype).itemsize if dtype != "bfloat16" else 2

    embed_table = V * D + (T * D if config.absolute_pos and config.trainable_pos else 0)
    n_matmul = n_params - (0 if config.weight_tying else V * D) - (embed_table - V * D)
    flops_per_token = 6 * n_matmul + 12 * L * T * H * E

    hidden = config.expansion * D
    per_layer = 6 * D + (H + 2 * K) * E + H * T + hidden * (3 if config.use_swiglu else 2)
    if config.effective_remat == "full":
        layer_elems = L * D + per_layer
    else:
        layer_elems = L * per_layer
    act_bytes = B * T * (itemsize * layer_elems + 4 * 2 * V)

    return {
        "n_params": n_params,
        "n_params_matmul": n_matmul,
        "dtype": dtype,
        "weights_mem_MB": round(tree_bytes(params) / MB, 3),
        "optimizer_mem_MB": round(tree_bytes(opt_state) / MB, 3),
        "activation_mem_MB": round(act_bytes / MB, 3),
        "activation_formula": "bytes_per_elem*B*T*(L*(6D+(H+2K)E+HT+mlp_hidden*(3|2)))+4*B*T*2V"
                              " per micro-batch (remat full: L*D + one layer)",
        "flops_per_token": int(flops_per_token),
        "flops_formula": "6*N_matmul + 12*L*T*n_heads*head_size",
        "tokens_per_step": config.tokens_per_step,
        "flops_per_step": int(flops_per_token) * config.tokens_per_step,
        "num_blocks": L,
        "dim": D,
        "n_heads": H,
        "kv_heads": K,
        "head_size": E,
        "vocab_size": V,
        "max_context": T,
    }
