"""Where rkd_fast's random numbers come from: seeds derived from named keys, and per-sample draws.

``derive_seed(seed, *keys)`` is the one way a seed for some purpose (an epoch's order, a training step, an
attack of an evaluation batch) is made from the run's seed: a hash of the keys, so that no two purposes share a
stream by accident of arithmetic.

Per-sample draws. Every draw of rkd_fast that is one value (or one tensor slice) per sample of a batch, the
adversarial starts, the Jacobian term's directions, dropout masks, goes through `uniform`, `normal`, `bernoulli`
and `randint` here. Outside a training step they draw the given shape from the given generator (torch's global
one when None). Inside `per_sample_draws(rows, global_size, seed)`, which a training step under torchrun
enters, a draw for this process's share of the batch draws the whole global batch and keeps this process's
rows, so N processes see the numbers one process would (and a resumed run replays them, the generator being
seeded from the step); the generator is the one given, else the step's own.
"""

import contextlib
import contextvars
import hashlib
import numbers

import torch

_SEED_BITS = 63


def derive_seed(seed, *keys):
    """A 63-bit seed for the purpose named by `keys` (ints and strings) under the run's `seed`."""
    parts = []
    for key in (seed, *keys):
        if isinstance(key, bool) or not isinstance(key, (numbers.Integral, str)):
            raise TypeError(f"seed keys are ints or strings, got {key!r}")
        parts.append(f"{type(key).__name__}:{key}")
    digest = hashlib.sha256("\x1f".join(parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> (64 - _SEED_BITS)


def generator(seed, device="cpu"):
    """A torch.Generator on `device` seeded with `seed`."""
    return torch.Generator(device=device).manual_seed(int(seed))


class _Step:
    def __init__(self, rows, global_size, seed):
        self.rows, self.global_size, self.seed = rows, int(global_size), seed
        self._generators = {}

    def default_generator(self, device):
        device = torch.device(device)
        if device not in self._generators:
            self._generators[device] = generator(derive_seed(self.seed, "per-sample draws"), device)
        return self._generators[device]


_STEP = contextvars.ContextVar("rkd_fast_per_sample_step", default=None)


@contextlib.contextmanager
def per_sample_draws(rows, global_size, seed):
    """Inside: per-sample draws of this process's `rows` (its positions in a global batch of `global_size`
    samples) are those rows of the global batch's draw; draws that name no generator use one seeded by `seed`."""
    token = _STEP.set(_Step(torch.as_tensor(rows), global_size, seed))
    try:
        yield
    finally:
        _STEP.reset(token)


def _draw(fill, shape, generator, device, dtype):
    """`fill(tensor, generator)` on a new tensor of `shape` (shape[0]: samples), per-sample as described above."""
    step = _STEP.get()
    shape = tuple(shape)
    if step is None:
        return fill(torch.empty(shape, device=device, dtype=dtype), generator)
    generator = generator if generator is not None else step.default_generator(device)
    if not shape or shape[0] != len(step.rows) or step.global_size == len(step.rows):
        # one process, or not one row per sample of this process's share (a subset of it): drawn as asked
        return fill(torch.empty(shape, device=device, dtype=dtype), generator)
    full = fill(torch.empty((step.global_size, *shape[1:]), device=device, dtype=dtype), generator)
    return full[step.rows.to(full.device)]


def uniform(shape, low, high, *, generator=None, device="cpu", dtype=torch.float32):
    return _draw(lambda t, g: t.uniform_(low, high, generator=g), shape, generator, device, dtype)


def normal(shape, *, generator=None, device="cpu", dtype=torch.float32):
    return _draw(lambda t, g: t.normal_(generator=g), shape, generator, device, dtype)


def bernoulli(shape, p, *, generator=None, device="cpu", dtype=torch.float32):
    return _draw(lambda t, g: t.bernoulli_(p, generator=g), shape, generator, device, dtype)


def randint(low, high, shape, *, generator=None, device="cpu", dtype=torch.int64):
    return _draw(lambda t, g: t.random_(low, high, generator=g), shape, generator, device, dtype)


SEED_LIMIT = 2 ** 64  # torch's generators take seeds in [0, 2**64)


def check_seed(option, seed):
    """ValueError naming `option` for an int seed outside [0, 2**64)."""
    if isinstance(seed, numbers.Integral) and not 0 <= seed < SEED_LIMIT:
        raise ValueError(f"{option} must be in [0, 2**64) (torch's random generators take 64-bit seeds), "
                         f"got {seed}")
