"""A population member on a prepared dataset is its separate run (issue 24 item 1): fed by the
host feed a `fit` of its config uses, batch for batch, and `train --resume` of an interrupted
member continues on that feed."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import jax
import numpy as np
import pytest
from cli.main import app
from click.testing import CliRunner

from dantinox_eqx.config import Config, ConfigError
from dantinox_eqx.data import feeds, tokens
from dantinox_eqx.train import population as pop
from dantinox_eqx.train import population_fit
from dantinox_eqx.train.population_fit import fit_population
from dantinox_eqx.train.programs import run_keys
from dantinox_eqx.train.progress import TrainingInterrupted
from dantinox_eqx.train.trainer import LOG_COLUMNS, Trainer, read_log

from .conftest import TINY, plays_slice
from .prepared import char_tokenizer_with_eot, split_docs, write_prepared

EXACT = [c for c in LOG_COLUMNS if c not in ("ms_per_step", "tokens_per_s")]
BASE = dict(TINY, vocab_size=None, max_steps=10, eval_interval=5, eval_iters=2, grad_accum=2, batch_size=2,
            dropout_rate=0.1, warmup_steps=2, lr=1e-3, n_devices=1)
MEMBERS = [{"seed": 1}, {"seed": 2, "lr": 2e-3, "dropout_rate": 0.2}]
# Relative bound on every logged number (losses ~3.5, bpb, grad norm): the member's step is the
# separate run's under vmap, whose batched matmuls may accumulate in another order, with its
# hyperparameters as float32 arrays instead of folded constants: a few float32 ulps (1.2e-7)
# per step, over 10 small steps (lr 1e-3, nothing amplifies them); 1e-6 = ~8 ulps.
REL = 1e-6


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("poprep")
    text = plays_slice(d / "corpus.txt", 40_000).read_text(encoding="utf-8")
    return write_prepared(d / "ds", split_docs(text, 20), char_tokenizer_with_eot(text), shard_tokens=15_000)


def _rows(run: Path) -> list[dict]:
    return [{k: r[k] for k in EXACT} for r in read_log(run / "training_log.csv")]


def _assert_rows_close(a: Path, b: Path) -> None:
    ra, rb = _rows(a), _rows(b)
    assert [r["step"] for r in ra] == [r["step"] for r in rb] == [5, 10]
    worst = max(abs(x[k] - y[k]) / max(abs(y[k]), 1e-30) for x, y in zip(ra, rb) for k in EXACT if y[k])
    print(f"{a.name} vs {b.name}: max relative diff {worst:.2e}")
    assert worst <= REL


def separate_and_population_runs(base: Config, data, tmp_path: Path) -> tuple[list[Path], list[Path], list]:
    """Each MEMBERS variant of `base` trained on `data` alone (Trainer.fit) and all together
    (fit_population): (member run dirs, separate run dirs, fit_population's results), with every
    member's log rows asserted within REL of its separate run's."""
    configs = [base.replace(**m) for m in MEMBERS]
    separate = [Trainer(c, progress=False).fit(data, run_dir=tmp_path / f"alone{k}") for k, c in enumerate(configs)]
    members = [tmp_path / "pop" / f"member_{k}" for k in range(len(configs))]
    results = fit_population(configs, data, members, progress=False)
    for m, s in zip(members, separate):
        _assert_rows_close(m, s)
    return members, separate, results


def test_member_batches_are_the_host_feeds(prepared):
    """MemberBatches' rows are, member by member, the batches a run's HostFeed places."""
    config = Config(**BASE).replace(vocab_size=100)
    splits = tokens.open_splits(prepared, config)
    assert feeds.choose_feed(splits) == "host"
    roots = [jax.random.key(s) for s in (1, 2)]
    keys = [run_keys(r) for r in roots]
    mesh = pop.population_mesh(1)
    batches = feeds.MemberBatches(splits, config, [k[1] for k in keys], [k[3] for k in keys])
    steps = np.asarray([3, 7])
    got, (ev_train, ev_val) = batches.train_batches(steps), batches.eval_batches(steps)
    for k, (_, data, _, evaluation) in enumerate(keys):
        alone = feeds.HostFeed(splits, config, mesh, data, evaluation)
        np.testing.assert_array_equal(got[k], np.asarray(alone.batch_at(int(steps[k]))))
        want_train, want_val = alone.eval_args(int(steps[k]))
        np.testing.assert_array_equal(ev_train[k], np.asarray(want_train))
        np.testing.assert_array_equal(ev_val[k], np.asarray(want_val))
    assert not np.array_equal(got[0], got[1])


@pytest.mark.slow
def test_member_on_prepared_data_is_its_separate_run_and_resumes(prepared, tmp_path, monkeypatch):
    configs = [Config(**BASE).replace(**m) for m in MEMBERS]
    members, separate, results = separate_and_population_runs(Config(**BASE), prepared, tmp_path)
    assert [r.status for r in results] == ["complete"] * 2
    for m, s in zip(members, separate):
        summary, alone = (json.loads((d / "model_summary.json").read_text()) for d in (m, s))
        assert summary["data"] == alone["data"] and summary["data"]["feed"] == "host"

    # Interrupted after step 7 (SIGTERM: each member's latest checkpoint saved at 7), then one
    # member resumed alone by `train --resume`: its rows are the separate run's (a resume on
    # another feed would train on other batches and miss by far more than REL).
    cut = [tmp_path / "cut" / f"member_{k}" for k in range(len(configs))]
    step = population_fit._Population._step

    def stop_at_7(self, progress):
        step(self, progress)
        if self.iteration == 7:
            signal.raise_signal(signal.SIGTERM)

    monkeypatch.setattr(population_fit._Population, "_step", stop_at_7)
    with pytest.raises(TrainingInterrupted):
        fit_population(configs, prepared, cut, progress=False)
    monkeypatch.undo()
    assert [r["step"] for r in read_log(cut[1] / "training_log.csv")] == [5]
    result = CliRunner().invoke(app, ["train", "--run_dir", str(cut[1]), "--resume"])
    assert result.exit_code == 0, result.output
    assert json.loads((cut[1] / "training_cursor.json").read_text())["step"] == 10
    _assert_rows_close(cut[1], separate[1])


def test_memory_check_counts_the_data_as_placed(prepared, tmp_path):
    """The host feed: each member's batches (one in use, two read ahead, the eval batches); the
    fused feed: the bytes FusedFeed places on every device; a population whose token arrays
    alone exceed the memory is refused, naming them."""
    config = Config(**BASE).replace(vocab_size=100)
    host = tokens.open_splits(prepared, config)
    window = config.batch_size * (config.max_context + 1) * 4  # int32 ids
    assert pop.data_bytes(config, host) == ((3 * config.grad_accum + 2 * config.eval_iters) * window, 0)
    text = plays_slice(tmp_path / "corpus.txt", 20_000)
    fused = tokens.open_splits(text, config)
    mesh = pop.population_mesh(1)
    placed = feeds.FusedFeed(fused, config, mesh, jax.random.key(0), jax.random.key(1))
    assert pop.data_bytes(config, fused) == (0, placed.train_tokens.nbytes + placed.val_tokens.nbytes)
    limit, _ = pop.device_memory(mesh.devices.flat[0])
    pop.check_memory(1, 0, mesh, per_device=limit)  # fits
    with pytest.raises(ConfigError, match=rf"\+ {limit + 1:,} of token arrays"):
        pop.check_memory(1, 0, mesh, per_device=limit + 1)
