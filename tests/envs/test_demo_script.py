"""`make demo` (scripts/demo.sh) end to end at toy size: every stage runs, the closing files exist, and the
servers it started are gone afterwards."""
import json
import os
import re
import subprocess

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _processes_mentioning(text: str) -> list[str]:
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmd = open(f"/proc/{pid}/cmdline", "rb").read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmd:
            found.append(f"{pid}: {cmd}")
    return found


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_demo_script_at_toy_size(tmp_path):
    out = tmp_path / "demo"
    env = {**os.environ, "DEMO_OUT": str(out), "DEMO_STEPS": "1", "DEMO_SFT_STEPS": "3", "DEMO_NUM_TRAIN": "64",
           "DEMO_NUM_TEST": "8", "DEMO_PROGRESS_S": "2", "PY": os.path.join(REPO, ".venv", "bin", "python")}
    proc = subprocess.run(["bash", os.path.join(REPO, "scripts", "demo.sh")], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=840)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.load(open(out / "demo_summary.json"))
    assert summary["n_test"] == 8 and set(summary["before"]) == {"em", "f1", "num_searches", "support_recall"}
    assert "EM gain" in proc.stdout
    # the heartbeat: while a stage runs, a progress line at least every DEMO_PROGRESS_S seconds, stdout not a tty
    beats = re.findall(r"^\[demo (\d+)s\]   \.\.\. (\d)/8", proc.stdout, flags=re.M)
    assert len({stage for _, stage in beats}) >= 3, proc.stdout[-3000:]
    for name in ("learning_curve.png", "report_after.html", "report_before.html", "eval_after/summary.json",
                 "rl/global_step_1/hf/config.json"):
        assert (out / name).exists(), name
    assert not _processes_mentioning(str(out / "index"))      # retrieval server stopped
