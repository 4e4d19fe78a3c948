"""The LR range test, its plot, and the LR schedule plots (library and CLI)."""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import matplotlib.image as mpimg
import numpy as np
import pytest

from dantinox_eqx.config import SCHEDULES, Config, ConfigError
from dantinox_eqx.model import Transformer
from dantinox_eqx.tools.lr_plots import plot_lr_finder, plot_lr_schedule, schedule_values
from dantinox_eqx.train.lr_finder import exponential_ramp, find_lr, prepare_config_data, smooth_losses, steepest_descent
from dantinox_eqx.train.optim import make_optimizer

from .conftest import TINY

FINDER = dict(TINY, vocab_size=None, batch_size=8)


def _tree(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in root.rglob("*") if p.is_file()}


def _check_png(path: Path) -> None:
    image = mpimg.imread(path)
    assert image.ndim == 3 and image.shape[0] > 200 and image.shape[1] > 300 and image.shape[2] in (3, 4)
    assert float(np.std(image[..., :3])) > 0.05  # something is drawn, not a blank canvas


def test_ramp_is_exponential_from_min_to_max():
    ramp = exponential_ramp(1e-6, 1e-2, 101)
    lrs = np.asarray([float(ramp(s)) for s in range(101)])
    np.testing.assert_allclose(lrs[[0, 50, 100]], [1e-6, 1e-4, 1e-2], rtol=1e-5)
    np.testing.assert_allclose(lrs[1:] / lrs[:-1], 10 ** 0.04, rtol=1e-5)  # a constant factor per step


def test_optimizer_follows_the_ramp():
    # Adam's first bias-corrected update of a constant gradient is exactly sign(g) * lr, so with
    # no clipping and no decay the update of step s is -ramp(s): the schedule drives the LR.
    config = Config(**TINY).replace(weight_decay=0.0, grad_clip=0.0)
    ramp = exponential_ramp(1e-4, 1e-1, 8)
    opt = make_optimizer(config, 8, schedule=ramp)
    params = {"w": jnp.ones((3, 2))}
    state = opt.init(params)
    for s in range(8):
        updates, state = opt.update({"w": jnp.full((3, 2), 0.5)}, state, params)
        np.testing.assert_allclose(np.asarray(updates["w"]), -float(ramp(s)), rtol=1e-4)


def test_smoothing_is_bias_corrected():
    np.testing.assert_allclose(smooth_losses([3.0] * 10, 0.98), 3.0, rtol=1e-12)
    raw = [4.0, 2.0, 3.0]
    avg1 = 0.1 * 4.0
    avg2 = 0.9 * avg1 + 0.1 * 2.0
    np.testing.assert_allclose(smooth_losses(raw, 0.9)[:2], [avg1 / 0.1, avg2 / (1 - 0.81)])


def test_steepest_descent_finds_the_inflection():
    lrs = np.logspace(-6, -1, 101)
    losses = 3.0 - np.tanh(2.0 * (np.log10(lrs) + 3.0))  # falls fastest at lr = 1e-3
    assert steepest_descent(lrs, losses) == pytest.approx(1e-3, rel=0.13)  # one grid step: 10**0.05


@pytest.mark.slow
def test_find_lr_suggests_in_range_and_writes_nothing(small_corpus, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = Config(**FINDER)
    data = prepare_config_data(config, small_corpus)  # caches token ids beside the corpus, once
    before = _tree(tmp_path)
    suggested, lrs, losses = find_lr(config, data, 1e-5, 1e-1, 40)
    assert _tree(tmp_path) == before  # no file created, changed or removed
    assert 1e-5 <= suggested <= 1e-1
    assert suggested in lrs
    assert len(lrs) == len(losses) == 40  # 1e-1 does not blow this tiny model up
    np.testing.assert_allclose(lrs, [float(exponential_ramp(1e-5, 1e-1, 40)(s)) for s in range(40)], rtol=1e-6)
    assert all(math.isfinite(v) for v in losses)
    assert min(losses) < losses[0] - 0.1  # the ramp reaches LRs that learn


@pytest.mark.slow
def test_find_lr_stops_when_the_loss_diverges(small_corpus):
    config = Config(**FINDER)
    data = prepare_config_data(config, small_corpus)
    suggested, lrs, losses = find_lr(config, data, 1e-4, 1e4, 60, smoothing=0.9)
    assert len(lrs) < 60  # stopped early
    best = min(losses[:-1])
    assert losses[-1] > 4.0 * best or len(lrs) < 60  # the stop rule: smoothed > 4 x best, or NaN
    assert 1e-4 <= suggested < lrs[-1]  # the suggestion is before the blow-up
    assert suggested <= lrs[int(np.argmin(losses))]  # ... and not past the loss minimum


def test_bad_arguments_are_config_errors(small_corpus):
    config = Config(**FINDER)
    data = prepare_config_data(config, small_corpus)
    with pytest.raises(ConfigError, match="max_lr"):
        find_lr(config, data, 1e-2, 1e-3, 10)
    with pytest.raises(ConfigError, match="min_lr"):
        find_lr(config, data, 0.0, 1e-3, 10)
    with pytest.raises(ConfigError, match="num_steps"):
        find_lr(config, data, 1e-5, 1e-3, 2)


def test_lr_finder_plot_is_a_valid_png(tmp_path):
    lrs = np.logspace(-6, -2, 50)
    losses = 3.0 - np.tanh(np.log10(lrs) + 4.0)
    path = plot_lr_finder(lrs, losses, 1e-4, tmp_path / "out" / "lr_finder.png")
    assert path == tmp_path / "out" / "lr_finder.png"
    _check_png(path)
    assert [p.name for p in path.parent.iterdir()] == ["lr_finder.png"]  # no temporary file left


@pytest.mark.parametrize("name", SCHEDULES)
def test_schedule_plot_for_every_schedule(tmp_path, name):
    config = Config(**TINY).replace(lr_schedule=name, lr=1e-3, warmup_steps=10, min_lr_ratio=0.1)
    values = schedule_values(config, 100)
    assert values.shape == (100,)
    assert values[9] == pytest.approx(1e-3)  # warmup reaches the peak at step W - 1
    assert values[0] == pytest.approx(1e-4)  # lr * 1 / W
    assert np.all(np.diff(values[9:]) <= 1e-12)  # never rises after the warmup
    if name == "constant":
        np.testing.assert_allclose(values[9:], 1e-3, rtol=1e-6)
    else:  # decays towards lr * min_lr_ratio, reached at step 100 (one past the last step, 99)
        assert 1e-4 <= values[-1] <= 1.1e-4 + 1e-9 and values[60] < 1e-3
    _check_png(plot_lr_schedule(config, 100, tmp_path / f"{name}.png"))


def test_schedule_plot_overlays_all(tmp_path):
    _check_png(plot_lr_schedule(Config(**TINY), 50, tmp_path / "all.png", schedules=SCHEDULES))
    with pytest.raises(ConfigError, match="total_steps"):
        plot_lr_schedule(Config(**TINY), 0, tmp_path / "none.png")


# ------------------------------------------------------------------------------------------ CLI
def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).parent / "dantinox-eqx"
    return subprocess.run([str(exe), *args], cwd=cwd, env=dict(os.environ), capture_output=True, text=True,
                          timeout=600)


def _tiny_yaml(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.yaml"
    Config(**FINDER).to_yaml(path)
    return path


@pytest.mark.slow
def test_cli_find_lr_plot(small_corpus, tmp_path):
    cfg = _tiny_yaml(tmp_path)
    out = _cli("find-lr", "--config", str(cfg), "--data_path", str(small_corpus), "--min_lr", "1e-5",
               "--max_lr", "1e-1", "--num_steps", "30", "--plot", "--out_dir", str(tmp_path / "lr"),
               "--batch_size", "4", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    suggested = float(re.search(r"Suggested LR: (\S+)", out.stdout).group(1))
    assert 1e-5 <= suggested <= 1e-1
    _check_png(tmp_path / "lr" / "lr_finder.png")
    rows = (tmp_path / "lr" / "lr_finder.csv").read_text().splitlines()
    assert rows[0] == "lr,smoothed_loss" and len(rows) == 31
    # without --out_dir, --plot writes into a new runs/lr_finder_<time>/ of the working directory
    out = _cli("find-lr", "--config", str(cfg), "--data_path", str(small_corpus), "--num_steps", "6", "--plot",
               cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    (made,) = (tmp_path / "runs").iterdir()
    assert made.name.startswith("lr_finder_")
    _check_png(made / "lr_finder.png")


@pytest.mark.slow
def test_cli_find_lr_bad_input(small_corpus, tmp_path):
    cfg = _tiny_yaml(tmp_path)
    out = _cli("find-lr", "--config", str(cfg), "--data_path", str(small_corpus), "--min_lr", "1e-2",
               "--max_lr", "1e-3", cwd=tmp_path)
    assert out.returncode == 2 and "max_lr" in out.stderr and "Traceback" not in out.stderr
    out = _cli("find-lr", "--config", str(cfg), "--data_path", str(small_corpus), "--lrr", "1", cwd=tmp_path)
    assert out.returncode == 2 and "No such option '--lrr'" in out.stderr and "'--lr'" in out.stderr
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_cli_plot_lr_schedule(tmp_path):
    cfg = _tiny_yaml(tmp_path)
    out = _cli("plot-lr-schedule", "--config", str(cfg), "--out", "s.png", "--lr_schedule", "wsd", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    _check_png(tmp_path / "s.png")
    out = _cli("plot-lr-schedule", "--config", str(cfg), "--all", "--total_steps", "80", "--out", "a.png",
               cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    _check_png(tmp_path / "a.png")
    out = _cli("plot-lr-schedule", "--config", str(cfg), "--max_steps", "None", cwd=tmp_path)
    assert out.returncode == 2 and "--total_steps" in out.stderr


@pytest.mark.slow
def test_given_model_is_used_and_left_unchanged(small_corpus):
    # The fresh model of find_lr is Transformer(config, key=split(key(seed), 3)[0]): passing that
    # same model gives the same curve, and the caller's arrays are not donated or modified.
    config = Config(**FINDER)
    data = prepare_config_data(config, small_corpus)
    config = config.replace(vocab_size=data.vocab_size)
    model = Transformer(config, key=jax.random.split(jax.random.key(config.seed), 3)[0])
    before = [np.asarray(x).copy() for x in jax.tree.leaves(eqx.filter(model, eqx.is_array))]
    fresh = find_lr(config, data, 1e-4, 1e-2, 6)
    given = find_lr(config, data, 1e-4, 1e-2, 6, model=model)
    np.testing.assert_allclose(given[2], fresh[2], rtol=1e-6)  # reproducible from the seed
    other = find_lr(config.replace(seed=7), data, 1e-4, 1e-2, 6)
    assert not np.allclose(other[2], fresh[2], rtol=1e-6)
    after = [np.asarray(x) for x in jax.tree.leaves(eqx.filter(model, eqx.is_array))]
    assert all(np.array_equal(a, b) for a, b in zip(before, after))
