"""GPU half of the retriever-speed issue (#8): an e5-sized encoder at fp16, the flat index on the GPU, queries/s
at batch 512, and top-3 agreement of the GPU fast path with exact fp32 on real questions.

The GPU machine has torch + transformers but no FAISS, no model hub and no shared data, so the run is in three steps:

    # 1. here (CPU): the real MiniLM in fp16 (what .half() makes of it, 45 MB), real questions, the 1,000-passage
    #    wiki-18 sample's fp32 embeddings and the exact fp32 top-3 of 2,000 questions (the reference)
    .venv/bin/python bench/retrieval_gpu.py prepare --dir .gpu/retrieval
    # 2. on the GPU machine (device tool; .gpu is carried): writes one JSON file
    python3 bench/retrieval_gpu.py run --dir .gpu/retrieval --out $OUT/retrieval_gpu.json
    # 3. here: the markdown section `gpu` of bench/results/retrieval.md
    .venv/bin/python bench/retrieval_gpu.py report --json FILE

What `run` measures (all on one GPU, CUDA-synchronised wall time, medians of repeats):
- agreement: MiniLM `mode="fp16"` on the GPU + TorchFlatIndex (fp16 and fp32 storage) vs the exact fp32 top-3
  computed on CPU with the real fp32 weights. fp16 weights are exactly `.half()` of the fp32 ones.
- encoder: an e5-base-v2-shaped BERT (12 layers, hidden 768, 110M parameters, random weights: speed does not depend
  on the values) with the bert-base-uncased WordPiece vocabulary, "query: " + real questions, 512 per call:
  fp32 in-order batches (Search-R1's path without --use_fp16), fp16 in-order batches (Search-R1 with fp16), and our
  fp16 length-sorted micro-batches of several sizes. Tokenization is included.
- index: a wiki-18-sized flat index (21,015,324 x 768, random unit vectors) in fp16 on the GPU (32 GB), and a 5M
  slice in fp16 vs fp32, searched top-3 with 512 queries per call.
- end to end: encode (best fp16 micro-batch) + search over the 21M fp16 index, 512 queries per call.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

WIKI18_PASSAGES = 21_015_324  # psgs_w100 (Search-R1's wiki-18 corpus)
E5_BASE_SHAPE = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                     max_position_embeddings=512, vocab_size=30522, type_vocab_size=2, model_type="bert",
                     architectures=["BertModel"])
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json")
TOPK, BATCH = 3, 512


# ---------------------------------------------------------------- 1. prepare (CPU machine)
def prepare(out: Path, n_agree: int, n_speed: int) -> None:
    import faiss
    import torch
    from safetensors.torch import load_file, save_file

    from bench.retrieval import WIKI_SAMPLE, build_sample_index, load_questions
    from stepsearch.search.encoders import Encoder, resolve_model

    out.mkdir(parents=True, exist_ok=True)
    src = Path(resolve_model("minilm")[1])
    minilm = out / "minilm16"
    minilm.mkdir(exist_ok=True)
    for name in ("config.json", *TOKENIZER_FILES):
        shutil.copy(src / name, minilm / name)
    weights = {k: v.half().contiguous() for k, v in load_file(src / "model.safetensors").items()}
    save_file(weights, minilm / "model.safetensors", metadata={"format": "pt"})
    # the e5-sized model: config only (weights are drawn on the GPU), MiniLM's uncased WordPiece tokenizer
    e5 = out / "e5-base-sized"
    e5.mkdir(exist_ok=True)
    for name in TOKENIZER_FILES:
        shutil.copy(src / name, e5 / name)
    (e5 / "config.json").write_text(json.dumps(E5_BASE_SHAPE, indent=1))

    questions = load_questions()
    agree_q, speed_q = questions[:n_agree], questions[n_agree:n_agree + n_speed]
    index = faiss.read_index(str(Path(build_sample_index(out / "tmp")) / "dense.faiss"))
    shutil.rmtree(out / "tmp", ignore_errors=True)
    passages = index.reconstruct_n(0, index.ntotal)  # (1000, 384) exact fp32 passage embeddings
    torch.set_num_threads(2)
    ref_scores, ref_ids = index.search(Encoder(mode="exact").encode_queries(agree_q), TOPK)
    np.save(out / "passages_fp32.npy", passages)
    np.save(out / "ref_ids.npy", ref_ids.astype(np.int64))
    np.save(out / "ref_scores.npy", ref_scores.astype(np.float32))
    (out / "questions.json").write_text(json.dumps({"agreement": agree_q, "speed": speed_q,
                                                    "corpus": str(WIKI_SAMPLE.name)}))
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    print(f"[prepare] {out}: {len(agree_q)} agreement + {len(speed_q)} speed questions, {len(passages)} passages, "
          f"{size / 2**20:.1f} MiB")


# ---------------------------------------------------------------- 2. run (GPU machine)
def sync_for(device: str):
    """CUDA-synchronise before reading the clock (no-op on CPU)."""
    import torch

    return torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)


def timed(fn, reps: int, sync) -> tuple[float, object]:
    """Median seconds of `reps` calls after one warm-up call, and the last result."""
    out = fn()
    sync()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        out = fn()
        sync()
        times.append(time.perf_counter() - t0)
    return float(np.median(times)), out


def agreement(ids: np.ndarray, ref: np.ndarray) -> dict:
    """Share of queries whose top-k ids (Q, k) are the reference's set, and in its order (the set part is
    bench.retrieval.top3_agreement, not imported here: the GPU machine lacks that module's dependencies)."""
    return {"top3_set_agreement": float(np.mean([set(a) == set(b) for a, b in zip(ids, ref)])),
            "same_order": float(np.mean((ids == ref).all(axis=1)))}


def agreement_section(d: Path, device: str, qs: list[str]) -> dict:
    from stepsearch.search.encoders import Encoder
    from stepsearch.search.gpu_index import TorchFlatIndex

    ref = np.load(d / "ref_ids.npy")
    passages = np.load(d / "passages_fp32.npy")
    enc = Encoder(model=str(d / "minilm16"), mode="fp16", device=device, query_batch_size=128)
    emb = enc.encode_queries(qs)
    res = {"queries": len(qs), "passages": int(len(passages)), "encoder": "MiniLM fp16 (mode=fp16)"}
    for storage in ("fp32", "fp16"):
        index = TorchFlatIndex(passages, [device], storage=storage)
        _, ids = index.search(emb, TOPK)
        res[f"index_{storage}"] = agreement(ids, ref)
        print(f"[gpu] agreement, index {storage}: {res[f'index_{storage}']}", flush=True)
    # the server's encoder on a GPU: native BERT, fp16, packed micro-batches (EncoderConfig.pack_tokens)
    native = Encoder(model=str(d / "minilm16"), mode="fp16", device=device, query_batch_size=128, backend="native")
    _, ids = TorchFlatIndex(passages, [device], storage="fp16").search(native.encode_queries(qs), TOPK)
    res["native_packed_index_fp16"] = agreement(ids, ref)
    print(f"[gpu] agreement, native packed encoder, index fp16: {res['native_packed_index_fp16']}", flush=True)
    return res


def encoder_section(d: Path, device: str, qs: list[str], reps: int, layers: int) -> dict:
    import torch
    from transformers import AutoConfig, AutoModel

    from stepsearch.search.encoders import Encoder

    folder = Path(f"/tmp/e5-base-sized-{layers}l")  # random e5-base-shaped weights, saved once for Encoder
    if not (folder / "model.safetensors").is_file():
        shutil.copytree(d / "e5-base-sized", folder, dirs_exist_ok=True)
        torch.manual_seed(0)
        AutoModel.from_config(AutoConfig.from_pretrained(folder, num_hidden_layers=layers)).save_pretrained(folder)
    sync = sync_for(device)
    batches = [qs[i:i + BATCH] for i in range(0, len(qs) - BATCH + 1, BATCH)]
    rows = {}

    def measure(enc, **kw):
        it = iter(range(10**9))
        secs, emb = timed(lambda: enc.encode_queries(batches[next(it) % len(batches)], **kw), reps, sync)
        return BATCH / secs, emb

    variants = [("fp32 in-order (Search-R1, no --use_fp16)", "exact", {}),
                ("fp16 in-order (Search-R1 --use_fp16)", "fp16-inorder", {}),
                *[(f"fp16 length-sorted micro-batches of {mb}", "fp16", {"batch_size": mb}) for mb in (64, 128, 256, 512)],
                *[(f"native encoder (the server's), fp16 sorted batches of 128, {how}", f"native_{how}",
                   {"batch_size": 128}) for how in ("padded", "packed")]]
    encoders = {"exact": Encoder(model=str(folder), mode="exact", device=device, batch_size=BATCH),
                "fp16": Encoder(model=str(folder), mode="fp16", device=device, batch_size=BATCH),
                **{f"native_{how}": Encoder(model=str(folder), mode="fp16", device=device, batch_size=BATCH,
                                            backend="native", pack_tokens=how == "packed")
                   for how in ("padded", "packed")}}
    for name, key, kw in variants:
        enc = encoders.get(key, encoders["fp16"])  # "fp16-inorder": the fp16 encoder, called in order
        if key == "fp16-inorder":  # Search-R1's fp16 path: the fp16 model, batches in order padded to the longest
            secs, _ = timed(lambda: enc.encode_in_order([enc.config.query_prefix + q for q in batches[0]], BATCH),
                            reps, sync)
            qps = BATCH / secs
        else:
            qps, _ = measure(enc, **kw)
        rows[name] = qps
        print(f"[gpu] encoder {name}: {qps:.0f} q/s", flush=True)
    params = sum(p.numel() for p in encoders["fp16"].model.parameters())
    return {"qps": rows, "params": int(params), "layers": layers, "prefix": encoders["fp16"].config.query_prefix,
            "tokens_mean": float(np.mean([len(x) for x in encoders["fp16"].token_ids(
                [encoders["fp16"].config.query_prefix + q for q in qs[:BATCH]])]))}, encoders["fp16"]


def random_unit_rows(n: int, d: int, device: str, dtype, seed: int, chunk: int = 1 << 21):
    """(n, d) random unit vectors built on the GPU in chunks (fp32 math, stored as `dtype`)."""
    import torch

    g = torch.Generator(device=device).manual_seed(seed)
    out = torch.empty((n, d), dtype=dtype, device=device)
    for s in range(0, n, chunk):
        x = torch.randn((min(chunk, n - s), d), generator=g, device=device)
        out[s:s + len(x)] = torch.nn.functional.normalize(x, dim=1).to(dtype)
    return out


def index_section(device: str, queries: np.ndarray, reps: int, full_rows: int, slice_rows: int) -> dict:
    import torch

    from stepsearch.search.gpu_index import TorchFlatIndex

    sync = sync_for(device)
    res = {}
    # a slice in fp16 and fp32: speed ratio, and how often fp16 storage changes the top-3 set on random data
    found = {}
    for storage in ("fp32", "fp16"):
        idx = TorchFlatIndex(None, [device], storage=storage, dim=queries.shape[1])
        idx.shards = [random_unit_rows(slice_rows, queries.shape[1], device, idx.dtype, seed=1)]
        idx.ntotal = slice_rows
        secs, (_, ids) = timed(lambda: idx.search(queries, TOPK), reps, sync)
        found[storage] = ids
        res[f"slice_{storage}"] = {"rows": slice_rows, "qps": BATCH / secs, "ms_per_batch": secs * 1e3,
                                   "gib": idx.memory_bytes() / 2**30}
        print(f"[gpu] index slice {storage}: {res[f'slice_{storage}']}", flush=True)
        del idx
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    res["slice_fp16_vs_fp32_top3_set_agreement_random"] = float(
        np.mean([set(a) == set(b) for a, b in zip(found["fp16"], found["fp32"])]))
    idx = TorchFlatIndex(None, [device], storage="fp16", dim=queries.shape[1])
    t0 = time.perf_counter()
    idx.shards = [random_unit_rows(full_rows, queries.shape[1], device, idx.dtype, seed=2)]
    idx.ntotal = full_rows
    sync()
    build_s = time.perf_counter() - t0
    secs, _ = timed(lambda: idx.search(queries, TOPK), reps, sync)
    res["full_fp16"] = {"rows": full_rows, "qps": BATCH / secs, "ms_per_batch": secs * 1e3,
                        "gib": idx.memory_bytes() / 2**30, "fill_s": build_s,
                        "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else 0.0}
    print(f"[gpu] index full fp16: {res['full_fp16']}", flush=True)
    return res, idx


def run(d: Path, out: Path, reps: int, full_rows: int, slice_rows: int, device: str, layers: int) -> dict:
    import torch

    qs = json.loads((d / "questions.json").read_text())
    info = {"python": platform.python_version(), "torch": torch.__version__,
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "gpus": torch.cuda.device_count(), "cpu_count": os.cpu_count(), "batch": BATCH, "topk": TOPK}
    import transformers
    info["transformers"] = transformers.__version__
    print(f"[gpu] {info}", flush=True)
    t0 = time.perf_counter()
    res = {"info": info, "agreement": agreement_section(d, device, qs["agreement"])}
    res["encoder"], enc = encoder_section(d, device, qs["speed"], reps, layers)
    queries = enc.encode_queries(qs["speed"][:BATCH])  # (512, 768) e5-sized query embeddings
    res["index"], index = index_section(device, queries, reps, full_rows, slice_rows)
    best = max((k for k in res["encoder"]["qps"] if "micro-batches" in k), key=res["encoder"]["qps"].get)
    mb = int(best.rsplit(" ", 1)[1])
    batches = [qs["speed"][i:i + BATCH] for i in range(0, len(qs["speed"]) - BATCH + 1, BATCH)]
    it = iter(range(10**9))
    secs, _ = timed(lambda: index.search(enc.encode_queries(batches[next(it) % len(batches)], batch_size=mb), TOPK),
                    reps, sync_for(device))
    res["end_to_end"] = {"qps": BATCH / secs, "ms_per_batch": secs * 1e3, "micro_batch": mb,
                         "rows": index.ntotal, "storage": "fp16"}
    print(f"[gpu] end to end: {res['end_to_end']}", flush=True)
    res["wall_s"] = time.perf_counter() - t0
    from stepsearch.data.io import write_text_atomic

    write_text_atomic(out, json.dumps(res, indent=1))
    return res


# ---------------------------------------------------------------- 3. report (CPU machine)
def report(res: dict, cmd: str, path: Path) -> None:
    from bench.retrieval import write_section

    i, a, e, x, ee = res["info"], res["agreement"], res["encoder"], res["index"], res["end_to_end"]
    lines = ["## GPU half (bench/retrieval_gpu.py)", "",
             f"Command: `{cmd}` (prepare and report on the CPU machine, run on the lent GPU machine)", "",
             f"Machine: {i['gpu']} ({i['gpus']} GPU), {i['cpu_count']} CPU cores, torch {i['torch']}, transformers "
             f"{i['transformers']}, Python {i['python']}. Batch {i['batch']} queries per call, top-{i['topk']}; "
             f"medians of repeated calls after a warm-up, CUDA-synchronised. Run wall time {res['wall_s']:.0f} s.", "",
             f"**Top-3 agreement with exact fp32** ({a['queries']} real questions, the {a['passages']}-passage wiki-18 "
             f"sample, MiniLM; reference computed on CPU with the fp32 weights): GPU fp16 encoder + fp32 index "
             f"{a['index_fp32']['top3_set_agreement']:.4f} (same order {a['index_fp32']['same_order']:.4f}); "
             f"GPU fp16 encoder + fp16 index (the `--device cuda --faiss_gpu` path) "
             f"{a['index_fp16']['top3_set_agreement']:.4f} (same order {a['index_fp16']['same_order']:.4f}); "
             + (f"the server's native encoder, fp16 packed, + fp16 index "
                f"{a['native_packed_index_fp16']['top3_set_agreement']:.4f}; " if "native_packed_index_fp16" in a else "")
             + "target >= 0.99.", "",
             f"**e5-sized encoder** ({e['params'] / 1e6:.0f}M parameters, {e['layers']} layers, BERT-base shape of "
             f"e5-base-v2, random "
             f"weights; prefix {e['prefix']!r}; {e['tokens_mean']:.1f} tokens per question on average):", "",
             "| encoder path, 512 real questions per call | queries/s |", "|---|---|"]
    lines += [f"| {k} | {v:,.0f} |" for k, v in e["qps"].items()]
    lines += ["", f"**Flat index on the GPU** (random unit vectors, d = 768, 512 e5-sized query embeddings per call):",
              "", "| index | rows | GiB on GPU | ms per 512 | queries/s |", "|---|---|---|---|---|"]
    for key in ("slice_fp32", "slice_fp16", "full_fp16"):
        r = x[key]
        lines.append(f"| {key.replace('_', ' ')} | {r['rows']:,} | {r['gib']:.1f} | {r['ms_per_batch']:.1f} | "
                     f"{r['qps']:,.0f} |")
    lines += ["", f"fp16 vs fp32 storage on the random slice: top-3 set agreement "
                  f"{x['slice_fp16_vs_fp32_top3_set_agreement_random']:.4f} (random vectors have far smaller score "
                  f"gaps than real passages; the real-question figure is the one above). Peak GPU memory "
                  f"{x['full_fp16']['peak_gib']:.1f} GiB; filling the {x['full_fp16']['rows']:,}-row index took "
                  f"{x['full_fp16']['fill_s']:.1f} s.",
              "", f"**End to end** (tokenize + e5-sized fp16 encode in micro-batches of {ee['micro_batch']} + search of "
                  f"the {ee['rows']:,}-row fp16 index): **{ee['qps']:,.0f} queries/s** at batch 512 "
                  f"({ee['ms_per_batch']:.0f} ms per call).", ""]
    write_section(path, "gpu", "\n".join(lines))
    print("\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    pp = sub.add_parser("prepare")
    pp.add_argument("--dir", default=".gpu/retrieval")
    pp.add_argument("--agreement_queries", type=int, default=2000)
    pp.add_argument("--speed_queries", type=int, default=4096)
    pr = sub.add_parser("run")
    pr.add_argument("--dir", default=".gpu/retrieval")
    pr.add_argument("--out", required=True)
    pr.add_argument("--reps", type=int, default=10)
    pr.add_argument("--full_rows", type=int, default=WIKI18_PASSAGES)
    pr.add_argument("--slice_rows", type=int, default=5_000_000)
    pr.add_argument("--device", default="cuda:0")
    pr.add_argument("--encoder_layers", type=int, default=12, help="e5-base has 12 (fewer: a quick CPU check)")
    rp = sub.add_parser("report")
    rp.add_argument("--json", required=True)
    rp.add_argument("--cmd", default="python3 bench/retrieval_gpu.py run --dir .gpu/retrieval --out $OUT/retrieval_gpu.json")
    rp.add_argument("--out", default=str(REPO / "bench" / "results" / "retrieval.md"))
    a = p.parse_args(argv)
    if a.cmd == "prepare":
        prepare(Path(a.dir), a.agreement_queries, a.speed_queries)
    elif a.cmd == "run":
        run(Path(a.dir), Path(a.out), a.reps, a.full_rows, a.slice_rows, a.device, a.encoder_layers)
    else:
        report(json.loads(Path(a.json).read_text()), a.cmd, Path(a.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
