"""Small digits (8×8) models and batches for the tests: an untrained small_cnn, a random batch, a saved teacher
file, and a robust model for the attack cross-checks.

The robust model is trained once per test process (a few seconds) by PGD adversarial training (Madry et al.)
with its own few-line PGD, independent of rkd_fast.attacks, so that the model under test does not depend on the
code under test."""

import contextlib
import functools

import torch
import torch.nn.functional as F

from rkd_fast.datasets import load_digits
from rkd_fast.model_file import save_model
from rkd_fast.models import build_model

EPS = 0.1  # L∞ radius used throughout the cross-checks (digits pixels in [0, 1])
# The cheapest training the tests run: a width-4 student, batches of 256 (digits' 1,257 training images in 5 steps),
# one attack step, no progress bars; as trainer options and as the same `rkd-fast train` flags.
FAST_TRAINING = {"width": 4, "batch_size": 256, "attack_steps": 1, "progress": False}
FAST_FLAGS = ["--width", "4", "--batch-size", "256", "--attack-steps", "1", "--no-progress"]


def tiny_cnn(seed=None, *, width=4, **kwargs):
    """small_cnn for 8×8 digits, width 4 unless asked, its weights drawn after torch.manual_seed(seed) when `seed`
    is given, from the global RNG as it stands otherwise."""
    if seed is not None:
        torch.manual_seed(seed)
    return build_model("small_cnn", width=width, **kwargs)


def digits_batch(n, *, seed=None, dtype=torch.float32):
    """n random 1×8×8 images in [0, 1] and labels of 10 classes, from a generator seeded with `seed`, or from the
    global RNG when it is None."""
    generator = None if seed is None else torch.Generator().manual_seed(seed)
    return (torch.rand(n, 1, 8, 8, generator=generator, dtype=dtype),
            torch.randint(0, 10, (n,), generator=generator))


def save_teacher(path, **kwargs):
    """A model file at `path` of small_cnn (width 4 unless `kwargs` say otherwise, seed 1): the untrained teacher
    of the training tests. Returns the path."""
    return save_model(tiny_cnn(1, **kwargs), path)


def _train_pgd(model, x, y, eps, alpha, steps, generator):
    x_adv = (x + torch.empty_like(x).uniform_(-eps, eps, generator=generator)).clamp(0, 1)
    for _ in range(steps):
        x_adv.requires_grad_(True)
        (grad,) = torch.autograd.grad(F.cross_entropy(model(x_adv), y), x_adv)
        x_adv = (x + (x_adv.detach() + alpha * grad.sign() - x).clamp(-eps, eps)).clamp(0, 1)
    return x_adv.detach()


@functools.lru_cache(maxsize=1)
def robust_digits_model(epochs=12, width=16, seed=0):
    """small_cnn (width 16) after `epochs` epochs of PGD-AT (eps 0.1, 5 steps of 0.03), in eval mode."""
    with one_thread():
        return _train(epochs, width, seed)


@contextlib.contextmanager
def one_thread():
    """One intra-op thread: on these tiny 8×8 models it is as fast as two on an idle machine and several
    times faster on a loaded one (no threads spinning at barriers)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _train(epochs, width, seed):
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    model = build_model("small_cnn", width=width)
    x, y = load_digits("train")
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=generator)
        for start in range(0, len(x), 128):
            index = order[start:start + 128]
            model.eval()  # craft the adversarials with frozen BN statistics, train on them in train mode
            x_adv = _train_pgd(model, x[index], y[index], EPS, 0.03, 5, generator)
            model.train()
            loss = F.cross_entropy(model(x_adv), y[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    return model.eval()
