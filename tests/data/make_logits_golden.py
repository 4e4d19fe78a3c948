"""Write `logits_3db2249.npz`: the logits of tiny models as commit 3db2249 computed them.

`tests/test_block_options.py` checks that with issue 16's block options off (qk_norm,
activation relu2, logit_softcap, zero_init_proj) the model still computes these logits. Run it
with that commit's package on the path, from the repository root:

    git archive 3db2249 src | tar -x -C /tmp/base
    PYTHONPATH=/tmp/base/src JAX_PLATFORMS=cpu python tests/data/make_logits_golden.py
"""

from pathlib import Path

import jax
import numpy as np

from dantinox_eqx.config import Config
from dantinox_eqx.model import Transformer

TINY = dict(dim=32, n_heads=4, head_size=8, num_blocks=2, vocab_size=37, max_context=16, expansion=2)
VARIANTS = {  # name -> config overrides; each one exercises another code path of the forward
    "swiglu": {},
    "gelu_untied_gqa": {"use_swiglu": False, "weight_tying": False, "kv_heads": 2},
    "moe_relu": {"use_swiglu": False, "activation": "relu", "use_moe": True, "n_experts": 4},
    "mla": {"mla": True, "down_dim_q": 16, "down_dim_kv": 16, "rope_dim": 8},
}


def logits(name: str) -> np.ndarray:
    model = Transformer(Config(**TINY, **VARIANTS[name]), key=jax.random.key(0))
    tokens = jax.random.randint(jax.random.key(1), (2, 16), 0, 37)
    return np.asarray(model(tokens)[0])


if __name__ == "__main__":
    out = Path(__file__).with_name("logits_3db2249.npz")
    np.savez(out, **{name: logits(name) for name in VARIANTS})
    print(f"wrote {out}")
