"""Where a result came from: the git commit and dirty flag of the checkout, the library versions, how the process
was started, the CPU model. Every JSON result and model file of rkd_fast records `provenance()`."""

import importlib.metadata
import os
import platform
import subprocess
import sys


def package_versions(names):
    """{distribution name: installed version, or None when it is not installed}."""
    versions = {}
    for name in names:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def git_commit():
    """(HEAD's commit, whether tracked files differ from it) of the checkout rkd_fast runs from, or (None, None)
    outside a git checkout."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                                timeout=10).stdout.strip()
        if not commit:
            return None, None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip() != ""
        return commit, dirty
    except (OSError, subprocess.SubprocessError):
        return None, None


def library_versions():
    """The versions every result file records: Python, torch (and its CUDA, cuDNN) and the libraries rkd_fast uses."""
    import torch

    versions = {"python": platform.python_version(), "torch": torch.__version__,
                "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version() if torch.cuda.is_available() else None}
    versions.update(package_versions(("rkd_fast", "numpy", "triton", "scikit-learn", "tqdm")))
    return versions


def provenance():
    """What every JSON result of rkd_fast records about where it came from: how the process was started, the git
    commit and the library versions."""
    commit, dirty = git_commit()
    return {"argv": [sys.executable] + sys.argv, "git_commit": commit, "git_dirty": dirty,
            "versions": library_versions()}


def cpu_model():
    """The CPU's model name (/proc/cpuinfo), else what platform knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
