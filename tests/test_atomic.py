"""Atomic writes: a failure mid-write keeps the old file and leaves no temporary behind."""

import os
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from qmargin_spk.utils import atomic_open, atomic_write_text

REPO = Path(__file__).resolve().parents[1]


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


def _temporaries(folder):
    return sorted(name for name in os.listdir(folder) if name.endswith(".tmp"))


def test_temp_file_of_a_killed_writer_is_removed_by_the_next_write(tmp_path):
    target = tmp_path / "results.json"
    writer = (
        "import os, signal\n"
        "from qmargin_spk.utils.atomic import atomic_open\n"
        f"with atomic_open({str(target)!r}) as handle:\n"
        "    handle.write('half of it')\n"
        "    handle.flush()\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    killed = subprocess.run([sys.executable, "-c", writer], env=env, capture_output=True)
    assert killed.returncode == -signal.SIGKILL
    (left,) = _temporaries(tmp_path)
    assert left.startswith(".results.json.")  # the kill left its temporary behind
    assert not target.exists()

    atomic_write_text(target, "complete\n")
    assert sorted(os.listdir(tmp_path)) == ["results.json"] and target.read_text() == "complete\n"


def test_temporaries_of_live_writers_are_kept(tmp_path):
    from qmargin_spk.utils.atomic import temporary_prefix

    target = tmp_path / "scores.txt"
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = tmp_path / f"{temporary_prefix(target, dead.pid)}abc123.tmp"
    live = tmp_path / f"{temporary_prefix(target, os.getpid())}def456.tmp"  # e.g. another thread writing now
    other_target = tmp_path / f"{temporary_prefix(tmp_path / 'scores.txt.md', dead.pid)}ghi789.tmp"
    foreign = tmp_path / ".scores.txt.otherhost.1.jkl012.tmp"  # another machine's writer: cannot tell
    for path in (stale, live, other_target, foreign):
        path.write_text("partial")
    atomic_write_text(target, "x")
    assert _temporaries(tmp_path) == sorted(p.name for p in (live, other_target, foreign))


def test_file_and_folder_are_fsynced_around_the_rename(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append("fsync folder" if stat.S_ISDIR(os.fstat(fd).st_mode) else "fsync file")
        real_fsync(fd)

    def replace(source, target):
        events.append("rename")
        real_replace(source, target)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    atomic_write_text(tmp_path / "a.txt", "x")
    assert events == ["fsync file", "rename", "fsync folder"]
