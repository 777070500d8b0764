"""Fetch the released StepSearch data and, optionally, Search-R1's wiki-18 corpus and e5 index (docs/method.md §3.5).

Uses `huggingface_hub` when it is installed (progress bars, resumable `.incomplete` files); otherwise a plain
HTTP download with a `.part` file and Range requests. Every file is verified against the hub's metadata
(size, and the LFS sha256 when the hub has one) before it is moved into place. Offline (or with
HF_HUB_OFFLINE=1) it fails at once with the list of URLs to fetch by hand and where to put each file.
"""
from __future__ import annotations

import gzip
import os
import shutil
from dataclasses import dataclass

from tqdm import tqdm

from stepsearch.data.io import atomic_path
from verl.utils.fs import file_sha256

HF_ENDPOINT = os.environ.get("HF_ENDPOINT", "https://huggingface.co")


@dataclass(frozen=True)
class RemoteFile:
    """One file of a HF dataset repo and the local name it is saved under."""

    repo: str
    filename: str
    target: str  # path relative to --save_path


@dataclass(frozen=True)
class Bundle:
    """Files to fetch, then an optional post-processing step: join parts or gunzip."""

    name: str
    files: tuple[RemoteFile, ...]
    join_into: str | None = None    # concatenate the files (in order) into this name, then delete the parts
    gunzip_into: str | None = None  # gunzip the single file into this name


STEPSEARCH_REPO = "Zill1/StepSearch-musi-dataset"
BUNDLES = {
    "stepsearch": Bundle("stepsearch", tuple(RemoteFile(STEPSEARCH_REPO, f, f) for f in (
        "musi_answerable_train.jsonl", "musi_answerable_dev.jsonl", "musi.jsonl", "musi.index"))),
    "wiki18_corpus": Bundle("wiki18_corpus", (RemoteFile("PeterJinGo/wiki-18-corpus", "wiki-18.jsonl.gz", "wiki-18.jsonl.gz"),),
                            gunzip_into="wiki-18.jsonl"),
    "wiki18_index": Bundle("wiki18_index", tuple(RemoteFile("PeterJinGo/wiki-18-e5-index", p, p) for p in ("part_aa", "part_ab")),
                           join_into="e5_Flat.index"),
}


class OfflineError(RuntimeError):
    """The hub cannot be reached; the message says what to download by hand and where to put it."""


def file_url(f: RemoteFile) -> str:
    return f"{HF_ENDPOINT}/datasets/{f.repo}/resolve/main/{f.filename}"


def manual_instructions(bundles: list[Bundle], save_path: str, reason: str) -> str:
    lines = [f"cannot download ({reason}). Fetch these files by hand on a machine with network access and put them here:"]
    for b in bundles:
        for f in b.files:
            lines.append(f"  {file_url(f)}\n      -> {os.path.join(save_path, f.target)}")
        if b.join_into:
            parts = " ".join(f.target for f in b.files)
            lines.append(f"  then: cd {save_path} && cat {parts} > {b.join_into}")
        if b.gunzip_into:
            lines.append(f"  then: gunzip -k {os.path.join(save_path, b.files[0].target)}  (gives {b.gunzip_into})")
    lines.append("Re-running this script afterwards skips files already in place (online it also checks their size and sha256).")
    return "\n".join(lines)


def verify_file(path: str, size: int | None, sha256: str | None) -> None:
    """Raise ValueError naming the file if its size or sha256 differs from the expected value."""
    if not os.path.exists(path):
        raise ValueError(f"{path}: missing after download")
    actual = os.path.getsize(path)
    if size is not None and actual != size:
        raise ValueError(f"{path}: size {actual} bytes, expected {size}; delete it and run again")
    if sha256 is not None and (digest := file_sha256(path)) != sha256:
        raise ValueError(f"{path}: sha256 {digest}, expected {sha256}; delete it and run again")


def join_parts(parts: list[str], out_path: str, remove_parts: bool = True) -> None:
    """Concatenate parts byte for byte into out_path (atomically), e.g. part_aa part_ab -> e5_Flat.index."""
    with atomic_path(out_path) as tmp, open(tmp, "wb") as out:
        for p in parts:
            with open(p, "rb") as f:
                shutil.copyfileobj(f, out, 1 << 24)
    if remove_parts:
        for p in parts:
            os.remove(p)


def gunzip_file(src: str, out_path: str) -> None:
    with atomic_path(out_path) as tmp, gzip.open(src, "rb") as f, open(tmp, "wb") as out:
        shutil.copyfileobj(f, out, 1 << 24)


def hub_offline_reason() -> str | None:
    """Why the hub is unusable without touching the network, or None."""
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(var, "").strip().lower() in ("1", "true", "yes", "on"):
            return f"{var}={os.environ[var]} is set"
    return None


def remote_metadata(f: RemoteFile, timeout_s: float = 15.0) -> tuple[int | None, str | None]:
    """(size, sha256) from the hub; sha256 only for LFS files. Raises OfflineError when unreachable."""
    import httpx

    try:
        r = httpx.head(file_url(f), follow_redirects=False, timeout=timeout_s)
    except httpx.HTTPError as e:
        raise OfflineError(f"{HF_ENDPOINT} unreachable: {type(e).__name__}: {e}") from None
    if r.status_code >= 400:
        raise OfflineError(f"{file_url(f)} answered HTTP {r.status_code}")
    size = r.headers.get("x-linked-size") or r.headers.get("content-length")
    etag = (r.headers.get("x-linked-etag") or "").strip('"')
    sha = etag if len(etag) == 64 and all(c in "0123456789abcdef" for c in etag) else None
    return (int(size) if size else None), sha


def http_download(url: str, dest: str, size: int | None, timeout_s: float = 60.0) -> None:
    """Resumable download: appends to dest + '.part' with a Range request, then renames onto dest."""
    import httpx

    part = dest + ".part"
    have = os.path.getsize(part) if os.path.exists(part) else 0
    headers = {"Range": f"bytes={have}-"} if have else {}
    with httpx.stream("GET", url, headers=headers, follow_redirects=True, timeout=timeout_s) as r:
        if r.status_code == 200:  # server ignored Range: start over
            have = 0
        elif r.status_code != 206:
            r.raise_for_status()
        with open(part, "ab" if have else "wb") as out, tqdm(total=size, initial=have, unit="B", unit_scale=True,
                                                              desc=os.path.basename(dest)) as bar:
            for chunk in r.iter_bytes(1 << 20):
                out.write(chunk)
                bar.update(len(chunk))
    os.replace(part, dest)


def fetch_file(f: RemoteFile, save_path: str) -> str:
    """Download one file unless a verified copy is already there; returns its local path."""
    dest = os.path.join(save_path, f.target)
    size, sha = remote_metadata(f)
    if os.path.exists(dest) and os.path.getsize(dest) == size:
        verify_file(dest, size, sha)
        return dest
    try:
        from huggingface_hub import hf_hub_download
    except ImportError:
        http_download(file_url(f), dest, size)
    else:
        got = hf_hub_download(f.repo, f.filename, repo_type="dataset", local_dir=save_path)
        if os.path.abspath(got) != os.path.abspath(dest):
            os.replace(got, dest)
    verify_file(dest, size, sha)
    return dest


def download(save_path: str, bundles: list[str]) -> list[str]:
    """Fetch the named bundles into save_path; returns the final file paths."""
    unknown = [b for b in bundles if b not in BUNDLES]
    if unknown:
        raise ValueError(f"unknown bundle(s) {unknown}; valid: {sorted(BUNDLES)}")
    chosen = [BUNDLES[b] for b in bundles]
    reason = hub_offline_reason()
    if reason:
        finals = [p for b in chosen for p in final_paths(b, save_path)]
        if all(os.path.exists(p) for p in finals):  # placed by hand: nothing to fetch (cannot verify offline)
            return finals
        raise OfflineError(manual_instructions(chosen, save_path, reason))
    os.makedirs(save_path, exist_ok=True)
    done = []
    for b in chosen:
        try:
            done += _fetch_bundle(b, save_path)
        except OfflineError as e:
            raise OfflineError(manual_instructions(chosen, save_path, str(e))) from None
    return done


def final_paths(b: Bundle, save_path: str) -> list[str]:
    """The files a bundle leaves behind once fetched and post-processed."""
    name = b.join_into or b.gunzip_into
    return [os.path.join(save_path, name)] if name else [os.path.join(save_path, f.target) for f in b.files]


def _fetch_bundle(b: Bundle, save_path: str) -> list[str]:
    if b.join_into:
        joined = os.path.join(save_path, b.join_into)
        total = sum(remote_metadata(f)[0] or 0 for f in b.files)
        if os.path.exists(joined) and os.path.getsize(joined) == total:
            return [joined]  # already joined in an earlier run (the parts were removed)
        join_parts([fetch_file(f, save_path) for f in b.files], joined)
        verify_file(joined, total, None)
        return [joined]
    paths = [fetch_file(f, save_path) for f in b.files]
    if b.gunzip_into:
        out = os.path.join(save_path, b.gunzip_into)
        if not os.path.exists(out):
            gunzip_file(paths[0], out)
        return [out]
    return paths
