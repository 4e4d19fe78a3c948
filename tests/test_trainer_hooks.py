"""The Trainer's seams added with the integration: loggers that fail to start (W&B not logged
in, ...) leave no run directory behind, and `Trainer.find_lr` runs the LR range test on the
model `fit` would train, writing nothing."""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np
import pytest

from dantinox_eqx.config import Config, ConfigError
from dantinox_eqx.model import Transformer
from dantinox_eqx.train.lr_finder import find_lr, prepare_config_data
from dantinox_eqx.train.trainer import Trainer
from dantinox_eqx.train.wandb_logger import WandbError

from .conftest import TINY

FINDER = dict(TINY, vocab_size=None, batch_size=8)


def _files(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")}


class _Refuses:
    """A logger whose start fails the way WandbLogger's does without a login."""

    def __init__(self) -> None:
        self.rows: list[dict] = []

    def start(self, config, summary) -> None:
        raise WandbError("wandb: could not start a W&B run (no login); run `wandb login`")

    def __call__(self, row) -> None:
        self.rows.append(row)


class _Records:
    def __init__(self) -> None:
        self.events: list[str] = []

    def start(self, config, summary) -> None:
        self.events.append("start")

    def __call__(self, row) -> None:
        self.events.append("row")

    def finish(self) -> None:
        self.events.append("finish")


def test_a_logger_that_cannot_start_leaves_no_run_directory(small_corpus: Path, tmp_path: Path):
    first, failing = _Records(), _Refuses()
    run = tmp_path / "runs" / "new" / "run"
    with pytest.raises(ConfigError, match="^wandb: could not start"):
        Trainer(Config(**FINDER), loggers=[first, failing]).fit(small_corpus, run_dir=run)
    assert not (tmp_path / "runs").exists()  # every directory this call made is gone
    assert first.events == ["start", "finish"] and failing.rows == []  # the started one was finished
    empty = tmp_path / "empty"  # an existing empty run_dir is kept, and left empty
    empty.mkdir()
    with pytest.raises(ConfigError):
        Trainer(Config(**FINDER), loggers=[_Refuses()]).fit(small_corpus, run_dir=empty)
    assert empty.is_dir() and list(empty.iterdir()) == []


@pytest.mark.slow
def test_trainer_find_lr_tests_the_model_fit_would_train_and_writes_nothing(small_corpus: Path, tmp_path: Path,
                                                                            monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = Config(**FINDER)
    data = prepare_config_data(config, small_corpus)  # the token ids cached beside the corpus, once
    before = _files(tmp_path)
    suggested, lrs, losses = Trainer(config).find_lr(small_corpus, 1e-4, 1e-1, 12)
    assert _files(tmp_path) == before  # no run directory, checkpoint or log; nothing changed
    assert 1e-4 <= suggested <= 1e-1 and suggested in lrs
    assert len(lrs) == len(losses) == 12 and lrs[0] == pytest.approx(1e-4) and lrs[-1] == pytest.approx(1e-1)
    # the model is fit's initial one: Transformer(config, key=split(key(seed), 4)[0])
    resolved = config.replace(vocab_size=data.vocab_size)
    model = Transformer(resolved, key=jax.random.split(jax.random.key(config.seed), 4)[0])
    want = find_lr(resolved, data, 1e-4, 1e-1, 12, model=model)
    np.testing.assert_allclose(losses, want[2], rtol=1e-6)
    assert suggested == want[0]
    print(f"\n[find_lr] suggested {suggested:.3e}; smoothed loss {losses[0]:.4f} -> {min(losses):.4f}")
    with pytest.raises(ConfigError, match="max_lr"):
        Trainer(config).find_lr(small_corpus, 1e-2, 1e-3, 12)
