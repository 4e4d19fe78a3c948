"""The batch feeds: how the windows of step s reach the devices (see `tokens.py`'s docstring).

`FusedFeed` samples inside the compiled step from a corpus placed on every device; `HostFeed`
draws window starts on the host (Philox, a pure function of the seed and s), reads each
process's own rows from the shards and places them ahead of the step (`Prefetcher`).
"""

from __future__ import annotations

import hashlib
import math
import queue
import threading
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from jaxtyping import Array, Int, PRNGKeyArray

from ..config import Config
from ..parallel import distributed, sharding
from .packing import Packing, read_bins
from .sampling import sample_batch
from .tokens import EVAL_TRAIN_STREAM, EVAL_VAL_STREAM, FUSED_MAX_BYTES, TRAIN_STREAM, Splits, TokenStream

__all__ = ["philox_key", "draw_starts", "read_batch", "global_windows", "Prefetcher", "fused_train_batch",
           "fused_eval_batches", "FusedFeed", "HostFeed", "MemberBatches", "PackedFeed", "packed_windows",
           "packed_batch", "choose_feed", "make_feed"]


# --------------------------------------------------------------------------- host-side batches
def philox_key(key: PRNGKeyArray) -> np.ndarray:
    """A Philox key (2 x uint64) derived from a JAX PRNG key's data (sha256 of its bytes)."""
    data = np.ascontiguousarray(np.asarray(jax.random.key_data(key)))
    return np.frombuffer(hashlib.sha256(data.tobytes()).digest()[:16], np.uint64).copy()


def draw_starts(key: np.ndarray, step: int, stream: int, shape: tuple[int, ...], n_starts: int
                ) -> Int[np.ndarray, "..."]:
    """Uniform window starts in [0, n_starts) for `step`: Philox4x64 keyed by `key`, counter
    (0, 0, step, stream). A pure function of its arguments on every platform (the raw Philox
    stream is fixed by its spec; the modulo's bias is below n_starts / 2**64)."""
    bits = np.random.Philox(key=key, counter=np.array([0, 0, step, stream], np.uint64))
    return (bits.random_raw(math.prod(shape)) % np.uint64(n_starts)).astype(np.int64).reshape(shape)


def read_batch(stream: TokenStream, key: np.ndarray, step: int, stream_id: int, shape: tuple[int, int],
               seq_len: int) -> Int[np.ndarray, "n batch window"]:
    """The host batch of `step` read whole in this process: windows of `seq_len + 1` tokens at
    `draw_starts(key, step, stream_id, shape, len(stream) - seq_len)`, int32 (*shape, seq_len + 1)."""
    starts = draw_starts(key, step, stream_id, shape, len(stream) - seq_len)
    return stream.read(starts, seq_len + 1).reshape(*shape, seq_len + 1)


def global_windows(stream: TokenStream, starts: Int[np.ndarray, "n batch"], length: int, mesh: Any,
                   on_read: Callable[[slice, np.ndarray], None] | None = None) -> Int[Array, "n batch length"]:
    """The windows at `starts` (n, batch) as one global int32 array (n, batch, length) split on
    axis 1 over `mesh`, of which this process reads and places only its own devices' rows.
    `on_read(rows, starts[:, rows])` is called for each block read (tests record it)."""
    n, batch = starts.shape
    blocks = {}
    for rows in distributed.local_rows(mesh, batch):
        blocks[rows.start, rows.stop] = stream.read(starts[:, rows], length).reshape(n, -1, length)
        if on_read is not None:
            on_read(rows, starts[:, rows])

    def fetch(index: tuple[slice, ...]) -> np.ndarray:
        a, b, _ = index[1].indices(batch)
        return blocks[a, b][index[0], :, index[2]]

    return jax.make_array_from_callback((n, batch, length), sharding.batch_sharding(mesh, 1), fetch)


class Prefetcher:
    """`make(s)` for s = start, ..., stop - 1, computed in a background thread at most `depth`
    steps ahead; `get(s)` returns them in order (and re-raises the thread's exception)."""

    def __init__(self, make: Callable[[int], Any], start: int, stop: int, depth: int = 2):
        self.stop = stop
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(make, start, stop), daemon=True,
                                        name="dantinox-eqx-prefetch")
        self._thread.start()

    def _put(self, item: tuple) -> bool:
        while not self._closed.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self, make: Callable[[int], Any], start: int, stop: int) -> None:
        for s in range(start, stop):
            try:
                item = (s, make(s), None)
            except BaseException as e:  # handed to the consumer, which raises it
                self._put((s, None, e))
                return
            if not self._put(item):
                return

    def get(self, step: int) -> Any:
        if step >= self.stop:
            raise IndexError(f"Prefetcher: step {step} is past the last one prepared ({self.stop - 1})")
        got, value, error = self._queue.get()
        if error is not None:
            raise error
        if got != step:
            raise RuntimeError(f"Prefetcher: asked for step {step}, the next prepared one is {got}")
        return value

    def close(self) -> None:
        self._closed.set()
        self._thread.join(timeout=10)


# --------------------------------------------------------------------------- feeds
def fused_train_batch(tokens: Any, data_key: PRNGKeyArray, step: Any, config: Config) -> Any:
    """The fused feed's training batch of `step` (traced): windows sampled from the whole split
    `tokens` with `fold_in(data_key, step)`, (grad_accum, batch_size, max_context + 1)."""
    c = config
    return sample_batch(tokens, jax.random.fold_in(data_key, step), c.batch_size, c.max_context, accum=c.grad_accum)


def fused_eval_batches(args: tuple[Any, Any], eval_key: PRNGKeyArray, step: Any, config: Config) -> list[Any]:
    """The fused feed's evaluation batches after `step` updates (traced): eval_iters batches of
    each split (train, val) from `split(fold_in(eval_key, step))`."""
    c = config
    keys = jax.random.split(jax.random.fold_in(eval_key, step))
    return [sample_batch(t, k, c.batch_size, c.max_context, accum=c.eval_iters) for t, k in zip(args, keys)]


class FusedFeed:
    """Every device holds the whole split; the compiled step samples its own windows (keys
    `fold_in(data_key, s)`; evaluation: `split(fold_in(eval_key, s))`)."""

    kind = "fused"

    def __init__(self, splits: Splits, config: Config, mesh: Any, data_key: PRNGKeyArray, eval_key: PRNGKeyArray):
        self.config, self.data_key, self.eval_key = config, data_key, eval_key
        self.train_tokens = sharding.replicate(np.asarray(splits.train.array()), mesh)
        self.val_tokens = sharding.replicate(np.asarray(splits.val.array()), mesh)
        self.sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

    def start(self, step: int, total: int) -> None:
        pass

    def close(self) -> None:
        pass

    def train_arg(self, step: int) -> Any:
        return self.train_tokens

    def eval_args(self, step: int) -> tuple[Any, Any]:
        return self.train_tokens, self.val_tokens

    def train_batch(self, tokens: Any, step: Any) -> Any:  # traced inside the step
        return fused_train_batch(tokens, self.data_key, step, self.config)

    def eval_batches(self, args: tuple[Any, Any], step: Any) -> list[Any]:  # traced
        return fused_eval_batches(args, self.eval_key, step, self.config)


class HostFeed:
    """Batches read on the host from the streams (this process's rows only) and placed ahead
    of the step by a `Prefetcher`; window starts from `draw_starts` (see the module docstring)."""

    kind = "host"

    def __init__(self, splits: Splits, config: Config, mesh: Any, data_key: PRNGKeyArray, eval_key: PRNGKeyArray,
                 on_read: Callable[[str, int, slice, np.ndarray], None] | None = None, depth: int = 2):
        self.splits, self.config, self.mesh, self.depth = splits, config, mesh, depth
        self.data_key, self.eval_key = philox_key(data_key), philox_key(eval_key)
        self.on_read = on_read
        self.sharding = sharding.batch_sharding(mesh, 1)
        self._prefetch: Prefetcher | None = None

    def _read(self, which: str, stream: TokenStream, key: np.ndarray, step: int, stream_id: int, n: int) -> Any:
        c = self.config
        starts = draw_starts(key, step, stream_id, (n, c.batch_size), len(stream) - c.max_context)
        hook = None if self.on_read is None else (lambda rows, s: self.on_read(which, step, rows, s))
        return global_windows(stream, starts, c.max_context + 1, self.mesh, hook)

    def batch_at(self, step: int) -> Int[Array, "accum batch window"]:
        """The training batch of `step` (accum, batch, max_context + 1), placed on the mesh."""
        return self._read("train", self.splits.train, self.data_key, step, TRAIN_STREAM, self.config.grad_accum)

    def start(self, step: int, total: int) -> None:
        self.close()
        self._prefetch = Prefetcher(self.batch_at, step, total, self.depth)

    def close(self) -> None:
        if self._prefetch is not None:
            self._prefetch.close()
            self._prefetch = None

    def train_arg(self, step: int) -> Any:
        return self._prefetch.get(step) if self._prefetch is not None else self.batch_at(step)

    def eval_args(self, step: int) -> tuple[Any, Any]:
        n = self.config.eval_iters
        return (self._read("eval_train", self.splits.train, self.eval_key, step, EVAL_TRAIN_STREAM, n),
                self._read("eval_val", self.splits.val, self.eval_key, step, EVAL_VAL_STREAM, n))

    def train_batch(self, batch: Any, step: Any) -> Any:  # traced: the batch is already made
        return batch

    def eval_batches(self, args: tuple[Any, Any], step: Any) -> list[Any]:
        return list(args)


class MemberBatches:
    """The host feed of a population (train/population.py): member k's windows are exactly those
    `HostFeed(splits, config, mesh, data_keys[k], eval_keys[k])` makes for its step (the same
    `draw_starts` counters and keys), read whole in this process and stacked on a leading member
    axis, (N, n, batch, max_context + 1) int32, then `place`d (on the members' devices); chat
    data: `PackedFeed`'s packed bins, a pair (tokens, flags) of such arrays (`packed_batch`).
    Training batches are read and placed ahead by a `Prefetcher` over the population's
    iterations i: member k at step starts[k] + i."""

    kind = "host"

    def __init__(self, splits: Splits, config: Config, data_keys: list[PRNGKeyArray], eval_keys: list[PRNGKeyArray],
                 place: Callable[[np.ndarray], Any] = lambda x: x, depth: int = 2):
        self.splits, self.config, self.depth, self.place = splits, config, depth, place
        self.data_keys = [philox_key(k) for k in data_keys]
        self.eval_keys = [philox_key(k) for k in eval_keys]
        self._prefetch: Prefetcher | None = None
        self._starts: np.ndarray | None = None
        self._next = 0

    def _stack(self, split: str, keys: list[np.ndarray], steps: np.ndarray, stream_id: int,
               n: int) -> Any:  # placed: Int[Array, "members n batch window"], or a (tokens, flags) pair of them
        c = self.config
        if self.splits.train_flags is not None:
            pairs = [packed_batch(self.splits, split, key, int(s), stream_id, (n, c.batch_size))
                     for key, s in zip(keys, steps)]
            return tuple(self.place(np.stack([p[i] for p in pairs]).astype(np.int32)) for i in range(2))
        stream = self.splits.train if split == "train" else self.splits.val
        return self.place(np.stack([read_batch(stream, key, int(s), stream_id, (n, c.batch_size), c.max_context)
                                    for key, s in zip(keys, steps)]).astype(np.int32))

    def train_batches(self, steps: np.ndarray) -> Any:
        """Each member's training batch of its step `steps[k]`, placed."""
        return self._stack("train", self.data_keys, steps, TRAIN_STREAM, self.config.grad_accum)

    def eval_batches(self, steps: np.ndarray) -> tuple[Any, Any]:
        """Each member's evaluation batches (train, val) after `steps[k]` updates, placed."""
        n = self.config.eval_iters
        return (self._stack("train", self.eval_keys, steps, EVAL_TRAIN_STREAM, n),
                self._stack("val", self.eval_keys, steps, EVAL_VAL_STREAM, n))

    def start(self, steps: np.ndarray, total: int) -> None:
        """Read ahead from the members' `steps`, for as many iterations as the furthest behind needs."""
        self.close()
        self._starts, self._next = np.asarray(steps, np.int64), 0
        self._prefetch = Prefetcher(lambda i: self.train_batches(self._starts + i), 0,
                                    max(0, total - int(self._starts.min())), self.depth)

    def close(self) -> None:
        if self._prefetch is not None:
            self._prefetch.close()
            self._prefetch = None

    def train_arg(self, steps: np.ndarray, active: np.ndarray) -> Any:
        """The batches of `steps` (inactive members' rows unused): read ahead when the active
        members are where `start` foresaw them, else read now."""
        if self._prefetch is not None and self._next < self._prefetch.stop:
            batches = self._prefetch.get(self._next)
            self._next += 1
            if np.array_equal((self._starts + self._next - 1)[active], np.asarray(steps)[active]):
                return batches
            self.close()
        return self.train_batches(np.asarray(steps))


def packed_windows(tokens: TokenStream, flags: TokenStream, packing: Packing, bins: Int[np.ndarray, "n batch"],
                   mesh: Any) -> tuple[Array, Array]:
    """The packed bins `bins` (n, batch) as two global int32 arrays (tokens, flags), each
    (n, batch, max_context + 1) split on axis 1 over `mesh`; this process reads only its rows."""
    n, batch = bins.shape
    blocks = {}
    for rows in distributed.local_rows(mesh, batch):
        blocks[rows.start, rows.stop] = read_bins(tokens, flags, packing, bins[:, rows])

    def fetch(which: int) -> Callable:
        def one(index: tuple[slice, ...]) -> np.ndarray:
            a, b, _ = index[1].indices(batch)
            return blocks[a, b][which][index[0], :, index[2]]
        return one

    shape, where = (n, batch, packing.window), sharding.batch_sharding(mesh, 1)
    return tuple(jax.make_array_from_callback(shape, where, fetch(i)) for i in range(2))


def packed_batch(splits: Splits, split: str, key: np.ndarray, step: int, stream_id: int, shape: tuple[int, int]
                 ) -> tuple[np.ndarray, np.ndarray]:
    """The packed batch of `step` of chat data's `split` ("train" / "val") read whole in this
    process: the bins `PackedFeed` draws (`draw_starts(key, step, stream_id, shape, bins)`),
    read and padded (packing.read_bins): (tokens, flags) int32, each (*shape, max_context + 1)."""
    packing = splits.packing[split]
    tokens, flags = (splits.train, splits.train_flags) if split == "train" else (splits.val, splits.val_flags)
    return read_bins(tokens, flags, packing, draw_starts(key, step, stream_id, shape, len(packing)))


class PackedFeed(HostFeed):
    """Chat data: each batch row is a packed bin of whole examples (data/packing.py), drawn
    uniformly with `draw_starts` like the host feed's windows (a pure function of seed and s),
    read on the host with its loss-mask flags: batches are (tokens, flags) pairs (train/step.py)."""

    kind = "packed"

    def batch_at(self, step: int) -> tuple[Array, Array]:
        """The training batch of `step`: (tokens, flags), each (accum, batch, max_context + 1)."""
        return self._read("train", self.splits.train, self.data_key, step, TRAIN_STREAM, self.config.grad_accum)

    def _read(self, which: str, stream: TokenStream, key: np.ndarray, step: int, stream_id: int, n: int) -> Any:
        c, split = self.config, ("train" if which == "train" or which == "eval_train" else "val")
        packing = self.splits.packing[split]
        flags = self.splits.train_flags if split == "train" else self.splits.val_flags
        bins = draw_starts(key, step, stream_id, (n, c.batch_size), len(packing))
        if self.on_read is not None:
            self.on_read(which, step, slice(0, c.batch_size), bins)
        return packed_windows(stream, flags, packing, bins, self.mesh)


def choose_feed(splits: Splits) -> str:
    """"host" for a prepared dataset or token arrays over FUSED_MAX_BYTES, else "fused"; chat
    data: "packed". A function of the data only (never of the devices), so a resumed run keeps its feed."""
    if splits.train_flags is not None:
        return "packed"
    small = splits.train.nbytes + splits.val.nbytes <= FUSED_MAX_BYTES
    return "fused" if small and not splits.prepared else "host"


def make_feed(kind: str, splits: Splits, config: Config, mesh: Any, data_key: PRNGKeyArray,
              eval_key: PRNGKeyArray) -> FusedFeed | HostFeed | PackedFeed:
    feed = {"fused": FusedFeed, "host": HostFeed, "packed": PackedFeed}[kind]
    return feed(splits, config, mesh, data_key, eval_key)

