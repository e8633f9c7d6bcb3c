"""Download a published archive with resume and checksum verification, then unpack it (urllib only).

An interrupted transfer (a dropped connection, a response shorter than its ``Content-Length``) is
resumed with an HTTP ``Range`` request from the bytes already in ``<archive>.part``; a server that
ignores the range (status 200) sends the whole file again, which replaces the partial one. Only a
file whose digest equals the published one becomes ``<archive>``: a mismatch removes the partial
file and ends in one line naming the URL and both digests.

The checksums are OpenSLR's, as published beside the archives (MD5): OpenSLR 17 (MUSAN) and 28
(RIRS_NOISES). ``--mirror`` style use replaces the host, never the checksum.
"""

from __future__ import annotations

import http.client
import logging
import os
import shutil
import tarfile
import time
import urllib.error
import urllib.request
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from qmargin_spk.utils.hashing import file_digest

logger = logging.getLogger(__name__)

OPENSLR = "https://www.openslr.org"


class DownloadError(RuntimeError):
    """A download or unpacking that failed; the message is one line naming the URL or file."""


@dataclass(frozen=True)
class Archive:
    """A published archive: where it is, its checksum (``algorithm`` as hashlib names it) and its top folder."""

    url: str
    algorithm: str
    digest: str
    top_folder: str

    @property
    def filename(self) -> str:
        return self.url.rsplit("/", 1)[-1]

    def on_mirror(self, base: str) -> Archive:
        """The same archive (same checksum) from a mirror: ``base`` replaces ``https://www.openslr.org``."""
        if not self.url.startswith(OPENSLR):
            return self
        return replace(self, url=base.rstrip("/") + self.url[len(OPENSLR) :])


PUBLISHED = {
    "musan": Archive(f"{OPENSLR}/resources/17/musan.tar.gz", "md5", "0c472d4fc0c5141eca47ad1ffeb2a7df", "musan"),
    "rirs_noises": Archive(
        f"{OPENSLR}/resources/28/rirs_noises.zip", "md5", "e6f48e257286e05de56413b4779d8ffb", "RIRS_NOISES"
    ),
}

_INTERRUPTIONS = (http.client.HTTPException, ConnectionError, TimeoutError, urllib.error.URLError)


def _transfer(url: str, partial: Path, timeout: float, chunk_bytes: int) -> bool:
    """One request appending to ``partial`` from where it ends; True when the server has sent the whole file."""
    have = partial.stat().st_size if partial.exists() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as err:
        if err.code == 416 and have:  # nothing after the bytes we have: the partial file is complete
            return True
        raise DownloadError(f"{url}: HTTP {err.code} {err.reason}") from err
    with response:
        if response.status == 206 and not response.headers.get("Content-Range", "").startswith(f"bytes {have}-"):
            raise DownloadError(f"{url}: the server resumed at another byte ({response.headers['Content-Range']})")
        mode = "ab" if response.status == 206 else "wb"  # 200: the server sends the whole file again
        expected = response.headers.get("Content-Length")
        received = 0
        with open(partial, mode) as handle:
            while block := response.read(chunk_bytes):
                handle.write(block)
                received += len(block)
    return expected is None or received == int(expected)


def fetch(
    url: str,
    target: str | os.PathLike,
    algorithm: str,
    digest: str,
    attempts: int = 5,
    timeout: float = 60.0,
    chunk_bytes: int = 1 << 20,
    wait: Callable[[float], None] = time.sleep,
) -> Path:
    """Download ``url`` to ``target`` unless it is there with the published digest; resume interrupted transfers.

    Raises :class:`DownloadError` (one line) after ``attempts`` interrupted requests, on an HTTP error,
    or when the finished file's digest differs from ``digest`` (the partial file is then removed).
    """
    target = Path(target)
    if target.exists():
        found = file_digest(target, algorithm)
        if found != digest.lower():
            raise DownloadError(
                f"{target}: {algorithm.upper()} {found} is not the published {digest} (delete it to download again)"
            )
        logger.info("%s: already downloaded and verified", target)
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".part")
    for attempt in range(1, attempts + 1):
        try:
            if _transfer(url, partial, timeout, chunk_bytes):
                break
            problem = "the response ended early"
        except _INTERRUPTIONS as err:  # HTTP errors became DownloadError in _transfer
            problem = str(getattr(err, "reason", err)) or type(err).__name__
        size = partial.stat().st_size if partial.exists() else 0
        logger.warning("%s: %s after %d bytes (attempt %d of %d); resuming", url, problem, size, attempt, attempts)
        if attempt == attempts:
            raise DownloadError(f"{url}: interrupted {attempts} times ({problem}); run again to resume from {partial}")
        wait(min(2.0**attempt, 60.0))
    found = file_digest(partial, algorithm)
    if found != digest.lower():
        partial.unlink()
        raise DownloadError(
            f"{url}: {algorithm.upper()} of the download is {found}, the published one is {digest}; "
            "the file was removed (run again to download it anew)"
        )
    os.replace(partial, target)
    return target


def unpack(archive: str | os.PathLike, into: str | os.PathLike, top_folder: str) -> Path:
    """Unpack a ``.tar.gz``/``.tgz``/``.zip`` whose files lie under ``top_folder`` into ``into/top_folder``.

    Done in a hidden folder beside it and moved into place when complete, so an interrupted unpack is
    never taken for a corpus; an existing ``into/top_folder`` is kept as it is.
    """
    archive, into = Path(archive), Path(into)
    destination = into / top_folder
    if destination.exists():
        logger.info("%s: already unpacked", destination)
        return destination
    staging = into / f".unpacking-{top_folder}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        if archive.name.endswith((".tar.gz", ".tgz", ".tar")):
            with tarfile.open(archive) as handle:
                handle.extractall(staging, filter="data")  # no absolute paths, links out or devices
        elif archive.suffix == ".zip":
            with zipfile.ZipFile(archive) as handle:
                handle.extractall(staging)  # zipfile drops absolute paths and '..'
        else:
            raise DownloadError(f"{archive}: unknown archive type (expected .tar.gz, .tgz, .tar or .zip)")
        if not (staging / top_folder).is_dir():
            raise DownloadError(f"{archive}: has no top folder {top_folder}/")
        os.replace(staging / top_folder, destination)
    except (tarfile.TarError, zipfile.BadZipFile) as err:
        raise DownloadError(f"{archive}: cannot unpack ({err})") from err
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return destination


def download_and_unpack(archive: Archive, folder: str | os.PathLike, **fetch_options) -> Path:
    """Fetch ``archive`` into ``folder`` (resumed, verified) and unpack it there; returns the unpacked top folder."""
    folder = Path(folder)
    if (folder / archive.top_folder).is_dir():  # only a complete unpack is moved there (see unpack)
        logger.info("%s: already there, not downloaded", folder / archive.top_folder)
        return folder / archive.top_folder
    path = fetch(archive.url, folder / archive.filename, archive.algorithm, archive.digest, **fetch_options)
    return unpack(path, folder, archive.top_folder)
