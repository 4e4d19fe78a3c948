"""Subprocess driver for tests/test_sharding.py: multi-device runs of the pure step.

The device count of a CPU process is fixed when JAX starts, so each scenario runs in its own
process, started with XLA_FLAGS=--xla_force_host_platform_device_count=N JAX_PLATFORMS=cpu.
Results go to a JSON file (--out); the tests compare the numbers.

    python tests/sharded_driver.py curves --out r.json --ckpt DIR        # 4 devices
    python tests/sharded_driver.py multi --out r.json --ckpt DIR \\
        --coordinator 127.0.0.1:PORT --num_processes 2 --process_id I    # 2 x 2 devices
    python tests/sharded_driver.py resume --out r.json --ckpt DIR [DIR...]  # 2 devices

Every run trains the same tiny model (float32, dropout on) from the same init on the same
global batches: the batch of step s is data.sample_batch(tokens, fold_in(data_key, s), ...),
built as one global array either by shard_batch (single process) or by
distributed.sample_global_batch (each process reads only its rows).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import equinox as eqx  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from dantinox_eqx.config import Config  # noqa: E402
from dantinox_eqx.data.sampling import sample_batch  # noqa: E402
from dantinox_eqx.model import Transformer  # noqa: E402
from dantinox_eqx.parallel import distributed  # noqa: E402
from dantinox_eqx.parallel import sharding as sh  # noqa: E402
from dantinox_eqx.run import checkpoint
from dantinox_eqx.train.optim import make_optimizer  # noqa: E402
from dantinox_eqx.train.step import init_opt_state, make_eval_step, make_train_step, per_device_loss  # noqa: E402

# dim 48, expansion 3 and 32 rows per device keep the stacked weight shapes, their FSDP shards
# and the activation shapes all distinct
# in the HLO check; batch 8 splits over 1, 2 and 4 devices; grad_accum 2 exercises the
# micro-batch scan under sharding.
CFG = dict(dim=48, n_heads=4, head_size=12, num_blocks=3, vocab_size=37, max_context=16,
           batch_size=8, grad_accum=2, expansion=3, lr=3e-3, warmup_steps=5, max_steps=20,
           dropout_rate=0.1, scan_unroll=1)  # rolled: the HLO checks look for the layer loop
STEPS, SAVE_AT, RESUME_STEPS = 20, 10, 3


def config() -> Config:
    return Config(**CFG)


def corpus(n: int = 20_000, vocab: int = 37) -> np.ndarray:
    """A seeded Markov chain over `vocab` symbols (3 likely successors each): learnable text."""
    rng = np.random.default_rng(0)
    succ = rng.integers(0, vocab, size=(vocab, 3))
    out = np.empty(n, np.uint16)
    out[0] = 0
    choice = rng.integers(0, 3, size=n)
    noise = rng.random(n) < 0.1
    rand = rng.integers(0, vocab, size=n)
    for i in range(1, n):
        out[i] = rand[i] if noise[i] else succ[out[i - 1], choice[i]]
    return out


def init(cfg: Config):
    params, static = eqx.partition(Transformer(cfg, key=jax.random.key(0)), eqx.is_array)
    opt = make_optimizer(cfg, STEPS)
    return params, static, opt, init_opt_state(opt, params)


def keys():
    return jax.random.key(1), jax.random.key(2)  # data key, dropout key


def fresh(tree):
    # place() may alias its input's buffers and the step donates them: give each run a copy.
    return jax.tree.map(jnp.copy, tree)


def batch_at(tokens, mesh, s: int, multi: bool):
    cfg, (data_key, _) = config(), keys()
    k = jax.random.fold_in(data_key, s)
    if multi:
        return distributed.sample_global_batch(tokens, k, mesh, cfg.batch_size, cfg.max_context, cfg.grad_accum)
    host = sample_batch(jnp.asarray(tokens), k, cfg.batch_size, cfg.max_context, cfg.grad_accum)
    return sh.shard_batch(host, mesh, 1)


def train(tokens, mesh, mode: str, start: int, stop: int, params, state, static, opt, *,
          multi: bool = False, save_dir: str | None = None, step=None):
    """Steps start..stop-1; returns (losses, params, state, step). Saves at SAVE_AT if asked.
    Pass back the returned `step` to reuse its compilation for arrays placed the same way."""
    params, state = sh.place(params, state, mesh, mode)
    step = step or sh.shard_train_step(make_train_step(static, opt), mesh, params, state)
    _, drop_key = keys()
    losses = []
    for s in range(start, stop):
        if save_dir is not None and s == SAVE_AT:
            save(save_dir, s, params, state, mesh)
        params, state, m = step(params, state, batch_at(tokens, mesh, s, multi), jax.random.fold_in(drop_key, s))
        losses.append(float(m["loss"]))
    return losses, params, state, step


def save(run_dir: str, s: int, params, state, mesh) -> None:
    """A Trainer-like checkpoint: params, and optimizer state + step + PRNG key (replicated
    scalars, so every process holds them). Collective: every process calls it."""
    extra = sh.replicate({"step": jnp.asarray(s, jnp.int32), "key": jax.random.key(config().seed)}, mesh)
    checkpoint.save(run_dir, checkpoint.LATEST, s, params, train_state={"opt_state": state, **extra})


def restore(run_dir: str, mesh, mode: str, params0, state0):
    """Restore onto `mesh` with `mode`'s placement: the like-tree gives the target shardings."""
    like_p, like_s = sh.place(fresh(params0), fresh(state0), mesh, mode)
    like_extra = sh.replicate({"step": jnp.zeros((), jnp.int32), "key": jax.random.key(0)}, mesh)
    step, params, state = checkpoint.restore(run_dir, checkpoint.LATEST, like_p, {"opt_state": like_s, **like_extra})
    seed_key = jax.random.key_data(jax.random.key(config().seed))
    key_ok = bool(jnp.array_equal(jax.random.key_data(state["key"]), seed_key))
    assert step == SAVE_AT == int(state["step"]) and key_ok, (step, int(state["step"]), key_ok)
    return params, state["opt_state"]


# --------------------------------------------------------------------------- HLO inspection
_COLLECTIVE = re.compile(r"= (\S+?)(?:\{[^}]*\})? (all-gather|all-reduce|reduce-scatter|all-to-all)(?:-start)?\(")


def collectives(hlo: str) -> dict[str, list[list[str]]]:
    """{computation name: [[op, result shape], ...]} for every collective of a compiled HLO."""
    out: dict[str, list[list[str]]] = {}
    comp = None
    for line in hlo.splitlines():
        if line and not line.startswith(" ") and line.rstrip().endswith("{"):
            comp = line.split()[1] if line.startswith("ENTRY") else line.split()[0]
            comp = comp.lstrip("%")
            continue
        m = _COLLECTIVE.search(line)
        if m:
            out.setdefault(comp, []).append([m.group(2), m.group(1)])
    return out


def while_loops(hlo: str) -> list[dict]:
    """Every while op: its body computation and the array shapes of its loop state."""
    loops = []
    for line in hlo.splitlines():
        m = re.search(r"= \((.*)\) while\(.*body=%?([\w.\-]+)", line)
        if m:
            loops.append({"body": m.group(2), "state": re.findall(r"[a-z0-9]+\[[0-9,]*\]", m.group(1))})
    return loops


def hlo_report(step, params, state, batch, key, block_params) -> dict:
    hlo = step.lower(params, state, batch, key).compile().as_text()
    stacked = sorted({f"f32[{','.join(map(str, x.shape))}]" for x in jax.tree.leaves(block_params) if x.ndim >= 3})
    layer = sorted({f"f32[{','.join(map(str, x.shape[1:]))}]" for x in jax.tree.leaves(block_params) if x.ndim >= 3})
    layer += [s.replace("f32[", "f32[1,") for s in layer]
    coll = collectives(hlo)
    loops = while_loops(hlo)
    bodies = {lp["body"] for lp in loops}
    gathers_in = [s for c, ops in coll.items() if c in bodies for op, s in ops if op == "all-gather"]
    gathers_out = [s for c, ops in coll.items() if c not in bodies for op, s in ops if op == "all-gather"]
    return {
        "n_loops": len(loops),
        "loops_gathering_layers": sum(any(op == "all-gather" and s in layer for op, s in coll.get(lp["body"], []))
                                      for lp in loops),
        "layer_gathers_in_loops": sum(s in layer for s in gathers_in),
        "stacked_gathers_anywhere": sum(s in stacked for s in gathers_in + gathers_out),
        "stacked_full_in_loop_state": sum(s in stacked for lp in loops for s in lp["state"]),
        "gathers_outside_loops": gathers_out,
        "stacked_shapes": stacked,
    }


# --------------------------------------------------------------------------- scenarios
def curves(args) -> dict:
    """4 devices: dp on 1 device, dp and fsdp on 4; bytes; HLO; shard_map per-device loss;
    an fsdp checkpoint at SAVE_AT and the uninterrupted losses after it."""
    cfg, tokens = config(), corpus()
    params0, static, opt, state0 = init(cfg)
    out = {"devices": jax.device_count()}
    try:
        sh.make_mesh(0, batch_size=6)
    except ValueError as e:
        out["batch_error"] = str(e)
    for name, n, mode in [("dp1", 1, "dp"), ("dp4", 4, "dp"), ("fsdp4", 4, "fsdp")]:
        mesh = sh.make_mesh(n, batch_size=cfg.batch_size)
        save = args.ckpt if name == "fsdp4" else None
        losses, params, state, step = train(tokens, mesh, mode, 0, STEPS, fresh(params0), fresh(state0),
                                            static, opt, save_dir=save)
        out[name] = {"losses": losses, "param_bytes": sh.bytes_per_device(params),
                     "state_bytes": sh.bytes_per_device(state)}
        if name == "fsdp4":
            p, s = sh.place(fresh(params0), fresh(state0), mesh, mode)
            out["hlo"] = hlo_report(step, p, s, batch_at(tokens, mesh, 0, False), jax.random.key(0),
                                    eqx.filter(p.blocks, eqx.is_array))
            out["state_follows_params"] = _state_follows(params, state)
            batch = batch_at(tokens, mesh, 0, False)
            per = per_device_loss(static, mesh)(p, batch)
            ev = sh.shard_eval_step(make_eval_step(static), mesh, p)(p, batch)
            out["per_device"] = {"losses": [float(v) for v in per], "eval_loss": float(ev["loss"])}
    return out


def _state_follows(params, state) -> bool:
    """Every optimizer-state leaf shaped like a parameter has that parameter's PartitionSpec."""
    by_name = {jax.tree_util.keystr(p): x.sharding.spec for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}
    ok, n = True, 0
    for path, x in jax.tree_util.tree_flatten_with_path(state)[0]:
        name = jax.tree_util.keystr(path)
        for pname, spec in by_name.items():
            if name.endswith(pname) and x.ndim:
                ok &= x.sharding.spec == spec
                n += 1
    return ok and n > 0


def trainer_sampler(tokens, mesh):
    """The Trainer's way: the corpus replicated on every device (from host numpy, identical in
    every process) and batches sampled inside jit straight into the batch sharding."""
    cfg, (data_key, _) = config(), keys()
    replicated = sh.replicate(tokens, mesh)
    fn = jax.jit(lambda t, s: sample_batch(t, jax.random.fold_in(data_key, s), cfg.batch_size, cfg.max_context,
                                           cfg.grad_accum), out_shardings=sh.batch_sharding(mesh, 1))
    return lambda s: fn(replicated, s)


def multi(args) -> dict:
    """One of 2 processes x 2 devices over one global 4-device mesh: an fsdp run saving a
    collective checkpoint (with a Trainer-like train_state: optimizer state, step, PRNG key) at
    SAVE_AT; a dp run; a collective restore of that checkpoint onto the dp placement, continued."""
    assert distributed.initialize(args.coordinator, args.num_processes, args.process_id, timeout_s=60)
    cfg, tokens = config(), corpus()
    params0, static, opt, state0 = init(cfg)
    mesh = sh.make_mesh(0, batch_size=cfg.batch_size)
    out = {"process": jax.process_index(), "processes": jax.process_count(), "devices": jax.device_count(),
           "local_devices": jax.local_device_count(), "primary": distributed.is_primary(),
           "local_rows": [[r.start, r.stop] for r in distributed.local_rows(mesh, cfg.batch_size)],
           "collectives": jax.config.jax_cpu_collectives_implementation}
    sampler = trainer_sampler(tokens, mesh)
    out["trainer_sampler_equal"] = all(
        np.array_equal(_local(sampler(s)), _local(batch_at(tokens, mesh, s, True))) for s in range(3))
    try:
        sh.make_mesh(2)
    except ValueError as e:
        out["n_devices_error"] = str(e)
    out["broadcast"] = distributed.broadcast_int(100 + jax.process_index())
    distributed.barrier("driver")

    for mode in ("fsdp", "dp"):  # fsdp saves at SAVE_AT (every process calls checkpoint.save)
        losses, params, _, step = train(tokens, mesh, mode, 0, STEPS, fresh(params0), fresh(state0), static, opt,
                                        multi=True, save_dir=args.ckpt if mode == "fsdp" else None)
        out[mode] = {"losses": losses, "param_bytes": sh.bytes_per_device(params)}
        # a plain jit reduction over sharded params (the Trainer's finiteness check) is readable
        finite = jax.jit(lambda p: jnp.all(jnp.asarray([jnp.isfinite(x).all() for x in jax.tree.leaves(p)])))
        out[mode]["finite"] = bool(finite(params))

    # collective restore onto the dp placement (not the fsdp one it was saved from), continued
    params, state = restore(args.ckpt, mesh, "dp", params0, state0)
    losses, *_ = train(tokens, mesh, "dp", SAVE_AT, SAVE_AT + RESUME_STEPS, params, state, static, opt,
                       multi=True, step=step)
    out["restored"] = {"losses": losses}
    jax.distributed.shutdown()
    return out


def _local(x) -> np.ndarray:
    """This process's rows of a global batch, in order."""
    return np.concatenate([np.asarray(s.data) for s in sorted(x.addressable_shards, key=lambda s: s.index[1].start)],
                          axis=1)


def resume(args) -> dict:
    """Restore each checkpoint in --ckpt onto 1 device (dp) and onto 2 devices (fsdp): the
    like-tree placed on that mesh gives the target shardings; then train RESUME_STEPS more
    steps from SAVE_AT."""
    cfg, tokens = config(), corpus()
    params0, static, opt, state0 = init(cfg)
    out, steps = {}, {}
    for ckpt in args.ckpt.split(","):
        res = {}
        for n, mode in ((1, "dp"), (2, "fsdp")):
            mesh = sh.make_mesh(n, batch_size=cfg.batch_size)
            params, state = restore(ckpt, mesh, mode, params0, state0)
            devices = {d.id for x in jax.tree.leaves(params) for d in x.sharding.device_set}
            specs = sorted({str(x.sharding.spec) for x in jax.tree.leaves(params)})
            losses, _, _, steps[n] = train(tokens, mesh, mode, SAVE_AT, SAVE_AT + RESUME_STEPS, params, state,
                                           static, opt, step=steps.get(n))
            res[str(n)] = {"losses": losses, "devices": sorted(devices), "specs": specs}
        out[ckpt] = res
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("command", choices=["curves", "multi", "resume"])
    ap.add_argument("--out", required=True)
    ap.add_argument("--ckpt", required=True, help="checkpoint run dir (resume: comma-separated)")
    ap.add_argument("--coordinator")
    ap.add_argument("--num_processes", type=int)
    ap.add_argument("--process_id", type=int)
    args = ap.parse_args()
    result = {"curves": curves, "multi": multi, "resume": resume}[args.command](args)
    Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
