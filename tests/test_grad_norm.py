"""train/grad_norm.py: optax's global norm and clipping, without a gradient-sized temporary."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dantinox_eqx.train.grad_norm import clip_by_global_norm, global_norm


def _tree(scale: float = 1.0):
    ks = jax.random.split(jax.random.key(0), 3)
    return {"w": scale * jax.random.normal(ks[0], (33, 17)), "b": scale * jax.random.normal(ks[1], (5,)),
            "deep": [scale * jax.random.normal(ks[2], (2, 3, 4)), None]}


def test_global_norm_equals_optax_tree_norm():
    tree = _tree()
    ours, theirs = jax.jit(global_norm)(tree), jax.jit(optax.tree.norm)(tree)
    np.testing.assert_allclose(float(ours), float(theirs), rtol=1e-6)
    expect = np.sqrt(sum(np.sum(np.asarray(x, np.float64) ** 2) for x in jax.tree.leaves(tree)))
    np.testing.assert_allclose(float(ours), expect, rtol=1e-6)
    assert float(global_norm({})) == 0.0


@pytest.mark.parametrize("scale", [1e-3, 10.0])  # below the threshold (unchanged) and above (scaled)
def test_clip_equals_optax_clip_and_has_its_state(scale):
    grads = _tree(scale)
    ours, theirs = clip_by_global_norm(1.0), optax.clip_by_global_norm(1.0)
    s_ours, s_theirs = ours.init(grads), theirs.init(grads)
    # the same (empty) state: a checkpoint written with optax's clipping resumes with ours
    assert jax.tree.structure(s_ours) == jax.tree.structure(s_theirs)
    u_ours, _ = jax.jit(ours.update)(grads, s_ours)
    u_theirs, _ = jax.jit(theirs.update)(grads, s_theirs)
    for a, b in zip(jax.tree.leaves(u_ours), jax.tree.leaves(u_theirs)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=0)
    norm_after = float(optax.tree.norm(u_ours))
    if scale > 1:
        assert abs(norm_after - 1.0) < 1e-5
    else:
        assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(u_ours), jax.tree.leaves(grads)))


def _adam_step_temp_bytes(norm, opt) -> int:
    """XLA's temporary bytes of one jitted AdamW update of a (1024, 1024) weight that also
    returns the gradient's norm (as the training step does), buffers donated."""
    params = {"w": jnp.ones((1024, 1024)), "b": jnp.ones((1024,))}
    grads = jax.tree.map(lambda x: 1e-3 * x, params)

    def update(p, s, g):
        u, s = opt.update(g, s, p)
        return eqx.apply_updates(p, u), s, norm(g)

    compiled = jax.jit(update, donate_argnums=(0, 1)).lower(params, opt.init(params), grads).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def test_no_gradient_sized_temporary():
    """optax's norm (and its clipping) make XLA write a copy of the gradient (4 MiB here: the
    square Adam shares, the clipped updates); ours fuse them into their consumers."""
    weight_bytes = 1024 * 1024 * 4
    adamw = optax.adamw(1e-3)
    assert _adam_step_temp_bytes(optax.tree.norm, adamw) >= weight_bytes
    assert _adam_step_temp_bytes(global_norm, adamw) < weight_bytes // 16
    clipped_theirs = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3))
    clipped_ours = optax.chain(clip_by_global_norm(1.0), optax.adamw(1e-3))
    assert _adam_step_temp_bytes(optax.tree.norm, clipped_theirs) >= weight_bytes
    assert _adam_step_temp_bytes(global_norm, clipped_ours) < weight_bytes // 16
