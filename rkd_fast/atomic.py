"""Files that a crash or a kill cannot leave half-written: each is written beside its path, synced, then renamed
over it, so the path holds either the old file or the new one."""

import json
import os
import tempfile
from pathlib import Path

import torch


def atomic_write(path, write, *, text=False, tmp_prefix=None):
    """Calls write(f) on a temporary file beside `path` (named `tmp_prefix`…`.tmp`; opened for text when `text`),
    then fsync, rename over `path`, fsync the directory: a crash leaves either the old file or the new one,
    never a partial one under `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=tmp_prefix or f".{path.name}.", suffix=".tmp")
    except OSError as error:  # named by the file asked for, not the temporary name
        raise OSError(error.errno, error.strerror, str(path)) from error
    try:
        # mkstemp makes the file 0600; give it the mode open() would (0666 less the umask), as users expect
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "w", newline="") if text else os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as error:
        Path(tmp).unlink(missing_ok=True)
        failure = _os_error(error)
        if failure is not None and (failure is not error or failure.filename is None):  # name the file
            raise OSError(failure.errno, failure.strerror or str(failure), str(path)) from error
        raise
    _fsync_dir(path.parent)
    return path


def _os_error(error):
    """The OSError behind `error`: itself, or the one a writer such as torch.save's reported as a RuntimeError
    ("[enforce fail at inline_container.cc...]", the OSError left as its context); None when there is none."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, OSError):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


def _umask():
    # Linux reports it without changing it (os.umask can only be read by setting it, which races other threads).
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_save(obj, path, *, tmp_prefix=None):
    """torch.save(obj) to `path` through `atomic_write`."""
    return atomic_write(path, lambda f: torch.save(obj, f), tmp_prefix=tmp_prefix)


def atomic_write_json(path, obj):
    """`obj` as indented JSON to `path` through `atomic_write`. Tensors become lists; anything else that JSON
    has no type for, its str()."""
    def write(f):
        json.dump(obj, f, indent=2, default=lambda o: o.tolist() if isinstance(o, torch.Tensor) else str(o))
        f.write("\n")
    return atomic_write(path, write, text=True)


def _fsync_dir(directory):
    # Makes the rename itself durable; not every platform lets a directory be opened for this.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
