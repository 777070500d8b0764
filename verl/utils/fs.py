"""File modes and durability for everything the project writes: one home for the umask and fsync helpers.

Kept free of torch and of any other heavy import, so data tools and the retrieval server can use it cheaply.
"""
from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager

TMP_PREFIX = ".tmp_"
"""Name prefix of the temp files `atomic_path` writes beside their target (checkpoint listings skip them)."""


def current_umask() -> int:
    """This process's umask, read from /proc/self/status ("Umask:\t0022") so that no other thread ever sees a
    changed umask; where /proc is missing, os.umask is set and restored at once."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def new_file_mode() -> int:
    """The mode open() gives a new file: 0o666 & ~umask (0644 under umask 022, 0640 under 027)."""
    return 0o666 & ~current_umask()


def follow_umask(folder: str) -> None:
    """Give ``folder``, its sub-folders and files the modes a plain mkdir/open would: 0o777 / 0o666 & ~umask.
    For model folders written by others: mkdtemp makes 0700 folders, safetensors (0.8) writes 0600 files."""
    mask = current_umask()
    for parent, dirs, files in os.walk(folder):
        os.chmod(parent, 0o777 & ~mask)
        for name in files:
            path = os.path.join(parent, name)
            if not os.path.islink(path):
                os.chmod(path, 0o666 & ~mask)


def fsync_dir(directory: str) -> None:
    """fsync a folder, so the renames and new entries in it survive a power cut."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def file_sha256(path: str | os.PathLike, chunk_bytes: int = 1 << 22) -> str:
    """sha256 hex digest of a file's bytes, read in chunks (corpus identity, index manifests, downloads, eval data)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


@contextmanager
def atomic_path(final_path: str | os.PathLike, suffix: str = "", durable: bool = False) -> Iterator[str]:
    """The one atomic writer: yield a temp path in the target's folder; when the block succeeds the temp file gets
    `new_file_mode()` (mkstemp creates 0600; the umask is respected) and replaces `final_path` with os.replace (readers
    never see a partial file); on an error it is removed and `final_path` is left as it was. durable: also fsync the
    file and the folder, so the new file survives a power cut (checkpoints)."""
    final_path = str(final_path)
    folder = os.path.dirname(os.path.abspath(final_path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=TMP_PREFIX + os.path.basename(final_path) + ".",
                               suffix=suffix + ".tmp")
    os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, new_file_mode())  # after the writer ran: some writers replace the temp file
        if durable:
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
        os.replace(tmp, final_path)
        if durable:
            fsync_dir(folder)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
