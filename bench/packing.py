"""Sequence packing ("remove padding"): actor update and log-prob tokens/s, packed ÷ padded.

    .venv/bin/python bench/packing.py [--reps 2] [--model tiny,real] [--out bench/results/packing.md]
    .venv/bin/python bench/packing.py --model tiny,real --reps 1 --max_rows 2 --max_width 512 \\
        --out /tmp/packing_smoke.md                                                     # a smoke check

Three length distributions, each run with the actor settings of a shipped config (composed with Hydra and built by
the trainer's own build_run_config), once with actor_rollout_ref.model.use_remove_padding=false (padded) and once
with the default true (packed), on the same rows, the same model and the same thread count, interleaved:

(a) demo: the response lengths the CPU demo's rollouts produced (per-step min / mean / max of
    ``response_length_with_obs`` from a demo run's metrics.jsonl, DEMO_STEPS below), prompts of ~55 tokens; widths
    P = 96, T = 400 and batch settings from configs/cpu_demo.yaml.
(b) Search-R1-like: prompt 300–600 tokens; 1–5 turns of 50–800 generated tokens, each search turn followed by an
    observation of 3 documents of ~120 tokens; widths P = T = 4096 and batch settings from configs/ppo_trainer.yaml.
(c) real tokenizer: the first --rows_c questions of the bundled MuSiQue sample (data/samples/musique_ans_train_100.json)
    as the training data renders them (paper prompt, SmolLM2's chat template), each followed by a gold trajectory:
    per decomposition step a short generated turn (``<think> … </think>`` and ``<search>`` with that step's search
    key) and an observation built by the agent loop's ObservationEncoder from real MuSiQue passages (the step's
    supporting paragraph and two other paragraphs of the record, max_obs_length 800), then a final
    ``<think>``/``<answer>`` turn and EOS; all tokenized with the SmolLM2 tokenizer (docs/real_model.md). The
    generated turns are gold actions, much shorter than a policy's reasoning; the prompt and the observations are
    what a real rollout sees. Widths and batch settings as (b).
(d) real run: the rows of (c) at the widths and actor settings of the real-data StePPO run (configs/cpu_real.yaml:
    P = 512, T = 2048, token-budget micro-batches of 3,072 tokens for the update and 6,144 for log-probs), the
    first --rows_d questions; a response longer than T is cut to T, as the run's response window cuts it. The
    size at which SmolLM2's packed/padded ratio is measurable on 2 CPU cores (the 4096+4096 widths of (b) and (c)
    make its padded side cost tens of minutes a pass).

--model picks the model(s): ``tiny`` (the default: a random tiny Qwen2, --hidden/--layers/--heads) and ``real``
(SmolLM2-135M-Instruct, 134.5M parameters, from --real_model_dir, made by `make real-model`), or both
(``tiny,real``), each on the same rows. The token ids of (c) are real SmolLM2 ids; the tiny model's vocabulary is
smaller, so for it they are folded into its range (the lengths, which are what packing depends on, are unchanged).
--max_rows caps the rows of every distribution and --max_width the widths P and T (rows cut to fit): a smoke check
of the script, whose numbers then mean nothing.

Tokens/s counts real (non-pad) tokens, the same numerator for both paths, so the ratio is the time ratio. The pad
share is the share of pad tokens in the (rows × (P + T)) tensors the padded path computes on; "after trimming" is
what it would be if each micro-batch dropped its all-pad columns.

--attention also times the two CPU attention paths for packed rows on one forward+backward (see
verl/utils/packing.py): per-sequence SDPA (the one used) against SDPA with a dense block-diagonal causal mask.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from stepsearch.data.io import write_text_atomic  # noqa: E402
from tests.real_model_fixture import real_model_path  # noqa: E402
from tests.verl.helpers import build_batch  # noqa: E402
from verl.protocol import DataProto  # noqa: E402
from verl.utils.packing import pack_rows  # noqa: E402
from verl.utils.tiny_model import build_tiny_causal_lm, build_tokenizer  # noqa: E402
from verl.workers.actor import Actor, forward_token_budget, micro_batches, update_token_budget  # noqa: E402

MUSIQUE_SAMPLE = REPO / "data" / "samples" / "musique_ans_train_100.json"
REAL_OBS_LENGTH = 800  # configs/ppo_trainer.yaml agent.max_obs_length
REAL_TOPK = 3  # configs/ppo_trainer.yaml agent.topk

# Per-step (min, mean, max) of response_length_with_obs (generated + observation tokens) of the CPU demo's
# rollouts, 32 per step, steps 1..20 of the `make demo` run L4 of docs/demo.md (its metrics.jsonl: EM 0.04 -> 0.72).
DEMO_STEPS = [(77, 114.9, 160), (77, 110.7, 158), (77, 136.8, 159), (77, 143.7, 291), (77, 152.0, 315),
              (77, 155.3, 290), (77, 152.8, 361), (143, 165.4, 400), (144, 153.6, 285), (144, 148.1, 171),
              (144, 146.9, 155), (98, 144.3, 154), (144, 147.8, 160), (144, 146.4, 159), (144, 146.4, 163),
              (144, 153.5, 296), (144, 145.8, 153), (144, 145.4, 156), (144, 145.8, 150), (144, 155.0, 306)]
DEMO_BENCH_STEPS = [4, 9, 14, 19]  # steps 5, 10, 15, 20: 128 rows
DEMO_OBS_SHARE = 0.75  # search/obs_token_ratio of the same run: 0.75-0.77 of the response tokens are observations


def _turns_to_rows(prompt_len: int, segments: list[tuple[int, int]], vocab: int, gen: torch.Generator
                   ) -> tuple[list[int], list[int], list[int]]:
    """A prompt and a response made of (length, is_generated) segments: ids and the loss mask."""
    prompt = torch.randint(3, vocab, (prompt_len,), generator=gen).tolist()
    response, mask = [], []
    for length, generated in segments:
        response += torch.randint(3, vocab, (length,), generator=gen).tolist()
        mask += [int(generated)] * length
    return prompt, response, mask


def demo_rows(vocab: int, seed: int, steps: list[int]) -> list[tuple[list[int], list[int], list[int]]]:
    """32 rows per demo step: one at the step's min, one at its max, 30 at the length that gives its mean."""
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for s in steps:
        lo, mean, hi = DEMO_STEPS[s]
        mid = min(max(round((32 * mean - lo - hi) / 30), lo), hi)
        for length in [lo, hi] + [mid] * 30:
            obs = round(DEMO_OBS_SHARE * length)
            gen_len = length - obs
            first = gen_len // 2  # a search turn, the observation, the answer turn
            segments = [(first, True), (obs, False), (gen_len - first, True)]
            rows.append(_turns_to_rows(int(torch.randint(50, 61, (1,), generator=gen)), segments, vocab, gen))
    return rows


def search_r1_rows(n: int, vocab: int, seed: int, max_response: int) -> list[tuple[list[int], list[int], list[int]]]:
    """Prompt U[300, 600]; 1-5 turns of U[50, 800] generated tokens, every turn but the last a search followed by
    3 documents of U[100, 140] tokens; the response is cut at max_response tokens."""
    gen = torch.Generator().manual_seed(seed)

    def u(lo: int, hi: int) -> int:
        return int(torch.randint(lo, hi + 1, (1,), generator=gen))

    rows = []
    for _ in range(n):
        turns = u(1, 5)
        segments = []
        for t in range(turns):
            segments.append((u(50, 800), True))
            if t < turns - 1:
                segments.append((sum(u(100, 140) for _ in range(3)), False))
        prompt, response, mask = _turns_to_rows(u(300, 600), segments, vocab, gen)
        rows.append((prompt, response[:max_response], mask[:max_response]))
    return rows


def real_tokenizer_rows(tokenizer, n: int, vocab: int, max_response: int, seed: int = 0
                        ) -> tuple[list[tuple[list[int], list[int], list[int]]], dict]:
    """Distributions (c) and (d): the first n MuSiQue gold trajectories tokenized with the real tokenizer
    (stepsearch.envs.gold_sft), ids folded into [3, vocab) when the model's vocabulary is smaller than the
    tokenizer's, responses cut to max_response. Also returns their length statistics (before the cut)."""
    from stepsearch.envs.gold_sft import gold_trajectories

    gold = gold_trajectories(tokenizer, [str(MUSIQUE_SAMPLE)], REAL_TOPK, REAL_OBS_LENGTH, seed, limit=n)
    if len(gold) < n:
        raise SystemExit(f"[packing] {MUSIQUE_SAMPLE} has only {len(gold)} answerable records; {n} rows asked for")
    rows, prompt_lens, response_lens, obs_lens = [], [], [], []
    for prompt, response, mask in gold:
        prompt_lens.append(len(prompt))
        response_lens.append(len(response))
        obs_lens.append(len(response) - sum(mask))
        if len(tokenizer) > vocab:
            prompt, response = ([3 + t % (vocab - 3) for t in ids] for ids in (prompt, response))
        rows.append((prompt, response[:max_response], mask[:max_response]))
    stats = {"prompt": (min(prompt_lens), sum(prompt_lens) / n, max(prompt_lens)),
             "response": (min(response_lens), sum(response_lens) / n, max(response_lens)),
             "observation_share": sum(obs_lens) / sum(response_lens)}
    return rows, stats


def with_ppo_keys(data: DataProto, seed: int) -> DataProto:
    gen = torch.Generator().manual_seed(seed)
    shape = data.batch["responses"].shape
    old = -3.0 + 0.3 * torch.randn(shape, generator=gen)
    adv = torch.randn(shape, generator=gen)
    return data.union(DataProto.from_dict(tensors={"old_log_probs": old, "advantages": adv}))


def pad_shares(data: DataProto, rows_per_micro: int, max_tokens: int | None = None) -> tuple[float, float]:
    """(pad share of the full-width tensors, pad share after trimming all-pad columns per micro-batch); the
    micro-batches are the update's (fixed rows, or a token budget)."""
    mask = data.batch["attention_mask"].bool()
    real = int(mask.sum())
    trimmed = 0
    micros, _ = micro_batches(data, rows_per_micro, max_tokens)
    for m in micros:
        cols = m.batch["attention_mask"].bool().any(dim=0).nonzero()
        trimmed += m.batch["attention_mask"].shape[0] * int(cols.max() - cols.min() + 1)
    return 1 - real / mask.numel(), 1 - real / trimmed


def actor_config(config_name: str, rows: int, use_remove_padding: bool):
    """The actor section of a shipped config as the trainer builds it; one mini-batch of `rows` rows. Fewer rows
    than the config's micro-batch (a --max_rows smoke check) shrink the micro-batch to a divisor of `rows`."""
    import math

    from hydra import compose, initialize_config_dir

    from verl.trainer.main_ppo import build_run_config

    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        cfg = compose(config_name=config_name, overrides=[
            "model.path=bench", "data.train_files=[x]", "data.val_files=[]", f"data.train_batch_size={rows}",
            f"actor_rollout_ref.actor.ppo_mini_batch_size={rows}", "trainer.n_gpus_per_node=0",
            f"actor_rollout_ref.model.use_remove_padding={str(use_remove_padding).lower()}"])
    actor = cfg.actor_rollout_ref.actor
    for key in ("ppo_micro_batch_size_per_device", "forward_micro_batch_size_per_device"):
        if rows % actor[key]:
            actor[key] = math.gcd(rows, actor[key])
    return dataclasses.replace(build_run_config(cfg).actor, world_size=1)


def time_actor(model, config, data: DataProto) -> tuple[float, float]:
    """Seconds for compute_log_prob (with entropy) and for update_policy, on a fresh copy of `model`."""
    module = copy.deepcopy(model)
    actor = Actor(module, torch.optim.AdamW(module.parameters(), lr=1e-5), config)
    t0 = time.perf_counter()
    actor.compute_log_prob(data, calculate_entropy=True)
    t1 = time.perf_counter()
    actor.update_policy(data)
    return t1 - t0, time.perf_counter() - t1


def distribution_batch(config_name: str, rows, P: int, T: int, pad_id: int) -> tuple[DataProto, dict]:
    """The PPO batch of `rows` and what describes it (no timing): token counts, micro-batch sizes, pad shares."""
    data = with_ppo_keys(build_batch([r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows], pad_id,
                                     prompt_length=P, response_length=T), seed=1)
    cfg = actor_config(config_name, len(rows), use_remove_padding=False)
    real = int(data.batch["attention_mask"].sum())
    full_pad, trimmed_pad = pad_shares(data, cfg.ppo_micro_batch_size_per_device, update_token_budget(cfg))
    micro, fwd_micro = ((f"≤{update_token_budget(cfg)} tok", f"≤{forward_token_budget(cfg)} tok") if cfg.use_dynamic_bsz
                        else (cfg.ppo_micro_batch_size_per_device, cfg.forward_micro_batch_size_per_device))
    return data, {"config": config_name, "rows": len(rows), "P": P, "T": T, "real_tokens": real,
                  "mean_len": real / len(rows), "max_len": int(data.batch["attention_mask"].sum(-1).max()),
                  "micro": micro, "fwd_micro": fwd_micro,
                  "pad_share": full_pad, "pad_share_trimmed": trimmed_pad}


def bench_distribution(name: str, config_name: str, rows, P: int, T: int, model, pad_id: int, reps: int,
                       model_name: str = "tiny") -> dict:
    """The description of the batch plus raw (log-prob s, update s) per repetition and side, interleaved."""
    data, desc = distribution_batch(config_name, rows, P, T, pad_id)
    configs = {side: actor_config(config_name, len(rows), use_remove_padding=side == "packed")
               for side in ("padded", "packed")}
    times = {"padded": [], "packed": []}
    for rep in range(reps):
        for side in ("padded", "packed") if rep % 2 == 0 else ("packed", "padded"):
            times[side].append(time_actor(model, configs[side], data))
            print(f"[{model_name} {name}] rep {rep} {side}: log-prob {times[side][-1][0]:.2f}s "
                  f"update {times[side][-1][1]:.2f}s", flush=True)
    return {"name": name, "model": model_name, **desc, "raw": times}


def tokens_per_s(result: dict) -> tuple[dict, dict]:
    """(log-prob, update) real tokens/s per side, from the fastest repetition of each side: the one least slowed
    by the other jobs on the shared machine."""
    best = {side: (min(t[0] for t in ts), min(t[1] for t in ts)) for side, ts in result["raw"].items()}
    real = result["real_tokens"]
    return {s: real / best[s][0] for s in best}, {s: real / best[s][1] for s in best}


def bench_attention(model, rows, pad_id: int, P: int, T: int, reps: int) -> dict:
    """Forward+backward of `model` on one packed micro-batch: per-sequence SDPA vs a dense block-diagonal mask."""
    from verl.utils.packing import enable_packed_attention, packed_attention_kwargs

    data = build_batch([r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows], pad_id, P, T)
    mask = data.batch["attention_mask"]
    packed = pack_rows(data.batch["input_ids"], mask, data.batch["position_ids"])
    dense = copy.deepcopy(model)  # sdpa; transformers builds the (1, 1, N, N) mask from restarting position_ids
    varlen = copy.deepcopy(model)
    enable_packed_attention(varlen, "bench")
    calls = {
        "per-sequence SDPA": lambda: varlen(input_ids=packed.input_ids, position_ids=packed.position_ids,
                                            attention_mask=None, **packed_attention_kwargs(packed)).logits,
        "dense block-diagonal mask": lambda: dense(input_ids=packed.input_ids, position_ids=packed.position_ids,
                                                   attention_mask=None).logits,
    }
    times = {name: [] for name in calls}
    for rep in range(reps + 1):  # rep 0 warms up, then the two paths alternate
        for name in (calls if rep % 2 else reversed(list(calls))):
            t0 = time.perf_counter()
            calls[name]().float().square().mean().backward()
            if rep:
                times[name].append(time.perf_counter() - t0)
                print(f"[attention] rep {rep} {name}: {times[name][-1]:.2f}s", flush=True)
    return {"rows": len(rows), "tokens": packed.num_tokens, "raw": times}


def machine_line(load) -> str:
    from bench.machine import cpu_description

    return (f"Machine: {cpu_description()}, {os.cpu_count()} CPU cores (shared with other jobs), Python {platform.python_version()}, torch {torch.__version__}, no GPU; "
            f"load average at the end "
            f"{load[0]:.1f}/{load[1]:.1f}/{load[2]:.1f} (1/5/15 min)")


def _attention_line(model_name: str, attention: dict, many: bool) -> str:
    t = {name: min(ts) for name, ts in attention["raw"].items()}
    who = f"{model_name} model: " if many else ""
    return (f"{who}Attention path for packed rows on CPU (forward+backward of the same model on one packed "
            f"micro-batch of {attention['rows']} Search-R1-like rows, {attention['tokens']} tokens): "
            + ", ".join(f"{k} {v:.2f} s" for k, v in t.items())
            + f" (fastest of {len(attention['raw']['per-sequence SDPA'])}) → the dense mask takes "
            f"{t['dense block-diagonal mask'] / t['per-sequence SDPA']:.2f}x the per-sequence time. Raw: "
            f"`{ {k: [round(x, 2) for x in v] for k, v in attention['raw'].items()} }`")


def render(results: list[dict], attention: dict | None, cmd: str, model_descs: dict[str, str] | str, start_load,
           end_load) -> str:
    """The markdown report. Accepts the raw JSON of older runs too (one tiny model: a str description, results
    without "model", one attention dict)."""
    if isinstance(model_descs, str):
        model_descs = {"tiny": model_descs}
    if attention and "raw" in attention:
        attention = {"tiny": attention}
    many = len(model_descs) > 1
    models = ("Models: " + "; ".join(f"**{k}**: {v}" for k, v in model_descs.items())) if many else \
        f"Model: {next(iter(model_descs.values()))}"
    lines = ["## bench/packing.py: sequence packing (remove padding), actor tokens/s packed ÷ padded", "",
             f"Command: `{cmd}`", "",
             machine_line(end_load) + f"; at the start {start_load[0]:.1f}/{start_load[1]:.1f}/{start_load[2]:.1f}.",
             f"{models}, fp32. Each side: a fresh copy of the same model, AdamW; `compute_log_prob` "
             f"(with entropy) and one `update_policy` (one mini-batch = all rows) on the same rows; padded and packed "
             f"interleaved, each side's fastest repetition (the one least slowed by the other jobs; every repetition "
             f"is listed below). Tokens/s counts real tokens only (the same numerator for both paths).", "",
             "| " + ("model | " if many else "") + "distribution | rows | mean / max real tokens per row | width P+T "
             "| micro-batch rows (update / log-prob) | pad share (full width / trimmed per micro-batch) "
             "| log-prob tok/s padded → packed | ratio | update tok/s padded → packed | ratio | target |",
             "|" + ("---|" if many else "") + "---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in results:
        lp, up = tokens_per_s(r)
        target = ">= 1.5x: " + ("met" if up["packed"] / up["padded"] >= 1.5 and lp["packed"] / lp["padded"] >= 1.5
                                else "not met") if r["name"].startswith("(b)") else "-"
        lines.append("| " + (f"{r.get('model', 'tiny')} | " if many else "")
                     + f"{r['name']} ({r['config']}) | {r['rows']} | {r['mean_len']:.0f} / {r['max_len']} | "
                     f"{r['P']}+{r['T']} | {r['micro']} / {r['fwd_micro']} | "
                     f"{100 * r['pad_share']:.1f}% / {100 * r['pad_share_trimmed']:.1f}% | "
                     f"{lp['padded']:.0f} → {lp['packed']:.0f} | **{lp['packed'] / lp['padded']:.2f}x** | "
                     f"{up['padded']:.0f} → {up['packed']:.0f} | **{up['packed'] / up['padded']:.2f}x** | {target} |")
    described = set()
    for r in results:
        if "lengths" not in r or r["name"] in described:
            continue
        described.add(r["name"])
        (p0, p1, p2), (r0, r1, r2) = r["lengths"]["prompt"], r["lengths"]["response"]
        lines += ["", f"{r['name'].split()[0]} rows with the SmolLM2 tokenizer, before any cut to the width: prompt "
                      f"{p0} / {p1:.0f} / {p2} tokens (min / mean / max), response {r0} / {r1:.0f} / {r2} tokens, "
                      f"{100 * r['lengths']['observation_share']:.0f}% of the response tokens are observations."]
    for model_name, att in (attention or {}).items():
        lines += ["", _attention_line(model_name, att, many)]
    spread = max(max(ts) / min(ts) for r in results for side in r["raw"].values() for ts in zip(*side))
    lines += ["", f"The same call varied up to {spread:.1f}x between repetitions (other jobs on the 2 cores); read the "
                  f"ratios as rough."]
    lines += ["", "Raw seconds (log-prob, update) per repetition: `"
              + str({(f"{r.get('model', 'tiny')} " if many else "") + r["name"]:
                     {s: [(round(a, 2), round(b, 2)) for a, b in v] for s, v in r["raw"].items()} for r in results})
              + "`"]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--rows_b", type=int, default=8, help="Search-R1-like rows (one mini-batch)")
    ap.add_argument("--rows_c", type=int, default=16, help="real-tokenizer MuSiQue rows (one mini-batch)")
    ap.add_argument("--rows_d", type=int, default=8, help="real-run rows (one mini-batch)")
    ap.add_argument("--max_rows", type=int, default=0,
                    help="cap the rows of every distribution (0: no cap); for a quick check that the script runs")
    ap.add_argument("--max_width", type=int, default=0,
                    help="cap the widths P and T (0: the configs' widths; rows are cut to fit); for a quick check")
    ap.add_argument("--model", default="tiny", help="comma list of tiny and real (SmolLM2-135M-Instruct)")
    ap.add_argument("--real_model_dir", default=str(real_model_path()),
                    help="the converted real model (make real-model; default $STEPSEARCH_REAL_MODEL or "
                         "models/smollm2-135m-instruct); its tokenizer is also used by section c")
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--sections", default="a,b,c,attention")
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "packing.md"))
    ap.add_argument("--render_only", action="store_true",
                    help="rewrite --out from the raw timings saved beside it (<out>.json), measuring nothing")
    args = ap.parse_args()
    raw_path = Path(args.out).with_suffix(".json")
    if args.render_only:
        run = json.loads(raw_path.read_text())
    else:
        run = measure(args)
        write_text_atomic(raw_path, json.dumps(run, indent=1) + "\n")
    text = render(run["results"], run["attention"], run["cmd"], run.get("model_descs", run.get("model_desc")),
                  run["start_load"], run["end_load"]) + (f"\n{run['note']}\n" if "note" in run else "")
    print(text)
    write_text_atomic(args.out, text)
    print(f"wrote {args.out} and {raw_path}")


def load_real(model_dir: str):
    """(model, tokenizer) of the converted SmolLM2 folder, or a message that says how to make it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not (Path(model_dir) / "config.json").is_file():
        raise SystemExit(f"[packing] no converted real model at {model_dir}: run `make real-model` "
                         f"(or pass --real_model_dir)")
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa")
    return model, AutoTokenizer.from_pretrained(model_dir)


def build_models(args) -> dict[str, tuple[torch.nn.Module, int, int, str]]:
    """name -> (model, vocabulary size, pad id, description) for each name of --model."""
    names = [m for m in args.model.split(",") if m]
    unknown = sorted(set(names) - {"tiny", "real"})
    if unknown or not names:
        raise SystemExit(f"[packing] --model takes a comma list of tiny and real, got {args.model!r}")
    out = {}
    for name in names:
        if name == "tiny":
            tok = build_tokenizer(vocab_size=1024)
            model = build_tiny_causal_lm(tok, hidden_size=args.hidden, num_layers=args.layers, num_heads=args.heads,
                                         seed=0, max_position_embeddings=8192)
            n_params = sum(p.numel() for p in model.parameters())
            desc = (f"tiny Qwen2 (hidden {args.hidden}, {args.layers} layers, {args.heads} heads, vocab {len(tok)}, "
                    f"{n_params / 1e6:.2f}M parameters, sdpa)")
            out[name] = (model, len(tok), tok.pad_token_id, desc)
        else:
            model, tok = load_real(args.real_model_dir)
            c = model.config
            n_params = sum(p.numel() for p in model.parameters())
            desc = (f"SmolLM2-135M-Instruct ({type(model).__name__}, hidden {c.hidden_size}, {c.num_hidden_layers} "
                    f"layers, {c.num_attention_heads}/{c.num_key_value_heads} heads, vocab {c.vocab_size}, "
                    f"{n_params / 1e6:.1f}M parameters, sdpa)")
            out[name] = (model, c.vocab_size, tok.pad_token_id, desc)
    return out


def measure(args) -> dict:
    start_load = os.getloadavg()
    torch.set_num_threads(args.threads)
    sections = set(args.sections.split(","))

    def cap(n: int) -> int:
        return min(n, args.max_rows) if args.max_rows > 0 else n

    def widths(P: int, T: int) -> tuple[int, int]:
        return (min(P, args.max_width), min(T, args.max_width)) if args.max_width > 0 else (P, T)

    def fit(rows, P: int, T: int):
        """Rows cut to the widths: a prompt keeps its last P tokens (as the rolling context does), a response its
        first T; a no-op at the real widths, which every row fits."""
        return [(p[-P:], r[:T], m[:T]) for p, r, m in rows]

    models = build_models(args)
    real_tok = load_real(args.real_model_dir)[1] if sections & {"c", "d"} else None
    results, attention = [], {}
    for name, (model, vocab, pad_id, _) in models.items():
        if "a" in sections:
            P, T = widths(96, 400)
            rows = fit(demo_rows(vocab, seed=0, steps=DEMO_BENCH_STEPS)[:cap(32 * len(DEMO_BENCH_STEPS))], P, T)
            results.append(bench_distribution("(a) demo rollouts", "cpu_demo", rows, P, T, model, pad_id,
                                              args.reps, name))
        P, T = widths(4096, 4096)
        if "b" in sections:
            rows = fit(search_r1_rows(cap(args.rows_b), vocab, seed=0, max_response=T), P, T)
            results.append(bench_distribution("(b) Search-R1-like", "ppo_trainer", rows, P, T, model, pad_id,
                                              args.reps, name))
        if "c" in sections:
            rows, lengths = real_tokenizer_rows(real_tok, cap(args.rows_c), vocab, max_response=T)
            result = bench_distribution("(c) real tokenizer", "ppo_trainer", fit(rows, P, T), P, T, model, pad_id,
                                        args.reps, name)
            results.append({**result, "lengths": lengths})
        if "d" in sections:
            Pd, Td = widths(512, 2048)
            rows, lengths = real_tokenizer_rows(real_tok, cap(args.rows_d), vocab, max_response=Td)
            result = bench_distribution("(d) real run", "cpu_real", fit(rows, Pd, Td), Pd, Td, model, pad_id,
                                        args.reps, name)
            results.append({**result, "lengths": lengths})
        if "attention" in sections:
            rows = fit(search_r1_rows(cap(4), vocab, seed=1, max_response=T), P, T)
            attention[name] = bench_attention(model, rows, pad_id, P, T, args.reps)
    cmd = (".venv/bin/python bench/packing.py " + " ".join(sys.argv[1:])).strip()
    descs = {name: f"{m[3]}, {args.threads} torch threads" for name, m in models.items()}
    return {"results": results, "attention": attention or None, "cmd": cmd, "model_descs": descs,
            "start_load": start_load, "end_load": os.getloadavg()}


if __name__ == "__main__":
    main()
