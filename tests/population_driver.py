"""Subprocess driver for tests/test_population.py: a population in a process of its own, on
DEVICES simulated CPU devices (default 4).

Started with XLA_FLAGS=--xla_force_host_platform_device_count=DEVICES JAX_PLATFORMS=cpu (the
device count of a CPU process is fixed when JAX starts):

    python tests/population_driver.py CONFIG.yaml MEMBERS.json CORPUS OUT_DIR [DEVICES]

trains CONFIG with each member's overrides (a JSON list of mappings) as one population, member
k into OUT_DIR/member_000k, its members split over the devices (one device holds whole
members; model_summary.json records how many devices the population used), then prints
`maxrss_bytes N`: this process's peak resident memory (VmHWM of /proc/self/status). The fault seam
(DANTINOX_EQX_TEST_FAULT) can kill it inside a member's checkpoint save.
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
    devices = int(sys.argv[5]) if len(sys.argv) > 5 else 4
    assert jax.device_count() == devices, jax.devices()
    members = json.loads(Path(members_path).read_text())
    train_population(Config.from_yaml(config_path), members, corpus, out, progress=False)
    print(f"maxrss_bytes {peak_rss_bytes()}")


def peak_rss_bytes() -> int:
    """This program's own peak resident memory: VmHWM, which exec resets. Not getrusage's
    ru_maxrss: Linux carries the pre-exec process's high-water mark into it, so a child started
    from a large pytest worker reported the worker's RSS (2.89 GB for 1 and 4 members alike)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024  # kB
    raise RuntimeError("no VmHWM in /proc/self/status")


if __name__ == "__main__":
    main()
