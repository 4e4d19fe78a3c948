"""Subprocess driver for tests/test_trainer_distributed.py: the Trainer on 4 simulated devices.

Started with XLA_FLAGS=--xla_force_host_platform_device_count=4 JAX_PLATFORMS=cpu (the device
count of a CPU process is fixed when JAX starts):

    python tests/trainer_driver.py CONFIG.yaml CORPUS OUT_DIR

trains CONFIG on CORPUS twice, into OUT_DIR/dp4 (n_devices 4, sharding dp) and OUT_DIR/fsdp4
(n_devices 4, sharding fsdp). While fsdp4 trains, its run directory is copied at step 10 (after
that step's checkpoint and cursor are written) into OUT_DIR/fsdp4_at10: a run stopped there,
for the resume-on-other-device-counts test. The test reads the run directories.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import jax  # noqa: E402

from dantinox_eqx.config import Config  # noqa: E402
from dantinox_eqx.train.trainer import Trainer  # noqa: E402

SNAPSHOT_STEP = 10


def main() -> None:
    config_path, corpus, out = sys.argv[1], sys.argv[2], Path(sys.argv[3])
    assert jax.device_count() == 4, jax.devices()
    config = Config.from_yaml(config_path)
    Trainer(config.replace(n_devices=4, sharding="dp"), progress=False).fit(corpus, run_dir=out / "dp4")

    def snapshot(row: dict) -> None:
        if row["step"] == SNAPSHOT_STEP:
            shutil.copytree(out / "fsdp4", out / "fsdp4_at10")

    Trainer(config.replace(n_devices=4, sharding="fsdp"), loggers=[snapshot], progress=False).fit(
        corpus, run_dir=out / "fsdp4")


if __name__ == "__main__":
    main()
