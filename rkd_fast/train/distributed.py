"""Data-parallel training with torch.distributed: `torchrun --nproc_per_node=N -m rkd_fast train ...`.

One process per device. The process group is initialised from torchrun's environment (RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR, MASTER_PORT): NCCL on CUDA, gloo on CPU. ``--batch-size`` is per process, so a step's
global batch is ``batch_size × world_size`` samples: the step's slice ``order[step·G:(step+1)·G]`` of the
epoch order, of which rank ``r`` takes ``[r::world_size]`` (the sharding of `torch.utils.data.DistributedSampler`
and `rkd_fast.datasets`). The student and the method's own parameters (the feature adapters) are wrapped
together in one `DistributedDataParallel` module, called once per step, so one backward all-reduces (averages)
all their gradients. Each rank's loss is scaled by ``local_batch · world_size / global_batch``, so the
averaged gradient is the gradient of the global batch's mean loss even when a last, short batch splits
unevenly: for a model without BatchNorm, N processes of batch B compute the steps one process of batch N·B does.

Randomness of a step (attack starts, Jacobian directions, dropout masks in the Jacobian term) must not depend on
the world size either: every per-sample draw goes through `rkd_fast.seeding`, which inside the trainer's step
draws for the whole global batch and keeps this rank's rows.

Where N processes do not compute exactly what one does: BatchNorm normalises with each rank's own batch
statistics (``--sync-bn``, CUDA only, uses the global batch's; it cannot be combined with the robust-kd Jacobian
term); ``--jac-fraction < 1`` picks each rank's subset on its own; the robust validation attacks
chunks of ``max(batch_size, 256)`` samples (imagenet, synthetic-imagenet: ``batch_size``), so its random starts
follow the per-process batch size.
"""

import datetime
import os
import threading
import time

import torch
import torch.distributed as dist
from torch import nn

HEARTBEAT_KEY = "rkd_fast/heartbeat/"


class PeerTimeout(RuntimeError):
    """A collective waited --dist-timeout for another process: the message names the rank(s) that stopped."""


def env_world_size():
    """WORLD_SIZE set by torchrun (1 when not started by a launcher)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


class Distributed:
    """The process's place in the job: ``rank``, ``world_size``, ``local_rank``; collectives that do nothing
    in a single process."""

    def __init__(self, rank=0, world_size=1, local_rank=0, owns_group=False, timeout=None):
        self.rank, self.world_size, self.local_rank = rank, world_size, local_rank
        self.owns_group = owns_group  # this object initialised the process group, so close() destroys it
        self.timeout = timeout
        self._store, self._beating = None, None
        if self.enabled:
            self._start_heartbeat()

    def _start_heartbeat(self):
        """Each rank counts up its own key in the job's store, from a thread, about once a second: after a
        collective times out, the ranks whose count stands still are the ones that stopped (SIGSTOP, a dead host);
        torch's own timeout error does not say which."""
        try:
            self._store = dist.distributed_c10d._get_default_store()
        except Exception:  # a process group without a store: the error will not name the rank
            return
        self._beating = threading.Event()
        interval = self.heartbeat_interval

        def beat(store=self._store, key=f"{HEARTBEAT_KEY}{self.rank}", stop=self._beating):
            while not stop.wait(interval):
                try:
                    store.add(key, 1)
                except Exception:
                    return
        self._store.add(f"{HEARTBEAT_KEY}{self.rank}", 1)
        threading.Thread(target=beat, name="rkd_fast-heartbeat", daemon=True).start()

    @property
    def heartbeat_interval(self):
        return min(1.0, (self.timeout or 60.0) / 10)

    def stopped_ranks(self):
        """The ranks whose heartbeat did not move over three intervals (None when it cannot be told)."""
        if self._store is None:
            return None
        try:
            keys = [f"{HEARTBEAT_KEY}{r}" for r in range(self.world_size)]
            before = [self._store.add(k, 0) for k in keys]
            time.sleep(3 * self.heartbeat_interval)
            after = [self._store.add(k, 0) for k in keys]
        except Exception:
            return None
        return [r for r in range(self.world_size) if r != self.rank and after[r] == before[r]]

    def timeout_error(self, error):
        """The PeerTimeout for a collective's timeout `error` (torch's DistError, or gloo's RuntimeError
        "Timed out waiting ..."), None for any other error."""
        if not self.enabled or not (isinstance(error, getattr(dist, "DistError", ())) or
                                    "timed out" in str(error).lower() or "timeout" in str(error).lower()):
            return None
        stopped = self.stopped_ranks()
        who = (f"rank {', '.join(map(str, stopped))} stopped answering" if stopped else
               "another process stopped answering" if stopped is None else
               "every rank is alive, but they wait at different collectives")
        detail = " ".join(str(error).split())
        limit = f"--dist-timeout {self.timeout:g}s" if self.timeout is not None else "the process group's timeout"
        return PeerTimeout(f"rank {self.rank}: no answer within {limit}: {who} "
                           f"(torch: {detail[:200]})")

    @property
    def enabled(self):
        return self.world_size > 1

    @property
    def is_main(self):
        return self.rank == 0

    def barrier(self):
        if self.enabled:
            dist.barrier()

    def all_reduce_sum(self, tensor):
        """Sums `tensor` over the ranks, in place; returns it."""
        if self.enabled:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def rows(self, global_size):
        """Positions, within a global batch of `global_size` samples, of this rank's samples."""
        return torch.arange(self.rank, global_size, self.world_size)

    def close(self):
        if self._beating is not None:
            self._beating.set()
            self._beating = None
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()
        self.owns_group = False


def setup(device, timeout=None):
    """(Distributed, device of this process) for a run asked to use `device` (a torch.device).

    A single process (no torchrun, or WORLD_SIZE=1): nothing to set up. Under torchrun: CUDA runs use
    ``cuda:LOCAL_RANK`` (a plain "cuda" or "auto" device), and the process group is initialised from the
    environment, NCCL for CUDA and gloo for CPU, unless the caller already initialised one (then it is used
    and left to the caller). ``timeout``: seconds a collective waits for the other ranks (--dist-timeout)."""
    if dist.is_available() and dist.is_initialized():
        rank, world_size, owns = dist.get_rank(), dist.get_world_size(), False
        local_rank = int(os.environ.get("LOCAL_RANK", rank))
    else:
        world_size = env_world_size()
        if world_size == 1:
            return Distributed(), device
        if not dist.is_available():
            raise ValueError(f"WORLD_SIZE={world_size}, but this torch build has no torch.distributed")
        rank, local_rank, owns = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0")), True
    if device.type == "cuda":
        if device.index is not None and device.index != local_rank and world_size > 1:
            raise ValueError(f"--device {device}: under torchrun each process uses cuda:LOCAL_RANK (this one "
                             f"cuda:{local_rank}); pass --device cuda or auto")
        if local_rank >= torch.cuda.device_count():
            raise ValueError(f"LOCAL_RANK {local_rank}, but only {torch.cuda.device_count()} CUDA device(s) visible")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    elif device.type != "cpu":
        raise ValueError(f"distributed training runs on cuda or cpu devices, not {device.type}")
    if owns:
        backend = "nccl" if device.type == "cuda" else "gloo"
        kwargs = {"device_id": device} if device.type == "cuda" else {}
        if timeout is not None:
            kwargs["timeout"] = datetime.timedelta(seconds=timeout)
        dist.init_process_group(backend=backend, **kwargs)
    return Distributed(rank, world_size, local_rank, owns, timeout), device


def check_sync_bn(sync_bn, device):
    """ValueError when --sync-bn cannot work on `device` (a method may refuse it too: its prepare_student)."""
    if not sync_bn:
        return
    if device.type != "cuda":
        raise ValueError(f"--sync-bn needs CUDA devices: torch.nn.SyncBatchNorm synchronises GPU tensors only "
                         f"(this run is on {device.type}); drop --sync-bn")


class StepModule(nn.Module):
    """The student and the method as one module whose forward is a training step's loss: wrapped in
    `DistributedDataParallel`, the student's and the method's parameters (feature adapters) have their
    gradients averaged by one backward. (The method holds the student by reference only, so it is
    registered here as well.)"""

    def __init__(self, student, method):
        super().__init__()
        self.student = student
        self.method = method

    def forward(self, x, y, step_seed, indices=None):
        return self.method(x, y, step_seed) if indices is None else self.method(x, y, step_seed, indices)


def wrap(student, method, ctx, device):
    """The callable a step runs: ``step(x, y, step_seed[, indices]) -> (total, terms)``; DDP-wrapped when
    distributed."""
    module = StepModule(student, method)
    if not ctx.enabled:
        return module
    if not any(p.requires_grad for p in module.parameters()):
        raise ValueError("nothing to train: the student has no trainable parameters")
    device_ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(module, device_ids=device_ids)
