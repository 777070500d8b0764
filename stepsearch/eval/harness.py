"""The evaluation harness: greedy multi-turn rollouts over parquet test sets, scored per data_source.

    python -m stepsearch.eval --data test.parquet [more.parquet ...] --model PATH --retriever_url URL --out DIR
    python -m stepsearch.eval --from-predictions DIR/predictions.jsonl --out DIR2      # re-score only

Writes `predictions.jsonl` (one scored record per question, input order), `summary.json` (per-source means,
model path, data and index hashes, settings; no timestamps, so two runs with the same inputs give identical
files), `metrics.md` (the table) and `run_info.json` (wall time: the one thing that varies between runs).
Rollouts go through the agent loop of training (`stepsearch.agent.dispatch.run_agent`) with greedy decoding;
`--mode auto` runs the async loop on vLLM's async engine and the sync loop on HF. Each prediction carries the
trajectory `record` (stepsearch.agent.record), from which rewards, metrics and the viewer read.

Failure policy: a question whose rollout had a retrieval that failed after the client's retries is a *retrieval
failure* (its prediction lists the errors in `retrieval_errors`). Every output counts them (`summary.json`
`retrieval_failures`, per source and in `metrics.md`). When the count exceeds `max_retrieval_failures` (default 0:
any failure), generation stops after the batch where that happened, the outputs are written for the questions
done so far, and `RetrievalFailuresExceeded` is raised (the CLI exits non-zero): a dead retriever must not
produce a plausible-looking score.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field

import httpx

from stepsearch.data.io import read_jsonl, write_json_atomic, write_jsonl_atomic
from stepsearch.eval.metrics import aggregate, markdown_table, retrieval_failed, score_prediction
from stepsearch.rewards import RewardConfig
from verl.utils.fs import file_sha256

logger = logging.getLogger(__name__)


class RetrievalFailuresExceeded(RuntimeError):
    """More questions had a failed retrieval than ``max_retrieval_failures`` allows; the outputs were written."""


@dataclass(frozen=True)
class EvalConfig:
    data: tuple[str, ...]
    model: str
    retriever_url: str
    out: str
    backend: str = "auto"            # auto (vllm when importable, else hf) | hf | vllm | scripted (world only)
    mode: str = "auto"               # agent loop: auto (async on vllm, else sync) | sync | async
    scripted_copy_prob: float = 1.0   # backend=scripted: the synthetic world's scripted searcher (tokenizer from --model)
    batch_size: int = 32
    max_prompt_length: int = 512
    max_turns: int = 5
    topk: int = 3
    max_new_tokens: int = 64          # per turn
    max_obs_length: int = 256
    max_context_length: int = 1024    # rolling context fed to the engine each turn (AgentConfig.max_context_length)
    max_response_length: int = 1024   # total response tokens, model turns + observations
    max_samples: int = -1             # first N rows of each file (-1: all)
    index_dir: str | None = None      # to hash the index manifest; else the server's /health identity is used
    seed: int = 0
    max_retrieval_failures: int = 0   # questions with a failed retrieval the run tolerates; more fails the run
    extra_agent: dict = field(default_factory=dict)
    # vLLM engine arguments (e.g. {"dtype": "float32", "enforce_eager": true, "kv_cache_memory_bytes": 4294967296});
    # on CPU the KV cache is 256 MiB unless set here (verl.workers.rollout.vllm.cpu_engine_defaults)
    engine_kwargs: dict = field(default_factory=dict)

    def __post_init__(self):
        if not self.data:
            raise ValueError("[eval] --data needs at least one parquet file")
        for path in self.data:
            if not os.path.exists(path):
                raise FileNotFoundError(f"[eval] --data file {path} does not exist")
        if self.backend not in ("auto", "hf", "vllm", "scripted"):
            raise ValueError(f"[eval] --backend {self.backend!r} is unknown; valid: auto, hf, vllm, scripted")
        if self.mode not in ("auto", "sync", "async"):
            raise ValueError(f"[eval] --mode {self.mode!r} is unknown; valid: auto, sync, async")
        if self.batch_size < 1 or self.max_turns < 1 or self.topk < 1:
            raise ValueError(f"[eval] batch_size ({self.batch_size}), max_turns ({self.max_turns}) and topk "
                             f"({self.topk}) must be >= 1")
        if self.max_retrieval_failures < 0:
            raise ValueError(f"[eval] --max_retrieval_failures must be >= 0, got {self.max_retrieval_failures}")


def index_hash(cfg: EvalConfig) -> str | None:
    """sha256 of the index manifest (from --index_dir), else of the identity the server reports on /health."""
    if cfg.index_dir:
        return file_sha256(os.path.join(cfg.index_dir, "manifest.json"))
    try:
        health = httpx.get(cfg.retriever_url.rstrip("/").removesuffix("/retrieve") + "/health", timeout=10.0).json()
    except (httpx.HTTPError, ValueError) as e:
        logger.warning("[eval] could not read %s/health (%s); summary has no index hash", cfg.retriever_url, e)
        return None
    ident = health.get("identity")
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest() if ident is not None else None


def agent_mode(cfg: EvalConfig, backend_name: str) -> str:
    """The agent loop: --mode, where auto is async on vLLM (its async engine) and sync on the other backends."""
    if cfg.mode != "auto":
        return cfg.mode
    return "async" if backend_name == "vllm" else "sync"


def make_backend(cfg: EvalConfig, tokenizer):
    """(backend, name): vLLM when asked for (or available under auto), HF transformers otherwise; `scripted` runs
    the synthetic world's scripted searcher (stepsearch.envs.scripted), a reference policy with a known EM. With
    vLLM and the async loop the engine is vLLM's async engine (AsyncVLLMEngine)."""
    kind = cfg.backend
    if kind == "scripted":
        from stepsearch.envs.scripted import ScriptedPolicyConfig, ScriptedSearchBackend
        return (ScriptedSearchBackend(tokenizer, ScriptedPolicyConfig(copy_correct_prob=cfg.scripted_copy_prob,
                                                                      seed=cfg.seed)),
                f"scripted(copy_correct_prob={cfg.scripted_copy_prob})")
    if kind == "auto":
        try:
            import vllm  # noqa: F401
            kind = "vllm"
        except ImportError:
            kind = "hf"
    if kind == "vllm":
        if agent_mode(cfg, "vllm") == "async":
            from verl.workers.rollout.vllm_async import AsyncVLLMEngine
            return AsyncVLLMEngine(cfg.model, tokenizer, **cfg.engine_kwargs), "vllm"
        from verl.workers.rollout.vllm import VLLMRolloutBackend
        return VLLMRolloutBackend(cfg.model, tokenizer, **cfg.engine_kwargs), "vllm"
    import torch
    from transformers import AutoModelForCausalLM

    from verl.workers.rollout.hf import HFRolloutBackend
    model = AutoModelForCausalLM.from_pretrained(cfg.model, dtype=torch.float32).eval()
    return HFRolloutBackend(model, tokenizer), "hf"


def question_of(prompt_text: str) -> str:
    """The question itself: the text after the last "Question:" of the prompt (the whole prompt otherwise)."""
    return prompt_text.rsplit("Question:", 1)[-1].strip()


def raw_predictions(gen) -> list[dict]:
    """One raw prediction per row of a rollout output DataProto (CONTRACTS.md "Rollout output")."""
    nt = gen.non_tensor_batch
    generated = gen.batch["response_mask"].sum(-1).tolist()
    out = []
    for i in range(len(gen)):
        gt = nt["ground_truth"][i]
        out.append({
            "id": str(nt["id"][i]), "data_source": str(nt["data_source"][i]), "question": question_of(nt["question"][i]),
            "trajectory": nt["response_text"][i], "targets": [str(t) for t in gt["target"]],
            "search_keys": [list(map(str, g)) for g in (gt.get("search_keys") or [])],
            "sub_answers": [list(map(str, h)) for h in (gt.get("sub_answers") or [])],
            "support_docs": [_plain(d) for d in (nt["support_docs"][i] or [])],
            "rounds": [{"query": r["query"], "docs": [{k: d.get(k) for k in ("id", "title", "text")} for d in r["docs"]]}
                       for r in nt["rounds"][i]],
            **({"record": nt["record"][i]} if "record" in nt else {}),
            "num_turns": int(nt["num_turns"][i]), "num_searches": int(nt["num_searches"][i]),
            "num_tokens": int(generated[i]), "finished": bool(nt["finished"][i]),
            "retrieval_errors": [str(e) for e in nt["retrieval_errors"][i]],
        })
    return out


def _plain(doc):
    return {str(k): v for k, v in doc.items()} if isinstance(doc, dict) else str(doc)


def generate_predictions(cfg: EvalConfig) -> tuple[list[dict], str, bool]:
    """Greedy rollouts over every file; returns (raw predictions in input order, backend name, stopped early).
    Generation stops after the batch that takes the retrieval failures past ``cfg.max_retrieval_failures``."""
    from stepsearch.agent.dispatch import run_agent
    from stepsearch.data.row_fields import search_row_fields
    from stepsearch.search.client import RetrievalClient
    from verl.utils.dataset import RLHFDataset
    from verl.utils.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(cfg.model)
    backend, name = make_backend(cfg, tokenizer)
    client = RetrievalClient(cfg.retriever_url)
    agent_cfg = build_agent_config(cfg, agent_mode(cfg, name))
    preds, failed = [], 0
    try:
        for path in cfg.data:
            ds = RLHFDataset(path, tokenizer, cfg.max_prompt_length, cfg.batch_size, shuffle=False, drop_last=False,
                             max_samples=cfg.max_samples, row_adapter=search_row_fields)
            for b, batch in enumerate(ds.iter_epoch()):
                batch_preds = raw_predictions(run_agent(batch, backend, client, tokenizer, agent_cfg))
                preds += batch_preds
                failed += sum(retrieval_failed(p) for p in batch_preds)
                logger.info("[eval] %s: batch %d/%d done (retrieval failures so far: %d)", os.path.basename(path),
                            b + 1, ds.batches_per_epoch(), failed)
                if failed > cfg.max_retrieval_failures:
                    logger.error("[eval] %d questions had a failed retrieval (--max_retrieval_failures %d); "
                                 "stopping", failed, cfg.max_retrieval_failures)
                    return preds, name, True
    finally:
        if hasattr(backend, "shutdown"):  # AsyncVLLMEngine: its engine core is a child process
            backend.shutdown()
    return preds, name, False


def build_agent_config(cfg: EvalConfig, mode: str = "sync"):
    """The rollout settings of evaluation: greedy decoding, the configured turn and length budgets, the loop."""
    from stepsearch.agent.agent_config import AgentConfig

    return AgentConfig.from_dict({"max_turns": cfg.max_turns, "topk": cfg.topk, "max_obs_length": cfg.max_obs_length,
                                  "max_new_tokens": cfg.max_new_tokens, "max_context_length": cfg.max_context_length,
                                  "max_response_length": cfg.max_response_length, "greedy": True, "seed": cfg.seed,
                                  "mode": mode, **cfg.extra_agent}, where="eval agent")


def write_outputs(out_dir: str, scored: list[dict], meta: dict) -> dict:
    """predictions.jsonl, summary.json and metrics.md under out_dir; returns the summary."""
    per_source = aggregate(scored)
    summary = {**meta, "num_predictions": len(scored), "retrieval_failures": per_source["all"]["retrieval_failures"],
               "per_source": per_source}
    os.makedirs(out_dir, exist_ok=True)
    write_jsonl_atomic(os.path.join(out_dir, "predictions.jsonl"), scored)
    write_json_atomic(os.path.join(out_dir, "summary.json"), summary)
    table = markdown_table(per_source)
    with open(os.path.join(out_dir, "metrics.md.tmp"), "w") as f:
        f.write(f"# Evaluation of `{meta.get('model_path')}`\n\n{table}\nQuestions with a failed retrieval: "
                f"{summary['retrieval_failures']}{' (generation stopped early)' if meta.get('stopped_early') else ''}\n")
    os.replace(os.path.join(out_dir, "metrics.md.tmp"), os.path.join(out_dir, "metrics.md"))
    return summary


def check_retrieval_failures(summary: dict, max_allowed: int, out_dir: str) -> None:
    """Raise RetrievalFailuresExceeded when the summary counts more failed-retrieval questions than allowed."""
    failed = summary["retrieval_failures"]
    if failed > max_allowed:
        stopped = " Generation stopped early;" if summary.get("stopped_early") else ""
        raise RetrievalFailuresExceeded(
            f"[eval] {failed} of {summary['num_predictions']} questions had a retrieval that failed after the "
            f"client's retries (--max_retrieval_failures {max_allowed}).{stopped} the scores in {out_dir} are not "
            f"valid; see 'retrieval_errors' in predictions.jsonl, check the retrieval server and rerun.")


def evaluate(cfg: EvalConfig, reward_cfg: RewardConfig = RewardConfig()) -> dict:
    """Generate, score and write; returns the summary dict. Raises RetrievalFailuresExceeded (after writing the
    outputs) when more than ``cfg.max_retrieval_failures`` questions had a failed retrieval."""
    start = time.perf_counter()
    raw, backend_name, stopped_early = generate_predictions(cfg)
    scored = [score_prediction(p, reward_cfg, f"{p['id']}") for p in raw]
    meta = {"model_path": os.path.abspath(cfg.model), "backend": backend_name,
            "data_files": {os.path.abspath(p): file_sha256(p) for p in cfg.data},
            "index_manifest_sha256": index_hash(cfg),
            "settings": {k: v for k, v in asdict(cfg).items() if k not in ("data", "model", "out", "retriever_url")},
            "reward_config": asdict(reward_cfg), "stopped_early": stopped_early}
    summary = write_outputs(cfg.out, scored, meta)
    write_json_atomic(os.path.join(cfg.out, "run_info.json"), {"wall_s": round(time.perf_counter() - start, 2),
                                                               "retriever_url": cfg.retriever_url})
    check_retrieval_failures(summary, cfg.max_retrieval_failures, cfg.out)
    return summary


def rescore(predictions_path: str, out_dir: str, reward_cfg: RewardConfig = RewardConfig(),
            max_retrieval_failures: int = EvalConfig.max_retrieval_failures) -> dict:
    """Re-score a predictions file (no generation); keeps the source summary's metadata when it is beside it.
    Raises RetrievalFailuresExceeded (after writing) as ``evaluate`` does."""
    preds = read_jsonl(predictions_path)
    scored = [score_prediction(p, reward_cfg, f"{predictions_path}:{i + 1}") for i, p in enumerate(preds)]
    src_summary = os.path.join(os.path.dirname(os.path.abspath(predictions_path)), "summary.json")
    meta = {}
    if os.path.exists(src_summary):
        with open(src_summary) as f:
            meta = {k: v for k, v in json.load(f).items() if k not in ("per_source", "num_predictions")}
    meta.update(rescored_from=os.path.abspath(predictions_path), reward_config=asdict(reward_cfg))
    meta.pop("retrieval_failures", None)  # recounted from the predictions
    summary = write_outputs(out_dir, scored, meta)
    check_retrieval_failures(summary, max_retrieval_failures, out_dir)
    return summary
