"""The files a run writes into its output directory, recorded so that ``--overwrite`` removes exactly those.

A training run (`rkd-fast train --out DIR`), the demo and the frontier study note each file in
``DIR/.rkd_fast_files`` (JSON) *before* writing it and its SHA-256 right after (`written`), so a crash can leave a
recorded name with no file or with no hash yet, never a written file that is not recorded. ``--overwrite``
removes a recorded file only while its content is still what the run wrote (the hash matches): a user's
``DIR/notes.txt``, a file edited since, or anything a hand-made record names stays. A record is trusted only as
far as it can be checked: every entry must be a plain relative name inside the run's folder (no ``..``, no
absolute path, no ``.``, no symbolic link on the way), or the whole record is refused and nothing is removed.
A directory counts as holding a run when the record exists.
"""

import hashlib
import json
import os
import warnings
from pathlib import Path

RECORD = ".rkd_fast_files"
FORMAT = "rkd_fast run files"
VERSION = 1
# The folders a run may record whole, with the only files in them that --overwrite removes: TensorBoard's event
# files (rkd_fast.train.tensorboard), which grow while the run goes on and so have no final hash to record.
TENSORBOARD_EVENTS = "events.out.tfevents.*"
FOLDER_PATTERNS = (TENSORBOARD_EVENTS,)


def sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_name(name):
    """`name` if it is a plain relative POSIX name (no absolute path, '.', '..', empty part or backslash); else
    a ValueError naming it."""
    if not isinstance(name, str) or not name or "\\" in name or "\0" in name or name.startswith("/") \
            or any(part in ("", ".", "..") for part in name.split("/")) or name == RECORD:
        raise ValueError(f"{name!r} is not a plain relative file name inside the run's folder")
    return name


class RunFiles:
    """The record of the files of the run in `root` (names relative to it)."""

    def __init__(self, root):
        self.root = Path(root)
        self.path = self.root / RECORD
        self._files = None  # name -> SHA-256 of the content the run wrote, or None until `written`
        self._folders = None  # name -> the pattern of the files in it that are the run's

    def _name(self, path):
        """`path` (absolute, or relative to the current directory, like `root` itself) as its name in the record,
        relative to root; a ValueError for a path outside root."""
        full, root = Path(os.path.abspath(path)), Path(os.path.abspath(self.root))
        if not full.is_relative_to(root) or full == root:
            raise ValueError(f"{path} is not inside the run's folder {self.root}")
        return check_name(full.relative_to(root).as_posix())

    def exists(self):
        return self.path.is_file() or self.path.is_symlink()

    def names(self):
        """The recorded files and folders, checked (`_read`)."""
        self._load()
        return [*self._files, *self._folders]

    def _load(self):
        if self._files is None:
            self._files, self._folders = self._read()

    def _invalid(self, why):
        return ValueError(f"{self.path}: {why}; nothing was removed (remove the run's files by hand, or choose "
                          "another --out)")

    def _read(self):
        """(files, folders) of the record, each entry checked: a plain relative name that stays inside root
        without passing a symbolic link. Anything else: a ValueError naming the entry."""
        if not self.exists():
            return {}, {}
        if self.path.is_symlink():
            raise self._invalid("the record is a symbolic link")
        try:
            record = json.loads(self.path.read_text())
        except (OSError, ValueError) as error:
            raise self._invalid(f"the record of the run's files cannot be read ({error})") from error
        if not isinstance(record, dict) or record.get("format") != FORMAT or record.get("version") != VERSION:
            raise self._invalid(f"not a record of this rkd_fast's format ({FORMAT!r}, version {VERSION})")
        files, folders = record.get("files"), record.get("folders", {})
        if not isinstance(files, dict) or not isinstance(folders, dict):
            raise self._invalid("'files' and 'folders' must be objects")
        for name, digest in files.items():
            if digest is not None and not (isinstance(digest, str) and len(digest) == 64):
                raise self._invalid(f"entry {name!r} has no SHA-256")
        for name, pattern in folders.items():
            if pattern not in FOLDER_PATTERNS:
                raise self._invalid(f"folder {name!r} has pattern {pattern!r}, not one of {FOLDER_PATTERNS}")
        for name in (*files, *folders):
            try:
                self._inside(check_name(name))
            except ValueError as error:
                raise self._invalid(f"entry {name!r}: {error}") from None
        return dict(files), dict(folders)

    def _inside(self, name):
        """root/name, refused when a part of it on disk is a symbolic link (which could lead out of root)."""
        path = self.root
        for part in name.split("/"):
            path = path / part
            if path.is_symlink():
                raise ValueError(f"{path} is a symbolic link")
        return path

    def _save(self):
        from .atomic import atomic_write_json

        atomic_write_json(self.path, {"format": FORMAT, "version": VERSION, "files": self._files,
                                      "folders": self._folders})

    def add(self, path):
        """Records `path` (a path under root: absolute, or relative to the current directory as `root` is) before
        it is written, with no hash until `written` (a name already recorded keeps its hash until then, so a file
        that is kept, such as a resumed study's model, stays the run's); returns it as a Path."""
        relative = self._name(path)
        self._load()
        if relative not in self._files:
            self._files[relative] = None
            self._save()
        return self.root / relative

    def written(self, *paths):
        """Records the content of `paths` (recorded with `add`, now written) as the run's."""
        self._load()
        for path in paths:
            self._files[self._name(path)] = sha256(path)
        self._save()

    def add_folder(self, path, pattern):
        """Records a folder the run fills itself with files named like `pattern` (one of FOLDER_PATTERNS): those
        are what --overwrite removes from it."""
        if pattern not in FOLDER_PATTERNS:
            raise ValueError(f"pattern {pattern!r} is not one of {FOLDER_PATTERNS}")
        relative = self._name(path)
        self._load()
        if self._folders.get(relative) != pattern:
            self._folders[relative] = pattern
            self._save()
        return self.root / relative

    def _is_ours(self, name):
        path = self._inside(name)
        return path.is_file() and self._files.get(name) is not None and sha256(path) == self._files[name]

    def remove(self, paths):
        """Removes those of `paths` that hold what the run wrote, and forgets them all (rolling checkpoints)."""
        self._load()
        for name in [self._name(p) for p in paths]:
            if self._is_ours(name):
                (self.root / name).unlink()
            self._files.pop(name, None)
        self._save()

    def remove_all(self):
        """Removes every recorded file that still holds what the run wrote, the files of its recorded folders,
        the folders left empty (up to root), then the record itself; returns the removed files. The whole record
        is checked first: an invalid one removes nothing. A recorded file whose content is not known to be the
        run's (edited since, or written as the run was killed) stays, with a warning naming it."""
        self._load()
        removed, kept = [], []
        for name in self._files:
            target = self.root / name
            if self._is_ours(name):
                target.unlink()
                removed.append(target)
            elif target.exists():
                kept.append(target)
        for name, pattern in self._folders.items():
            folder = self.root / name
            if folder.is_dir():
                for entry in folder.glob(pattern):
                    if entry.is_file() and not entry.is_symlink():
                        entry.unlink()
                        removed.append(entry)
        for target in [self.root / n for n in self._folders] + removed:
            parent = target if target.is_dir() else target.parent
            while parent != self.root and parent.is_dir() and not any(parent.iterdir()):
                parent.rmdir()
                parent = parent.parent
        self.path.unlink()
        self._files, self._folders = {}, {}
        if kept:
            warnings.warn(f"left in place, as their content is not what the run in {self.root} recorded writing: "
                          + ", ".join(str(p) for p in kept), RuntimeWarning, stacklevel=2)
        return removed
