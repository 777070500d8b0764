"""Loading a policy with FSDP2 and fsdp.load_from_rank0 (verl/workers/fsdp_workers.py load_sharded_causal_lm), on 2
gloo ranks in two processes: the sharded model holds exactly the checkpoint's parameters and buffers (its
all-gathered state dict equals the plain ``from_pretrained`` load, and its logits match), and rank 1 never
materialises a full copy: it is given a folder with the model's config.json and no weight file at all, and holds
only its half of the parameters."""
from __future__ import annotations

import json
import os
import shutil
import socket

import pytest
import torch

def _rank_main(rank: int, world: int, port: int, model_dir: str, config_only_dir: str, out_dir: str) -> None:
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM

    from verl.utils.hydra_to_dataclass import FSDPConfig
    from verl.workers.fsdp_workers import _full_state_items, load_sharded_causal_lm

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    path = model_dir if rank == 0 else config_only_dir  # rank 1 cannot read any weights
    model = load_sharded_causal_lm(path, "sdpa", FSDPConfig(), torch.device("cpu"), rank, world)
    local_numel = sum(p.to_local().numel() for p in model.parameters())
    full = {name: t.clone() for name, t in _full_state_items(model, torch.device("cpu"))}  # collective
    ids = torch.arange(3, 40).view(1, -1)
    with torch.no_grad():
        logits = model(input_ids=ids).logits  # collective
    result = {"rank": rank, "local_numel": local_numel,
              "total_numel": sum(t.numel() for t in full.values())}
    if rank == 0:
        plain = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa")
        reference = plain.state_dict()
        result["same_keys"] = sorted(full) == sorted(reference)
        result["equal"] = all(torch.equal(full[k], reference[k]) for k in reference)
        buffers = dict(model.named_buffers())
        result["buffers_equal"] = all(torch.equal(buffers[k], b) for k, b in plain.named_buffers())
        with torch.no_grad():
            result["logits_max_diff"] = float((plain(input_ids=ids).logits - logits).abs().max())
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)
    dist.barrier()
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from verl.utils.tiny_model import build_tokenizer

    out = tmp_path_factory.mktemp("sharded_load_model")
    cfg = Qwen2Config(vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512,
                      tie_word_embeddings=False)
    torch.manual_seed(0)
    Qwen2ForCausalLM(cfg).save_pretrained(out, safe_serialization=True)
    build_tokenizer(["x"], vocab_size=300).save_pretrained(out)
    return str(out)


@pytest.mark.slow  # two spawned processes import torch + transformers: ~30 s on a quiet 2-core machine
@pytest.mark.timeout(900)
def test_rank0_load_matches_plain_load_and_rank1_holds_no_full_copy(model_dir, tmp_path):
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config_only = tmp_path / "config_only"
    config_only.mkdir()
    shutil.copy(os.path.join(model_dir, "config.json"), config_only / "config.json")
    mp.spawn(_rank_main, args=(2, port, model_dir, str(config_only), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (json.load(open(tmp_path / f"rank{r}.json")) for r in (0, 1))
    assert r0["same_keys"] and r0["equal"] and r0["buffers_equal"]  # rotary inv_freq too (not in the state dict)
    assert r0["logits_max_diff"] < 1e-5
    assert r0["local_numel"] + r1["local_numel"] == r0["total_numel"] and r1["local_numel"] < 0.55 * r0["total_numel"]
