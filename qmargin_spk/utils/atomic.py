"""Atomic file writes: write to a temporary file in the same folder, then rename.

A crash or a kill mid-write leaves either the old file or the new one, never a
half-written score file, manifest or checkpoint. The file is fsynced before the
rename and its folder after it, so a power loss cannot undo a finished write either.

A kill leaves the temporary file behind. Temporaries are named
``.<name>.<host>.<pid>.<random>.tmp``, and every write removes the leftovers of its
own target whose writer is gone (same host, process no longer alive); a concurrent
writer's temporary (live process, or another host) is never touched.

A write that fails (a full disk, a quota, permissions) raises :class:`WriteError` naming the
file that was not written, after removing its temporary.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO

PathLike = str | os.PathLike

logger = logging.getLogger(__name__)
_HOST = re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname()) or "host"


class WriteError(OSError):
    """A file (or folder) that could not be written; ``filename`` names it, ``errno`` says why (ENOSPC, EDQUOT...)."""


def write_error(err: BaseException, target: PathLike, *temporaries: PathLike) -> WriteError | None:
    """``err`` as a :class:`WriteError` naming ``target`` when it is an ``OSError`` of writing it, else None.

    An error that names no file (a failed ``write``, ``flush`` or ``fsync``), or one whose file
    starts with ``target`` or one of the ``temporaries``, is the write's.
    """
    if not isinstance(err, OSError) or isinstance(err, WriteError):
        return None
    if err.filename is not None and not str(err.filename).startswith(tuple(str(p) for p in (target, *temporaries))):
        return None
    return WriteError(err.errno, err.strerror or str(err), str(target))


@contextlib.contextmanager
def writing(target: PathLike, *temporaries: PathLike) -> Iterator[None]:
    """Re-raise an ``OSError`` of writing ``target`` (:func:`write_error`) as a :class:`WriteError` naming it."""
    try:
        yield
    except OSError as err:
        failed = write_error(err, target, *temporaries)
        if failed is None:
            raise
        raise failed from err


@contextlib.contextmanager
def atomic_open(path: PathLike, mode: str = "w", encoding: str | None = "utf-8") -> Iterator[IO]:
    """Open a temporary sibling of ``path`` for writing; rename it over ``path`` on success."""
    if "r" in mode or "a" in mode:
        raise ValueError(f"atomic_open only writes whole files, got mode {mode!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    with writing(path, path.parent / temporary_prefix(path)):
        fd, tmp = tempfile.mkstemp(prefix=temporary_prefix(path), suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, mode, encoding=None if "b" in mode else encoding) as handle:
                yield handle
                handle.flush()
                os.fsync(handle.fileno())
            os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the usual permissions
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
    _fsync_folder(path.parent)


def temporary_prefix(path: PathLike, pid: int | None = None) -> str:
    """Start of the name of a temporary file for ``path`` written by process ``pid`` (default: this one)."""
    return f".{Path(path).name}.{_HOST}.{os.getpid() if pid is None else pid}."


def remove_stale_temporaries(path: PathLike) -> list[Path]:
    """Delete temporaries of ``path`` left by dead writers on this host; return them."""
    path = Path(path)
    pattern = re.compile(re.escape(f".{path.name}.") + r"(?P<host>[A-Za-z0-9-]+)\.(?P<pid>[0-9]+)\.[A-Za-z0-9_]+\.tmp")
    removed = []
    with contextlib.suppress(FileNotFoundError), os.scandir(path.parent) as entries:
        for entry in entries:
            match = pattern.fullmatch(entry.name)
            if match and match["host"] == _HOST and not _process_alive(int(match["pid"])):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(entry.path)
                    removed.append(Path(entry.path))
    if removed:
        logger.info("removed %d temporary files of %s left by killed writers", len(removed), path)
    return removed


def _process_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this machine (a process of another user counts)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _fsync_folder(folder: Path) -> None:
    """Make a rename in ``folder`` durable; file systems that cannot fsync a folder are let be."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as err:
        if err.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(fd)


@contextlib.contextmanager
def exclusive_lock(path: PathLike) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``path`` (created if absent) for a read-modify-write of a shared file.

    The lock is released by the kernel when the process dies, so a killed holder never blocks others.
    """
    import fcntl

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: PathLike, text: str) -> None:
    """Write ``text`` to ``path`` atomically."""
    with atomic_open(path, "w") as handle:
        handle.write(text)


def atomic_torch_save(obj: object, path: PathLike) -> None:
    """``torch.save`` to ``path`` atomically."""
    import torch

    with atomic_open(path, "wb") as handle:
        torch.save(obj, handle)


def swap_folder_into_place(staging: PathLike, target: PathLike) -> None:
    """Rename the finished folder ``staging`` to ``target``; an existing ``target`` is moved aside first, then deleted.

    A reader sees the old complete folder or the new one, never a mix (``staging`` must be a sibling of ``target``).
    """
    import shutil

    staging, target = Path(staging), Path(target)
    if not target.exists():
        os.rename(staging, target)
        return
    retired = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".old", dir=target.parent))
    os.rename(target, retired / target.name)
    os.rename(staging, target)
    shutil.rmtree(retired, ignore_errors=True)
