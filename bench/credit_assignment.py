"""Credit assignment in miniature: StePPO vs PPO (answer F1 only) vs GRPO (answer F1 only) on the synthetic world,
under a protocol fixed before the runs (it is printed into the results):

Settings (each a world, a MiniLM index and a warm start built here, under --work/<setting>/):
  easy  2-hop questions; the warm start answers prematurely after hop 1 with probability 0.6 (the demo's flaw:
        one early decision).
  hard  3- and 4-hop questions; the first two hops are always searched and the premature answer comes mid-chain,
        after hop 2 or 3, with probability 0.6 at each (`premature_from_hop=2`).
Warm start: the demo's (scripts/demo.sh): SFT on the scripted searcher's trajectories of all 800 training
  questions, every person and relation randomly relabelled per sample (so no question can be memorised).
Splits: after the warm start, the world's 800 training questions lose 100 (seeded draw) to a validation split; RL
  trains on the other 700; the trainer validates on the 100 every --test_freq steps (greedy); the world's 100 test
  questions are evaluated once, after training, by the final policy (`python -m stepsearch.eval`).
Budget, equal for every arm: 16 trajectories per RL step, 2 optimizer steps per RL step (mini-batches of 8
  trajectories, ppo_epochs 1), --steps RL steps. StePPO and PPO: GAE with a critic (critic lr = actor lr). GRPO:
  G samples per prompt (32/G prompts), KL as a loss, no critic.
Tuning, equal for every arm, on validation only: actor lr in LRS, and for GRPO also G in GROUPS; one run per
  configuration with seed TUNE_SEED (not one of the final seeds). Rule: the configuration with the highest mean
  validation EM over the validation points after steps/2 wins; a tie goes to the earlier one in grid order.
Final: the chosen configuration of each arm with every seed of --seeds (5 by default). Reported per arm: mean
  final test EM with a 95% bootstrap interval over seeds (10,000 resamples), the same for F1 and support recall,
  steps until validation EM >= --threshold, and collapses (a run whose last validation EM is below its step-0 one).

    python bench/credit_assignment.py --work runs/credit_assignment --settings easy hard
    python bench/credit_assignment.py --work runs/credit_assignment --report_only

Every (setting, stage, arm, configuration, seed) run keeps its result in its folder, so an interrupted call resumes
where it stopped (and a trainer run resumes from its last checkpoint). Results: bench/results/credit_assignment.md
and credit_assignment_<setting>.png.
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
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from bench.machine import cpu_description  # noqa: E402

# Reward ablation of docs/method.md §5.3: PPO and GRPO use the answer F1 only (no r_key, no step rewards).
ANSWER_ONLY = ["reward.use_search_key_reward=false", "reward.use_step_rewards=false"]
ARMS = ("steppo", "ppo", "grpo")
TRAJECTORIES = 16          # per RL step, every arm
MINI_BATCH = 8             # trajectories per optimizer step, every arm: 2 optimizer steps per RL step
LRS = (1.0e-3, 2.0e-3)     # the tuning grid (actor lr; the critic, where there is one, gets the same)
GROUPS = (4, 8)            # GRPO's group sizes in the tuning grid
TUNE_SEED = 100
NUM_VAL = 100
BOOTSTRAP = 10_000


@dataclass(frozen=True)
class Setting:
    hops: str
    premature_prob: float
    premature_from_hop: int
    # agent.max_response_length of training and of the test evaluation: a search round (query + 3 passages) is ~72
    # tokens, so 256 leaves room for 3 searches on 2-hop questions and 400 for 5 on 3-4-hop ones
    max_response_length: int
    # warm start: continue from this setting's warm-started model (same people and passages: the worlds share seed
    # 0) instead of a new tiny model; a fresh 0.66M-parameter model had copied 31% of names right after 600 SFT
    # steps on 3-4-hop trajectories (the copy circuit had not formed), against 81% on 2-hop ones
    init_from: str | None = None


SETTINGS = {"easy": Setting(hops="2:1", premature_prob=0.6, premature_from_hop=1, max_response_length=256),
            "hard": Setting(hops="3:0.5,4:0.5", premature_prob=0.6, premature_from_hop=2, max_response_length=400,
                            init_from="easy")}


def grid(arm: str) -> list[dict]:
    """The tuning configurations of one arm, in grid order."""
    if arm == "grpo":
        return [{"lr": lr, "group": g} for g in GROUPS for lr in LRS]
    return [{"lr": lr} for lr in LRS]


def config_name(cfg: dict) -> str:
    return "_".join(f"{k}{v:g}" for k, v in sorted(cfg.items()))


def arm_overrides(arm: str, cfg: dict) -> list[str]:
    """Hydra overrides on top of configs/cpu_demo.yaml for one arm and configuration."""
    lr = [f"actor_rollout_ref.optim.lr={cfg['lr']}", f"critic.optim.lr={cfg['lr']}"]
    if arm in ("steppo", "ppo"):
        sizes = [f"data.train_batch_size={TRAJECTORIES}", f"actor_rollout_ref.actor.ppo_mini_batch_size={MINI_BATCH}",
                 f"actor_rollout_ref.actor.ppo_micro_batch_size_per_device={MINI_BATCH}",
                 f"critic.ppo_mini_batch_size={MINI_BATCH}", f"critic.ppo_micro_batch_size_per_device={MINI_BATCH}"]
        return lr + sizes + ([] if arm == "steppo" else ANSWER_ONLY)
    group = cfg["group"]          # GRPO (docs/method.md §1.11): mini-batch sizes count prompts, x group = rows
    return lr + [f"data.train_batch_size={TRAJECTORIES // group}", f"actor_rollout_ref.rollout.n={group}",
                 f"actor_rollout_ref.actor.ppo_mini_batch_size={MINI_BATCH // group}",
                 f"actor_rollout_ref.actor.ppo_micro_batch_size_per_device={MINI_BATCH}",
                 "algorithm.adv_estimator=grpo", "algorithm.use_kl_in_reward=false",
                 "actor_rollout_ref.actor.use_kl_loss=true", *ANSWER_ONLY]


# ---------------------------------------------------------------------------------------------------------------------
# Preparation: world, splits, index, warm start (each step skipped when its output exists)
# ---------------------------------------------------------------------------------------------------------------------
def sh(cmd: list[str], log: str, threads: int, timeout_s: int | None = None) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    with open(log, "a") as f:
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=REPO, env=env, timeout=timeout_s)
    if proc.returncode != 0:
        raise RuntimeError(f"exit {proc.returncode}: {shlex.join(cmd)}; see {log}")


def split_validation(world_dir: str, seed: int) -> None:
    """world/train.parquet -> train.parquet (RL) + val.parquet (NUM_VAL rows); the original kept as train_all."""
    import pandas as pd

    from stepsearch.data.io import atomic_path

    full = os.path.join(world_dir, "train_all.parquet")
    if not os.path.exists(full):
        os.replace(os.path.join(world_dir, "train.parquet"), full)
    rows = pd.read_parquet(full)
    val_idx = np.random.default_rng(seed).choice(len(rows), size=NUM_VAL, replace=False)
    is_val = np.zeros(len(rows), dtype=bool)
    is_val[val_idx] = True
    question = rows["extra_info"].map(lambda info: info["question"])
    train = rows[~is_val & ~question.isin(set(question[is_val]))]
    for name, part in (("train", train), ("val", rows[is_val])):
        with atomic_path(os.path.join(world_dir, f"{name}.parquet"), suffix=".parquet") as tmp:
            part.reset_index(drop=True).to_parquet(tmp, index=False)


def prepare(setting: str, a) -> str:
    from stepsearch.search.testing import start_retrieval_server

    spec, root = SETTINGS[setting], os.path.join(a.work, setting)
    world, index, sft = (os.path.join(root, d) for d in ("world", "index", "sft_model"))
    os.makedirs(os.path.join(root, "logs"), exist_ok=True)
    log = lambda name: os.path.join(root, "logs", f"{name}.log")  # noqa: E731
    if not os.path.exists(os.path.join(world, "world.json")):
        sh([sys.executable, "-m", "stepsearch.envs.make_world", "--out", world, "--seed", "0", "--num_train", "800",
            "--num_test", "100", "--hop_weights", spec.hops, "--num_entities", "240"], log("world"), 1)
    if not os.path.exists(os.path.join(index, "manifest.json")):
        sh([sys.executable, "-m", "stepsearch.search.build_index", "--corpus", f"{world}/corpus.jsonl", "--out",
            index, "--quiet"], log("build_index"), a.prep_threads)
    if not os.path.exists(os.path.join(sft, "warm_start.json")):
        init = [] if spec.init_from is None else ["--init_model", os.path.join(a.work, spec.init_from, "sft_model")]
        if spec.init_from and not os.path.exists(os.path.join(a.work, spec.init_from, "sft_model", "warm_start.json")):
            raise SystemExit(f"the {setting} warm start continues the {spec.init_from} one: prepare that first")
        server = start_retrieval_server(index)
        try:   # the demo's warm start (scripts/demo.sh) on all 800 training questions, with this setting's flaw
            sh([sys.executable, "-m", "stepsearch.envs.warmstart", "--world_dir", world, "--retriever_url",
                server.url, "--out", sft, "--sft_steps", "2000", "--seed", "0", "--premature_answer_prob",
                str(spec.premature_prob), "--premature_from_hop", str(spec.premature_from_hop),
                "--copy_correct_prob", "1.0", "--hidden_size", "128", "--stop_copy_acc", "0.85", "--min_sft_steps",
                "300" if spec.init_from else "600", "--plateau_checks", "3", "--plateau_min_acc", "0.8", *init],
               log("warmstart"), a.prep_threads)
        finally:
            server.stop()
    if not os.path.exists(os.path.join(world, "val.parquet")):   # after the warm start, which saw all 800
        split_validation(world, seed=0)
    return root


# ---------------------------------------------------------------------------------------------------------------------
# One run: train, then (final stage only) the single test evaluation
# ---------------------------------------------------------------------------------------------------------------------
def run_one(root: str, stage: str, arm: str, cfg: dict, seed: int, a, url: str) -> dict:
    run_dir = os.path.join(root, stage, f"{arm}_{config_name(cfg)}_seed{seed}")
    done = os.path.join(run_dir, "result.json")
    if os.path.exists(done):
        return json.load(open(done))
    os.makedirs(run_dir, exist_ok=True)
    world = os.path.join(root, "world")
    cmd = [sys.executable, "-m", "verl.trainer.main_ppo", "--config-name", "cpu_demo",
           f"model.path={root}/sft_model", f"data.train_files=[{world}/train.parquet]",
           f"data.val_files=[{world}/val.parquet]", f"data.val_max_samples={NUM_VAL}", f"data.val_batch_size={NUM_VAL}",
           f"retriever.url={url}", f"trainer.default_local_dir={run_dir}/rl",
           f"trainer.total_training_steps={a.steps}", f"trainer.save_freq={a.test_freq}",
           f"trainer.test_freq={a.test_freq}", "trainer.resume_mode=auto", f"trainer.seed={seed}",
           f"data.seed={seed + 1}", f"actor_rollout_ref.actor.seed={seed}", f"critic.seed={seed}",
           f"agent.max_response_length={SETTINGS[os.path.basename(root)].max_response_length}",
           *arm_overrides(arm, cfg)]
    start = time.perf_counter()
    sh(cmd, os.path.join(run_dir, "train.log"), a.threads, a.run_timeout_s)
    rows = [json.loads(line) for line in open(os.path.join(run_dir, "rl", "metrics.jsonl"))]
    curve = sorted({r["step"]: r["val/all/em"] for r in rows if "val/all/em" in r}.items())
    result = {"arm": arm, "cfg": cfg, "seed": seed, "stage": stage, "val_curve": curve,
              "train_wall_s": time.perf_counter() - start}
    if stage == "final":   # the test split, touched once per final run
        eval_dir = os.path.join(run_dir, "test_eval")
        sh([sys.executable, "-m", "stepsearch.eval", "--data", f"{world}/test.parquet", "--model",
            f"{run_dir}/rl/global_step_{a.steps}/hf", "--retriever_url", url, "--out", eval_dir, "--backend", "hf",
            "--max_prompt_length", "96", "--max_new_tokens", "24", "--max_response_length",
            str(SETTINGS[os.path.basename(root)].max_response_length), "--index_dir", f"{root}/index"], os.path.join(run_dir, "eval.log"), a.threads)
        summary = json.load(open(os.path.join(eval_dir, "summary.json")))["per_source"]["all"]
        result["test"] = {k: summary[k] for k in ("em", "f1", "support_recall", "format_ok", "num_searches")}
    from stepsearch.data.io import write_json_atomic

    write_json_atomic(done, result)
    print(f"[{os.path.basename(root)}/{stage}] {arm} {config_name(cfg)} seed {seed}: val {curve}"
          + (f", test EM {result['test']['em']:.3f}" if "test" in result else "")
          + f" ({result['train_wall_s']:.0f} s)", flush=True)
    return result


def late_val_mean(curve: list, steps: int) -> float:
    late = [em for step, em in curve if step > steps / 2]
    return float(np.mean(late)) if late else float("nan")


def choose(results: list[dict], arm: str, steps: int) -> dict:
    """The tuning rule: highest mean validation EM after steps/2; ties to the earlier grid entry."""
    scores = [(late_val_mean(r["val_curve"], steps), -i, r["cfg"]) for i, r in
              enumerate(r for r in results if r["arm"] == arm)]
    return max(scores, key=lambda s: (s[0], s[1]))[2]


def run_setting(setting: str, a) -> dict:
    from stepsearch.search.testing import start_retrieval_server

    root = prepare(setting, a)
    if a.prepare_only:
        return {}
    server = start_retrieval_server(os.path.join(root, "index"))
    try:
        with ThreadPoolExecutor(max_workers=a.jobs) as pool:
            if a.tuning_from and a.tuning_from != setting:   # reuse another setting's choices, no tuning runs here
                tuning = []
                chosen = json.load(open(os.path.join(a.work, a.tuning_from, "results.json")))["chosen"]
            else:
                tune_jobs = [(arm, cfg) for arm in a.arms for cfg in grid(arm)]
                tuning = list(pool.map(lambda job: run_one(root, "tune", job[0], job[1], TUNE_SEED, a, server.url),
                                       tune_jobs))
                chosen = {arm: choose(tuning, arm, a.steps) for arm in a.arms}
            # seed-major order: a call stopped early leaves every arm with about the same number of seeds
            final_jobs = [(arm, seed) for seed in a.seeds for arm in a.arms]
            final = list(pool.map(lambda job: run_one(root, "final", job[0], chosen[job[0]], job[1], a, server.url),
                                  final_jobs))
    finally:
        server.stop()
    return {"tuning": tuning, "chosen": chosen, "tuned_on": a.tuning_from or setting, "final": final}


# ---------------------------------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------------------------------
def bootstrap_ci(values, rng: np.random.Generator) -> tuple[float, float, float]:
    """(mean, 2.5th, 97.5th percentile of the resampled means)."""
    x = np.asarray(values, dtype=np.float64)
    means = x[rng.integers(0, len(x), size=(BOOTSTRAP, len(x)))].mean(axis=1)
    return float(x.mean()), float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def diff_ci(a_vals, b_vals, rng: np.random.Generator) -> tuple[float, float, float]:
    """mean(a) - mean(b) with a 95% bootstrap interval (seeds resampled within each arm)."""
    a, b = np.asarray(a_vals, dtype=np.float64), np.asarray(b_vals, dtype=np.float64)
    d = (a[rng.integers(0, len(a), size=(BOOTSTRAP, len(a)))].mean(axis=1)
         - b[rng.integers(0, len(b), size=(BOOTSTRAP, len(b)))].mean(axis=1))
    return float(a.mean() - b.mean()), float(np.percentile(d, 2.5)), float(np.percentile(d, 97.5))


def flaw_stats(a, setting: str, r: dict) -> dict:
    """From a final run's test predictions: EM per hop count, and the share of questions answered before the last
    hop was searched (fewer searches than hops: the warm start's flaw)."""
    path = os.path.join(a.work, setting, "final", f"{r['arm']}_{config_name(r['cfg'])}_seed{r['seed']}", "test_eval",
                        "predictions.jsonl")
    preds = [json.loads(line) for line in open(path)]
    by_hops: dict[int, list[float]] = {}
    for p in preds:
        by_hops.setdefault(len(p["support_docs"]), []).append(p["em"])
    return {"em_by_hops": {h: float(np.mean(v)) for h, v in sorted(by_hops.items())},
            "early_stop": float(np.mean([p["num_searches"] < len(p["support_docs"]) for p in preds]))}


def steps_to(curve: list, threshold: float) -> int | None:
    return next((step for step, em in curve if em >= threshold), None)


def collapsed(curve: list) -> bool:
    return len(curve) >= 2 and curve[-1][1] < curve[0][1]


def plot(setting: str, final: list[dict], path: str, threshold: float) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rng = np.random.default_rng(0)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    colors = {"steppo": "tab:green", "ppo": "tab:blue", "grpo": "tab:orange"}
    for arm in ARMS:
        curves = [dict(r["val_curve"]) for r in final if r["arm"] == arm]
        if not curves:
            continue
        steps = sorted(set.intersection(*(set(c) for c in curves)))
        stats = [bootstrap_ci([c[s] for c in curves], rng) for s in steps]
        mean, lo, hi = (np.array([s[i] for s in stats]) for i in range(3))
        ax.plot(steps, mean, color=colors[arm], marker=".", label=f"{arm} (mean of {len(curves)} seeds)")
        ax.fill_between(steps, lo, hi, color=colors[arm], alpha=0.2)
    ax.axhline(threshold, ls="--", color="gray", lw=0.8)
    ax.set_xlabel("RL step")
    ax.set_ylabel("validation EM (greedy, 100 questions)")
    ax.set_title(f"{setting} setting: StePPO vs PPO vs GRPO, band = 95% bootstrap interval")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def fmt_ci(t: tuple[float, float, float]) -> str:
    return f"{t[0]:.3f} [{t[1]:.3f}, {t[2]:.3f}]"


def setting_markdown(setting: str, res: dict, a, png: str) -> list[str]:
    rng = np.random.default_rng(0)
    spec = SETTINGS[setting]
    warm = json.load(open(os.path.join(a.work, setting, "sft_model", "warm_start.json")))
    lines = [f"### {setting} setting", "",
             f"World: hops {spec.hops}, 240 people; warm start: premature answer with probability "
             f"{spec.premature_prob} after every hop from hop {spec.premature_from_hop} on (SFT steps "
             f"{warm.get('sft_steps_run', warm.get('steps', '?'))}).", "",
             f"Response budget (agent.max_response_length): {spec.max_response_length} tokens.", "",
             "Tuning (seed {}, validation EM after step {}; chosen per the rule in **bold**){}:".format(
                 TUNE_SEED, a.steps // 2, "" if res.get("tuned_on", setting) == setting else
                 f"; no tuning runs here, the configurations tuned on the {res['tuned_on']} setting are used"), "",
             "| arm | configuration | validation EM curve (step: EM) | late mean |", "|---|---|---|---|"]
    for r in res["tuning"]:
        name = config_name(r["cfg"])
        chosen = r["cfg"] == res["chosen"][r["arm"]]
        curve = ", ".join(f"{s}: {em:.2f}" for s, em in r["val_curve"])
        lines.append(f"| {r['arm']} | {'**' + name + '**' if chosen else name} | {curve} | "
                     f"{late_val_mean(r['val_curve'], a.steps):.3f} |")
    lines += ["", f"Final runs, seeds {a.seeds} (test split, 100 questions, evaluated once per run; mean and 95% "
              f"bootstrap interval over seeds):", "",
              "| arm | config | test EM | test F1 | support recall | format ok | mean searches | answered before the "
              f"last hop | EM by hop count | reached val EM ≥ {a.threshold} (steps) | collapses |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    by_arm = {arm: [r for r in res["final"] if r["arm"] == arm] for arm in ARMS}
    for arm, runs in by_arm.items():
        if not runs:
            continue
        metric = lambda k: [r["test"][k] for r in runs]  # noqa: E731
        reach = [steps_to(r["val_curve"], a.threshold) for r in runs]
        reached = [s for s in reach if s is not None]
        flaws = [flaw_stats(a, setting, r) for r in runs]
        hops = sorted({h for f in flaws for h in f["em_by_hops"]})
        by_hops = ", ".join(f"{h}-hop {np.mean([f['em_by_hops'][h] for f in flaws if h in f['em_by_hops']]):.2f}"
                            for h in hops)
        lines.append(
            f"| {arm} | {config_name(res['chosen'][arm])} | {fmt_ci(bootstrap_ci(metric('em'), rng))} | "
            f"{fmt_ci(bootstrap_ci(metric('f1'), rng))} | {fmt_ci(bootstrap_ci(metric('support_recall'), rng))} | "
            f"{np.mean(metric('format_ok')):.3f} | {np.mean(metric('num_searches')):.2f} | "
            f"{np.mean([f['early_stop'] for f in flaws]):.2f} | {by_hops} | {len(reached)}/{len(runs)}" + (f" (median {int(np.median(reached))})" if reached else "") + " | "
            f"{sum(collapsed(r['val_curve']) for r in runs)}/{len(runs)} |")
    lines += ["", "Per seed, test EM: " + "; ".join(
        f"{arm} " + ", ".join(f"{r['test']['em']:.2f}" for r in runs) for arm, runs in by_arm.items() if runs), ""]
    if by_arm["steppo"] and by_arm["ppo"]:
        em = lambda arm: [r["test"]["em"] for r in by_arm[arm]]  # noqa: E731
        lines.append(f"StePPO − PPO, test EM: {fmt_ci(diff_ci(em('steppo'), em('ppo'), rng))}" +
                     (f"; StePPO − GRPO: {fmt_ci(diff_ci(em('steppo'), em('grpo'), rng))}" if by_arm["grpo"] else ""))
        lines.append("")
    lines += [f"![{setting}]({os.path.basename(png)})", ""]
    return lines


def report(all_results: dict, a, argv) -> None:
    from stepsearch.data.io import write_text_atomic

    cmd = "python bench/credit_assignment.py " + " ".join(shlex.quote(x) for x in argv)
    walls = [r["train_wall_s"] for res in all_results.values() for r in res["tuning"] + res["final"]]
    lines = ["## Credit assignment on the synthetic world (bench/credit_assignment.py)", "",
             "Commands: the runs, `python bench/credit_assignment.py --work DIR --settings easy` then `python "
             "bench/credit_assignment.py --work DIR --settings hard --tuning_from easy` (resumable, any number of "
             f"calls); this report, `{cmd}`.", "",
             f"Machine: {cpu_description()}, {os.cpu_count()} CPU cores (shared with other jobs while it ran), Python {platform.python_version()}; "
             f"{len(walls)} training runs, {sum(walls) / 60:.0f} min of training wall time in all.", "",
             "Protocol, fixed before the runs: "
             f"{TRAJECTORIES} trajectories and 2 optimizer steps (mini-batches of {MINI_BATCH}) per RL step for every "
             f"arm, {a.steps} RL steps; StePPO = the paper's rewards (answer F1, r_key, G^t − P^t); PPO and GRPO = "
             f"answer F1 only (docs/method.md §5.3). Warm start: the demo's SFT on all 800 training questions (names "
             f"relabelled per sample). Splits, drawn after it: train 700 / validation {NUM_VAL} (from the world's "
             f"training questions) / test 100 (the world's test questions, evaluated once per final run). "
             f"Tuning: actor lr in {list(LRS)} for every arm, and G in {list(GROUPS)} for GRPO, one run each "
             f"(seed {TUNE_SEED}); the configuration with the highest mean validation EM after step "
             f"{a.steps // 2} wins. Collapse: last validation EM below the step-0 one.", ""]
    for setting, res in all_results.items():
        png = os.path.join(os.path.dirname(a.results), f"credit_assignment_{setting}.png")
        plot(setting, res["final"], png, a.threshold)
        lines += setting_markdown(setting, res, a, png)
    write_text_atomic(a.results, "\n".join(lines))
    print(f"wrote {a.results}")


def load_results(a) -> dict:
    """Each setting's results.json, or, for a setting still running or stopped early, the finished runs' own
    result.json files (the report then covers the seeds that finished)."""
    out = {}
    for setting in a.settings:
        path = os.path.join(a.work, setting, "results.json")
        if os.path.exists(path):
            out[setting] = json.load(open(path))
            continue
        runs = {stage: [json.load(open(os.path.join(a.work, setting, stage, d, "result.json")))
                        for d in sorted(os.listdir(os.path.join(a.work, setting, stage)))
                        if os.path.exists(os.path.join(a.work, setting, stage, d, "result.json"))]
                for stage in ("tune", "final") if os.path.isdir(os.path.join(a.work, setting, stage))}
        if not runs.get("final"):
            continue
        tuned_on = a.tuning_from or setting
        tuning = runs.get("tune", []) if tuned_on == setting else []
        chosen = ({arm: choose(tuning, arm, a.steps) for arm in a.arms} if tuned_on == setting else
                  json.load(open(os.path.join(a.work, tuned_on, "results.json")))["chosen"])
        out[setting] = {"tuning": tuning, "chosen": chosen, "tuned_on": tuned_on, "final": runs["final"]}
    return out


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default="runs/credit_assignment")
    p.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    p.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--test_freq", type=int, default=5)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--threshold", type=float, default=0.5, help="validation EM for 'steps to threshold'")
    p.add_argument("--jobs", type=int, default=2, help="runs at a time (each with --threads torch threads)")
    p.add_argument("--threads", type=int, default=1, help="torch threads of each run (training and test eval)")
    p.add_argument("--prep_threads", type=int, default=2, help="torch threads of the index build and warm start")
    p.add_argument("--run_timeout_s", type=int, default=3600)
    p.add_argument("--results", default=os.path.join(REPO, "bench", "results", "credit_assignment.md"))
    p.add_argument("--report_only", action="store_true", help="rebuild the markdown and plots from --work; no runs")
    p.add_argument("--prepare_only", action="store_true", help="build the settings' worlds, indexes, warm starts")
    p.add_argument("--tuning_from", choices=list(SETTINGS), help="use this setting's tuned configurations (its "
                   "results.json) for every setting instead of tuning each")
    a = p.parse_args(argv)
    if TUNE_SEED in a.seeds:
        raise SystemExit(f"--seeds must not contain the tuning seed {TUNE_SEED}")
    a.work = os.path.abspath(a.work)
    if a.report_only:
        results = load_results(a)
        report(results, a, argv)
        return results
    os.environ.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    # SIGTERM (kill, a CI timeout) unwinds through `finally` like Ctrl-C, so the retrieval servers are stopped too
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    results = {}
    for setting in a.settings:
        results[setting] = run_setting(setting, a)
        if a.prepare_only:
            continue
        from stepsearch.data.io import write_json_atomic

        write_json_atomic(os.path.join(a.work, setting, "results.json"), results[setting])
        report(results, a, argv)
    return results


if __name__ == "__main__":
    main()
