"""training.files.atomic_write: the new file or the old one, never a partial one."""

import os

import pytest

from training import files


def test_atomic_write_creates_parents_and_replaces(tmp_path):
  path = tmp_path / "a" / "b" / "metrics.jsonl"
  files.atomic_write(path, lambda f: f.write(b"first\n"))
  files.atomic_write(path, lambda f: f.write(b"second\n"))
  assert path.read_bytes() == b"second\n"
  assert [p.name for p in path.parent.iterdir()] == ["metrics.jsonl"]  # no temporary left


def test_atomic_write_failure_keeps_the_old_file_and_removes_the_temporary(tmp_path):
  path = tmp_path / "config.json"
  path.write_bytes(b"old")

  def write_half_then_fail(f):
    f.write(b"half of the new")
    raise KeyboardInterrupt  # BaseException too: a Ctrl-C mid-write

  with pytest.raises(KeyboardInterrupt):
    files.atomic_write(path, write_half_then_fail)
  assert path.read_bytes() == b"old"
  assert [p.name for p in tmp_path.iterdir()] == ["config.json"]


def test_as_path_keeps_uris_and_makes_local_paths_absolute(tmp_path, monkeypatch):
  # pathlib would turn the bucket into the local directory <cwd>/gs:/bucket/run.
  assert os.fspath(files.as_path("gs://bucket/run")) == "gs://bucket/run"
  assert files.is_uri("gs://bucket/run") and not files.is_uri("runs/x")
  monkeypatch.chdir(tmp_path)
  assert os.fspath(files.as_path("runs/x")) == str(tmp_path / "runs" / "x")
  assert os.fspath(files.as_path("~/x")) == os.path.expanduser("~/x")
  path = files.as_path("runs/x") / "metrics.jsonl"
  files.atomic_write(path, lambda f: f.write(b"ok"))
  assert (tmp_path / "runs" / "x" / "metrics.jsonl").read_bytes() == b"ok"
