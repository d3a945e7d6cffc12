"""The run directory: what --out may already hold, what --resume continues and --overwrite removes. Checked
before anything is written; a run records every file it writes (rkd_fast.runfiles)."""

import csv
import json
import os
import warnings
from pathlib import Path

from ..atomic import atomic_write, atomic_write_json
from ..dirlock import check_out_path, lock_directory
from ..runfiles import RunFiles, sha256
from . import checkpoints, rerun
from .config import RESUME_MAY_CHANGE, resolve_method_defaults


def check_out_dir(cfg):
    """Refuses an --out holding another run (its record of files, `rkd_fast.runfiles`) unless --resume or
    --overwrite, and a record that is not valid or a run.json without one always; other files there are not a
    run and are never touched. With --resume: the newest
    readable checkpoint, or None for a run that stopped before writing its first one (it starts over from
    scratch); an error when there is no run to resume."""
    if cfg.out is None:
        return None
    out = Path(cfg.out)
    _check_writable(out)
    files = RunFiles(out)
    files.names()  # a record that names anything outside the run's own files is refused before anything runs
    if not files.exists() and (out / "run.json").is_file():
        raise ValueError(f"--out {out} holds a run.json but no record of the run's files ({files.path}): not a run "
                         "this rkd_fast can resume or replace; choose another --out, or remove it by hand")
    holds_run = files.exists()
    # best.pt is written after its epoch's checkpoint: alone, it is from a run stopped before that checkpoint
    no_checkpoint = not checkpoints.list_checkpoints(out)
    if cfg.resume:
        state, path = checkpoints.load_latest(out)
        if state is not None:
            if (out / "run.json").exists():
                read_run_record(out / "run.json")  # the resume appends to it: refused now, not after the work
            return state, path
        if holds_run and no_checkpoint:
            return None  # stopped before its first checkpoint: nothing to continue, it starts over
        raise ValueError(f"--resume: no readable checkpoint in {out / checkpoints.CHECKPOINT_DIR}")
    if holds_run and not cfg.overwrite:
        if no_checkpoint:
            raise ValueError(f"--out {out} holds a run that stopped before its first checkpoint; pass --resume to "
                             "start it over from scratch, or --overwrite to replace it")
        raise ValueError(f"--out {out} holds another run; pass --resume to continue it or --overwrite to replace it")
    return None


def read_run_record(path):
    """The run.json at `path` as a dict; ValueError naming the file when it is not JSON or not an object."""
    try:
        record = json.loads(Path(path).read_text())
    except (UnicodeDecodeError, ValueError) as error:
        raise ValueError(f"{path} is not valid JSON ({error}): restore it, or start a new run") from error
    if not isinstance(record, dict):
        raise ValueError(f"{path} holds a JSON {type(record).__name__}, not a run's record (an object): restore "
                         "it, or start a new run")
    return record


def _check_writable(out):
    check_out_path(out)  # a directory, or a path that can become one
    for parent in (out, *out.parents):
        if parent.exists():
            if not os.access(parent, os.W_OK | os.X_OK):
                raise ValueError(f"--out {out}: cannot write in {parent} (permission denied or a read-only file "
                                 "system)")
            break


def lock_out_dir(cfg):
    """The lock of --out (rkd_fast.dirlock), taken before check_out_dir looks at what it holds, so that no other
    process can start, resume or replace the run in between; None without --out."""
    if cfg.out is None:
        return None
    _check_writable(Path(cfg.out))
    return lock_directory(cfg.out)


def check_resume_config(state, cfg, path, world_size):
    # A record written before a method resolved its defaults holds None where the run used them.
    saved, current = resolve_method_defaults(state["config"]), cfg.to_dict()
    # --batch-size is per process: a run may resume under another world size with the same global batch.
    saved_world = state.get("world_size", 1)
    differ = [f"{k}: checkpoint {saved.get(k)!r}, now {v!r}" for k, v in current.items()
              if k not in RESUME_MAY_CHANGE and k != "batch_size" and saved.get(k) != v]
    if saved["batch_size"] * saved_world != cfg.batch_size * world_size:
        differ.append(f"global batch: checkpoint {saved['batch_size'] * saved_world} ({saved['batch_size']} per "
                      f"process x {saved_world}), now {cfg.batch_size * world_size} ({cfg.batch_size} x "
                      f"{world_size}); with {world_size} process(es) pass --batch-size "
                      f"{saved['batch_size'] * saved_world / world_size:g}")
    if differ:
        raise ValueError(f"--resume from {path}: the run's options differ from the checkpoint's (resume with the "
                         f"same options, or start a new run): " + "; ".join(differ))


def _data_files(cfg):
    """The files the training data is read from, where the data set declares a fixed set (its DatasetSpec's
    `files`); [] for data sets embedded in a package, generated, or read from a folder tree."""
    from ..datasets import SPECS

    files = SPECS[cfg.dataset].files
    if files is None or (cfg.data_dir is None and SPECS[cfg.dataset].needs_data_dir):
        return []
    try:
        return [Path(p) for p in files("train", cfg.data_dir) if Path(p).is_file()]
    except FileNotFoundError:
        return []


def input_hashes(cfg):
    """The content hashes (sha256) of a run's input files, kept in its checkpoints: the teacher file, and the
    data set's files where it has a fixed set (`_data_files`)."""
    hashes = {}
    if cfg.teacher is not None and Path(cfg.teacher).is_file():
        hashes["teacher"] = sha256(cfg.teacher)
    for path in _data_files(cfg):
        hashes[f"data file {path.name}"] = sha256(path)
    return hashes


def check_resume_inputs(state, hashes, path):
    """ValueError naming each input file whose content differs from the one the checkpoint's run read (a
    checkpoint written before runs kept these hashes is not checked)."""
    saved = state.get("inputs")
    if saved is None:
        return
    changed = [name for name in sorted(set(saved) | set(hashes)) if saved.get(name) != hashes.get(name)]
    if changed:
        raise ValueError(f"--resume from {path}: the run's input files changed since it started ("
                         + ", ".join(f"{name}: sha256 {str(saved.get(name))[:12]}, now {str(hashes.get(name))[:12]}"
                                     for name in changed)
                         + "); resuming would not continue the same run: restore them, or start a new run")


def start_run_files(cfg, out, meta, resume_from):
    """Makes `out` a run's folder and writes its run.json (rank 0 only): replaces the old run's files for
    --overwrite (and for a --resume of a run that stopped before its first checkpoint, with a warning), and on a
    resume appends the resume to run.json. Returns the run's RunFiles."""
    restart = cfg.resume and resume_from is None  # a run that stopped before its first checkpoint
    if cfg.overwrite or restart:
        if restart:
            warnings.warn(f"--resume: {out} has no checkpoint yet; the run starts over from scratch",
                          RuntimeWarning, stacklevel=3)
        RunFiles(out).remove_all()
    out.mkdir(parents=True, exist_ok=True)
    files = RunFiles(out)
    checkpoints.remove_temporary_files(out)
    run_file = files.add(out / "run.json")
    if cfg.resume and not restart and run_file.exists():
        record = read_run_record(run_file)
        record.setdefault("resumes", []).append({"from": str(resume_from[1]), **{
            k: meta[k] for k in ("command", "git_commit", "git_dirty", "versions", "device")}})
    else:
        record = {**rerun.record_header(), **meta}  # the format `--config` checks
    files.written(atomic_write_json(run_file, record))
    return files


def write_metrics(files, meta, history, best, train_seconds):
    """metrics.csv (one row per epoch, the union of the epochs' columns) and metrics.json in the run's folder."""
    columns = []
    for row in history:
        columns += [k for k in row if k not in columns]

    def write_csv(f):
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(history)
    files.written(atomic_write(files.add(files.root / "metrics.csv"), write_csv, text=True))
    files.written(atomic_write_json(files.add(files.root / "metrics.json"),
                                    {**meta, "epochs": history, "best": best, "train_seconds": train_seconds}))
