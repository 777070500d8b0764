"""bench/gpu_train_check.py end to end on CPU with --tiny: the same code path the GPU check runs (FSDP2 on one rank,
the real Actor packed and padded, with and without gradient checkpointing, the HF rollout), without importing
vLLM, Ray or FAISS (the lent GPU machine has none of them); and its bench/RESULTS.md section writer."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

RUN = """
import runpy, sys
sys.argv = ["gpu_train_check.py", "--tiny", "--device", "cpu", "--repeats", "1", "--out", sys.argv[1]]
try:
    runpy.run_path("bench/gpu_train_check.py", run_name="__main__")
except SystemExit as exit:
    assert not exit.code, exit.code
print("IMPORTED", sorted({"vllm", "ray", "faiss"} & {m.split(".")[0] for m in sys.modules}))
"""


@pytest.mark.timeout(600)
def test_tiny_check_runs_on_cpu_without_vllm_ray_faiss(tmp_path):
    out = tmp_path / "check"
    done = subprocess.run([sys.executable, "-c", RUN, str(out)], cwd=REPO, capture_output=True, text=True,
                          timeout=600, env={"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PATH": "/usr/bin:/bin",
                                            "TOKENIZERS_PARALLELISM": "false"})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "IMPORTED []" in done.stdout
    results = json.loads((out / "gpu_train_check.json").read_text())
    rows = {(r["use_remove_padding"], r["gradient_checkpointing"]): r for r in results["actor"]}
    assert set(rows) == {(False, False), (True, False), (True, True)}
    for r in rows.values():
        assert r["update_s"] > 0 and r["log_prob_tokens_per_s"] > 0 and r["update_peak_memory_gb"] > 0
        assert r["update_mfu"] is None  # no peak FLOP/s figure for a CPU
        assert r["real_tokens"] < r["padded_tokens"]  # real lengths vary, so packing has pads to skip
    assert results["packing"] == "available"
    assert results["rollout"]["new_tokens"] > 0 and results["rollout"]["tokens_per_s"] > 0
    table = (out / "gpu_train_check.md").read_text()
    assert "| true | true |" in table and "| false | false |" in table and "HF rollout" in table


def test_results_section_is_replaced_in_place(tmp_path):
    sys.path.insert(0, str(REPO / "bench"))
    try:
        import gpu_train_check as check
    finally:
        sys.path.remove(str(REPO / "bench"))
    results_md = tmp_path / "RESULTS.md"
    results_md.write_text("# Benchmark results\n\n## Other\n\ntext\n")
    check.write_results_section(None, results_md)
    first = results_md.read_text()
    assert "**Not run yet**" in first and check.COMMAND in first and first.startswith("# Benchmark results")
    fake = {"packing": "not available",
            "rollout": {"prompts": 2, "new_tokens": 10, "seconds": 1.0, "tokens_per_s": 10.0},
            "actor": [{"use_remove_padding": None, "gradient_checkpointing": False, "update_s": 2.0,
                       "update_tokens_per_s": 100.0, "update_tflops": 400.0, "update_mfu": 0.4044,
                       "update_peak_memory_gb": 30.0, "log_prob_tokens_per_s": 900.0}],
            "meta": {"model": "m", "params": 1.5e9, "shape": {"rows": 16, "prompt_len": 512, "response_len": 1536,
                                                             "min_fill": 0.3, "micro_batch": 4},
                     "device_name": "NVIDIA H100", "device": "cuda:0", "torch": "t", "transformers": "x",
                     "date": "d", "wall_s": 100.0, "peak_flops_note": "n"}}
    check.write_results_section(fake, results_md)
    second = results_md.read_text()
    assert "Not run yet" not in second and second.count(check.SECTION_START) == 1
    assert "| not available | false | 2.00 | 100 | 400.0 | 40.4% | 30.0 | 900 |" in second
    assert second.split(check.SECTION_START)[0] == first.split(check.SECTION_START)[0]  # the rest is kept
