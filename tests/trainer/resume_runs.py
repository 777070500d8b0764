"""Kill-and-resume runs of the trainer command line, shared by the slow end-to-end tests (vLLM, two Ray nodes).

The plan (``kill_then_resume``): run 1 trains with ``trainer.total_training_steps=4 trainer.save_freq=2`` and is
SIGKILLed as soon as step 4's batch is traced, so steps 1-3 are logged, checkpoint 2 is the latest complete one
and step 3 ran uninterrupted after step 2. Run 2 (the same command, resume_mode=auto) loads checkpoint 2, redoes
step 3 and trains step 4. ``assert_exact_resume`` then checks that the resumed step 3 drew the same batch with the
same RNG states as run 1's step 3, logged the same metrics (everything but timings and memory), and that the
resumed step 4 drew the batch that the killed run had drawn.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import pytest

REPO = Path(__file__).resolve().parents[2]
NONDETERMINISTIC_PREFIXES = ("timing_s/", "perf/")
"""Metric families that measure the machine (time, memory), not the run; everything else must repeat exactly."""


@pytest.fixture(scope="module")
def musi_server(tmp_path_factory):
    """A real retrieval server over the supporting paragraphs of the 100 bundled MuSiQue questions (as
    test_e2e_cpu's ``musi_retriever``), with a start-up wait long enough for a 2-core machine under other load."""
    from stepsearch.search.testing import build_test_index, start_retrieval_server

    work = tmp_path_factory.mktemp("musi_corpus")
    corpus = work / "corpus.jsonl"
    subprocess.run([sys.executable, str(REPO / "scripts" / "data_process" / "build_corpus.py"), "--input",
                    str(REPO / "data" / "samples" / "musique_ans_train_100.json"), "--output", str(corpus),
                    "--supporting_only"], check=True, capture_output=True, timeout=600)
    server = start_retrieval_server(build_test_index(corpus, work / "index", method="dense"), timeout_s=900)
    try:
        yield server.url
    finally:
        server.stop()


def trainer_command(config_name: str, model: str, parquet: str, url: str, out_dir: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "verl.trainer.main_ppo", "--config-name", config_name, f"model.path={model}",
            f"data.train_files=[{parquet}]", f"retriever.url={url}", f"trainer.default_local_dir={out_dir}",
            "trainer.total_training_steps=4", "trainer.save_freq=2", *extra]


def trainer_env() -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
            "RAY_USAGE_STATS_ENABLED": "0", "PYTHONPATH": str(REPO),
            # a loaded 2-core machine can take longer than Ray's default 10 s to register a fresh local raylet
            "RAY_raylet_start_wait_time_s": "120"}


def read_jsonl(path) -> list[dict]:
    return [json.loads(line) for line in open(path)] if os.path.exists(path) else []


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the driver, then anything left in its process group (a local Ray's services)."""
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _run_until_step_traced(cmd: list[str], out_dir: str, log: Path, step: int, timeout_s: float) -> None:
    trace = os.path.join(out_dir, "data_trace.jsonl")
    proc = subprocess.Popen(cmd, cwd=REPO, env=trainer_env(), stdout=open(log, "wb"), stderr=subprocess.STDOUT,
                            start_new_session=True)
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            if any(r["step"] == step for r in read_jsonl(trace)):
                return
            if proc.poll() is not None:
                raise AssertionError(f"run 1 exited early ({proc.returncode}):\n{open(log).read()[-6000:]}")
            time.sleep(0.2)
        raise AssertionError(f"run 1 did not reach step {step} in {timeout_s}s:\n{open(log).read()[-6000:]}")
    finally:
        _kill_group(proc)


def kill_then_resume(cmd: list[str], out_dir: str, work: Path, timeout_s: float = 900,
                     after_run1: Callable[[], None] | None = None) -> tuple[list[dict], str]:
    """Run 1 (killed during step 4), ``after_run1()``, then run 2 to the end. Returns (run 1's metrics rows, run
    2's output)."""
    _run_until_step_traced(cmd, out_dir, work / "run1.log", step=4, timeout_s=timeout_s)
    if after_run1 is not None:
        after_run1()
    run1_metrics = read_jsonl(os.path.join(out_dir, "metrics.jsonl"))
    assert [m["step"] for m in run1_metrics] == [1, 2, 3], run1_metrics
    done = subprocess.run(cmd, cwd=REPO, env=trainer_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          timeout=timeout_s, start_new_session=True)
    output = done.stdout.decode(errors="replace")
    (work / "run2.log").write_text(output)
    assert done.returncode == 0, output[-6000:]
    return run1_metrics, output


def comparable(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if not k.startswith(NONDETERMINISTIC_PREFIXES)}


def assert_exact_resume(out_dir: str, run1_metrics: list[dict]) -> list[dict]:
    """Checks the plan of the module docstring; returns the metrics rows of both runs (steps 1, 2, 3, 3, 4)."""
    from verl.utils import checkpoint as ckpt

    trace = read_jsonl(os.path.join(out_dir, "data_trace.jsonl"))
    assert [r["step"] for r in trace] == [1, 2, 3, 4, 3, 4]
    for uninterrupted, resumed in ((trace[2], trace[4]), (trace[3], trace[5])):
        for key in ("index", "id", "epoch", "driver_rng", "worker_rng"):
            assert resumed[key] == uninterrupted[key], (resumed["step"], key)
    rows = read_jsonl(os.path.join(out_dir, "metrics.jsonl"))
    assert [m["step"] for m in rows] == [1, 2, 3, 3, 4]
    resumed_step3 = comparable(rows[3])
    assert resumed_step3 == comparable(run1_metrics[2]), {
        k: (v, run1_metrics[2].get(k)) for k, v in resumed_step3.items() if run1_metrics[2].get(k) != v}
    assert len(resumed_step3) > 20  # losses, rewards, search statistics, ...
    assert ckpt.read_latest(out_dir) == 4 and ckpt.is_complete(ckpt.step_dir(out_dir, 4))
    return rows
