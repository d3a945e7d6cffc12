"""The training loop: `train_model(config)` trains a student with one of the methods and returns a TrainResult.

Data: `rkd_fast.datasets.run_data` gives every data set the same way, a training loader and a val split. Digits
and CIFAR batches come from `rkd_fast.datasets.GPULoader`, which holds the split on the device (CIFAR: cropped and
flipped there; digits unaugmented); ImageNet batches are read from ``data_dir/train`` by DataLoader workers
(`rkd_fast.datasets.ImageFolderLoader`: random resized crop to ``image_size``, flip; pinned host memory) and
moved to the device (non_blocking) in the loop; synthetic-imagenet serves ``synthetic_batches`` steps of one
seeded random batch (`rkd_fast.datasets.SyntheticLoader`), to measure throughput. All have the same small
interface (``set_epoch(epoch, start_batch)``, iteration, ``len``, ``num_samples``), so the loop has one code
path. Validation is never augmented: digits' val split, CIFAR's held-out ``val_size`` train images, or a fixed
stratified ``val_size`` images (default 1000) of the ImageNet-shaped val split, attacked chunk by chunk.

Reproducibility and resumption: the batch order of an epoch and each sample's crop and flip are functions of
(seed, epoch, sample) alone (ImageNet's too, whatever the number of workers), the PGD
random starts of a step are seeded from (seed, global step), and a checkpoint holds everything else that
changes (weights, adapters, optimizer, LR scheduler, loss scaler, RNG states, position within the epoch,
metrics so far). A run resumed from any checkpoint therefore replays the same batches and, with
``deterministic=True``, ends with bit-identical weights to a run that was never interrupted.

Data parallel (`torchrun --nproc_per_node=N -m rkd_fast train ...`, see `distributed`): ``--batch-size`` is per
process, a step takes the next global batch of ``N·batch_size`` samples and rank r its ``[r::N]`` share,
gradients are averaged by DDP, per-sample randomness comes from (seed, step, position in the global batch),
rank 0 writes the files, and the position is counted in global batches, so a checkpoint resumes under any N
with the same global batch.

Files in ``out`` (when given): run.json (metadata), metrics.csv and metrics.json (per epoch),
checkpoints/ckpt-<step>.pt (the last ``keep``), best.pt (the checkpoint of the best robust validation
accuracy). `rkd-fast export` turns best.pt (or any checkpoint) into a model file.
"""

import math
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .. import seeding, teachers
from ..datasets import GPULoader, run_data
from ..model_source import arch_kwargs, build_architecture, check_model
from ..precision import autocast_factory, resolve_device, resolve_precision
from ..runfiles import TENSORBOARD_EVENTS
from . import checkpoints, distributed, tensorboard
from .config import TrainConfig, make_config, run_metadata
from .health import LossHealth, finite_or_raise
from .methods import build_method
from .run_dir import (check_out_dir, check_resume_config, check_resume_inputs, input_hashes, lock_out_dir,
                      start_run_files, write_metrics)
from .runtime import restore_determinism, seed_everything, set_determinism
from .schedule import lr_lambda
from .validation import robust_accuracy

LOG_EVERY = 10  # steps between progress-bar updates (each reads the running losses back to the host)


@dataclass
class TrainResult:
    metrics: list  # one dict per epoch (see metrics.csv)
    model: nn.Module  # the student after the last epoch, eval mode
    best_model: nn.Module | None  # the student of the best robust validation accuracy (None if never evaluated)
    best: dict  # {"epoch", "val_clean_acc", "val_robust_acc"} of best_model, or {}
    train_seconds: float  # time in training steps (evaluation and checkpointing excluded)
    out: Path | None
    config: TrainConfig
    rank: int = 0  # this process's rank under torchrun (0 in a single process)
    world_size: int = 1


def train_model(config=None, *, tensorboard=False, **overrides):
    """Trains as `rkd-fast train` does. `config`: a TrainConfig or a dict of its fields; keyword arguments
    override. ``tensorboard``: also log each epoch's metrics to OUT/tensorboard (rkd_fast.train.tensorboard).
    Returns a TrainResult (metrics, trained model, best model, train seconds)."""
    return Run(make_config(config, **overrides), tensorboard=tensorboard).run()


def load_run_teacher(cfg, info, device):
    """The run's teacher (rkd_fast.teachers.load_teacher), checked against the data set; a missing file is bad
    input like any other option (ValueError)."""
    try:
        return teachers.load_teacher(cfg.teacher, num_classes=info.num_classes, in_channels=info.in_channels,
                                     device=device, arch=cfg.teacher_arch, weights=cfg.teacher_weights, info=info)
    except (FileNotFoundError, ImportError) as error:  # a missing file, or a robustbench: spec without RobustBench
        raise ValueError(str(error)) from error


# --- the run -----------------------------------------------------------------------------------------------

def step_seed(seed, global_step):
    """Seed of a step's random draws (attack starts, directions, masks), handed to the method."""
    return seeding.derive_seed(seed, "step", global_step)


def _plain(value):
    if isinstance(value, torch.Tensor):
        return value.item()
    return value


class Run:
    """One training run: prepare() (checks, builds, creates the files), train(), close()."""

    def __init__(self, cfg, *, tensorboard=False):
        self.cfg = cfg
        self.tensorboard = tensorboard  # log each epoch's metrics to out/tensorboard (rkd_fast.train.tensorboard)
        self.tb_log = None
        self.lock = None  # rkd_fast.dirlock: --out's, held from _setup to close()
        self.rewrite_best = False  # a resume from the best epoch's checkpoint writes best.pt again

    # Everything that can refuse the run happens here, before a file is written.
    def _setup(self):
        cfg = self.cfg
        if self.tensorboard:
            if not cfg.out:
                raise ValueError("--tensorboard needs --out DIR (the events go to DIR/tensorboard)")
            tensorboard.summary_writer_class()  # installed, or a clear error now
        self.dist, self.device = distributed.setup(resolve_device(cfg.device), cfg.dist_timeout)
        world = self.dist.world_size
        self.dtype = resolve_precision(cfg.precision, self.device)
        distributed.check_sync_bn(cfg.sync_bn, self.device)
        if self.dist.is_main:  # one process per run directory; under torchrun rank 0 writes, and locks
            self.lock = lock_out_dir(cfg)
        self.resume_from = check_out_dir(cfg)
        self.inputs = input_hashes(cfg)
        if self.resume_from is not None:
            check_resume_config(self.resume_from[0], cfg, self.resume_from[1], world)
            check_resume_inputs(self.resume_from[0], self.inputs, self.resume_from[1])

        seed_everything(cfg.seed)
        # The loaders draw nothing from the global RNG seeded above.
        self.info, self.train_batches, self.val = run_data(cfg, self.device, self.dist)
        n = self.train_batches.num_samples
        if n == 0:
            raise ValueError(f"{cfg.dataset}: empty training split")
        info = self.info
        # The data set's classes, channels and normalisation; rkd_fast's ResNet-34/50 and MobileNetV2 take its stem
        # (224×224 inputs), torchvision's and timm's ViTs its input size (rkd_fast.model_source).
        self.model_kwargs = arch_kwargs(cfg.arch, info, width=cfg.width)
        # The student is initialised right after seeding: its initial weights depend on the seed alone (building
        # the teacher draws random numbers too, before its weights are loaded).
        student = build_architecture(cfg.arch, **self.model_kwargs).to(self.device)
        if cfg.sync_bn:  # before anything holds the BatchNorm modules (hooks, optimizer)
            student = nn.SyncBatchNorm.convert_sync_batchnorm(student)
        teacher = load_run_teacher(cfg, self.info, self.device) if cfg.teacher else None
        if cfg.channels_last:
            student = student.to(memory_format=torch.channels_last)
            if teacher is not None:
                teacher = teacher.to(memory_format=torch.channels_last)
        self.student, self.teacher = student, teacher

        self.autocast = autocast_factory(self.device, self.dtype)
        # The method reads the feature shapes from it (eval mode, no_grad): only its shape matters.
        example = self._layout(torch.zeros(2, info.in_channels, *info.input_size, device=self.device))
        check_model(student, example, info.num_classes, f"the student {cfg.arch}")
        if teacher is not None:
            check_model(teacher, example, info.num_classes, f"the teacher {cfg.teacher}")
        self.method = build_method(cfg, student, teacher, example, self.autocast).to(self.device)
        fixed_inputs = isinstance(self.train_batches, GPULoader) and not self.train_batches.augment
        self.precomputes = self.method.plan_precompute(fixed_inputs)
        if self.precomputes:
            self.train_batches.yield_indices = True
        self.eps, self.alpha = cfg.attack_eps(), cfg.validation_alpha()

        # A step takes the next global batch (batch_size per process) of the epoch order.
        self.global_batch = cfg.batch_size * world
        self.num_train = n
        self.replays = self.method.replays  # optimizer steps per batch (free-at's m)
        self.steps_per_epoch = math.ceil(n / self.global_batch) * self.replays
        if 0 < n % self.global_batch < world:
            raise ValueError(f"the epoch's last global batch has {n % self.global_batch} sample(s), fewer than the "
                             f"{world} processes: pick a --batch-size that leaves at least one sample per process")
        assert len(self.train_batches) * self.replays == self.steps_per_epoch  # every rank takes part in every step
        params = list(student.parameters()) + list(self.method.parameters())
        self.optimizer = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                                         weight_decay=cfg.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(cfg, self.steps_per_epoch))
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=cfg.precision == "fp16")
        self.health = LossHealth(cfg.max_bad_steps, self.device, self.dist)
        self.method.prepare_student(compile=cfg.compile, sync_bn=cfg.sync_bn, world_size=world)
        if cfg.compile:
            student.compile()  # in place: module names and state_dict keys stay as they are

    def _layout(self, x):
        return x.contiguous(memory_format=torch.channels_last) if self.cfg.channels_last and x.dim() == 4 else x

    def run(self):
        try:
            self.prepare()
            return self.train()
        finally:
            self.close()

    def prepare(self):
        """Checks the inputs and builds everything (raising ValueError/TypeError before any file is written),
        then creates the run's files. Sets the process's determinism flags until close()."""
        self._saved_flags = set_determinism(self.cfg.deterministic, resolve_device(self.cfg.device))
        self._setup()
        self._start_files()
        # Called once per step; under torchrun a DDP module (it broadcasts rank 0's weights on creation).
        self.step_module = distributed.wrap(self.student, self.method, self.dist, self.device)
        self.dist.barrier()  # rank 0 has made the run's files before any rank goes on

    def train(self):
        try:
            return self._loop()
        except RuntimeError as error:  # a collective that timed out: which rank stopped answering
            timeout = self.dist.timeout_error(error)
            if timeout is None:
                raise
            raise timeout from error

    def close(self):
        # Drops the loaders: the DataLoader workers of imagenet end with them.
        self.train_batches = self.val = None
        if getattr(self, "_saved_flags", None) is not None:
            restore_determinism(self._saved_flags)
            self._saved_flags = None
        if getattr(self, "dist", None) is not None:
            self.dist.close()
        if self.tb_log is not None:
            self.tb_log.close()
            self.tb_log = None
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    # --- files ---------------------------------------------------------------------------------------------

    def _start_files(self):
        cfg = self.cfg
        self.meta = run_metadata(cfg, self.device)
        self.meta["world_size"] = self.dist.world_size
        self.out = Path(cfg.out) if cfg.out else None
        self.writes = self.out is not None and self.dist.is_main  # under torchrun rank 0 writes the files
        self.history, self.best, self.best_state = [], {}, None
        self.position = {"epoch": 0, "step": 0, "global_step": 0}
        self.accum = {"sums": {}, "images": 0, "seconds": 0.0}
        self.train_seconds = 0.0
        if self.resume_from is not None:
            self._restore(*self.resume_from)
        if not self.writes:
            return
        self.files = start_run_files(cfg, self.out, self.meta, self.resume_from)
        if self.resume_from is not None:
            # What a stop between the checkpoint and the files written after it left out of date or missing.
            if self.rewrite_best:
                self.files.written(checkpoints.atomic_save(self.resume_from[0], self.files.add(self.out / "best.pt")))
            if self.history:
                write_metrics(self.files, self.meta, self.history, self.best, self.train_seconds)
        if self.tensorboard:
            if not (self.out / tensorboard.TENSORBOARD_DIR).exists():
                self.files.add_folder(self.out / tensorboard.TENSORBOARD_DIR, TENSORBOARD_EVENTS)
            self.tb_log = tensorboard.TensorBoardLog(self.out)

    def _restore(self, state, path):
        cfg = self.cfg
        self.student.load_state_dict(state["student"])
        self.method.load_state_dict(state["method"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if state["scaler"]:
            self.scaler.load_state_dict(state["scaler"])
        self.position = dict(state["position"])
        self.accum = {"sums": dict(state["epoch_accum"]["sums"]), "images": state["epoch_accum"]["images"],
                      "seconds": state["epoch_accum"]["seconds"]}
        # The saved sums are the whole job's: one rank carries them, so that summing the ranks counts them once.
        self.accum["sums"] = {k: v.to(self.device) * (1 if self.dist.is_main else 0)
                              for k, v in self.accum["sums"].items()}
        self.history = list(state["history"])
        self.best = dict(state["best"])
        self.train_seconds = float(state["train_seconds"])
        best_file = Path(cfg.out) / "best.pt"
        self.rewrite_best = False
        if self.best and self._best_epoch_end(state):
            # The checkpoint of the best epoch's end: the best model is its student, whatever best.pt holds (a
            # run stopped between the two writes left the previous best there).
            self.best_state = state["student"]
            self.rewrite_best = True
        elif self.best and best_file.exists():
            try:
                best = checkpoints.read_checkpoint(best_file)
                if best.get("best") != self.best:
                    raise ValueError(f"it holds epoch {best.get('best', {}).get('epoch')}, the checkpoint's best "
                                     f"is epoch {self.best['epoch']}")
                self.best_state = best["student"]
            except ValueError as error:
                warnings.warn(f"cannot read {best_file} ({error}); the best model is forgotten", RuntimeWarning)
                self.best = {}
        checkpoints.set_rng_state(state["rng"])  # last: nothing after this may draw random numbers

    @staticmethod
    def _best_epoch_end(state):
        position = state["position"]
        return position["step"] == 0 and state["best"].get("epoch") == position["epoch"]

    def _state(self):
        finite_or_raise(self.student.state_dict(), f"the student after global step {self.position['global_step']}",
                        "refusing to write a checkpoint; the last one written is intact")
        return {
            "format": checkpoints.FORMAT,
            "version": checkpoints.VERSION,
            "config": self.cfg.to_dict(),
            "model": {"arch": self.cfg.arch, "kwargs": self.model_kwargs, "num_classes": self.info.num_classes},
            "dataset": self.info.name,
            "inputs": self.inputs,  # the input files' sha256: --resume refuses changed ones
            "eps": self.eps,
            "student": self.student.state_dict(),
            "method": self.method.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": checkpoints.rng_state(),
            # step counts global batches of global_batch samples: any world size with that global batch resumes
            "position": {**self.position, "global_batch": self.global_batch},
            "world_size": self.dist.world_size,
            "epoch_accum": {"sums": {k: v.detach().cpu() for k, v in self.accum["sums"].items()},
                            "images": self.accum["images"], "seconds": self.accum["seconds"]},
            "history": list(self.history),
            "best": dict(self.best),
            "train_seconds": self.train_seconds,
        }

    # --- the loop ------------------------------------------------------------------------------------------

    def _loop(self):
        from tqdm import tqdm

        cfg = self.cfg
        ctx = self.dist
        progress = cfg.progress and ctx.is_main
        first_epoch = self.position["epoch"]
        for epoch in range(first_epoch, cfg.epochs):
            self.student.train()
            self.method.train()
            first = self.position["step"]
            bar = tqdm(total=self.steps_per_epoch, initial=first, desc=f"epoch {epoch + 1}/{cfg.epochs}",
                       unit="step", disable=not progress, dynamic_ncols=True, leave=True)
            # Seconds of training in this epoch: the clock excludes checkpoint writes; `base` carries the
            # seconds of a resumed epoch's earlier part.
            base, started, paused = self.accum["seconds"], time.perf_counter(), 0.0
            if self.precomputes and epoch == first_epoch:  # in the clock: part of the training's cost
                self.method.precompute((self._layout(x), y) for x, y in self.train_batches.in_order(cfg.batch_size))
            for step, x, y, size, indices in self._epoch_steps(epoch, first):
                self._step(x, y, size, indices)
                self.position.update(step=step + 1, global_step=self.position["global_step"] + 1)
                bar.update(1)
                last_step = step + 1 == self.steps_per_epoch
                if (step + 1) % LOG_EVERY == 0 or last_step:
                    self.health.check()  # a collective too: every rank stops at the same step
                    if cfg.progress:
                        self._reduce_accum()  # a collective: every rank takes part, rank 0 shows it
                        bar.set_postfix(self._postfix(base + time.perf_counter() - started - paused))
                if self.out and cfg.ckpt_every and self.position["global_step"] % cfg.ckpt_every == 0 and not last_step:
                    # Mid-epoch checkpoint (an epoch's last step is covered by the epoch-end one).
                    self.health.check()
                    self._sync()
                    now = time.perf_counter()
                    self.accum["seconds"] = base + now - started - paused
                    self._reduce_accum()
                    if self.writes:
                        checkpoints.save_checkpoint(self.out, self._state(), self.position["global_step"], cfg.keep,
                                                    self.files)
                    ctx.barrier()  # no rank runs ahead of a checkpoint being written
                    paused += time.perf_counter() - now
            bar.close()
            self._sync()
            self.accum["seconds"] = base + time.perf_counter() - started - paused
            self._end_epoch(epoch)
        return self._result()

    def _epoch_steps(self, epoch, first):
        """(step, x, y, global batch size, the samples' indices or None) of each optimizer step of `epoch` from its
        step `first` (a resumed epoch skips the steps done): each batch serves `replays` consecutive steps
        (free-at's; 1 otherwise). The indices come with the batch when the method precomputes per sample."""
        m, batch = self.replays, self.global_batch
        self.train_batches.set_epoch(epoch, start_batch=first // m)
        step = first
        for index, (x, y, *indices) in enumerate(self.train_batches, start=first // m):
            indices = indices[0] if indices else None
            size = min(batch, self.num_train - index * batch)  # the global batch; (x, y) is this rank's share
            # imagenet's batches come from the host (pinned); the others are on the device already.
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            x = self._layout(x)
            while step < (index + 1) * m:
                yield step, x, y, size, indices
                step += 1

    def _step(self, x, y, global_size, indices=None):
        """One optimizer step on this rank's share (x, y) of a global batch of `global_size` samples (`indices`:
        their positions in the split, for a method that precomputes per sample)."""
        ctx, seed = self.dist, step_seed(self.cfg.seed, self.position["global_step"])
        # Per-sample random draws come from (seed, step, position in the global batch): any world size
        # draws the same numbers for a sample (rkd_fast.seeding).
        with seeding.per_sample_draws(ctx.rows(global_size), global_size, seed):
            total, terms = self.step_module(x, y, seed, indices)
        if x.shape[0] * ctx.world_size != global_size:
            # Shares of a short last batch differ in size: weigh each rank's mean by its share of the batch,
            # so that DDP's average of the gradients is the gradient of the global batch's mean.
            total = total * (x.shape[0] * ctx.world_size / global_size)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(total).backward()
        if self.health.record(self.position["global_step"], total, terms):
            self.scaler.step(self.optimizer)
            self.scaler.update()
        self.scheduler.step()
        if self.health.skipped_last:
            return  # a tolerated bad step: no update, and its losses stay out of the epoch's means
        sums, size = self.accum["sums"], x.shape[0]
        for name, value in terms.items():  # running sums stay on the device: no sync per step
            sums[name] = sums[name] + value * size if name in sums else value * size
        self.accum["images"] += global_size  # the job's images: sums hold this rank's part until _reduce_accum

    def _reduce_accum(self, everywhere=False):
        """Sums the ranks' running loss sums onto rank 0 (the others restart from zero, unless `everywhere`:
        at an epoch's end, where the sums are reset after), so that rank 0's sums over accum["images"] are the
        job's means. Nothing to do in a single process."""
        sums = self.accum["sums"]
        if not self.dist.enabled or not sums:
            return
        names = sorted(sums)
        total = self.dist.all_reduce_sum(torch.stack([sums[k].float() for k in names]))
        keep = 1.0 if self.dist.is_main or everywhere else 0.0
        self.accum["sums"] = {k: total[i] * keep for i, k in enumerate(names)}

    def _postfix(self, seconds):
        images = max(self.accum["images"], 1)
        postfix = {name: f"{(value / images).item():.4f}" for name, value in self.accum["sums"].items()}
        postfix["img/s"] = f"{self.accum['images'] / max(seconds, 1e-9):.0f}"
        postfix["lr"] = f"{self.scheduler.get_last_lr()[0]:.4g}"
        return postfix

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _end_epoch(self, epoch):
        cfg = self.cfg
        self.health.check()
        self._reduce_accum(everywhere=True)
        images = max(self.accum["images"], 1)
        row = {"epoch": epoch + 1, "lr": self.scheduler.get_last_lr()[0]}
        row.update({f"train_{name}": (value / images).item() for name, value in self.accum["sums"].items()})
        row["train_seconds"] = self.accum["seconds"]
        row["images_per_s"] = self.accum["images"] / max(self.accum["seconds"], 1e-9)
        self.train_seconds += self.accum["seconds"]
        row["val_clean_acc"] = row["val_robust_acc"] = None
        if (epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs:
            t = time.perf_counter()
            clean, robust = self._validate()
            row.update(val_clean_acc=clean, val_robust_acc=robust, eval_seconds=time.perf_counter() - t)
            improved = not self.best or robust > self.best["val_robust_acc"]
            if improved:
                self.best = {"epoch": epoch + 1, "val_clean_acc": clean, "val_robust_acc": robust}
                self.best_state = {k: v.detach().clone() for k, v in self.student.state_dict().items()}
        else:
            improved = False
        self.history.append({k: _plain(v) for k, v in row.items()})
        self.position = {"epoch": epoch + 1, "step": 0, "global_step": self.position["global_step"]}
        self.accum = {"sums": {}, "images": 0, "seconds": 0.0}
        if self.writes:
            state = self._state()
            # The checkpoint first: one that records a best epoch holds that epoch's student, so a run stopped
            # before best.pt was written rewrites it on --resume (_restore).
            checkpoints.save_checkpoint(self.out, state, self.position["global_step"], cfg.keep, self.files)
            if improved:
                self.files.written(checkpoints.atomic_save(state, self.files.add(self.out / "best.pt")))
            write_metrics(self.files, self.meta, self.history, self.best, self.train_seconds)
            if self.tb_log is not None:
                self.tb_log.log_epoch(self.history[-1])
        self.dist.barrier()
        if cfg.progress and self.dist.is_main:
            shown = {k: (f"{v:.4f}" if isinstance(v, float) else v) for k, v in self.history[-1].items()}
            print(" ".join(f"{k}={v}" for k, v in shown.items()), flush=True)

    def _validate(self):
        """(clean, PGD accuracy) of the student on the val split (every rank gets the job's result)."""
        cfg = self.cfg
        options = {"eps": self.eps, "alpha": self.alpha, "steps": cfg.attack_steps, "precision": cfg.precision,
                   "autocast": self.autocast, "seed": cfg.seed, "ctx": self.dist}
        return robust_accuracy(self.student, self.val, device=self.device, channels_last=cfg.channels_last, **options)

    def _result(self):
        self.student.eval()
        best_model = None
        if self.best_state is not None:
            best_model = build_architecture(self.cfg.arch, **self.model_kwargs).to(self.device)
            best_model.load_state_dict(self.best_state)
            best_model.eval()
        return TrainResult(metrics=list(self.history), model=self.student, best_model=best_model, best=dict(self.best),
                           train_seconds=self.train_seconds, out=self.out, config=self.cfg, rank=self.dist.rank,
                           world_size=self.dist.world_size)


