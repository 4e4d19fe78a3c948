"""Data parallel, FSDP, multi-process and checkpoint portability.

Multi-device cases run tests/sharded_driver.py in subprocesses (the CPU device count is fixed
at JAX start-up) with XLA_FLAGS=--xla_force_host_platform_device_count=N, each under a timeout
so a stuck collective can never hang CI. The fast in-process tests cover the rules and
single-device equivalences.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from dantinox_eqx.config import Config, ConfigError
from dantinox_eqx.data.sampling import sample_batch
from dantinox_eqx.model import Transformer
from dantinox_eqx.parallel import distributed
from dantinox_eqx.parallel import sharding as sh
from dantinox_eqx.train.step import make_train_step

from .conftest import TINY
from .procs import device_env, free_port

DRIVER = Path(__file__).with_name("sharded_driver.py")
RTOL = 1e-5
TIMEOUT_S = 600  # per subprocess; a run takes well under a minute on an idle 2-core machine


# --------------------------------------------------------------------------- in-process
def test_fsdp_spec_picks_largest_divisible_dimension():
    assert sh.fsdp_spec((37, 48), 4) == P(None, "data")  # 37 does not divide
    assert sh.fsdp_spec((144, 48), 4) == P("data")
    assert sh.fsdp_spec((48, 48), 4) == P("data")  # ties: the earliest axis
    assert sh.fsdp_spec((37, 7), 4) == P()  # none divides: replicated
    assert sh.fsdp_spec((48,), 1) == P()
    # stacked blocks: never the leading layer axis, even when it is the largest divisible one
    assert sh.fsdp_spec((8, 4, 6), 4, stacked=True) == P(None, "data")
    assert sh.fsdp_spec((8, 3, 6), 4, stacked=True) == P()


@pytest.mark.slow
def test_param_sharding_marks_stacked_blocks():
    cfg = Config(**{**TINY, "num_blocks": 4})
    params = eqx.filter(Transformer(cfg, key=jax.random.key(0)), eqx.is_array)
    shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
    specs = {jax.tree_util.keystr(p): sh.fsdp_spec(x.shape, 4, sh._is_stacked(p))
             for p, x in jax.tree_util.tree_flatten_with_path(shapes)[0]}
    # attn_norm.scale is (4 blocks, 32): only the block axis would be excluded
    assert specs[".blocks.attn_norm.scale"] == P(None, "data")
    assert specs[".blocks.attn.qkv.weight"] == P(None, None, "data")  # (4, 32, 96)
    assert specs[".norm.scale"] == P("data")


def test_make_mesh_errors_name_the_field():
    with pytest.raises(ConfigError, match="n_devices"):
        sh.make_mesh(jax.device_count() + 1)
    with pytest.raises(ConfigError, match="n_devices"):
        sh.make_mesh(-1)
    assert sh.num_devices(sh.make_mesh(0, batch_size=3)) == jax.device_count()


def test_place_and_bytes_on_one_device():
    params = eqx.filter(Transformer(Config(**TINY), key=jax.random.key(0)), eqx.is_array)
    opt = optax.adam(1e-3)
    mesh = sh.make_mesh(1)
    p, s = sh.place(params, opt.init(params), mesh, "fsdp")
    total = sum(x.nbytes for x in jax.tree.leaves(params))
    assert sh.bytes_per_device(p) == {"max": total, "min": total, "total": total, "devices": 1}
    with pytest.raises(ConfigError, match="sharding"):
        sh.param_sharding(params, mesh, "zero3")


@pytest.mark.slow
def test_sharded_step_on_one_device_equals_plain_step():
    cfg = Config(**TINY, sharding="fsdp")  # the model the Trainer builds for fsdp (rolled scan)
    params, static = eqx.partition(Transformer(cfg, key=jax.random.key(0)), eqx.is_array)
    opt = optax.adam(1e-2)
    batches = jax.random.randint(jax.random.key(3), (3, 2, 4, 17), 0, 37)
    plain = make_train_step(static, opt, donate=False)
    p0, s0 = params, opt.init(params)
    mesh = sh.make_mesh(1)
    p1, s1 = sh.place(jax.tree.map(jnp.copy, params), opt.init(params), mesh, "fsdp")
    wrapped = sh.shard_train_step(make_train_step(static, opt), mesh, p1, s1)
    for i in range(3):
        p0, s0, m0 = plain(p0, s0, batches[i], jax.random.key(i))
        p1, s1, m1 = wrapped(p1, s1, sh.shard_batch(batches[i], mesh, 1), jax.random.key(i))
        np.testing.assert_allclose(m1["loss"], m0["loss"], rtol=1e-6)
    for a, b in zip(jax.tree.leaves(p0), jax.tree.leaves(p1)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_global_batch_matches_sample_batch_on_one_device():
    tokens = np.arange(500, dtype=np.uint16) % 37
    mesh = sh.make_mesh(1)
    key = jax.random.key(7)
    got = distributed.sample_global_batch(tokens, key, mesh, 4, 16, 3)
    want = sample_batch(jnp.asarray(tokens), key, 4, 16, 3)
    assert got.shape == (3, 4, 17) and got.dtype == jnp.int32
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(distributed.global_batch(np.asarray(want), mesh), want)
    assert distributed.local_rows(mesh, 4) == [slice(0, 4)]


def test_initialize_reads_arguments_and_environment(monkeypatch):
    for name in (distributed.ENV_COORDINATOR, distributed.ENV_NUM_PROCESSES, distributed.ENV_PROCESS_ID):
        monkeypatch.delenv(name, raising=False)
    assert distributed.initialize() is False  # single process: nothing to join
    assert distributed.is_primary()
    with pytest.raises(ConfigError, match="process_id"):
        distributed.initialize("127.0.0.1:1234", 2)
    monkeypatch.setenv(distributed.ENV_COORDINATOR, "localhost")
    monkeypatch.setenv(distributed.ENV_NUM_PROCESSES, "2")
    monkeypatch.setenv(distributed.ENV_PROCESS_ID, "0")
    with pytest.raises(ConfigError, match="coordinator"):
        distributed.initialize()
    monkeypatch.setenv(distributed.ENV_PROCESS_ID, "two")
    with pytest.raises(ConfigError, match=distributed.ENV_PROCESS_ID):
        distributed.initialize()
    with pytest.raises(ConfigError, match="process_id"):
        distributed.initialize("127.0.0.1:1234", 2, 2)


# --------------------------------------------------------------------------- subprocesses
def _drive(args: list[str], devices: int, out: Path) -> dict:
    proc = subprocess.run([sys.executable, str(DRIVER), *args, "--out", str(out)], env=device_env(devices),
                          capture_output=True, text=True, timeout=TIMEOUT_S)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def curves(tmp_path_factory) -> dict:
    d = tmp_path_factory.mktemp("curves")
    result = _drive(["curves", "--ckpt", str(d / "run")], 4, d / "out.json")
    result["ckpt"] = str(d / "run")
    return result


@pytest.fixture(scope="module")
def multi(tmp_path_factory) -> list[dict]:
    """Two processes x 2 CPU devices joined by jax.distributed (gloo), killed on timeout."""
    d = tmp_path_factory.mktemp("multi")
    port = free_port()
    procs = []
    for i in range(2):
        args = ["multi", "--ckpt", str(d / "run"), "--out", str(d / f"out{i}.json"),
                "--coordinator", f"127.0.0.1:{port}", "--num_processes", "2", "--process_id", str(i)]
        procs.append(subprocess.Popen([sys.executable, str(DRIVER), *args], env=device_env(2),
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=TIMEOUT_S)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log[-3000:]
    results = [json.loads((d / f"out{i}.json").read_text()) for i in range(2)]
    results[0]["ckpt"] = str(d / "run")
    return results


@pytest.fixture(scope="module")
def resumed(tmp_path_factory, curves, multi) -> dict:
    d = tmp_path_factory.mktemp("resume")
    return _drive(["resume", "--ckpt", f"{curves['ckpt']},{multi[0]['ckpt']}"], 2, d / "out.json")


def _rel(a, b) -> float:
    a, b = np.asarray(a), np.asarray(b)
    return float(np.max(np.abs(a - b) / np.abs(b)))


@pytest.mark.slow
def test_data_parallel_4_devices_matches_1_device(curves):
    dp1, dp4 = curves["dp1"]["losses"], curves["dp4"]["losses"]
    assert curves["devices"] == 4 and len(dp1) == len(dp4) == 20
    print(f"\n[dp] 20 steps, loss {dp1[0]:.4f} -> {dp1[-1]:.4f}; max rel diff 4 vs 1 devices {_rel(dp4, dp1):.2e}")
    assert _rel(dp4, dp1) < RTOL
    assert dp1[-1] < dp1[0] - 0.5  # it learns
    # dp replicates: every device holds the whole model
    assert curves["dp4"]["param_bytes"]["max"] == curves["dp1"]["param_bytes"]["max"]
    assert "batch_size: 6" in curves["batch_error"] and "4 device" in curves["batch_error"]


@pytest.mark.slow
def test_fsdp_matches_dp_with_a_quarter_of_the_bytes(curves):
    assert _rel(curves["fsdp4"]["losses"], curves["dp4"]["losses"]) < RTOL
    ratio = curves["fsdp4"]["param_bytes"]["max"] / curves["dp4"]["param_bytes"]["max"]
    state_ratio = curves["fsdp4"]["state_bytes"]["max"] / curves["dp4"]["state_bytes"]["max"]
    print(f"\n[fsdp] max rel diff vs dp {_rel(curves['fsdp4']['losses'], curves['dp4']['losses']):.2e}; "
          f"per-device bytes: params {curves['fsdp4']['param_bytes']['max']} / {curves['dp4']['param_bytes']['max']}"
          f" = {ratio:.4f}, optimizer state {state_ratio:.4f}")
    # every array of this model has a dimension divisible by 4: exactly 1/4 (scalars replicated)
    assert ratio == pytest.approx(0.25, abs=1e-9)
    assert state_ratio == pytest.approx(0.25, abs=1e-3)
    assert curves["state_follows_params"]


@pytest.mark.slow
def test_fsdp_gathers_one_layer_at_a_time_inside_the_scan(curves):
    hlo = curves["hlo"]
    print(f"\n[hlo] {hlo}")
    assert hlo["loops_gathering_layers"] >= 2  # the forward scan and the backward scan
    assert hlo["layer_gathers_in_loops"] >= 2 * 4  # qkv, o, up, down in each
    assert hlo["stacked_gathers_anywhere"] == 0  # never all layers up front
    assert hlo["stacked_full_in_loop_state"] == 0  # no full layer stack saved for the backward
    assert len(hlo["stacked_shapes"]) == 4


@pytest.mark.slow
def test_per_device_loss_with_shard_map(curves):
    per = curves["per_device"]
    print(f"\n[shard_map] per-device losses {per['losses']}, mean {np.mean(per['losses']):.6f}, "
          f"global eval loss {per['eval_loss']:.6f}")
    assert len(per["losses"]) == 4 and len(set(per["losses"])) == 4  # each device its own rows
    np.testing.assert_allclose(np.mean(per["losses"]), per["eval_loss"], rtol=1e-5)


@pytest.mark.slow
def test_two_processes_train_like_one_process_with_4_devices(curves, multi):
    p0, p1 = multi
    assert (p0["processes"], p0["devices"], p0["local_devices"], p0["collectives"]) == (2, 4, 2, "gloo")
    assert p0["primary"] and not p1["primary"]
    # each process reads its own half of the global batch of 8
    assert p0["local_rows"] == [[0, 2], [2, 4]] and p1["local_rows"] == [[4, 6], [6, 8]]
    print(f"\n[multi] max rel diff vs 1 process x 4 devices: dp {_rel(p0['dp']['losses'], curves['dp4']['losses']):.2e}"
          f", fsdp {_rel(p0['fsdp']['losses'], curves['fsdp4']['losses']):.2e}")
    assert p0["dp"]["losses"] == p1["dp"]["losses"]
    assert _rel(p0["dp"]["losses"], curves["dp4"]["losses"]) < RTOL
    assert _rel(p0["fsdp"]["losses"], curves["fsdp4"]["losses"]) < RTOL
    # fsdp across processes: each device holds a quarter of the model
    assert p0["fsdp"]["param_bytes"]["max"] == curves["fsdp4"]["param_bytes"]["max"]
    # the Trainer's way (corpus replicated from host numpy, batches sampled in jit) gives each
    # process the same rows as sample_global_batch
    assert p0["trainer_sampler_equal"] and p1["trainer_sampler_equal"]
    assert "n_devices: 2 with 2 processes" in p0["n_devices_error"]
    assert p0["broadcast"] == p1["broadcast"] == 100  # process 0's value everywhere
    assert p0["dp"]["finite"] and p0["fsdp"]["finite"]


@pytest.mark.slow
def test_two_processes_save_and_restore_collectively(multi):
    """Saved from fsdp by both processes at step 10; restored by both onto the dp placement."""
    for p in multi:
        print(f"\n[multi restore] process {p['process']}: max rel diff "
              f"{_rel(p['restored']['losses'], p['fsdp']['losses'][10:13]):.2e}")
        assert _rel(p["restored"]["losses"], p["fsdp"]["losses"][10:13]) < RTOL


@pytest.mark.slow
def test_checkpoints_resume_on_other_device_counts(curves, multi, resumed):
    for ckpt, uninterrupted in ((curves["ckpt"], curves["fsdp4"]["losses"]),
                                (multi[0]["ckpt"], multi[0]["fsdp"]["losses"])):
        res = resumed[ckpt]
        assert res["1"]["devices"] == [0] and res["2"]["devices"] == [0, 1]
        assert res["1"]["specs"] == ["P()"]  # restored replicated on 1 device
        assert "P(None, 'data')" in res["2"]["specs"]  # restored FSDP-sharded on 2
        for n in ("1", "2"):
            diff = _rel(res[n]["losses"], uninterrupted[10:13])
            print(f"\n[resume] {Path(ckpt).parent.name} on {n} device(s): steps 10-12 {res[n]['losses']}, "
                  f"uninterrupted {uninterrupted[10:13]}, max rel diff {diff:.2e}")
            assert diff < RTOL, (ckpt, n)
