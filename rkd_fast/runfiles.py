"""The files a run writes into its output directory, recorded so that ``--overwrite`` removes exactly those.

A training run (`rkd-fast train --out DIR`) and the demo (`rkd-fast demo --out DIR`) note each file in
``DIR/.rkd_fast_files`` (JSON) *before* writing it, so a crash can leave a recorded name with no file (harmless),
never a written file that is not recorded. ``--overwrite`` removes the recorded files that exist, then the
folders the run created that are left empty, then the record: a user's ``DIR/checkpoints/my_model.pt`` or
``DIR/models/notes.txt`` stays. A directory counts as holding a run when the record exists.
"""

import json
import shutil
from pathlib import Path

RECORD = ".rkd_fast_files"


class RunFiles:
    """The record of the files of the run in `root` (paths relative to it)."""

    def __init__(self, root):
        self.root = Path(root)
        self.path = self.root / RECORD
        self._names = None

    def _name(self, path):
        """`path` (absolute, or relative to the current directory, like `root` itself) as its name in the record,
        relative to root; a ValueError for a path outside root."""
        full, root = Path(path).absolute(), self.root.absolute()
        if not full.is_relative_to(root):
            raise ValueError(f"{path} is not inside the run's folder {self.root}")
        return full.relative_to(root).as_posix()

    def exists(self):
        return self.path.is_file()

    def names(self):
        if self._names is None:
            self._names = self._read()
        return list(self._names)

    def _read(self):
        if not self.path.is_file():
            return []
        try:
            names = json.loads(self.path.read_text())
        except (OSError, ValueError) as error:
            raise ValueError(f"{self.path}: the record of the run's files cannot be read ({error}); remove the "
                             f"run's files by hand, or choose another --out") from error
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise ValueError(f"{self.path} is not a list of file names")
        return names

    def add(self, path):
        """Records `path` (a path under root: absolute, or relative to the current directory as `root` is) before
        it is written; returns it as a Path.
        A recorded folder is one the run creates and fills itself: --overwrite removes it whole."""
        from .atomic import atomic_write_json

        relative = self._name(path)
        if relative not in self.names():
            self._names.append(relative)
            atomic_write_json(self.path, self._names)
        return self.root / relative

    def discard(self, paths):
        """Forgets files the run has deleted itself (rolling checkpoints), so the record does not grow."""
        names = {self._name(p) for p in paths}
        if names & set(self.names()):
            from .atomic import atomic_write_json

            self._names = [n for n in self._names if n not in names]
            atomic_write_json(self.path, self._names)

    def remove_all(self):
        """Removes every recorded file that exists, the folders they were in when left empty (up to root), then
        the record itself. Returns the removed files."""
        removed = []
        for name in self.names():
            target = self.root / name
            if target.is_dir() and not target.is_symlink():  # a folder the run created whole (TensorBoard's)
                shutil.rmtree(target)
                removed.append(target)
            elif target.is_file() or target.is_symlink():
                target.unlink()
                removed.append(target)
            parent = target.parent
            while parent != self.root and parent.is_dir() and not any(parent.iterdir()):
                parent.rmdir()
                parent = parent.parent
        self.path.unlink(missing_ok=True)
        self._names = []
        return removed
