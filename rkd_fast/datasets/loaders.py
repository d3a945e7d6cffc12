"""Batches of a split, sharded across the ranks of a job the way `torch.utils.data.DistributedSampler` does:
`GPULoader` (a split held on the device), `ShardSampler` (the order of a DataLoader's samples), and `ValSet`/
`TensorValSet` (a val split served in chunks to the robust validation).

The epoch's order is a permutation drawn from ``(seed, epoch)`` alone and split ``perm[rank::world_size]``, so
the ranks' batches ``k``, interleaved, are exactly batch ``k`` of a single process whose batch size is
``world_size`` times larger, whatever the device.
"""

import torch

from .. import seeding


# --- sharding ----------------------------------------------------------------------------------------------

def _epoch_generator(seed, epoch):
    # One CPU stream per (seed, epoch), the same on every rank and device: the epoch order of every loader.
    return seeding.generator(seeding.derive_seed(int(seed), "epoch", int(epoch)))


def _shard(order, rank, world_size, batch_size, drop_last):
    """This rank's slice of the epoch order. drop_last: keep only complete global batches (batch_size ·
    world_size samples); otherwise every sample exactly once, so shards may differ by one sample."""
    if drop_last:
        order = order[: len(order) // (batch_size * world_size) * batch_size * world_size]
    return order[rank::world_size]


def check_sharding(batch_size, rank, world_size):
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be a positive int, got {world_size!r}")
    if not isinstance(rank, int) or not 0 <= rank < world_size:
        raise ValueError(f"rank must be an int in [0, {world_size}), got {rank!r}")


def distributed_defaults(rank, world_size):
    # None: take them from the initialised process group, or a single process.
    import torch.distributed as dist

    initialised = dist.is_available() and dist.is_initialized()
    if rank is None:
        rank = dist.get_rank() if initialised else 0
    if world_size is None:
        world_size = dist.get_world_size() if initialised else 1
    return rank, world_size


# --- training batches --------------------------------------------------------------------------------------

class GPULoader:
    """Serves a whole split held on `device` (CUDA, or CPU for tests): no DataLoader workers, no host copies.

    Images are stored once as given (uint8, scaled by 1/255 on the way out, or float already in [0, 1]) in
    channels_last. Each batch is cropped and flipped by one gather on the device: a random H×W window of
    the image padded by `pad` pixels on each side (``padding="reflect"``: mirrored without repeating the edge,
    like ``torch.nn.functional.pad(mode="reflect")``; ``"zero"``: black), then a horizontal flip with
    probability 1/2. The standard CIFAR augmentation (pad 4, random crop, flip); off when ``augment=False`` (digits'
    training batches: shuffled, never cropped or flipped).

    Shuffling, crop offsets and flips come from a CPU generator seeded by ``(seed, epoch)`` and are indexed by
    sample, so a sample's augmentation does not depend on the rank, world size or device.

    With ``yield_indices`` set, each batch comes as ``(x, y, indices)``: the samples' positions in the split, for
    a step that looks up something computed per sample beforehand (`in_order` serves the split for it)."""

    def __init__(self, x, y, batch_size, *, augment=True, shuffle=None, drop_last=None, seed=0, pad=4,
                 padding="reflect", rank=None, world_size=None, device=None, dtype=torch.float32,
                 channels_last=True):
        rank, world_size = distributed_defaults(rank, world_size)
        check_sharding(batch_size, rank, world_size)
        if x.ndim != 4 or y.ndim != 1 or len(x) != len(y):
            raise ValueError(f"expected x (N, C, H, W) and y (N,), got {tuple(x.shape)} and {tuple(y.shape)}")
        if x.dtype != torch.uint8 and not x.is_floating_point():
            raise TypeError(f"x must be uint8 or floating point, got {x.dtype}")
        if padding not in ("reflect", "zero"):
            raise ValueError(f"padding must be 'reflect' or 'zero', got {padding!r}")
        if not isinstance(pad, int) or pad < 0 or (padding == "reflect" and pad >= min(x.shape[2:])):
            raise ValueError(f"pad must be a non-negative int (below the image size for reflect padding), got {pad!r}")
        device = torch.device(device) if device is not None else x.device
        self.x = x.to(device).contiguous(memory_format=torch.channels_last)
        self.y = y.to(device=device, dtype=torch.int64)
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.augment, self.pad, self.padding = augment, pad, padding
        self.shuffle = augment if shuffle is None else shuffle
        self.drop_last = augment if drop_last is None else drop_last
        self.seed, self.dtype, self.channels_last = seed, dtype, channels_last
        self.epoch, self.start_batch = 0, 0
        self.yield_indices = False

    @property
    def num_samples(self):
        return len(self.y)

    def set_epoch(self, epoch, start_batch=0):
        """The next iteration serves epoch `epoch`, from its batch `start_batch` (a resumed run's position)."""
        if not 0 <= start_batch <= len(self):
            raise ValueError(f"start_batch must be in [0, {len(self)}], got {start_batch}")
        self.epoch, self.start_batch = int(epoch), int(start_batch)

    def _plan(self):
        """(this rank's sample indices in order, per-sample crop offsets (N, 2), per-sample flips (N,))."""
        n = self.num_samples
        gen = _epoch_generator(self.seed, self.epoch)
        order = torch.randperm(n, generator=gen) if self.shuffle else torch.arange(n)
        offsets = torch.randint(0, 2 * self.pad + 1, (n, 2), generator=gen)
        flips = torch.randint(0, 2, (n,), generator=gen, dtype=torch.bool)
        return _shard(order, self.rank, self.world_size, self.batch_size, self.drop_last), offsets, flips

    def __len__(self):
        n = len(_shard(torch.arange(self.num_samples), self.rank, self.world_size, self.batch_size, self.drop_last))
        return -(-n // self.batch_size)

    def _source_index(self, offset, flip, size):
        """Index (B, size) into the unpadded image for each output row/column, and whether it hits padding."""
        pos = torch.arange(size, device=offset.device)
        pos = torch.where(flip[:, None], size - 1 - pos, pos) if flip is not None else pos.expand(len(offset), -1)
        src = offset[:, None] - self.pad + pos
        if self.padding == "reflect":
            src = src.abs()  # -k -> k
            src = torch.where(src > size - 1, 2 * (size - 1) - src, src)  # size-1+k -> size-1-k
            return src, None
        inside = (src >= 0) & (src < size)
        return src.clamp(0, size - 1), inside

    def _batch(self, index, offsets, flips):
        x_nhwc = self.x.permute(0, 2, 3, 1)  # a view: x is channels_last
        _, h, w, _ = x_nhwc.shape
        if self.augment:
            rows, row_in = self._source_index(offsets[index, 0], None, h)
            cols, col_in = self._source_index(offsets[index, 1], flips[index], w)
            out = x_nhwc[index[:, None, None], rows[:, :, None], cols[:, None, :]]  # (B, H, W, C)
            if row_in is not None:  # zero padding: blank the pixels that came from outside the image
                out = out * (row_in[:, :, None] & col_in[:, None, :])[..., None].to(out.dtype)
        else:
            out = x_nhwc[index]
        out = out.permute(0, 3, 1, 2)  # NCHW view of NHWC memory: channels_last
        out = out.to(self.dtype) / 255 if self.x.dtype == torch.uint8 else out.to(self.dtype)
        if not self.channels_last:
            out = out.contiguous()
        return (out, self.y[index], index) if self.yield_indices else (out, self.y[index])

    def __iter__(self):
        # The epoch's plan goes to the device once, so the batches below never wait on a host copy.
        order, offsets, flips = (t.to(self.x.device) for t in self._plan())
        start = self.start_batch
        self.start_batch = 0  # a resume offset applies to one pass only
        for b in range(start, len(self)):
            yield self._batch(order[b * self.batch_size:(b + 1) * self.batch_size], offsets, flips)

    def in_order(self, batch_size):
        """Every sample of the split once (not only this rank's), in index order, as the training batches serve
        it: ``(x, y)`` batches of ``batch_size``. Only for an unaugmented split, whose batches are a function of
        the samples alone."""
        if self.augment:
            raise ValueError("the training batches are cropped and flipped anew each epoch: a sample has no one "
                             "input to compute anything from beforehand")
        check_sharding(batch_size, 0, 1)
        n = self.num_samples
        for start in range(0, n, batch_size):
            index = torch.arange(start, min(start + batch_size, n), device=self.x.device)
            yield self._batch(index, None, None)[:2]


class ShardSampler(torch.utils.data.Sampler):
    """`DistributedSampler`'s sharding with `GPULoader`'s order (same (seed, epoch) permutation) and a
    ``start_batch`` so a resumed run skips, without loading, the batches it already did."""

    def __init__(self, num_samples, batch_size, *, shuffle=True, drop_last=True, seed=0, rank=0, world_size=1):
        check_sharding(batch_size, rank, world_size)
        self.num_samples, self.batch_size, self.shuffle, self.drop_last = num_samples, batch_size, shuffle, drop_last
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.epoch, self.start_batch = 0, 0

    def set_epoch(self, epoch, start_batch=0):
        self.epoch, self.start_batch = int(epoch), int(start_batch)

    def _indices(self):
        n = self.num_samples
        order = torch.randperm(n, generator=_epoch_generator(self.seed, self.epoch)) if self.shuffle else torch.arange(n)
        return _shard(order, self.rank, self.world_size, self.batch_size, self.drop_last)

    def __len__(self):
        return max(0, len(self._indices()) - self.start_batch * self.batch_size)

    def __iter__(self):
        return iter(self._indices()[self.start_batch * self.batch_size:].tolist())


# --- val splits --------------------------------------------------------------------------------------------

class _ChunkedSplit:
    """A val split served in chunks for the robust validation: chunk c holds the split's samples ``[c·size,
    (c+1)·size)``; rank r of N evaluates chunks r, r + N, ... (`chunks`). ``chunk_size``: the size `chunks` uses
    when given none (the trainer's)."""

    def __init__(self, chunk_size):
        self.chunk_size = chunk_size

    def _starts(self, size, rank, world_size):
        """(chunk size, the first sample of each of this rank's chunks)."""
        size = self.chunk_size if size is None else size
        if not isinstance(size, int) or size < 1:
            raise ValueError(f"the chunk size must be a positive int, got {size!r}")
        return size, range(rank * size, len(self), size * world_size)


class TensorValSet(_ChunkedSplit):
    """A val split held as tensors: x (N, C, H, W) float in [0, 1], y (N,) int64, on the device the model runs on."""

    def __init__(self, x, y, *, chunk_size=None):
        super().__init__(chunk_size)
        self.x, self.y = x, y

    def __len__(self):
        return len(self.y)

    def chunks(self, size=None, rank=0, world_size=1):
        """This rank's chunks as ``(start, x, y)``: start the position of the chunk's first sample in the split."""
        size, starts = self._starts(size, rank, world_size)
        for start in starts:
            yield start, self.x[start:start + size], self.y[start:start + size]


class ValSet(_ChunkedSplit):
    """A val split read from files: the samples `indices` (default: all) of the map-style `dataset` (items ``(x,
    y)``, x float (C, H, W) in [0, 1]), in that order, each chunk loaded by a DataLoader of `num_workers` workers
    started per pass."""

    def __init__(self, dataset, indices=None, *, chunk_size=None, num_workers=0, pin_memory=False):
        super().__init__(chunk_size)
        self.dataset = dataset
        self.indices = torch.arange(len(dataset)) if indices is None else torch.as_tensor(indices)
        self.num_workers, self.pin_memory = num_workers, pin_memory

    def __len__(self):
        return len(self.indices)

    def chunks(self, size=None, rank=0, world_size=1):
        """This rank's chunks as ``(start, x, y)``: start the position of the chunk's first sample in the subset,
        x (B, C, H, W) and y (B,) on the host."""
        size, starts = self._starts(size, rank, world_size)
        batches = [self.indices[s:s + size].tolist() for s in starts]
        # A generator of its own: the loader's seed draw leaves the process's RNG (the training's) alone.
        loader = torch.utils.data.DataLoader(self.dataset, batch_sampler=batches, pin_memory=self.pin_memory,
                                             num_workers=min(self.num_workers, len(batches)),
                                             generator=torch.Generator())
        for start, (x, y) in zip(starts, loader):
            yield start, x, y
