"""StopCutter, SamplingConfig checks and weight buckets (no engine needed)."""
import pytest
import torch

from tests.rollout.models import tag_tokenizer
from verl.utils.tiny_model import build_tokenizer
from verl.workers.rollout.base import GenerationOutput, SamplingConfig, StopCutter
from verl.workers.rollout.base import iter_weight_buckets, layer_key

pytestmark = pytest.mark.timeout(60)


def _slow_cut(tokenizer, ids, stop, eos):
    """Reference: walk token by token, decode every prefix, stop at the first that contains a stop string."""
    for k in range(1, len(ids) + 1):
        if ids[k - 1] == eos:
            return ids[:k - 1], "eos"
        text = tokenizer.decode(ids[:k], skip_special_tokens=False)
        if any(s in text for s in stop):
            return ids[:k], "stop"
    return ids, "length"


def test_cut_multi_token_stop_matches_slow_reference():
    # Without tag tokens "</search>" is several BPE pieces: the cut must land on the piece that completes it.
    tok = build_tokenizer(vocab_size=300)
    text = "think a bit </sea no </search> then more </answer> tail"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert len(tok("</search>", add_special_tokens=False)["input_ids"]) > 1
    cutter = StopCutter(tok, [tok.eos_token_id])
    kept, finish = cutter.cut(ids, ("</search>", "</answer>"))
    assert (kept, finish) == _slow_cut(tok, ids, ("</search>", "</answer>"), tok.eos_token_id)
    assert finish == "stop"
    assert tok.decode(kept).endswith("</search>")
    assert "</search>" not in tok.decode(kept[:-1])
    assert kept == ids[:len(kept)]  # a prefix of the sampled ids, never re-tokenized


def test_cut_first_stop_wins_and_eos_dropped():
    tok = tag_tokenizer()
    ids = tok("<answer> x </answer> <search> q </search>", add_special_tokens=False)["input_ids"]
    kept, finish = StopCutter(tok, [tok.eos_token_id]).cut(ids, ("</search>", "</answer>"))
    assert finish == "stop" and tok.decode(kept) == "<answer> x </answer>"
    eos = tok.eos_token_id
    body = tok("abc", add_special_tokens=False)["input_ids"]
    kept, finish = StopCutter(tok, [eos]).cut(body + [eos, eos], ("</search>",))
    assert (kept, finish) == (body, "eos")
    # A stop string after EOS does not count: EOS ends the model's text.
    after = tok(" </search>", add_special_tokens=False)["input_ids"]
    kept, finish = StopCutter(tok, [eos]).cut(body + [eos] + after, ("</search>",))
    assert (kept, finish) == (body, "eos")
    kept, finish = StopCutter(tok, [eos]).cut(body, ("</search>",))
    assert (kept, finish) == (body, "length")


def test_randomized_cuts_match_reference():
    tok = tag_tokenizer()
    gen = torch.Generator().manual_seed(0)
    cutter = StopCutter(tok, [tok.eos_token_id])
    stop = ("</search>", "</answer>")
    for _ in range(200):
        ids = torch.randint(0, len(tok), (int(torch.randint(1, 40, (1,), generator=gen)),), generator=gen).tolist()
        assert cutter.cut(ids, stop) == _slow_cut(tok, ids, stop, tok.eos_token_id)


def test_sampling_config_rejects_bad_values():
    with pytest.raises(ValueError, match="max_new_tokens"):
        SamplingConfig(max_new_tokens=0)
    with pytest.raises(ValueError, match="temperature"):
        SamplingConfig(max_new_tokens=4, temperature=0.0)
    SamplingConfig(max_new_tokens=4, temperature=0.0, greedy=True)
    with pytest.raises(ValueError, match="top_k"):
        SamplingConfig(max_new_tokens=4, top_k=0)
    with pytest.raises(TypeError, match="stop"):
        SamplingConfig(max_new_tokens=4, stop="</search>")
    with pytest.raises(ValueError, match="log_probs"):
        GenerationOutput([1, 2], [0.0], "stop")
    with pytest.raises(ValueError, match="finish_reason"):
        GenerationOutput([1], None, "done")


def test_weight_buckets_keep_layers_whole():
    sd = {"model.embed_tokens.weight": torch.zeros(10, 4)}  # 160 bytes
    for i in range(3):
        for part in ("q_proj", "k_proj", "v_proj"):
            sd[f"model.layers.{i}.self_attn.{part}.weight"] = torch.zeros(4, 4)  # 64 bytes each, 192 per layer
    sd["model.norm.weight"] = torch.zeros(4)
    buckets = list(iter_weight_buckets(sd, bucket_bytes=400))
    # embed (160) + layer0 (192) = 352 <= 400; layer1 would make 544 -> new bucket; layer1+layer2 = 384;
    # + norm (16) = 400 <= 400.
    assert [[layer_key(n) for n, _ in b] for b in buckets] == [
        ["model.embed_tokens.weight"] + ["model.layers.0"] * 3,
        ["model.layers.1"] * 3 + ["model.layers.2"] * 3 + ["model.norm.weight"],
    ]
    assert [n for b in buckets for n, _ in b] == list(sd)
    # A layer larger than a bucket is never split.
    assert [len(b) for b in iter_weight_buckets(sd, bucket_bytes=1)] == [1, 3, 3, 3, 1]
    with pytest.raises(ValueError, match="bucket_bytes"):
        list(iter_weight_buckets(sd, bucket_bytes=0))


def test_weight_buckets_never_split_a_tiny_qwen2_layer():
    """A real tiny Qwen2 state dict, streamed as the worker streams it (one (name, tensor) pair at a time)."""
    from verl.utils.tiny_model import build_tiny_causal_lm

    model = build_tiny_causal_lm(build_tokenizer(vocab_size=300), hidden_size=32, num_layers=3, num_heads=2)
    sd = model.state_dict()
    nbytes = {n: t.numel() * t.element_size() for n, t in sd.items()}
    layer_bytes = [sum(b for n, b in nbytes.items() if n.startswith(f"model.layers.{i}.")) for i in range(3)]
    assert len({*layer_bytes}) == 1  # every layer has the same size: L bytes, 12 tensors
    L = layer_bytes[0]
    assert sum(n.startswith("model.layers.0.") for n in sd) == 12
    # One layer and a half per bucket: the old byte-count cut ended buckets inside a layer.
    buckets = list(iter_weight_buckets(iter(sd.items()), bucket_bytes=L + L // 2))
    assert [n for b in buckets for n, _ in b] == list(sd)  # every tensor once, in state-dict order
    seen = {}
    for i, bucket in enumerate(buckets):
        for name, _ in bucket:
            assert seen.setdefault(layer_key(name), i) == i, f"{layer_key(name)} split over buckets"
        assert sum(nbytes[n] for n, _ in bucket) <= L + L // 2 or len({layer_key(n) for n, _ in bucket}) == 1
    # L = 66176 bytes, the bucket 99264. embed (38400) + layer 0 would be 104576: embed alone; two layers never
    # fit: layers 0 and 1 alone; layer 2 + norm (128) = 66304, + lm_head (38400) would exceed: lm_head alone.
    # (The old cut, "flush once the byte count reaches the size", ended the first bucket inside layer 0.)
    groups = [[layer_key(n) for n, _ in b] for b in buckets]
    assert groups == [["model.embed_tokens.weight"], ["model.layers.0"] * 12, ["model.layers.1"] * 12,
                      ["model.layers.2"] * 12 + ["model.norm.weight"], ["lm_head.weight"]]
    # A group bigger than the bucket goes alone, whole.
    assert [len(b) for b in iter_weight_buckets(sd, bucket_bytes=L // 4)] == [1, 12, 12, 12, 1, 1]
    # A stream whose layer reappears after another group cannot be bucketed without splitting it.
    names = list(sd)
    shuffled = [(n, sd[n]) for n in names[:3] + names[14:20] + names[3:14] + names[20:]]
    with pytest.raises(ValueError, match="not contiguous"):
        list(iter_weight_buckets(iter(shuffled), bucket_bytes=10**9))
