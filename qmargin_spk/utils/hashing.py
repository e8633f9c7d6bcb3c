"""Digests of whole files (training manifests, imported weights files, downloaded corpus archives)."""

from __future__ import annotations

import hashlib
import os


def file_digest(path: str | os.PathLike, algorithm: str) -> str:
    """Hex digest of a file's bytes with hashlib's ``algorithm`` (``md5``, ``sha256``), read in blocks."""
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, algorithm).hexdigest()


def file_sha256(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file's bytes."""
    return file_digest(path, "sha256")
