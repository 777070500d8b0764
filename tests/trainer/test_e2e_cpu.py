"""End to end on CPU: Ray with 2 data-parallel gloo workers, a tiny warm-started policy, the real retrieval server
over a corpus built from the bundled MuSiQue sample, a parquet from the data pipeline.

Run 1 trains 3 StePPO steps, checkpoints at step 3, starts step 4 and is SIGKILLed. Run 2 (resume_mode=auto)
continues from step 3 with the same next batch and the same RNG states, and saves step 4. The HF export loads
with AutoModelForCausalLM.

Why the warm start: a random tiny model almost never writes <search>…</search>, so its rollouts would have no
search rounds and no step rewards. tests/trainer/warm_start.py fine-tunes it for 100 steps on gold trajectories;
it then samples real search turns, and retrieval, rewards and PPO run unchanged.
"""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
MUSIQUE_SAMPLE = REPO / "data" / "samples" / "musique_ans_train_100.json"

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]


@pytest.fixture(scope="module")
def musi_retriever(tmp_path_factory):
    """A real retrieval server over the supporting paragraphs of the 100 bundled MuSiQue questions."""
    from stepsearch.search.testing import build_test_index, start_retrieval_server

    work = tmp_path_factory.mktemp("musi_corpus")
    corpus = work / "corpus.jsonl"
    subprocess.run([sys.executable, str(REPO / "scripts" / "data_process" / "build_corpus.py"), "--input",
                    str(MUSIQUE_SAMPLE), "--output", str(corpus), "--supporting_only"],
                   check=True, capture_output=True, timeout=120)
    index_dir = build_test_index(corpus, work / "index", method="dense")
    server = start_retrieval_server(index_dir)
    try:
        yield server.url
    finally:
        server.stop()


@pytest.fixture(scope="module")
def warm_policy(tmp_path_factory, musi_parquet):
    from tests.trainer.warm_start import build_warm_policy

    return build_warm_policy(str(tmp_path_factory.mktemp("warm_policy")), musi_parquet)


def _command(model, parquet, url, out_dir, *extra):
    return [sys.executable, "-m", "verl.trainer.main_ppo", "--config-name", "cpu_test", f"model.path={model}",
            f"data.train_files=[{parquet}]", f"retriever.url={url}", f"trainer.default_local_dir={out_dir}",
            *extra]


def _env():
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
            "RAY_USAGE_STATS_ENABLED": "0", "PYTHONPATH": str(REPO)}


def _read_jsonl(path):
    return [json.loads(line) for line in open(path)] if os.path.exists(path) else []


def _kill_group(proc):
    """SIGKILL the driver, then anything left in its process group (Ray's local services)."""
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _run_until_step4_starts(cmd, out_dir, log, timeout_s=600):
    """Start run 1; SIGKILL it as soon as step 4's batch is traced (after checkpoint 3 is complete)."""
    trace = os.path.join(out_dir, "data_trace.jsonl")
    proc = subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=open(log, "wb"), stderr=subprocess.STDOUT,
                            start_new_session=True)
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            if any(r["step"] == 4 for r in _read_jsonl(trace)):
                return
            if proc.poll() is not None:
                raise AssertionError(f"run 1 exited early ({proc.returncode}):\n{open(log).read()[-4000:]}")
            time.sleep(0.2)
        raise AssertionError(f"run 1 did not reach step 4 in {timeout_s}s:\n{open(log).read()[-4000:]}")
    finally:
        _kill_group(proc)


def _finite(x):
    return isinstance(x, (int, float)) and math.isfinite(x)


def test_steppo_three_steps_kill_resume_and_hf_export(tmp_path, musi_parquet, musi_retriever, warm_policy):
    from transformers import AutoModelForCausalLM

    from verl.utils import checkpoint as ckpt

    from stepsearch.train import check_retriever

    check_retriever(musi_retriever)  # what train.sh runs first; a dead URL fails fast with a message
    with pytest.raises(SystemExit, match="no answer from http://127.0.0.1:9"):
        check_retriever("http://127.0.0.1:9", timeout_s=2.0)
    out_dir = str(tmp_path / "run")
    cmd = _command(warm_policy, musi_parquet, musi_retriever, out_dir, "trainer.total_training_steps=4",
                   "trainer.save_freq=3")
    _run_until_step4_starts(cmd, out_dir, tmp_path / "run1.log")

    # Run 1: 3 steps with finite losses and non-zero step rewards, then a complete checkpoint at step 3.
    metrics = _read_jsonl(os.path.join(out_dir, "metrics.jsonl"))
    assert [m["step"] for m in metrics] == [1, 2, 3]
    for m in metrics:
        for key in ("actor/pg_loss", "critic/vf_loss", "actor/grad_norm", "critic/grad_norm"):
            assert _finite(m[key]), (key, m[key])
        assert m["search/num_searches/mean"] > 0
        assert m["reward/step_reward/mean"] != 0.0
    assert ckpt.read_latest(out_dir) == 3 and ckpt.is_complete(ckpt.step_dir(out_dir, 3))
    assert not os.path.exists(ckpt.step_dir(out_dir, 4))  # killed during step 4, before its save
    killed_step4 = [r for r in _read_jsonl(os.path.join(out_dir, "data_trace.jsonl")) if r["step"] == 4]
    assert len(killed_step4) == 1

    # Run 2: resume_mode=auto continues from step 3 with the same batch and RNG state, and finishes step 4.
    done = subprocess.run(cmd + ["trainer.resume_mode=auto"], cwd=REPO, env=_env(), capture_output=True,
                          timeout=600, start_new_session=True)
    assert done.returncode == 0, done.stdout.decode()[-4000:] + done.stderr.decode()[-4000:]
    trace = _read_jsonl(os.path.join(out_dir, "data_trace.jsonl"))
    assert [r["step"] for r in trace] == [1, 2, 3, 4, 4]
    resumed = trace[-1]
    assert resumed["index"] == killed_step4[0]["index"] and resumed["id"] == killed_step4[0]["id"]
    assert resumed["driver_rng"] == killed_step4[0]["driver_rng"]
    assert resumed["worker_rng"] == killed_step4[0]["worker_rng"]
    assert [m["step"] for m in _read_jsonl(os.path.join(out_dir, "metrics.jsonl"))] == [1, 2, 3, 4]
    assert ckpt.read_latest(out_dir) == 4

    # The HF export of the resumed run's last save loads with transformers and generates.
    model = AutoModelForCausalLM.from_pretrained(os.path.join(ckpt.step_dir(out_dir, 4), "hf"))
    assert model.config.num_hidden_layers == 2
