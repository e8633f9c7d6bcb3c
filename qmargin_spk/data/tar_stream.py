"""Reading tar shards as streams of samples, from local files or ``pipe:COMMAND`` URLs.

A sample is the run of consecutive members sharing a key (``dir/key.ext`` -> key ``dir/key``,
extension ``ext``: the part after the first dot of the last path component), the WebDataset
convention. Local files are opened seekable, so skipping samples reads only their headers; a
``pipe:`` URL runs the command with a shell and reads its standard output as a stream
(``pipe:cat shard.tar``, ``pipe:curl -s https://host/shard.tar``, ``pipe:aws s3 cp s3://b/shard.tar -``).
"""

from __future__ import annotations

import subprocess
import tarfile
from collections.abc import Generator, Iterator

PIPE_PREFIX = "pipe:"


class ShardError(RuntimeError):
    """A shard that cannot be opened, or whose command failed; the message names it."""


class DamagedShard(Exception):
    """A tar that breaks off in the middle; the samples before the damage were yielded."""


def split_member_name(name: str) -> tuple[str, str]:
    """``spk/000012.wav`` -> ``("spk/000012", "wav")``; a name without a dot has extension ``""``."""
    folder, _, base = name.rpartition("/")
    stem, _, extension = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), extension


def read_shard(url: str, first: int = 0, stop: int | None = None) -> Iterator[tuple[str, dict[str, bytes]]]:
    """``(key, {extension: bytes})`` for the samples numbered ``first <= n < stop`` of one shard.

    Raises :class:`ShardError` when the shard cannot be opened or its command exits with a
    non-zero status after its output was read to the end, :class:`DamagedShard` when the tar
    breaks off. Stopping early (``stop``, or the consumer closing the generator) kills the command.
    """
    process = None
    if url.startswith(PIPE_PREFIX):
        process = subprocess.Popen(url[len(PIPE_PREFIX) :], shell=True, stdout=subprocess.PIPE)
    read_to_end = False
    try:
        with _open_tar(url, process) as tar:
            read_to_end = yield from _samples(tar, first, stop)
    finally:
        if process is not None:
            _close_pipe(process, url, check=read_to_end)


def _open_tar(url: str, process: subprocess.Popen | None) -> tarfile.TarFile:
    try:
        if process is not None:
            return tarfile.open(fileobj=process.stdout, mode="r|")
        return tarfile.open(url, mode="r:")
    except FileNotFoundError as err:
        raise ShardError(f"{url}: no such shard") from err
    except tarfile.TarError as err:
        raise ShardError(f"{url}: not a readable tar file ({err})") from err


def _samples(tar: tarfile.TarFile, first: int, stop: int | None) -> Generator[tuple[str, dict[str, bytes]], None, bool]:
    """Group members into samples; returns True if the archive ended (False if ``stop`` was reached)."""
    number, key, members = -1, None, {}
    try:
        for info in tar:
            if not info.isfile():
                continue
            member_key, extension = split_member_name(info.name)
            if member_key != key:
                if key is not None and number >= first:
                    yield key, members
                number, key, members = number + 1, member_key, {}
                if stop is not None and number >= stop:
                    return False
            if number >= first:
                members[extension] = tar.extractfile(info).read()
    except (tarfile.TarError, EOFError, OSError) as err:
        raise DamagedShard(f"damaged in sample {number} ({key!r}): {err}") from err
    if key is not None and number >= first:
        yield key, members
    return True


def _close_pipe(process: subprocess.Popen, url: str, check: bool) -> None:
    """Drain and check the command if its output was read to the end; otherwise kill it."""
    if check:
        while process.stdout.read(1 << 16):  # the tar padding after the end-of-archive blocks
            pass
    elif process.poll() is None:
        process.kill()
    process.stdout.close()
    status = process.wait()
    if check and status != 0:
        raise ShardError(f"{url}: command exited with status {status}")
