"""Atomic writes of files and whole folders, for every writer of the library and the CLI.

* :func:`write_file` writes into a new temporary file beside the target, flushes it to
  disk, then renames it over the target in one step: a crash or a failure at any point
  leaves the old file (or none) in place, never a partial one.
* :func:`replace_folder` builds a complete new folder beside the target, flushes it, then
  swaps it with the old one in one step (``renameat2(RENAME_EXCHANGE)`` on Linux,
  ``renamex_np(RENAME_SWAP)`` on macOS) and removes the old one: at every instant the
  target path holds either the complete old folder or the complete new one.
  Elsewhere (or on file systems without the swap) the old folder is renamed aside first;
  a crash between the two renames then leaves it complete under a ``.NAME.*.old`` name.

Permissions follow the usual rules rather than ``tempfile``'s private ones: a new file
is created ``0o666`` and a new folder ``0o777``, both less the process umask (``0644``
and ``0755`` under umask ``022``); replacing an existing file or folder keeps its mode.
Temporaries are named ``.NAME.<random>.tmp`` and are gone after success or failure
(only a process killed mid-write can leave one behind).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import os
import secrets
import shutil
import stat
import sys
from collections.abc import Callable
from pathlib import Path

_RENAME_EXCHANGE = 2  # linux/fs.h
_RENAME_SWAP = 2  # macOS sys/stdio.h
_AT_FDCWD = -100


def _temporary_name(target: Path, suffix: str) -> Path:
    return target.with_name(f".{target.name[:100]}.{secrets.token_hex(6)}{suffix}")


def _claim_temporary(target: Path, create: Callable[[Path], object]) -> Path:
    """A new hidden name beside ``target``, made by ``create`` (which fails if it exists)."""
    while True:
        temporary = _temporary_name(target, ".tmp")
        try:
            create(temporary)
            return temporary
        except FileExistsError:
            continue


def fsync_path(path: str | os.PathLike[str]) -> None:
    """Flush a file or folder to disk (``fsync`` on a descriptor of it)."""
    fd = os.open(os.fspath(path), os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) * Path(path).is_dir())
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _existing_mode(target: Path, want_dir: bool) -> int | None:
    try:
        info = target.lstat()
    except FileNotFoundError:
        return None
    if want_dir and not stat.S_ISDIR(info.st_mode):
        raise NotADirectoryError(errno.ENOTDIR, "exists and is not a folder", str(target))
    if not want_dir and stat.S_ISDIR(info.st_mode):
        raise IsADirectoryError(errno.EISDIR, "is a folder, not a file", str(target))
    return stat.S_IMODE(info.st_mode) if stat.S_ISREG(info.st_mode) or stat.S_ISDIR(info.st_mode) else None


def write_file(path: str | os.PathLike[str], write: Callable[[str], object]) -> None:
    """Call ``write(temporary_path)``, then move the result onto ``path`` atomically.

    The temporary file exists (empty, with the final permissions) when ``write`` is
    called; ``write`` fills it by path. On any exception the temporary file is removed
    and ``path`` is untouched.

    Examples
    --------
    >>> import os, tempfile
    >>> target = os.path.join(tempfile.mkdtemp(), "notes.txt")
    >>> write_file(target, lambda tmp: open(tmp, "w").write("hello"))
    >>> open(target).read(), sorted(os.listdir(os.path.dirname(target)))
    ('hello', ['notes.txt'])
    """
    target = Path(path)
    mode = _existing_mode(target, want_dir=False)
    target.parent.mkdir(parents=True, exist_ok=True)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
    temporary = _claim_temporary(target, lambda name: os.close(os.open(name, flags, 0o666)))
    try:
        write(str(temporary))
        if mode is not None:
            os.chmod(temporary, mode)
        fsync_path(temporary)
        os.replace(temporary, target)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    with contextlib.suppress(OSError):
        fsync_path(target.parent)


@functools.cache
def _libc() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None


def _swap(first: Path, second: Path) -> bool:
    """Exchange two paths atomically; False where the system or file system cannot."""
    libc = _libc()
    if libc is None:
        return False
    try:
        if sys.platform.startswith("linux") and hasattr(libc, "renameat2"):
            result = libc.renameat2(_AT_FDCWD, os.fsencode(first), _AT_FDCWD, os.fsencode(second), _RENAME_EXCHANGE)
        elif sys.platform == "darwin" and hasattr(libc, "renamex_np"):
            result = libc.renamex_np(os.fsencode(first), os.fsencode(second), _RENAME_SWAP)
        else:
            return False
    except (OSError, AttributeError):
        return False
    if result == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(second))


def _fsync_tree(folder: Path) -> None:
    for entry in folder.iterdir():
        if entry.is_file() and not entry.is_symlink():
            fsync_path(entry)
    fsync_path(folder)


def replace_folder(path: str | os.PathLike[str], populate: Callable[[Path], object]) -> None:
    """Call ``populate(temporary_folder)``, then put that folder at ``path`` as one unit.

    ``populate`` writes plain files into the (new, empty) temporary folder; they are
    flushed to disk before the folder replaces ``path``. On any exception before the
    swap, the temporary folder is removed and ``path`` is untouched.

    Examples
    --------
    >>> import os, tempfile
    >>> target = os.path.join(tempfile.mkdtemp(), "adapter")
    >>> replace_folder(target, lambda d: (d / "a.txt").write_text("one"))
    >>> replace_folder(target, lambda d: (d / "b.txt").write_text("two"))
    >>> sorted(os.listdir(target)), sorted(os.listdir(os.path.dirname(target)))
    (['b.txt'], ['adapter'])
    """
    target = Path(path)
    mode = _existing_mode(target, want_dir=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = _claim_temporary(target, lambda name: os.mkdir(name, 0o777))
    try:
        populate(staging)
        if mode is not None:
            os.chmod(staging, mode)
        _fsync_tree(staging)
        if mode is None:
            os.rename(staging, target)  # fails if a folder appeared there meanwhile (non-empty)
            old = None
        elif _swap(staging, target):
            old = staging
        else:
            old = _temporary_name(target, ".old")
            os.rename(target, old)
            try:
                os.rename(staging, target)
            except BaseException:
                os.rename(old, target)
                raise
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    with contextlib.suppress(OSError):
        fsync_path(target.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
