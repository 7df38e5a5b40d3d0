"""The one atomic-write helper: whole file or old file, flushed to the disk, nothing left behind on error."""

import os

import pytest

from gali.engine.files import atomic_write, file_sha256, write_text_atomic


def test_atomic_write_replaces_the_file_and_flushes_the_file_and_its_folder(tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(os.path.isdir(f"/proc/self/fd/{fd}")) or real_fsync(fd))
    target = tmp_path / "metrics.json"
    target.write_text("old")
    assert write_text_atomic(target, "new") == target
    assert target.read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]  # no temporary file left
    assert synced == [False, True]  # the file's bytes, then the folder's entry


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "checkpoint.pt"
    target.write_bytes(b"complete")

    def half_then_fail(tmp):
        tmp.write_bytes(b"hal")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(target, half_then_fail)
    assert target.read_bytes() == b"complete"
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]


def test_file_sha256_is_the_digest_of_the_bytes(tmp_path):
    path = tmp_path / "net.pt"
    path.write_bytes(b"abc")
    assert file_sha256(path) == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
