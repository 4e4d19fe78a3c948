"""Subprocess driver for tests/test_population.py: a population on 4 simulated CPU devices.

Started with XLA_FLAGS=--xla_force_host_platform_device_count=4 JAX_PLATFORMS=cpu (the device
count of a CPU process is fixed when JAX starts):

    python tests/population_driver.py CONFIG.yaml MEMBERS.json CORPUS OUT_DIR

trains CONFIG with each member's overrides (a JSON list of mappings) as one population, member
k into OUT_DIR/member_000k, its members split over the 4 devices (one device holds whole
members; model_summary.json records how many devices the population used).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import jax  # noqa: E402

from dantinox_eqx.config import Config  # noqa: E402
from dantinox_eqx.train.population_fit import train_population  # noqa: E402


def main() -> None:
    config_path, members_path, corpus, out = sys.argv[1], sys.argv[2], sys.argv[3], Path(sys.argv[4])
    assert jax.device_count() == 4, jax.devices()
    members = json.loads(Path(members_path).read_text())
    train_population(Config.from_yaml(config_path), members, corpus, out, progress=False)


if __name__ == "__main__":
    main()
