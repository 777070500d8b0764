"""GPU training check: the actor's speed and memory on a Qwen2.5-1.5B-shaped model, with no model hub.

    python bench/gpu_train_check.py --out DIR [--device auto|cuda|cpu] [--tiny] [--use_remove_padding both]
    python bench/gpu_train_check.py --report DIR/gpu_train_check.json   # its section -> bench/results/, RESULTS.md rebuilt

What it builds: a Qwen2 with the published Qwen2.5-1.5B dimensions (hidden 1536, 28 layers, 12 heads, 2 KV heads,
intermediate 8960, vocab 151936, tied embeddings), random weights (seed 0), wrapped with FSDP2 on one rank as the
trainer does (bf16 compute, fp32 master weights and reductions on GPU), driven by the real ``Actor`` class.
``--tiny`` swaps in a 2-layer, hidden-64 model and a small batch so that the same path runs on CPU in seconds.

What it measures (raw numbers in DIR/gpu_train_check.json, a table in DIR/gpu_train_check.md):
- actor update (PPO mini-batch: forward + backward + AdamW) time and MFU, packed and padded
  (``use_remove_padding`` true/false; "not available" where ActorConfig has no such key);
- compute_log_prob tokens/s (no grad);
- peak GPU memory of the update with and without gradient checkpointing;
- HF rollout tokens/s (``HFRolloutBackend``, bf16 copy, sampling, no stop strings).

MFU = model FLOPs of the real (non-pad) tokens / (seconds x peak bf16 FLOP/s). Model FLOPs per token:
2·N (N = parameters in matmuls, lm_head included, embedding lookup excluded) plus attention 4·layers·hidden·s/2
on average over a causal row of length s; an update is 3x a forward (forward + backward). Peak: the device's
dense bf16 figure (H100/H200 SXM: 989 TFLOP/s) or ``--peak_tflops``.

Imports torch, transformers and this repository's verl only (no vLLM, Ray or FAISS): it runs on the lent GPU
machine. Budget: about 3 minutes on an H100.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

QWEN25_15B = dict(hidden_size=1536, num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
                  intermediate_size=8960, vocab_size=151936, tie_word_embeddings=True, max_position_embeddings=32768,
                  rope_theta=1000000.0, rms_norm_eps=1e-6)
TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128,
            vocab_size=512, tie_word_embeddings=True, max_position_embeddings=1024, rope_theta=1000000.0,
            rms_norm_eps=1e-6)
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}
SECTION_MD = REPO / "bench" / "results" / "gpu_train_check.md"  # joined into bench/RESULTS.md
SECTION_START, SECTION_END = "<!-- gpu_train_check:start -->", "<!-- gpu_train_check:end -->"
COMMAND = "bash scripts/gpu_checks.sh OUT_DIR"
PART_COMMAND = "python bench/gpu_train_check.py --device cuda --out OUT_DIR/train_check"


@dataclasses.dataclass(frozen=True)
class Shape:
    """The batch of one measurement: ``rows`` sequences of prompt ``prompt_len`` + response ``response_len``
    (padded widths); real lengths are drawn uniformly from [min_fill, 1] of each width (seed 0)."""
    rows: int
    prompt_len: int
    response_len: int
    micro_batch: int
    min_fill: float = 0.3
    rollout_prompts: int = 32
    rollout_new_tokens: int = 256


FULL_SHAPE = Shape(rows=16, prompt_len=512, response_len=1536, micro_batch=4)
TINY_SHAPE = Shape(rows=4, prompt_len=16, response_len=32, micro_batch=2, rollout_prompts=4, rollout_new_tokens=8)


# ---- model and batch -----------------------------------------------------------------------------------------------
def build_model(dims: dict, device, seed: int = 0):
    """A randomly initialised fp32 Qwen2ForCausalLM with ``dims``, built directly on ``device``."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(**dims, torch_dtype="float32", attn_implementation="sdpa")
    torch.manual_seed(seed)
    with torch.device(device):
        model = Qwen2ForCausalLM(config)
    return model


def matmul_params(model) -> int:
    """Parameters used in matmuls per token: all but the embedding table, plus the (tied) lm_head once."""
    total = sum(p.numel() for p in model.parameters())  # a tied table counts once: as the lm_head matmul
    if not model.config.tie_word_embeddings:
        total -= model.get_input_embeddings().weight.numel()  # the lookup itself is not a matmul
    return total


def make_batch(shape: Shape, vocab: int, seed: int = 0):
    """A PPO batch (DataProto): left-padded prompts, right-padded responses, random advantages.

    input_ids/attention_mask/position_ids (B, P+T), responses/response_mask/old_log_probs/advantages (B, T);
    real token counts per row in ``meta_info["seq_lens"]``.
    """
    import torch

    from verl.protocol import DataProto

    g = torch.Generator().manual_seed(seed)
    B, P, T = shape.rows, shape.prompt_len, shape.response_len
    p_len = (torch.rand(B, generator=g) * (1 - shape.min_fill) * P + shape.min_fill * P).long().clamp(1, P)
    t_len = (torch.rand(B, generator=g) * (1 - shape.min_fill) * T + shape.min_fill * T).long().clamp(1, T)
    ids = torch.randint(0, vocab, (B, P + T), generator=g)
    attn = torch.zeros(B, P + T, dtype=torch.long)
    response_mask = torch.zeros(B, T)
    for i in range(B):
        attn[i, P - p_len[i]:P + t_len[i]] = 1
        response_mask[i, :t_len[i]] = 1
    ids = ids * attn
    position_ids = (attn.cumsum(-1) - 1).clamp(min=0)
    data = DataProto.from_dict(tensors={
        "input_ids": ids, "attention_mask": attn, "position_ids": position_ids, "responses": ids[:, P:],
        "response_mask": response_mask, "old_log_probs": torch.full((B, T), -2.0) * response_mask,
        "advantages": torch.randn(B, T, generator=g) * response_mask})
    data.meta_info["seq_lens"] = [int(s) for s in (p_len + t_len)]
    return data


def model_flops(n_matmul: int, layers: int, hidden: int, seq_lens: list[int], passes: int) -> float:
    """FLOPs of ``passes`` forward-equivalents over rows of real lengths ``seq_lens`` (see the module docstring)."""
    tokens = sum(seq_lens)
    attention = sum(4 * layers * hidden * s * s / 2 for s in seq_lens)
    return passes * (2.0 * n_matmul * tokens + attention)


# ---- measurements --------------------------------------------------------------------------------------------------
class Meter:
    """Timing with device synchronisation, and peak memory (GPU: allocator peak; CPU: process max RSS)."""

    def __init__(self, device):
        import torch

        self.torch, self.device = torch, device

    def sync(self) -> None:
        if self.device.type == "cuda":
            self.torch.cuda.synchronize(self.device)

    def reset_peak(self) -> None:
        if self.device.type == "cuda":
            self.torch.cuda.empty_cache()
            self.torch.cuda.reset_peak_memory_stats(self.device)

    def peak_gb(self) -> float:
        if self.device.type == "cuda":
            return self.torch.cuda.max_memory_allocated(self.device) / 2**30
        import resource
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20

    def timed(self, fn, repeats: int) -> tuple[float, object]:
        """(mean seconds over ``repeats`` calls after one warm-up call, last result)."""
        fn()
        self.sync()
        start = time.perf_counter()
        for _ in range(repeats):
            out = fn()
        self.sync()
        return (time.perf_counter() - start) / repeats, out


def _actor_config_fields() -> set[str]:
    from verl.workers.worker_config import ActorConfig
    return {f.name for f in dataclasses.fields(ActorConfig)}


def make_actor(module, optimizer, shape: Shape, packed: bool | None, checkpointing: bool):
    """The real Actor; ``packed`` None leaves use_remove_padding out (a tree without that key)."""
    from verl.workers.actor import Actor
    from verl.workers.worker_config import ActorConfig

    kw = dict(ppo_mini_batch_size=shape.rows, ppo_micro_batch_size_per_device=shape.micro_batch,
              forward_micro_batch_size_per_device=shape.micro_batch, world_size=1, entropy_coeff=0.0,
              gradient_checkpointing=checkpointing, use_bf16_autocast=False)
    if packed is not None:
        kw["use_remove_padding"] = packed
    if not checkpointing and hasattr(module, "gradient_checkpointing_disable"):
        module.gradient_checkpointing_disable()
    return Actor(module, optimizer, ActorConfig(**kw))


def measure_actor(module, optimizer, data, shape: Shape, meter: Meter, packed: bool | None, checkpointing: bool,
                  n_matmul: int, dims: dict, peak_flops: float | None, repeats: int) -> dict:
    actor = make_actor(module, optimizer, shape, packed, checkpointing)
    seq_lens = data.meta_info["seq_lens"]
    real_tokens = sum(seq_lens)
    meter.reset_peak()
    update_s, _ = meter.timed(lambda: actor.update_policy(data), repeats)
    peak = meter.peak_gb()
    logprob_s, _ = meter.timed(lambda: actor.compute_log_prob(data), repeats)
    flops = model_flops(n_matmul, dims["num_hidden_layers"], dims["hidden_size"], seq_lens, passes=3)
    return {"use_remove_padding": packed, "gradient_checkpointing": checkpointing, "update_s": update_s,
            "update_tokens_per_s": real_tokens / update_s, "update_tflops": flops / update_s / 1e12,
            "update_mfu": None if peak_flops is None else flops / update_s / peak_flops,
            "log_prob_s": logprob_s, "log_prob_tokens_per_s": real_tokens / logprob_s, "update_peak_memory_gb": peak,
            "real_tokens": real_tokens, "padded_tokens": len(seq_lens) * (shape.prompt_len + shape.response_len)}


def measure_rollout(dims: dict, state_dict, device, shape: Shape, meter: Meter) -> dict:
    """HF rollout on a bf16 (GPU) / fp32 (CPU) copy: sampled tokens per second, no stop strings."""
    import torch

    from verl.utils.tiny_model import build_tokenizer
    from verl.workers.rollout.base import SamplingConfig
    from verl.workers.rollout.hf import HFRolloutBackend

    model = build_model(dims, device)
    model.load_state_dict(state_dict)
    if device.type == "cuda":
        model.to(torch.bfloat16)
    model.eval()
    tokenizer = build_tokenizer(["a small tokenizer: the rollout samples ids only"], vocab_size=300)
    model.generation_config.eos_token_id = None  # random weights: run every row to max_new_tokens
    backend = HFRolloutBackend(model, tokenizer)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, dims["vocab_size"], (64,), generator=g).tolist()
               for _ in range(shape.rollout_prompts)]
    params = SamplingConfig(max_new_tokens=shape.rollout_new_tokens, temperature=1.0, stop=(), seed=0)
    seconds, outputs = meter.timed(lambda: backend.generate(prompts, params), repeats=1)
    tokens = sum(len(o.token_ids) for o in outputs)
    del model, backend
    return {"prompts": shape.rollout_prompts, "new_tokens": tokens, "seconds": seconds,
            "tokens_per_s": tokens / seconds}


def _init_single_rank(device) -> None:
    import torch.distributed as dist

    if not dist.is_initialized():
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method=f"tcp://127.0.0.1:{port}",
                                rank=0, world_size=1)


def _peak_flops(device, override: float | None) -> tuple[float | None, str]:
    import torch

    if override:
        return override * 1e12, f"--peak_tflops {override}"
    if device.type != "cuda":
        return None, "no peak figure for a CPU (MFU not computed)"
    name = torch.cuda.get_device_name(device)
    for key, tflops in PEAK_BF16_TFLOPS.items():
        if key in name:
            return tflops * 1e12, f"{name}: {tflops:.0f} TFLOP/s dense bf16"
    return None, f"{name}: unknown peak (pass --peak_tflops)"


def run(out_dir: str, device_name: str, tiny: bool, packing: str, peak_tflops: float | None, repeats: int) -> dict:
    import torch

    from verl.utils.hydra_to_dataclass import FSDPConfig
    from verl.workers.fsdp_workers import _shard, resolve_device

    started = time.perf_counter()
    device = resolve_device(device_name)
    dims, shape = (TINY, TINY_SHAPE) if tiny else (QWEN25_15B, FULL_SHAPE)
    meter = Meter(device)
    _init_single_rank(device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    peak, peak_note = _peak_flops(device, peak_tflops)
    module = build_model(dims, device)
    n_matmul = matmul_params(module)
    rollout_state = {k: v.detach().to("cpu", copy=True) for k, v in module.state_dict().items()}
    _shard(module, FSDPConfig(), device, 1)  # FSDP2 as in the trainer (bf16 params, fp32 reductions on GPU)
    optimizer = torch.optim.AdamW(module.parameters(), lr=1e-7)
    data = make_batch(shape, dims["vocab_size"])
    has_packing = "use_remove_padding" in _actor_config_fields()
    settings = {"both": [False, True], "true": [True], "false": [False]}[packing]
    results: dict = {"actor": [], "packing": "available" if has_packing else "not available"}
    for packed in (settings if has_packing else [None]):
        results["actor"].append(measure_actor(module, optimizer, data, shape, meter, packed, False, n_matmul, dims,
                                              peak, repeats))
    ckpt_packed = (True if True in settings else settings[0]) if has_packing else None
    results["actor"].append(measure_actor(module, optimizer, data, shape, meter, ckpt_packed, True, n_matmul, dims,
                                          peak, repeats))
    del optimizer, module
    if device.type == "cuda":
        torch.cuda.empty_cache()
    results["rollout"] = measure_rollout(dims, rollout_state, device, shape, meter)
    import transformers

    results["meta"] = {
        "date": datetime.date.today().isoformat(), "host": socket.gethostname(), "device": str(device),
        "device_name": (torch.cuda.get_device_name(device) if device.type == "cuda"
                        else f"{platform.machine()} CPU, {os.cpu_count()} cores"),
        "torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version(),
        "model": "tiny" if tiny else "Qwen2.5-1.5B-shaped (random init)", "dims": dims,
        "params": n_matmul, "shape": dataclasses.asdict(shape), "peak_flops_note": peak_note, "repeats": repeats,
        "load_average": os.getloadavg(), "wall_s": time.perf_counter() - started}
    os.makedirs(out_dir, exist_ok=True)
    from verl.utils.checkpoint import atomic_write_text

    atomic_write_text(os.path.join(out_dir, "gpu_train_check.json"), json.dumps(results, indent=1) + "\n")
    atomic_write_text(os.path.join(out_dir, "gpu_train_check.md"), markdown(results))
    return results


# ---- report --------------------------------------------------------------------------------------------------------
def _fmt(value, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def markdown(results: dict) -> str:
    meta = results["meta"]
    lines = [f"Model: {meta['model']}, {meta['params'] / 1e9:.2f} B parameters; batch {meta['shape']['rows']} rows of "
             f"prompt {meta['shape']['prompt_len']} + response {meta['shape']['response_len']} (real lengths "
             f"{meta['shape']['min_fill']:.0%}-100% of each), micro-batch {meta['shape']['micro_batch']}; "
             f"{meta['device_name']} ({meta['device']}), torch {meta['torch']}, transformers "
             f"{meta['transformers']}; {meta['date']}; whole check {meta['wall_s']:.0f} s. MFU peak: "
             f"{meta['peak_flops_note']}. Packing (actor_rollout_ref.model.use_remove_padding): {results['packing']}.",
             "",
             "| use_remove_padding | gradient checkpointing | update s | update tokens/s | TFLOP/s | MFU | "
             "update peak memory GiB | compute_log_prob tokens/s |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in results["actor"]:
        packed = "not available" if r["use_remove_padding"] is None else str(r["use_remove_padding"]).lower()
        lines.append(f"| {packed} | {str(r['gradient_checkpointing']).lower()} | {r['update_s']:.2f} | "
                     f"{r['update_tokens_per_s']:.0f} | {r['update_tflops']:.1f} | "
                     f"{_fmt(r['update_mfu'] and r['update_mfu'] * 100, '.1f')}{'%' if r['update_mfu'] else ''} | "
                     f"{r['update_peak_memory_gb']:.1f} | {r['log_prob_tokens_per_s']:.0f} |")
    ro = results["rollout"]
    lines += ["", f"HF rollout: {ro['prompts']} prompts x {ro['new_tokens'] // max(ro['prompts'], 1)} new tokens "
                  f"in {ro['seconds']:.1f} s = **{ro['tokens_per_s']:.0f} tokens/s** (sampling, no stop strings).", ""]
    return "\n".join(lines)


def write_results_section(results: dict | None, path: Path = SECTION_MD) -> None:
    """Replace (or append) the "GPU training check" section in `path` (bench/results/gpu_train_check.md, which
    bench/collect_results.py joins into bench/RESULTS.md); None: the not-run text."""
    from verl.utils.checkpoint import atomic_write_text

    head = ["## GPU training check (bench/gpu_train_check.py)", "",
            f"Command: `{COMMAND}` (its third part: `{PART_COMMAND}`; alone: `GPU_CHECKS=train {COMMAND}`). "
            f"Raw output: OUT_DIR/train_check/gpu_train_check.json; this section: "
            f"`python bench/gpu_train_check.py --report OUT_DIR/train_check/gpu_train_check.json`.", ""]
    if results is None:
        body = ["**Not run yet**: no GPU was lent to the session that added it. The CPU test "
                "(tests/trainer/test_gpu_train_check.py) runs the same code with `--tiny`.", ""]
    else:
        body = [markdown(results)]
    section = "\n".join([SECTION_START, *head, *body, SECTION_END])
    text = path.read_text() if path.exists() else ""
    if SECTION_START in text and SECTION_END in text:
        before, rest = text.split(SECTION_START, 1)
        after = rest.split(SECTION_END, 1)[1]
        text = before + section + after
    else:
        text = (text.rstrip("\n") + "\n\n" if text.strip() else "") + section + "\n"
    atomic_write_text(str(path), text)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", help="folder for gpu_train_check.json / .md")
    ap.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    ap.add_argument("--tiny", action="store_true", help="2-layer hidden-64 model and a small batch (CPU tests)")
    ap.add_argument("--use_remove_padding", default="both", choices=["both", "true", "false"],
                    help="packed, padded or both (both: also reports the packing speed-up)")
    ap.add_argument("--peak_tflops", type=float, default=None, help="peak dense bf16 TFLOP/s for MFU")
    ap.add_argument("--repeats", type=int, default=2, help="timed calls per measurement (after one warm-up)")
    ap.add_argument("--report", help="a gpu_train_check.json: write its table into bench/results/gpu_train_check.md, rebuild bench/RESULTS.md, exit")
    args = ap.parse_args(argv)
    if args.report:
        write_results_section(json.load(open(args.report)))
        subprocess.run([sys.executable, str(REPO / "bench" / "collect_results.py")], check=True)
        return 0
    if not args.out:
        ap.error("--out is required (or --report JSON)")
    results = run(args.out, args.device, args.tiny, args.use_remove_padding, args.peak_tflops, args.repeats)
    print(markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
