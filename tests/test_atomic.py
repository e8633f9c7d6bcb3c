"""Atomic writes: a failure mid-write keeps the old file and leaves no temporary behind."""
import os

import pytest

from qmargin_spk.utils import atomic_open, atomic_write_text


def test_failed_write_keeps_the_previous_content(tmp_path):
    target = tmp_path / "scores.txt"
    atomic_write_text(target, "old\n")
    with pytest.raises(RuntimeError):
        with atomic_open(target) as handle:
            handle.write("half of the new")
            raise RuntimeError("killed")
    assert target.read_text() == "old\n"
    assert os.listdir(tmp_path) == ["scores.txt"]


def test_written_files_get_the_usual_permissions(tmp_path):
    mask = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "a.txt", "x")
    finally:
        os.umask(mask)
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == 0o644


def test_read_modes_are_refused(tmp_path):
    with pytest.raises(ValueError, match="mode"):
        with atomic_open(tmp_path / "a.txt", "r"):
            pass
