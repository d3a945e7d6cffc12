"""Model definitions. Every model takes inputs in [0, 1] and returns logits: the input normalisation is
part of the model (an `InputNormalization` first layer), so attacks and the Jacobian term see raw pixels.

`build_model(arch, **kwargs)` builds a registered architecture by name; checkpoints store that name and the
keyword arguments (see `rkd_fast.checkpoint`)."""

import torch
from torch import nn

from .data import DIGITS_MEAN, DIGITS_STD

MODELS = {}


def register_model(name):
    def add(cls):
        MODELS[name] = cls
        return cls
    return add


def build_model(arch, **kwargs):
    if arch not in MODELS:
        raise ValueError(f"unknown architecture {arch!r}; available: {', '.join(sorted(MODELS))}")
    return MODELS[arch](**kwargs)


class InputNormalization(nn.Module):
    """(x - mean) / std per channel, as buffers so they follow the model's device and are saved with it."""

    def __init__(self, mean, std):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x):
        return (x - self.mean) / self.std


def _conv_block(c_in, c_out, batchnorm, pool):
    layers = [nn.Conv2d(c_in, c_out, 3, padding=1, bias=not batchnorm)]
    if batchnorm:
        layers.append(nn.BatchNorm2d(c_out))
    layers.append(nn.ReLU(inplace=True))
    if pool:
        layers.append(nn.MaxPool2d(2))
    return nn.Sequential(*layers)


@register_model("small_cnn")
class SmallCNN(nn.Module):
    """A small CNN for 8×8 digits: three 3×3 conv blocks (8×8 → 4×4 → 2×2) and a two-layer head.

    Feature maps worth distilling: ``block1`` (width, 8, 8), ``block2`` (2·width, 4, 4),
    ``block3`` (4·width, 2, 2)."""

    def __init__(self, num_classes=10, in_channels=1, width=32, batchnorm=True, mean=DIGITS_MEAN, std=DIGITS_STD):
        super().__init__()
        self.normalize = InputNormalization(mean, std)
        self.block1 = _conv_block(in_channels, width, batchnorm, pool=False)
        self.block2 = _conv_block(width, 2 * width, batchnorm, pool=True)
        self.block3 = _conv_block(2 * width, 4 * width, batchnorm, pool=True)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(4 * width * 4, 128), nn.ReLU(inplace=True),
                                  nn.Linear(128, num_classes))

    def forward(self, x):
        return self.head(self.block3(self.block2(self.block1(self.normalize(x)))))
