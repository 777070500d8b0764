"""Credit assignment in miniature: StePPO vs PPO (answer F1 only) vs GRPO on the synthetic multi-hop world.

Same warm start, same budget (trajectories per step x steps), 3 seeds each. For every run it records the held-out
EM curve (the trainer's greedy validation every `--test_freq` steps), the first step at which EM reaches
`--threshold`, and, from a final `python -m stepsearch.eval` of the exported policy, final EM / F1, mean searches
and mean redundancy P^t (share of a round's docs already retrieved earlier in the trajectory).

    python bench/credit_assignment.py --demo_dir runs/demo --steps 40 --seeds 0 1 2

`--demo_dir` must hold what `make demo` builds: world/, index/ and sft_model/. Results go to
bench/results/credit_assignment.md and bench/results/credit_assignment.png; run folders to --work.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import signal
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

# Reward ablation of docs/method.md §5.3: PPO and GRPO use the answer F1 only (no r_key, no step rewards).
ANSWER_ONLY = ["reward.use_search_key_reward=false", "reward.use_step_rewards=false"]
ALGOS = ("steppo", "ppo", "grpo")
GRPO_GROUP = 4


def algo_overrides(algo: str, trajectories: int) -> list[str]:
    """Hydra overrides on top of configs/cpu_demo.yaml; every algorithm samples `trajectories` per step."""
    if algo in ("steppo", "ppo"):
        half = max(trajectories // 2, 1)
        sizes = [f"data.train_batch_size={trajectories}", f"actor_rollout_ref.actor.ppo_mini_batch_size={half}",
                 f"actor_rollout_ref.actor.ppo_micro_batch_size_per_device={half}", f"critic.ppo_mini_batch_size={half}",
                 f"critic.ppo_micro_batch_size_per_device={half}"]
        return sizes + ([] if algo == "steppo" else ANSWER_ONLY)
    prompts = trajectories // GRPO_GROUP      # GRPO (docs/method.md §1.11): groups of GRPO_GROUP samples per prompt, KL as a loss
    return [f"data.train_batch_size={prompts}", f"actor_rollout_ref.rollout.n={GRPO_GROUP}",
            f"actor_rollout_ref.actor.ppo_mini_batch_size={prompts}",
            f"actor_rollout_ref.actor.ppo_micro_batch_size_per_device={trajectories}", "algorithm.adv_estimator=grpo",
            "algorithm.use_kl_in_reward=false", "actor_rollout_ref.actor.use_kl_loss=true", *ANSWER_ONLY]


def run_training(algo: str, seed: int, a, url: str, run_dir: str) -> float:
    """One trainer run in a subprocess; returns its wall time in seconds."""
    cmd = [sys.executable, "-m", "verl.trainer.main_ppo", "--config-name", "cpu_demo",
           f"model.path={a.demo_dir}/sft_model", f"data.train_files=[{a.demo_dir}/world/train.parquet]",
           f"data.val_files=[{a.demo_dir}/world/test.parquet]", f"retriever.url={url}",
           f"trainer.default_local_dir={run_dir}", f"trainer.total_training_steps={a.steps}",
           f"trainer.save_freq={a.steps}", f"trainer.test_freq={a.test_freq}",
           "trainer.resume_mode=disable", f"trainer.seed={seed}", f"data.seed={seed + 1}",
           f"actor_rollout_ref.actor.seed={seed}", f"critic.seed={seed}", *algo_overrides(algo, a.trajectories)]
    start = time.perf_counter()
    with open(os.path.join(run_dir + ".log"), "w") as log:
        proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, timeout=a.run_timeout_s)
    if proc.returncode != 0:
        raise RuntimeError(f"{algo} seed {seed} failed (exit {proc.returncode}); see {run_dir}.log\n"
                           f"command: {shlex.join(cmd)}")
    return time.perf_counter() - start


def run_eval(model: str, a, url: str, out: str) -> dict:
    from stepsearch.eval.harness import EvalConfig, evaluate

    cfg = EvalConfig(data=(f"{a.demo_dir}/world/test.parquet",), model=model, retriever_url=url, out=out,
                     backend="hf", max_prompt_length=96, max_new_tokens=24, max_response_length=400,
                     index_dir=f"{a.demo_dir}/index")
    summary = evaluate(cfg)
    preds = [json.loads(line) for line in open(os.path.join(out, "predictions.jsonl"))]
    penalties = [r["redundancy"] for p in preds for r in p["rounds"] if r["redundancy"] is not None]
    return {**summary["per_source"]["all"], "redundancy": sum(penalties) / max(len(penalties), 1)}


def val_curve(run_dir: str) -> list[tuple[int, float]]:
    rows = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    return [(r["step"], r["val/all/em"]) for r in rows if "val/all/em" in r]


def steps_to(curve: list[tuple[int, float]], threshold: float) -> int | None:
    return next((step for step, em in curve if em >= threshold), None)


def plot(results: dict, path: str, threshold: float) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    colors = {"steppo": "tab:green", "ppo": "tab:blue", "grpo": "tab:orange"}
    for algo, runs in results.items():
        for i, r in enumerate(runs):
            xs, ys = zip(*([(0, r["em_before"])] + r["curve"])) if r["curve"] else ([0], [r["em_before"]])
            ax.plot(xs, ys, color=colors.get(algo), alpha=0.8, label=algo if i == 0 else None, marker=".")
    ax.axhline(threshold, ls="--", color="gray", lw=0.8)
    ax.set_xlabel("RL step")
    ax.set_ylabel("held-out EM (greedy)")
    ax.set_title("synthetic world: StePPO vs PPO vs GRPO, 3 seeds")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def mean(xs):
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def fmt(x, f="{:.3f}"):
    return "–" if x is None else f.format(x)


def write_markdown(results: dict, a, em_before: float, path: str, cmd: str, wall_s: float) -> None:
    lines = ["## Credit assignment on the synthetic world (bench/credit_assignment.py)", "",
             f"Command: `{cmd}`", "",
             f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores (shared with other jobs while it ran), "
             f"{platform.python_version()}; total wall {wall_s / 60:.1f} min.", "",
             f"Same warm start (held-out EM {em_before:.3f}), {a.steps} steps x {a.trajectories} trajectories per "
             f"step (GRPO: {a.trajectories // GRPO_GROUP} prompts x {GRPO_GROUP} samples), seeds {a.seeds}, "
             f"EM threshold {a.threshold}. PPO and GRPO: answer-F1 reward only (docs/method.md §5.3).", "",
             "| algorithm | seed | steps to EM≥thr | final EM | final F1 | support recall | format ok | mean searches "
             "| redundancy P | wall s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for algo, runs in results.items():
        for r in runs:
            lines.append(f"| {algo} | {r['seed']} | {fmt(r['steps_to'], '{}')} | {fmt(r['em'])} | {fmt(r['f1'])} | "
                         f"{fmt(r.get('support_recall'))} | {fmt(r.get('format_ok'))} | "
                         f"{fmt(r['num_searches'], '{:.2f}')} | {fmt(r['redundancy'])} | {r['wall_s']:.0f} |")
    lines += ["", "| algorithm | runs reaching thr | mean final EM | mean support recall | mean format ok | mean searches "
              "| mean redundancy |", "|---|---|---|---|---|---|---|"]
    for algo, runs in results.items():
        reached = sum(r["steps_to"] is not None for r in runs)
        lines.append(f"| {algo} | {reached}/{len(runs)} | {fmt(mean([r['em'] for r in runs]))} | "
                     f"{fmt(mean([r.get('support_recall') for r in runs]))} | "
                     f"{fmt(mean([r.get('format_ok') for r in runs]))} | "
                     f"{fmt(mean([r['num_searches'] for r in runs]), '{:.2f}')} | "
                     f"{fmt(mean([r['redundancy'] for r in runs]))} |")
    lines += ["", "![credit assignment](credit_assignment.png)", ""]
    from stepsearch.data.io import write_text_atomic

    write_text_atomic(path, "\n".join(lines))


def report_from_work(a, argv) -> dict:
    """Rebuild the table and plot from a finished --work folder (results.json plus each run's eval summary)."""
    saved = json.load(open(os.path.join(a.work, "results.json")))
    for algo, runs in saved["results"].items():
        for r in runs:
            summary = json.load(open(os.path.join(a.work, f"{algo}_seed{r['seed']}_eval", "summary.json")))
            r.update({k: summary["per_source"]["all"][k] for k in ("support_recall", "format_ok")})
            r["steps_to"] = steps_to([tuple(x) for x in r["curve"]], a.threshold)
    png = os.path.join(os.path.dirname(a.results), "credit_assignment.png")
    plot(saved["results"], png, a.threshold)
    cmd = "python bench/credit_assignment.py " + " ".join(shlex.quote(x) for x in (argv or sys.argv[1:]))
    wall = sum(r["wall_s"] for runs in saved["results"].values() for r in runs)
    write_markdown(saved["results"], a, saved["before"]["em"], a.results, cmd, wall)
    return saved["results"]


def main(argv: list[str] | None = None) -> dict:
    from stepsearch.search.testing import start_retrieval_server

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--demo_dir", default="runs/demo")
    p.add_argument("--work", default="runs/credit_assignment")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--test_freq", type=int, default=10)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--algos", nargs="+", default=list(ALGOS), choices=list(ALGOS))
    p.add_argument("--trajectories", type=int, default=32, help="trajectories per step (GRPO: /4 prompts x 4)")
    p.add_argument("--threshold", type=float, default=0.5)
    p.add_argument("--run_timeout_s", type=int, default=3600)
    p.add_argument("--results", default=os.path.join(REPO, "bench", "results", "credit_assignment.md"))
    p.add_argument("--report_only", action="store_true", help="rebuild the markdown and plot from --work; no runs")
    a = p.parse_args(argv)
    if a.report_only:
        return report_from_work(a, argv)
    for need in ("world/test.parquet", "index/manifest.json", "sft_model/config.json"):
        if not os.path.exists(os.path.join(a.demo_dir, need)):
            raise SystemExit(f"{a.demo_dir}/{need} is missing: run `make demo` first (or pass --demo_dir)")
    os.environ.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    os.makedirs(a.work, exist_ok=True)
    start = time.perf_counter()
    # SIGTERM (kill, a CI timeout) unwinds through `finally` like Ctrl-C, so the retrieval server is stopped too
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    server = start_retrieval_server(os.path.join(a.demo_dir, "index"))
    try:
        before = run_eval(f"{a.demo_dir}/sft_model", a, server.url, os.path.join(a.work, "eval_warm_start"))
        results: dict[str, list[dict]] = {}
        for algo in a.algos:
            for seed in a.seeds:
                run_dir = os.path.abspath(os.path.join(a.work, f"{algo}_seed{seed}"))
                wall = run_training(algo, seed, a, server.url, run_dir)
                final = run_eval(os.path.join(run_dir, f"global_step_{a.steps}", "hf"), a, server.url,
                                 run_dir + "_eval")
                curve = val_curve(run_dir)
                results.setdefault(algo, []).append({
                    "seed": seed, "curve": curve, "steps_to": steps_to(curve, a.threshold), "em": final["em"],
                    "f1": final["f1"], "num_searches": final["num_searches"], "redundancy": final["redundancy"],
                    "support_recall": final["support_recall"], "format_ok": final["format_ok"],
                    "wall_s": wall, "em_before": before["em"]})
                print(f"{algo} seed {seed}: final EM {final['em']:.3f}, curve {curve}, {wall:.0f}s", flush=True)
                with open(os.path.join(a.work, "results.json"), "w") as f:
                    json.dump({"before": before, "results": results}, f, indent=1)
    finally:
        server.stop()
    png = os.path.join(os.path.dirname(a.results), "credit_assignment.png")
    plot(results, png, a.threshold)
    cmd = "python bench/credit_assignment.py " + " ".join(shlex.quote(x) for x in (argv or sys.argv[1:]))
    write_markdown(results, a, before["em"], a.results, cmd, time.perf_counter() - start)
    return results


if __name__ == "__main__":
    main()
