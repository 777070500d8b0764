"""The CPU a benchmark ran on, named from /proc/cpuinfo, for every results file's "Machine:" line; and dropping files
from the page cache for cold-start measurements."""
from __future__ import annotations

import os
from pathlib import Path

# instruction sets that decide which encoder and kernels are fast (bf16: AVX512-BF16 or AMX)
_ISA_FLAGS = (("amx_bf16", "AMX-BF16"), ("avx512_bf16", "AVX512-BF16"), ("avx512f", "AVX512"), ("avx2", "AVX2"))
# environment variables that hide instructions from one kernel library each: oneDNN (torch's bf16 matmuls), MKL
# (torch's fp32 matmuls), ATen (torch's own vectorised kernels: GELU, LayerNorm, softmax)
ISA_CAP_VARS = ("ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS", "ATEN_CPU_CAPABILITY")


def isa_caps() -> str:
    """The instruction-set caps set in the environment as `VAR=value` words ("" when none), for a results file's
    command line."""
    return " ".join(f"{var}={os.environ[var]}" for var in ISA_CAP_VARS if os.environ.get(var))


def cpu_description() -> str:
    """e.g. "AMD EPYC 7B13 (AVX2; no bf16 instructions)" or "Intel Xeon ... (AMX-BF16, AVX512-BF16, AVX512, AVX2)";
    adds the instruction-set caps set in the environment (`isa_caps`: ONEDNN_MAX_CPU_ISA=AVX2 hides bf16
    instructions from torch)."""
    model, flags = "unknown CPU", set()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and model == "unknown CPU":
                    model = value.strip()
                elif key.strip() == "flags" and not flags:
                    flags = set(value.split())
    except OSError:
        pass
    isa = [name for flag, name in _ISA_FLAGS if flag in flags]
    bf16 = "" if {"amx_bf16", "avx512_bf16"} & flags else "; no bf16 instructions"
    capped = f"; {isa_caps()}" if isa_caps() else ""
    return f"{model} ({', '.join(isa) or 'no AVX2'}{bf16}{capped})"


def drop_from_page_cache(paths: list[Path]) -> None:
    """posix_fadvise(DONTNEED) each file, recursing into folders (its clean pages leave the page cache; no root
    needed)."""
    for path in map(Path, paths):
        if path.is_dir():
            drop_from_page_cache([p for p in path.rglob("*") if p.is_file()])
        elif path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
