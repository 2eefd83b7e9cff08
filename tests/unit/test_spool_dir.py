"""Per-process download directories: what a killed worker leaves is removed by the next."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from fileserver.errors import ConfigError
from fileserver.fetch import _spool_owner, prepare_spool_dir


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _leave(directory: Path, *names: str) -> Path:
    directory.mkdir()
    for name in names:
        (directory / name).write_bytes(b"partial download")
    return directory


def test_directories_of_dead_processes_and_our_own_pid_are_emptied(tmp_path: Path) -> None:
    owner = _spool_owner()
    killed = _leave(tmp_path / f"{owner}{_dead_pid()}", "fileserver-a.mp3", "fileserver-b.mp3")
    previous_self = _leave(tmp_path / f"{owner}{os.getpid()}", "fileserver-c.mp3")
    with subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"]) as running:
        try:
            live = _leave(tmp_path / f"{owner}{running.pid}", "fileserver-d.mp3")
            other_host = _leave(tmp_path / "fileserver-spool-otherhost-1", "fileserver-e.mp3")
            unrelated = _leave(tmp_path / "keep-me", "x.mp3")

            spool, left_over = prepare_spool_dir(str(tmp_path))
        finally:
            running.kill()

    assert left_over == 3
    assert not killed.exists()
    assert spool == previous_self and list(spool.iterdir()) == []
    assert (spool.stat().st_mode & 0o777) == 0o700
    # a live process's files, another host's and anything else are left alone
    assert [p.name for p in live.iterdir()] == ["fileserver-d.mp3"]
    assert [p.name for p in other_host.iterdir()] == ["fileserver-e.mp3"]
    assert [p.name for p in unrelated.iterdir()] == ["x.mp3"]


def test_a_fresh_directory_reports_nothing_left_over(tmp_path: Path) -> None:
    spool, left_over = prepare_spool_dir(str(tmp_path / "new-base"))
    assert left_over == 0
    assert spool.parent == tmp_path / "new-base" and spool.is_dir()


def test_an_unusable_tmp_dir_names_the_setting(tmp_path: Path) -> None:
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("")
    with pytest.raises(ConfigError, match="FILESERVER_TMP_DIR"):
        prepare_spool_dir(str(not_a_dir))
