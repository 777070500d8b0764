"""File modes and durability for everything the project writes: one home for the umask and fsync helpers.

Kept free of torch and of any other heavy import, so data tools and the retrieval server can use it cheaply.
"""
from __future__ import annotations

import hashlib
import os


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
