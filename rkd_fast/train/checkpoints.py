"""Training checkpoints: atomic writes, the last K kept, and loading the newest one that reads back whole.

A checkpoint is one ``torch.save``d dict of plain containers, numbers, strings and tensors, so
``torch.load(weights_only=True)`` reads it (RNG states included: stored as tensors and lists). Files are
``DIR/checkpoints/ckpt-<global step, 8 digits>.pt``; a save goes to a hidden temporary file in the same
directory, is fsync'd and then renamed, so a file with a checkpoint's name is always a complete write. Files
that fail to load anyway (truncated by a disk, edited by hand) are skipped with a warning in favour of the
previous one.
"""

import random
import re
import warnings
from pathlib import Path

import numpy as np
import torch

from ..model_file import atomic_save as _atomic_save
from ..model_source import load_weights_only

FORMAT = "rkd_fast.train_checkpoint"
VERSION = 1
CHECKPOINT_DIR = "checkpoints"
_NAME = re.compile(r"^ckpt-(\d{8})\.pt$")
_TMP_PREFIX = ".ckpt-"


def atomic_save(obj, path):
    """The model file's atomic write, with the temporary name that `latest_checkpoint` ignores and cleans up."""
    return _atomic_save(obj, path, tmp_prefix=_TMP_PREFIX)


def checkpoint_path(run_dir, global_step):
    return Path(run_dir) / CHECKPOINT_DIR / f"ckpt-{global_step:08d}.pt"


def list_checkpoints(run_dir):
    """[(global_step, path)] of the files named like checkpoints, newest first (temporary files ignored)."""
    directory = Path(run_dir) / CHECKPOINT_DIR
    if not directory.is_dir():
        return []
    found = []
    for entry in directory.iterdir():
        match = _NAME.match(entry.name)
        if match and entry.is_file():
            found.append((int(match.group(1)), entry))
    return sorted(found, reverse=True)


def save_checkpoint(run_dir, state, global_step, keep, files=None):
    """Writes `state` as the checkpoint of `global_step`, then deletes all but the newest `keep`. `files`: the
    run's rkd_fast.runfiles.RunFiles, which records the new file and its content, and removes an old one only while it
    holds what the run wrote."""
    path = checkpoint_path(run_dir, global_step)
    if files is None:
        atomic_save(state, path)
        for _, old in list_checkpoints(run_dir)[keep:]:
            old.unlink(missing_ok=True)
        return path
    files.written(atomic_save(state, files.add(path)))
    files.remove([p for _, p in list_checkpoints(run_dir)[keep:]])
    return path


def read_checkpoint(path):
    """The checked contents of a training checkpoint, on the CPU; ValueError when it is not one or does not load
    (truncated, damaged, another kind of file), naming it. A missing file stays a FileNotFoundError."""
    state = load_weights_only(path, "an rkd_fast training checkpoint")  # damage of any kind: a ValueError naming it
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ValueError(f"{path} is not an rkd_fast training checkpoint (no 'format': {FORMAT!r} entry)")
    if not isinstance(state.get("version"), int) or state["version"] > VERSION:
        raise ValueError(f"{path} has checkpoint version {state.get('version')!r}; this rkd_fast reads up to {VERSION}")
    return state


def load_latest(run_dir):
    """(state, path) of the newest checkpoint in `run_dir` that loads, or (None, None). Unreadable files are
    skipped with a warning."""
    for _, path in list_checkpoints(run_dir):
        try:
            return read_checkpoint(path), path
        except (ValueError, OSError) as error:
            warnings.warn(f"skipping checkpoint {path}: {error}", RuntimeWarning, stacklevel=2)
    return None, None


def remove_temporary_files(run_dir):
    """Deletes the temporary files interrupted saves left behind (never loaded, only clutter)."""
    for directory in (Path(run_dir), Path(run_dir) / CHECKPOINT_DIR):
        if directory.is_dir():
            for entry in directory.glob(f"{_TMP_PREFIX}*.tmp"):
                entry.unlink(missing_ok=True)


# --- RNG states, as tensors and plain lists -------------------------------------------------------------

def rng_state():
    version, state, gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": list(torch.cuda.get_rng_state_all()) if torch.cuda.is_available() else [],
        "python": {"version": version, "state": list(state), "gauss": gauss},
        "numpy": {"name": np_name, "keys": torch.from_numpy(np_keys.astype(np.int64)), "pos": int(np_pos),
                  "has_gauss": int(np_has_gauss), "gauss": float(np_gauss)},
    }


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        if len(state["cuda"]) != torch.cuda.device_count():
            warnings.warn(f"the checkpoint holds RNG states of {len(state['cuda'])} CUDA devices, this machine has "
                          f"{torch.cuda.device_count()}: restoring those that match", RuntimeWarning, stacklevel=2)
        for i, s in enumerate(state["cuda"][:torch.cuda.device_count()]):
            torch.cuda.set_rng_state(s, i)
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss"]))
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
