"""The native backend's build folder: created private, checked before use, locked across processes.

A compiled library is code this process will run, so the folder it is built in and loaded from must
be one that no other user can change: the folder itself owned by us (or root) and writable by nobody
else, and every folder above it owned by us or root and not writable by others, unless it is sticky
(like /tmp, where others cannot rename or delete what we own in it).

Builds and loads in one folder are serialized with an exclusive ``flock`` on a file in it, held
across torch's build and the import of the library: a process never loads a library that another
is still writing. The kernel drops the lock when its holder exits, however it exits, so a killed
build blocks nobody (torch's own ``lock`` file, made with O_EXCL, stays behind after a kill and makes
every later ``cpp_extension.load`` wait forever; under our lock it is known to be stale).
POSIX only, like the native backend itself.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

LOCK_NAME = "fastrl_build.lock"
# The file torch.utils.cpp_extension creates (O_EXCL) while it builds and removes when done.
TORCH_BATON_NAME = "lock"
_ROOT_UID = 0
_WRITABLE_BY_OTHERS = stat.S_IWGRP | stat.S_IWOTH


class UnsafeBuildDirectory(RuntimeError):
    """The build folder, or a folder above it, can be changed by another user."""


def make_directory(path: Path) -> None:
    """Create ``path`` and any missing folder above it, each writable by its owner only (0o755)."""
    path = Path(os.path.abspath(path))
    missing = []
    for folder in (path, *path.parents):
        if folder.exists():
            break
        missing.append(folder)
    for folder in reversed(missing):
        try:
            # Not pathlib's parents=True: it makes the parents 0o777 minus the umask (group-writable
            # under a umask of 002), which check() below would then refuse.
            os.mkdir(folder, 0o755)
        except FileExistsError:  # another process made it in between
            pass


def _owner_ok(st: os.stat_result) -> bool:
    return st.st_uid in (os.geteuid(), _ROOT_UID)


def _chain_reason(path: Path) -> Optional[str]:
    """Why another user could change ``path`` or a folder above it (symlinks followed), or None."""
    st = os.stat(path)
    if not stat.S_ISDIR(st.st_mode):
        return f"{path} is not a folder"
    if not _owner_ok(st):
        return f"{path} belongs to another user (uid {st.st_uid})"
    if st.st_mode & _WRITABLE_BY_OTHERS:
        return f"{path} can be written by other users (mode {stat.filemode(st.st_mode)})"
    child, child_st = path, st
    for folder in path.parents:
        st = os.stat(folder)
        if not _owner_ok(st):
            return f"{folder}, above {path}, belongs to another user (uid {st.st_uid})"
        writable = st.st_mode & _WRITABLE_BY_OTHERS
        # In a sticky folder others can add entries but not rename or delete ours.
        if writable and not (st.st_mode & stat.S_ISVTX and _owner_ok(child_st)):
            return (f"{folder}, above {path}, can be written by other users and is not sticky "
                    f"(mode {stat.filemode(st.st_mode)}), so {child} could be replaced")
        child, child_st = folder, st
    return None


def unsafe_reason(path: Path) -> Optional[str]:
    """Why ``path`` is not private to us, or None when it is.

    Both the path as given (made absolute) and its real path are checked: a symlink on the way
    must sit in a safe folder, and so must what it points to.
    """
    given = Path(os.path.abspath(path))
    real = Path(os.path.realpath(path))
    for candidate in (given, real) if real != given else (given,):
        reason = _chain_reason(candidate)
        if reason is not None:
            return reason
    return None


def check(path: Path, env_var: str) -> None:
    """Raise UnsafeBuildDirectory, naming the folder and the way out, unless ``path`` is private."""
    reason = unsafe_reason(path)
    if reason is not None:
        raise UnsafeBuildDirectory(
            f"refusing to build or load the C++ extension in {path}: {reason}. A library there could be "
            f"swapped by another user and then run by this process. Set {env_var} to a folder that only "
            f"you can write (or remove the write permission of others, e.g. chmod go-w on that folder)"
        )


@contextmanager
def exclusive(path: Path, on_wait: Optional[Callable[[], None]] = None) -> Iterator[None]:
    """Hold the folder's build lock (``flock``, exclusive); ``on_wait()`` runs once if it is busy.

    On entry a leftover torch ``lock`` file is removed: whoever made it is gone, since any process
    building here holds this lock.
    """
    import fcntl

    fd = os.open(path / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if on_wait is not None:
                on_wait()
            fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            (path / TORCH_BATON_NAME).unlink()
        except FileNotFoundError:
            pass
        yield
    finally:
        os.close(fd)  # releases the lock
