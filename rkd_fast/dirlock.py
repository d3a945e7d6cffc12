"""One process per output directory: a run (train, demo, frontier, eval --out) holds an exclusive OS file lock on
``DIR/.rkd_fast.lock`` for its lifetime, taken before it writes anything else there.

The lock is `fcntl.flock`: the kernel releases it when the process ends, however it ends, so a SIGKILLed run never
leaves a stale lock (the file may stay behind, unlocked, holding the dead process's pid). A second process is
refused with one line naming the holder's pid."""

import errno
import functools
import os
from pathlib import Path

LOCK_FILE = ".rkd_fast.lock"

try:
    import fcntl
except ImportError:  # not POSIX: no lock (the rest of the run works as before)
    fcntl = None


class DirectoryInUse(ValueError):
    """Another process holds the directory's lock (a ValueError: the CLIs report it as bad input, exit 2)."""


class DirectoryLock:
    """A held lock; `release()` (or the end of a `with` block) unlocks it and removes the lock file and the
    folders `lock_directory` created, when nothing else was written into them."""

    def __init__(self, root, fd, created):
        self.root, self._fd, self._created = root, fd, created

    def release(self):
        if self._fd is None:
            return
        try:
            # Unlinked while still held: a process waiting on the old file checks, once it gets the lock, that
            # the file it locked is still the one at the path (lock_directory), so removing it here is safe.
            (self.root / LOCK_FILE).unlink(missing_ok=True)
            for folder in self._created:  # deepest first; only those left empty
                try:
                    folder.rmdir()
                except OSError:
                    break
        finally:
            os.close(self._fd)
            self._fd = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()


def check_out_path(out, option="--out"):
    """ValueError for an --out that cannot become a directory: a dangling symbolic link, or a path under a file."""
    out = Path(out)
    if out.is_symlink() and not out.exists():
        raise ValueError(f"{option} {out} is a symbolic link to {os.readlink(out)}, which does not exist")
    if out.exists() and not out.is_dir():
        raise ValueError(f"{option} {out} exists and is not a directory")
    for parent in out.parents:
        if parent.exists():
            if not parent.is_dir():
                raise ValueError(f"{option} {out}: {parent} is not a directory")
            break


def lock_directory(out, option="--out"):
    """Creates `out` (and missing parents) if needed and takes its lock; returns a DirectoryLock. Raises
    DirectoryInUse naming the holder's pid when another process holds it, ValueError when the directory cannot
    be made or locked (naming the path and the error)."""
    out = Path(out)
    check_out_path(out, option)
    created = []
    try:
        missing = [p for p in (out, *out.parents) if not p.exists()]
        for folder in reversed(missing):
            folder.mkdir()
            created.insert(0, folder)
    except OSError as error:
        _remove_empty(created)
        raise ValueError(f"{option} {out}: cannot create {error.filename or out}: {_reason(error)}") from error
    path = out / LOCK_FILE
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as error:
            _remove_empty(created)
            raise ValueError(f"{option} {out}: cannot write {path}: {_reason(error)}") from error
        if fcntl is None:
            break
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            holder = _read_pid(fd)
            os.close(fd)
            if error.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise ValueError(f"{option} {out}: cannot lock {path}: {_reason(error)}") from error
            raise DirectoryInUse(f"{option} {out} is in use by another rkd-fast process (pid {holder}); wait for it "
                                 f"to end or choose another {option}") from None
        try:  # the file locked must still be the one at the path (its holder may have removed it meanwhile)
            if os.fstat(fd).st_ino == os.stat(path).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return DirectoryLock(out, fd, created)


def _read_pid(fd):
    try:
        text = os.pread(fd, 32, 0).decode(errors="replace").strip()
    except OSError:
        text = ""
    return text or "unknown"


def _reason(error):
    name = errno.errorcode.get(error.errno, str(error.errno)) if error.errno else ""
    return f"{error.strerror or error} ({name})" if name else str(error.strerror or error)


def _remove_empty(folders):
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:
            break


def holding_lock(function):
    """Decorator: calls ``function(out, ...)`` holding the lock of the directory `out` (created if missing)."""
    @functools.wraps(function)
    def locked(out, *args, **kwargs):
        with lock_directory(out):
            return function(out, *args, **kwargs)
    return locked
