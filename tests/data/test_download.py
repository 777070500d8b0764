"""download.py: the offline message, verification and the joining of parts (no network is used)."""
import gzip
import hashlib
import subprocess
import sys
import time

import pytest

from stepsearch.data.download import OfflineError, download, gunzip_file, join_parts, verify_file

from .conftest import REPO


def test_offline_fails_at_once_naming_files_and_destinations(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t0 = time.monotonic()
    with pytest.raises(OfflineError) as e:
        download(str(tmp_path), ["stepsearch", "wiki18_index"])
    assert time.monotonic() - t0 < 1.0
    msg = str(e.value)
    assert "HF_HUB_OFFLINE=1 is set" in msg
    assert "https://huggingface.co/datasets/Zill1/StepSearch-musi-dataset/resolve/main/musi.index" in msg
    assert f"-> {tmp_path}/musi_answerable_train.jsonl" in msg
    assert f"cd {tmp_path} && cat part_aa part_ab > e5_Flat.index" in msg
    assert not list(tmp_path.iterdir())


def test_cli_offline_exit_code_and_message(tmp_path):
    r = subprocess.run([sys.executable, "scripts/download.py", "--save_path", str(tmp_path), "--wiki18"], cwd=REPO,
                       capture_output=True, text=True, timeout=60, env={"HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)})
    assert r.returncode == 2
    assert "wiki-18-corpus/resolve/main/wiki-18.jsonl.gz" in r.stderr and "gunzip" in r.stderr


def test_offline_with_files_in_place_returns_them(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    names = ["musi_answerable_train.jsonl", "musi_answerable_dev.jsonl", "musi.jsonl", "musi.index"]
    for n in names:
        (tmp_path / n).write_text("x")
    assert download(str(tmp_path), ["stepsearch"]) == [str(tmp_path / n) for n in names]


def test_verify_file_checks_size_and_sha256(tmp_path):
    p = tmp_path / "f"
    p.write_bytes(b"hello")
    verify_file(str(p), 5, hashlib.sha256(b"hello").hexdigest())
    with pytest.raises(ValueError, match="size 5 bytes, expected 6"):
        verify_file(str(p), 6, None)
    with pytest.raises(ValueError, match="sha256 .* expected 00"):
        verify_file(str(p), 5, "00" * 32)


def test_join_parts_and_gunzip(tmp_path):
    (tmp_path / "part_aa").write_bytes(b"abc")
    (tmp_path / "part_ab").write_bytes(b"def")
    join_parts([str(tmp_path / "part_aa"), str(tmp_path / "part_ab")], str(tmp_path / "e5_Flat.index"))
    assert (tmp_path / "e5_Flat.index").read_bytes() == b"abcdef" and not (tmp_path / "part_aa").exists()
    with gzip.open(tmp_path / "c.jsonl.gz", "wb") as f:
        f.write(b'{"id": "1"}\n')
    gunzip_file(str(tmp_path / "c.jsonl.gz"), str(tmp_path / "c.jsonl"))
    assert (tmp_path / "c.jsonl").read_bytes() == b'{"id": "1"}\n'
