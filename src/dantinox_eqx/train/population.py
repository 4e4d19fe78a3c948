"""A population: N models of one shape trained together by one jitted, `jax.vmap`ped step.

    check_members(configs)                       # one shape and program, or ConfigError
    values = member_values(configs)              # {name: (N,) array} of POPULATION_FIELDS
    programs = build_population_programs(configs[0], static, trainable, dataset, mesh, total, data_roots)
    programs.start(steps, total)                 # the host feed reads ahead (fused: nothing to do)
    params, opt_state, metrics = programs.step(params, opt_state, values, roots, steps, active)
    train, val, finite, counts = programs.evaluate(params, steps)

Every array of a population has a leading member axis of length N: the parameters and optimizer
states (each member's, stacked), the values of POPULATION_FIELDS, the root keys `key(seed)`, the
step numbers and the `active` mask (a member that finished, stopped early or diverged is carried
unchanged). The members are split over the devices of `mesh` along that axis: each member's
arrays and computation live whole on one device, and no step moves data between devices.

Member k computes what `Trainer(configs[k]).fit` computes (train/programs.py), with its own
numbers: its optimizer is `make_optimizer(config, total, values=member k's values)`, built inside
the vmapped function from traced scalars (the optimizer state has the structure a plain run's
has, so each member checkpoints in the ordinary format); its dropout keeps units with its own
probability (`nn.functional.keep_probability`); its root key gives its batches, dropout and
evaluation batches exactly as a run of its seed derives them:

    init, data, dropout, eval = run_keys(key(seed))                     (train/programs.py)
    batch of update s    = the feed's windows for (data, s)                 (data from data_roots)
    dropout of update s  = fold_in(dropout, s)
    eval after s updates = eval_iters batches of each split for (eval, s)  (data_roots)

The feed is the one `fit` picks for the data (data/feeds.choose_feed): "fused" samples inside
the step from each split placed whole on every device (data/feeds.fused_train_batch, as
FusedFeed); "host" (a prepared dataset, or token arrays over FUSED_MAX_BYTES) reads member k's
windows on the host exactly as its run's HostFeed does and places the stacked (N, ...) batches
with the members, read ahead of the step (data/feeds.MemberBatches): device memory O(batch).
"packed" (chat data) is the host feed of PackedFeed's bins: (tokens, flags) pairs, the masked
loss of train/step.py; `document_mask` masks plain batches as `fit` does (programs.document_separator).

By default `data_roots` are the members' own roots, so member k sees exactly the batches it would
see alone: that is what makes member k a separate run of its config, comparable with any other
run of it (a sweep's result must not depend on which members shared its program). Shared batches
(`data_roots` all member 0's key) are the option for comparing hyperparameters on identical data.

Exactness: vmap turns each matmul into a batched one, whose accumulation order XLA may choose
differently, and the hyperparameters become float32 arrays instead of constants folded in
double precision. So member k agrees with its separate run to float32 rounding, not bitwise:
4.8e-7 at most in the logged losses of tests/test_population.py (20 steps, 1 and 4 devices).
Training that is chaotic (that tiny model at lr 0.1) amplifies such differences over the steps,
as it amplifies those between device counts: about 0.04 after 30 steps there.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable, Sequence
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from ..config import Config, ConfigError
from ..data.feeds import MemberBatches, choose_feed, fused_eval_batches, fused_train_batch
from ..data.sampling import Dataset
from ..data.tokens import Splits, TokenStream
from ..model import cast_floating
from ..nn.functional import keep_probability
from ..parallel.sharding import DATA
from ..run.summary import model_summary
from .expert_log import make_counts_fn
from .hooks import all_finite
from .inputs import initial_model
from .optim import HYPERPARAMETERS, make_optimizer
from .programs import document_separator, run_keys
from .step import init_opt_state, make_eval_step, make_train_step

__all__ = ["POPULATION_FIELDS", "HOST_FIELDS", "check_members", "structure_key", "member_values",
           "PopulationPrograms", "build_population_programs", "population_mesh", "stack", "place", "take",
           "member_bytes", "check_memory", "data_bytes", "check_population_memory", "mu_dtype"]

# The fields the members of one population may set each to its own value: numbers the step
# reads (as arrays), and the seed (each member's root key).
POPULATION_FIELDS = (*HYPERPARAMETERS, "dropout_rate", "seed")
# Fields only the host-side hooks read, also free per member.
HOST_FIELDS = ("patience",)
# Values of population fields that change the program or the optimizer state's structure: the
# members of one population agree on each of these.
_STRUCTURE = {
    "grad_clip": ("clipping on or off", lambda c: c.grad_clip > 0),
    "dropout_rate": ("dropout on or off", lambda c: c.dropout_rate > 0),
    "weight_decay": ("adafactor's weight decay on or off", lambda c: c.optimizer == "adafactor" and c.weight_decay > 0),
}
_UNSUPPORTED = {"use_lora": "a LoRA fine-tune trains alone (dantinox-eqx train)",
                "wandb": "W&B logging needs a run per process (sweep --backend wandb)"}


def check_members(configs: Sequence[Config]) -> None:
    """Raise ConfigError unless `configs` can train as one population: at least one, the same
    fields everywhere except POPULATION_FIELDS and HOST_FIELDS, and among those the same
    structure (clipping, dropout, adafactor decay on or off). The message names the field."""
    if len(configs) < 1:
        raise ConfigError("population: needs at least 1 member, got 0")
    first = configs[0]
    for name, why in _UNSUPPORTED.items():
        if getattr(first, name) or (name == "wandb" and first.wandb_project):
            raise ConfigError(f"{name}: a population cannot train with {name} on ({why})")
    free = set(POPULATION_FIELDS) | set(HOST_FIELDS)
    for k, c in enumerate(configs[1:], 1):
        for field in dataclasses.fields(Config):
            a, b = getattr(first, field.name), getattr(c, field.name)
            if field.name not in free and a != b:
                raise ConfigError(f"{field.name}: member {k} has {field.name}={b!r}, member 0 {a!r}; the members of "
                                  f"one population share every field but {', '.join(POPULATION_FIELDS + HOST_FIELDS)}"
                                  " (a sweep with --backend population groups its trials by the others)")
        for name, (what, flag) in _STRUCTURE.items():
            if flag(first) != flag(c):
                raise ConfigError(f"{name}: member {k} has {name}={getattr(c, name)!r}, member 0 "
                                  f"{getattr(first, name)!r}; {what} changes the compiled step or the optimizer "
                                  "state, so they train in separate populations")


def structure_key(config: Config) -> tuple:
    """What members of one population share (`check_members`): a sweep groups trials by it."""
    free = set(POPULATION_FIELDS) | set(HOST_FIELDS)
    shared = tuple((f.name, getattr(config, f.name)) for f in dataclasses.fields(Config) if f.name not in free)
    return shared + tuple(flag(config) for _, flag in _STRUCTURE.values())


def member_values(configs: Sequence[Config]) -> dict[str, np.ndarray]:
    """Each member's optimizer numbers as (N,) arrays (float32; warmup_steps int32) plus `keep`,
    the dropout keep probability 1 - dropout_rate (computed in double, as a plain run folds it)."""
    out = {name: np.asarray([getattr(c, name) for c in configs],
                            np.int32 if name == "warmup_steps" else np.float32) for name in HYPERPARAMETERS}
    out["keep"] = np.asarray([1.0 - c.dropout_rate for c in configs], np.float32)
    return out


# ------------------------------------------------------------------------------------------ placement
def population_mesh(n_members: int, n_devices: int = 0) -> Mesh:
    """A 1-D "data" mesh over the most devices (of the first `n_devices`; 0 = all) that split
    `n_members` evenly: each device holds n_members / devices whole members."""
    devices = jax.devices()
    if n_devices < 0 or n_devices > len(devices):
        raise ConfigError(f"n_devices: asked for {n_devices}, but {len(devices)} device(s) are visible")
    n = n_devices or len(devices)
    used = max(d for d in range(1, n + 1) if n_members % d == 0)
    return Mesh(np.asarray(devices[:used]), (DATA,))


def stack(trees: Sequence[Any], mesh: Mesh) -> Any:
    """The member trees stacked on a new leading axis, split over `mesh` along it. Member 0's
    tree structure is kept: the members' may differ only in static metadata (dropout rates)."""
    treedef = jax.tree.structure(trees[0])
    return place(treedef.unflatten([jnp.stack(xs) for xs in zip(*(jax.tree.leaves(t) for t in trees))]), mesh)


def place(tree: Any, mesh: Mesh) -> Any:
    """Arrays with a leading member axis, split over `mesh` along it."""
    return jax.device_put(tree, NamedSharding(mesh, P(DATA)))


@jax.jit
def _take(tree: Any, k: Any) -> Any:
    return jax.tree.map(lambda x: x[k], tree)


def take(tree: Any, k: int) -> Any:
    """Member `k`'s slice of a stacked tree (on the device that holds it)."""
    return _take(tree, np.int32(k))


# ------------------------------------------------------------------------------------------ programs
@dataclasses.dataclass(frozen=True)
class PopulationPrograms:
    """The population's step and evaluation, fed as a separate run of each member is fed.

    step(params, opt_state, values, roots, steps, active) -> (params, opt_state, metrics)
    evaluate(params, steps) -> (train, val, finite, counts), each (N, ...)
    start(steps, total) / close(): the host feed reads ahead from `steps` (a no-op when fused).
    feed: "fused", "host" or "packed" (data/feeds.choose_feed of the data, as `fit` chooses it)."""

    step: Callable
    evaluate: Callable
    start: Callable
    close: Callable
    feed: str


def _ids(split: Any) -> Any:
    return split.array() if isinstance(split, TokenStream) else split


def build_population_programs(config: Config, static: Any, trainable: Any, dataset: Dataset | Splits, mesh: Mesh,
                              total: int, data_roots: Sequence[Any], *, mu_dtype: Any = None) -> PopulationPrograms:
    """The population's jitted step and evaluation (see the module docstring). `config` is any
    member's (they share everything but their values); `static` the model's non-array part;
    `data_roots[k]` the root key whose data and eval keys (`run_keys`) feed member k. The feed
    is `fit`'s for the data (data/feeds.choose_feed; a prepare_data Dataset is fused): "fused"
    places each split whole on every device and samples in the step; "host" reads member k's
    windows as a separate run's HostFeed would (data/feeds.MemberBatches) and places the
    stacked batches with the members (device memory O(batch) per member)."""
    c = config
    compute = jnp.bfloat16 if c.use_bf16 and c.master_weights else None
    doc_sep = document_separator(c, dataset)
    eval_fn = make_eval_step(static, alpha_balance=c.alpha_balance, compute_dtype=compute, doc_sep=doc_sep)
    counts_fn = make_counts_fn(static) if c.use_moe else None
    members, rep = NamedSharding(mesh, P(DATA)), NamedSharding(mesh, P())
    feed = choose_feed(dataset) if isinstance(dataset, Splits) else "fused"
    keys = [run_keys(r) for r in data_roots]
    data_keys = place(jnp.stack([k[1] for k in keys]), mesh)
    eval_keys = place(jnp.stack([k[3] for k in keys]), mesh)

    def member_step(params, opt_state, values, root, data_key, step, data):
        optimizer = make_optimizer(c, total, mu_dtype=mu_dtype, values={k: values[k] for k in HYPERPARAMETERS})
        step_fn = make_train_step(static, optimizer, alpha_balance=c.alpha_balance, trainable=trainable,
                                  donate=False, compute_dtype=compute, doc_sep=doc_sep)
        batch = fused_train_batch(data, data_key, step, c) if feed == "fused" else data
        with keep_probability(values["keep"]):
            return step_fn(params, opt_state, batch, jax.random.fold_in(run_keys(root)[2], step))

    def step(params, opt_state, values, roots, data_keys, steps, active, data):
        new_p, new_o, metrics = jax.vmap(member_step, in_axes=(0, 0, 0, 0, 0, 0, None if feed == "fused" else 0))(
            params, opt_state, values, roots, data_keys, steps, data)

        def keep(new, old):  # inactive members unchanged; dtypes as they were (see member_values)
            where = active.reshape(active.shape + (1,) * (old.ndim - 1))
            return jnp.where(where, new.astype(old.dtype), old)

        return jax.tree.map(keep, new_p, params), jax.tree.map(keep, new_o, opt_state), metrics

    def member_eval(params, eval_key, step, train, val):
        batches = fused_eval_batches((train, val), eval_key, step, c) if feed == "fused" else [train, val]
        tokens = batches[1][0] if isinstance(batches[1], tuple) else batches[1]  # packed: (tokens, flags)
        counts = None if counts_fn is None else counts_fn(params, tokens)
        return eval_fn(params, batches[0]), eval_fn(params, batches[1]), all_finite(params), counts

    def evaluate(params, eval_keys, steps, train, val):
        axis = None if feed == "fused" else 0
        return jax.vmap(member_eval, in_axes=(0, 0, 0, axis, axis))(params, eval_keys, steps, train, val)

    data_sharding = rep if feed == "fused" else members
    step_jit = jax.jit(step, in_shardings=(members,) * 7 + (data_sharding,), out_shardings=(members,) * 3,
                       donate_argnums=(0, 1))
    eval_jit = jax.jit(evaluate, in_shardings=(members,) * 3 + (data_sharding,) * 2, out_shardings=members)
    if feed == "fused":  # each split whole on every device (a TokenStream's array or a Dataset's ids)
        train_tokens = jax.device_put(np.asarray(_ids(dataset.train)), rep)
        val_tokens = jax.device_put(np.asarray(_ids(dataset.val)), rep)
        return PopulationPrograms(
            step=lambda p, o, v, r, s, a: step_jit(p, o, v, r, data_keys, s, a, train_tokens),
            evaluate=lambda p, s: eval_jit(p, eval_keys, s, train_tokens, val_tokens),
            start=lambda steps, total: None, close=lambda: None, feed=feed)
    batches = MemberBatches(dataset, c, [k[1] for k in keys], [k[3] for k in keys],
                            place=lambda x: jax.device_put(x, members))

    def host_step(p, o, v, r, s, a):
        return step_jit(p, o, v, r, data_keys, s, a, batches.train_arg(np.asarray(s), np.asarray(a)))

    def host_evaluate(p, s):
        return eval_jit(p, eval_keys, s, *batches.eval_batches(np.asarray(s)))

    return PopulationPrograms(step=host_step, evaluate=host_evaluate, start=batches.start, close=batches.close,
                              feed=feed)


# ------------------------------------------------------------------------------------------ memory
def member_bytes(config: Config, params: Any, opt_state: Any) -> int:
    """Bytes one member needs: parameters + optimizer state + activations of one micro-batch
    (run/summary.py's estimate; `params` / `opt_state` may be shapes from `jax.eval_shape`)."""
    s = model_summary(config, params, opt_state)
    return int(round((s["weights_mem_MB"] + s["optimizer_mem_MB"] + s["activation_mem_MB"]) * 2**20))


def device_memory(device: Any) -> tuple[int, str]:
    """(bytes a device can hold, what that is): an accelerator's allocator limit, or the host's
    physical memory for CPU devices (simulated CPU devices all share it)."""
    stats = device.memory_stats() if device.platform != "cpu" else None
    if stats and stats.get("bytes_limit"):
        return int(stats["bytes_limit"]), f"{device.device_kind} memory"
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "host memory"


def check_memory(n_members: int, per_member: int, mesh: Mesh, *, what: str = "--population",
                 per_device: int = 0) -> None:
    """Refuse (ConfigError naming `what`) a population whose estimate exceeds the memory of the
    devices that would hold it: ceil(N / devices) members per accelerator plus `per_device`
    bytes every device holds once (the fused feed's token arrays); on CPU all of it, N members
    and a copy of `per_device` per device, in the one host memory."""
    device = mesh.devices.flat[0]
    limit, where = device_memory(device)
    shared = device.platform == "cpu"
    on_one = n_members if shared else math.ceil(n_members / mesh.devices.size)
    data = per_device * (mesh.devices.size if shared else 1)
    need = on_one * per_member + data
    if need > limit:
        tokens = f" + {data:,} of token arrays" if data else ""  # the batches count with each member
        raise ConfigError(f"{what}: {n_members} members need about {need:,} bytes ({on_one} x {per_member:,}: "
                          f"parameters + optimizer state + activations){tokens} but {where} holds {limit:,}; "
                          f"train fewer members at once (lower {what}) or a smaller model")


def data_bytes(config: Config, dataset: Dataset | Splits) -> tuple[int, int]:
    """(bytes per member, bytes per device) the population's data takes on the devices: with the
    host feed each member's batches (a training batch in use and two read ahead, plus the
    evaluation batches), with the fused feed each split's ids whole on every device."""
    c = config
    if isinstance(dataset, Splits) and choose_feed(dataset) != "fused":
        windows = (3 * c.grad_accum + 2 * c.eval_iters) * c.batch_size * (c.max_context + 1)
        arrays = 2 if choose_feed(dataset) == "packed" else 1  # packed: tokens and flags
        return arrays * windows * np.dtype(np.int32).itemsize, 0
    return 0, sum(np.asarray(_ids(split)).nbytes if not isinstance(split, TokenStream) else split.nbytes
                  for split in (dataset.train, dataset.val))


def mu_dtype(config: Config) -> Any:
    """The first moments' dtype, as fit decides it (bfloat16 with use_bf16 without master weights)."""
    return jnp.bfloat16 if config.use_bf16 and not config.master_weights else None  # as fit decides


def check_population_memory(config: Config, n_members: int, dataset: Dataset | Splits | None = None, *,
                            what: str = "--population") -> None:
    """Refuse (ConfigError naming `what`) `n_members` members of `config` (its vocab_size
    resolved) that would not fit the devices holding them (check_memory) with `dataset`'s
    arrays as the population places them (`data_bytes`; None: the model alone), estimated
    from shapes alone: nothing is allocated."""
    bf16_moments = mu_dtype(config)

    fresh = config.replace(init_from="")  # a fine-tune's base has this shape (finetune.load_base checks it)

    def one_member() -> tuple[Any, Any]:  # shapes only: a base run's checkpoint is not read under eval_shape
        params = eqx.filter(initial_model(fresh, jax.random.key(0))[0], eqx.is_array)
        params = params if bf16_moments is None else cast_floating(params, jnp.bfloat16)
        return params, init_opt_state(make_optimizer(config, 1, mu_dtype=bf16_moments), params)

    per_member, per_device = (0, 0) if dataset is None else data_bytes(config, dataset)
    per = member_bytes(config, *jax.eval_shape(one_member)) + per_member
    check_memory(n_members, per, population_mesh(n_members, config.n_devices), what=what, per_device=per_device)
