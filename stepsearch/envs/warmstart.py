"""Warm start for the demo: a tokenizer trained on the world's text, a tiny Qwen2 LM, and a short SFT on the
scripted (flawed) policy's trajectories, collected through the real rollout loop and the real retriever.

    python -m stepsearch.envs.warmstart --world_dir runs/world --retriever_url http://127.0.0.1:8000/retrieve \
        --out runs/sft_model [--sft_steps 300 --premature_answer_prob 0.65 --copy_correct_prob 1.0]

SFT teaches the tag format and the hop-by-hop procedure; since the scripted policy stops searching too early
most of the time and answers with an intermediate name (`stepsearch.envs.scripted`), the warm-started model is
mostly wrong on held-out questions under greedy decoding, and any rise in accuracy afterwards comes from RL.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch

from transformers import AutoTokenizer

from verl.protocol import DataProto
from verl.utils.tiny_model import build_tiny_causal_lm, build_tokenizer

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TinyModelConfig:
    """The demo policy: a tiny Qwen2 with a BPE vocabulary trained on the world's text."""

    vocab_size: int = 1024
    hidden_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    seed: int = 0


@dataclass(frozen=True)
class SFTConfig:
    steps: int = 300
    batch_size: int = 16
    lr: float = 3e-3
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    seed: int = 0
    # give every SFT sample its own random relabelling of the world's people and relations
    # (`permute_token_groups`), so the model cannot memorize the knowledge base or a favourite relation and must
    # learn to copy names out of <information> blocks and the relation out of the question
    permute_names: bool = True
    # stop early once the teacher-forced accuracy on copied tokens (each id group: names, relations) of held-out
    # trajectories reaches this value for every group (0: always run `steps`); checked every `eval_every` steps
    # from `min_steps` on. Whether and when the copy circuit forms depends on the initialisation and the data
    # order (docs/demo.md), so a fixed step count is either wasteful or, for some seeds, too short.
    stop_copy_acc: float = 0.0
    min_steps: int = 0
    eval_every: int = 100
    # ... or once the copy accuracy has plateaued: the weakest group's accuracy has not beaten its best so far by more
    # than `plateau_delta` for `plateau_checks` consecutive checks, and that best is at least `plateau_min_acc`
    # (plateau_checks 0 turns this off). A run whose copy circuit settles just under stop_copy_acc (a fresh-clone
    # run peaked at 0.884 against 0.9) stops there instead of running every step to the cap.
    plateau_checks: int = 0
    plateau_delta: float = 0.01
    plateau_min_acc: float = 0.0
    # a progress line at least every this many seconds (and every 50 steps), whether or not stdout is a terminal
    log_every_s: float = 20.0

    def __post_init__(self):
        if self.steps < 1 or self.batch_size < 1 or self.lr <= 0 or self.eval_every < 1:
            raise ValueError(f"[sft] steps ({self.steps}), batch_size ({self.batch_size}), lr ({self.lr}) and "
                             f"eval_every ({self.eval_every}) must be positive")
        if not 0.0 <= self.stop_copy_acc <= 1.0:
            raise ValueError(f"[sft] stop_copy_acc ({self.stop_copy_acc}) must lie in [0, 1] (0 turns it off)")
        if self.plateau_checks < 0 or self.plateau_delta < 0 or not 0.0 <= self.plateau_min_acc <= 1.0:
            raise ValueError(f"[sft] plateau_checks ({self.plateau_checks}) and plateau_delta ({self.plateau_delta}) "
                             f"must be >= 0 and plateau_min_acc ({self.plateau_min_acc}) in [0, 1]")


def sft_stop_reason(history: list[dict], cfg: SFTConfig) -> str | None:
    """Why SFT should stop after the last copy-accuracy check in `history` ([{"step", "copy_acc": [per group]}], one
    entry per check), or None to go on. The weakest measured group decides (nan: the group never occurs)."""
    weakest = [min((a for a in h["copy_acc"] if a == a), default=float("nan")) for h in history]
    if not weakest or weakest[-1] != weakest[-1]:
        return None
    if cfg.stop_copy_acc > 0 and weakest[-1] >= cfg.stop_copy_acc:
        return f"copy accuracy {weakest[-1]:.3f} >= {cfg.stop_copy_acc}"
    k = cfg.plateau_checks
    if k and len(weakest) > k:
        best_before = max(weakest[:-k])
        best = max(best_before, *weakest[-k:])
        if best - best_before <= cfg.plateau_delta and best >= cfg.plateau_min_acc:
            return (f"copy accuracy plateaued at {best:.3f} (no gain over {cfg.plateau_delta} in the last {k} "
                    f"checks)")
    return None


def build_demo_model(texts: list[str], cfg: TinyModelConfig = TinyModelConfig()):
    """(tokenizer, model) for the world; the tag tokens are single, non-special ids (CONTRACTS.md)."""
    from stepsearch.agent.tags import TAG_TOKENS

    tokenizer = build_tokenizer(texts, vocab_size=cfg.vocab_size, extra_tokens=list(TAG_TOKENS))
    model = build_tiny_causal_lm(tokenizer, hidden_size=cfg.hidden_size, num_layers=cfg.num_layers,
                                 num_heads=cfg.num_heads, seed=cfg.seed)
    return tokenizer, model


def sft_loss_mask(data: DataProto) -> torch.Tensor:
    """(B, L) float: 1 on model-generated response tokens (response_mask), 0 on prompt, observations and pad."""
    prompts, response_mask = data.batch["prompts"], data.batch["response_mask"]
    B, P = prompts.shape
    return torch.cat([torch.zeros(B, P), response_mask.float()], dim=1)


def sft_step_loss(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                  loss_mask: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over loss_mask. All arguments are (B, L); returns a scalar."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids).logits
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)                       # (B, L-1, V)
    token_logp = logp.gather(-1, input_ids[:, 1:].unsqueeze(-1)).squeeze(-1)     # (B, L-1)
    mask = loss_mask[:, 1:]                                                       # token t+1 is predicted at t
    return -(token_logp * mask).sum() / mask.sum().clamp(min=1.0)


def single_token_ids(tokenizer, words: list[str]) -> list[int]:
    """Ids of the words that are one token when preceded by a space (how names and relations occur in world texts)."""
    ids = []
    for word in words:
        toks = tokenizer(" " + word, add_special_tokens=False)["input_ids"]
        if len(toks) == 1:
            ids.append(toks[0])
    return sorted(set(ids))


def permute_token_groups(input_ids: torch.Tensor, groups: list[torch.Tensor], generator: torch.Generator) -> torch.Tensor:
    """input_ids (B, L) with, in each row, the ids of every group (N_g,) relabelled by the row's own random
    permutation of that group (names among names, relations among relations).

    A relabelled trajectory is still a consistent chain (every occurrence of a name or relation maps to the same new
    one), but its facts are no longer the knowledge base's and its relation no longer says which one was asked:
    the only way to predict a name or relation the policy copied is to copy it.
    """
    B = input_ids.shape[0]
    vocab = int(max([int(input_ids.max())] + [int(g.max()) for g in groups])) + 1
    mapping = torch.arange(vocab).repeat(B, 1)                                          # (B, V) identity
    for ids in groups:
        perms = torch.argsort(torch.rand(B, len(ids), generator=generator), dim=1)     # (B, N_g)
        mapping[:, ids] = ids[perms]
    return mapping.gather(1, input_ids)


def after_first_observation_mask(data: DataProto) -> torch.Tensor:
    """(B, L) bool: True from the first observation token (an <information> block) of each row's response on."""
    prompts, response_mask = data.batch["prompts"], data.batch["response_mask"]
    P = prompts.shape[1]
    observation = (data.batch["attention_mask"][:, P:] == 1) & (response_mask == 0)     # (B, T)
    return torch.cat([torch.zeros_like(prompts, dtype=torch.bool), observation.cumsum(1) > 0], dim=1)


@torch.no_grad()
def copy_accuracy(model, data: DataProto, groups: list[torch.Tensor], after_observation: list[bool] | None = None,
                  batch_size: int = 64) -> list[float]:
    """Teacher-forced greedy accuracy on the policy's own tokens that belong to each id group (N_g,): for every
    group, the share of its tokens in the response actions that argmax(logits) predicts (nan if none occur).
    `after_observation[k]` counts only group k's tokens after the first <information> block: for names, the ones
    copied out of retrieved passages rather than out of the question."""
    after_observation = after_observation or [False] * len(groups)
    was_training = model.training
    model.eval()
    loss_mask = sft_loss_mask(data).bool()
    after = after_first_observation_mask(data)
    hits, counts = [0] * len(groups), [0] * len(groups)
    for start in range(0, len(data), batch_size):
        sl = slice(start, start + batch_size)
        ids = data.batch["input_ids"][sl]
        logits = model(input_ids=ids, attention_mask=data.batch["attention_mask"][sl],
                       position_ids=data.batch["position_ids"][sl]).logits
        predicted, target = logits[:, :-1].argmax(-1), ids[:, 1:]                   # (B, L-1)
        action = loss_mask[sl, 1:]
        for k, group in enumerate(groups):
            in_group = action & torch.isin(target, group)
            if after_observation[k]:
                in_group &= after[sl, 1:]
            hits[k] += int((in_group & (predicted == target)).sum())
            counts[k] += int(in_group.sum())
    model.train(was_training)
    return [h / c if c else float("nan") for h, c in zip(hits, counts)]


def run_sft(model, data: DataProto, cfg: SFTConfig, permute_groups: list[list[int]] = (),
            val_data: DataProto | None = None, history: list | None = None) -> list[float]:
    """Supervised fine-tuning on rollout trajectories (loss on generated tokens only); returns per-step losses.
    With cfg.permute_names, each sampled trajectory gets its own relabelling of every id group in `permute_groups`
    (the world's single-token names, its relations). With `val_data` it stops as `sft_stop_reason` says: once
    `copy_accuracy` on val_data reaches cfg.stop_copy_acc for every group, or has plateaued, counting the first
    group (the names) only after the first <information> block (copying out of passages is the skill that forms late; copying the
    start entity out of the question forms first); each check is appended to `history` as {"step", "copy_acc"}."""
    g = torch.Generator().manual_seed(cfg.seed)
    groups = [torch.tensor(ids, dtype=torch.long) for ids in permute_groups if len(ids) > 1]
    permute = cfg.permute_names and bool(groups)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    loss_mask = sft_loss_mask(data)
    ids, am, pos = data.batch["input_ids"], data.batch["attention_mask"], data.batch["position_ids"]
    n = ids.shape[0]
    losses = []
    model.train()
    t0 = last_log = time.perf_counter()
    checking = val_data is not None and bool(groups) and (cfg.stop_copy_acc > 0 or cfg.plateau_checks > 0)
    checks = history if history is not None else []
    for step in range(cfg.steps):
        idx = torch.randperm(n, generator=g)[: cfg.batch_size]
        used = am[idx].sum(0).nonzero()                                            # drop all-pad columns
        cols = slice(int(used.min()), int(used.max()) + 1)
        batch_ids = permute_token_groups(ids[idx, cols], groups, g) if permute else ids[idx, cols]
        loss = sft_step_loss(model, batch_ids, am[idx, cols], pos[idx, cols], loss_mask[idx, cols])
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        losses.append(float(loss.detach()))
        done = step + 1
        now = time.perf_counter()
        if step % 50 == 0 or done == cfg.steps or now - last_log >= cfg.log_every_s:
            logger.info("sft step %d/%d loss %.4f (%.0f s)", done, cfg.steps, losses[-1], now - t0)
            last_log = now
        if checking and done >= cfg.min_steps and done % cfg.eval_every == 0:
            acc = copy_accuracy(model, val_data, groups, after_observation=[k == 0 for k in range(len(groups))])
            checks.append({"step": done, "copy_acc": [round(a, 4) for a in acc]})
            logger.info("sft step %d held-out copy accuracy (names from passages, relations) %s (stop at %.2f)", done,
                        " ".join(f"{a:.3f}" for a in acc), cfg.stop_copy_acc)
            reason = sft_stop_reason(checks, cfg)
            if reason:
                logger.info("sft stops at step %d: %s", done, reason)
                break
    model.eval()
    return losses


def collect_scripted_rollouts(train_parquet: str, tokenizer, retriever_url: str, agent_cfg,
                              policy_cfg, max_prompt_length: int, batch_size: int = 64,
                              max_samples: int = -1) -> DataProto:
    """Run the scripted policy over the training questions through the real rollout loop and retriever."""
    from stepsearch.agent.loop import run_rollout
    from stepsearch.data.row_fields import search_row_fields
    from stepsearch.envs.scripted import ScriptedSearchBackend
    from stepsearch.search.client import RetrievalClient
    from verl.utils.dataset import RLHFDataset

    ds = RLHFDataset(train_parquet, tokenizer, max_prompt_length, batch_size, shuffle=False, drop_last=False,
                     max_samples=max_samples, row_adapter=search_row_fields)
    backend = ScriptedSearchBackend(tokenizer, policy_cfg)
    client = RetrievalClient(retriever_url)
    outs = []
    for batch in ds.iter_epoch():
        outs.append(run_rollout(batch, backend, client, tokenizer, agent_cfg))
        logger.info("scripted rollouts: %d trajectories collected", sum(len(o) for o in outs))
    keep = ("prompts", "responses", "input_ids", "attention_mask", "position_ids", "response_mask")
    return DataProto.concat([_pad_responses(o.select(batch_keys=list(keep), non_tensor_batch_keys=["response_text"]),
                                            max(x.batch["responses"].shape[1] for x in outs), tokenizer.pad_token_id)
                             for o in outs])


def _pad_responses(data: DataProto, width: int, pad_id: int) -> DataProto:
    """Right-pad the response part of every (B, L) / (B, T) tensor to T = width, so batches concatenate."""
    T = data.batch["responses"].shape[1]
    extra = width - T
    def pad(x, value):
        return torch.cat([x, torch.full((x.shape[0], extra), value, dtype=x.dtype)], dim=1)
    b = data.batch
    last_pos = b["position_ids"][:, -1:]
    tensors = {"prompts": b["prompts"], "responses": pad(b["responses"], pad_id),
               "input_ids": pad(b["input_ids"], pad_id), "attention_mask": pad(b["attention_mask"], 0),
               "response_mask": pad(b["response_mask"], 0),
               "position_ids": torch.cat([b["position_ids"], last_pos + torch.arange(1, extra + 1)], dim=1)}
    return DataProto.from_dict(tensors=tensors, non_tensors=dict(data.non_tensor_batch))   # rollout metrics dropped


def world_texts(world_dir: str) -> list[str]:
    """Tokenizer training texts from a written world: passages, prompts and the observation doc headers."""
    import pandas as pd

    with open(os.path.join(world_dir, "corpus.jsonl")) as f:
        passages = [json.loads(line) for line in f if line.strip()]
    texts = [p["text"] for p in passages]
    texts += [f"Doc {i}<## Title: {p['title']} ##> {p['text']}\n" for i in (1, 2, 3) for p in passages]
    texts += [f"<think> {n} left </think>" for n in range(5)] * 20     # the scripted plan (stepsearch.envs.scripted)
    for split in ("train", "test"):
        df = pd.read_parquet(os.path.join(world_dir, f"{split}.parquet"))
        texts += [m[-1]["content"] for m in df["prompt"]]
    return texts


def world_vocabulary(world_dir: str) -> tuple[list[str], list[str]]:
    """(people, relations) of a written world: a passage's title is its subject, its text "The R of S is O."."""
    from stepsearch.envs.scripted import _DOC_RE
    from stepsearch.search.corpus import iter_passages

    names, relations = set(), set()
    for passage in iter_passages(os.path.join(world_dir, "corpus.jsonl")):
        names.add(passage.title)
        fact = _DOC_RE.match(passage.text)
        if fact:
            relations.add(fact.group(1))
    return sorted(names), sorted(relations)


def save_model_dir(model, tokenizer, out_dir: str) -> str:
    """Save model + tokenizer into a temp sibling folder, then swap it in (no half-written model folder)."""
    import shutil

    from verl.utils.fs import follow_umask
    tmp = out_dir.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    follow_umask(tmp)  # safetensors writes the weights 0600
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(tmp, out_dir)
    return out_dir


def warm_start(world_dir: str, retriever_url: str, out_dir: str, model_cfg: TinyModelConfig, sft_cfg: SFTConfig,
               policy_cfg, agent_cfg, max_prompt_length: int = 128, max_samples: int = -1,
               init_model: str | None = None) -> dict:
    """Tokenizer + tiny model + scripted trajectories + SFT; saves an HF folder and returns a report dict.

    `init_model`: continue from this warm-started HF folder (its tokenizer and weights; `model_cfg` is then unused),
    e.g. to teach a model that already copies names a new flaw or longer chains on a world with the same people."""
    torch.manual_seed(sft_cfg.seed)
    t0 = time.perf_counter()
    if init_model:
        from transformers import AutoModelForCausalLM

        tokenizer = AutoTokenizer.from_pretrained(init_model)
        model = AutoModelForCausalLM.from_pretrained(init_model, torch_dtype=torch.float32)
    else:
        tokenizer, model = build_demo_model(world_texts(world_dir), model_cfg)
    # Use the tokenizer exactly as every later stage (eval, trainer, rollout) loads it: AutoTokenizer on the saved
    # folder builds a Qwen2Tokenizer, whose pre-tokenizer splits digits ("Doc 1" is 3 tokens there, 2 in the
    # freshly built one). SFT data tokenized the other way put every <information> block a token off at eval time.
    save_model_dir(model, tokenizer, out_dir)
    tokenizer = AutoTokenizer.from_pretrained(out_dir)
    data = collect_scripted_rollouts(os.path.join(world_dir, "train.parquet"), tokenizer, retriever_url, agent_cfg,
                                     policy_cfg, max_prompt_length, max_samples=max_samples)
    t_collect = time.perf_counter() - t0
    names, relations = world_vocabulary(world_dir)
    name_ids, relation_ids = single_token_ids(tokenizer, names), single_token_ids(tokenizer, relations)
    val_data, history = None, []
    if sft_cfg.stop_copy_acc > 0 or sft_cfg.plateau_checks > 0:   # the last 10% of the trajectories decide when to stop
        n_val = max(len(data) // 10, 1)
        data, val_data = data[: len(data) - n_val], data[len(data) - n_val:]
    losses = run_sft(model, data, sft_cfg, [name_ids, relation_ids], val_data=val_data, history=history)
    save_model_dir(model, tokenizer, out_dir)
    report = {"model": {"init_model": init_model} if init_model else asdict(model_cfg), "sft": asdict(sft_cfg),
              "policy": asdict(policy_cfg),
              "num_names": len(names), "num_single_token_names": len(name_ids),
              "relations": relations, "num_single_token_relations": len(relation_ids), "num_trajectories": len(data),
              "num_val_trajectories": len(val_data) if val_data is not None else 0, "sft_steps_run": len(losses),
              "copy_acc_history": history, "response_width": int(data.batch["responses"].shape[1]),
              "first_losses": losses[:5], "last_losses": losses[-5:], "collect_s": round(t_collect, 1),
              "total_s": round(time.perf_counter() - t0, 1), "out": out_dir}
    with open(os.path.join(out_dir, "warm_start.json"), "w") as f:
        json.dump(report, f, indent=1)
    return report


def main(argv: list[str] | None = None) -> dict:
    from stepsearch.agent.agent_config import AgentConfig
    from stepsearch.envs.scripted import ScriptedPolicyConfig

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--world_dir", required=True, help="folder written by python -m stepsearch.envs.make_world")
    p.add_argument("--retriever_url", required=True)
    p.add_argument("--out", required=True, help="HF model folder to write")
    p.add_argument("--sft_steps", type=int, default=SFTConfig.steps)
    p.add_argument("--sft_batch_size", type=int, default=SFTConfig.batch_size)
    p.add_argument("--lr", type=float, default=SFTConfig.lr)
    p.add_argument("--copy_correct_prob", type=float, default=ScriptedPolicyConfig.copy_correct_prob,
                   help="probability of copying the top-ranked passage's name (else the second-ranked one's)")
    p.add_argument("--premature_answer_prob", type=float, default=ScriptedPolicyConfig.premature_answer_prob,
                   help="probability of answering with the name just read instead of searching the next hop")
    p.add_argument("--premature_from_hop", type=int, default=ScriptedPolicyConfig.premature_from_hop,
                   help="the first hop after which the premature answer may come (2: a mid-chain flaw)")
    p.add_argument("--stop_copy_acc", type=float, default=SFTConfig.stop_copy_acc,
                   help="stop SFT once held-out copy accuracy (names and relations) reaches this (0: run all steps)")
    p.add_argument("--min_sft_steps", type=int, default=SFTConfig.min_steps)
    p.add_argument("--plateau_checks", type=int, default=SFTConfig.plateau_checks,
                   help="also stop once the copy accuracy gained no more than --plateau_delta in this many checks "
                        "(0: off)")
    p.add_argument("--plateau_delta", type=float, default=SFTConfig.plateau_delta)
    p.add_argument("--plateau_min_acc", type=float, default=SFTConfig.plateau_min_acc,
                   help="a plateau below this copy accuracy does not stop SFT")
    p.add_argument("--no_permute_names", action="store_true",
                   help="train on the trajectories as collected (default: rename the people per sample)")
    p.add_argument("--hidden_size", type=int, default=TinyModelConfig.hidden_size)
    p.add_argument("--vocab_size", type=int, default=TinyModelConfig.vocab_size)
    p.add_argument("--num_layers", type=int, default=TinyModelConfig.num_layers)
    p.add_argument("--max_samples", type=int, default=-1, help="use the first N training questions (-1: all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--init_model", help="continue from this warm-started model folder instead of a new tiny model")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    agent_cfg = AgentConfig(max_turns=5, topk=3, max_context_length=1024, max_new_tokens=32, max_response_length=1024,
                            max_obs_length=256, greedy=True)
    report = warm_start(a.world_dir, a.retriever_url, a.out,
                        TinyModelConfig(vocab_size=a.vocab_size, hidden_size=a.hidden_size, num_layers=a.num_layers,
                                        seed=a.seed),
                        SFTConfig(steps=a.sft_steps, batch_size=a.sft_batch_size, lr=a.lr, seed=a.seed,
                                  permute_names=not a.no_permute_names, stop_copy_acc=a.stop_copy_acc,
                                  min_steps=a.min_sft_steps, plateau_checks=a.plateau_checks,
                                  plateau_delta=a.plateau_delta, plateau_min_acc=a.plateau_min_acc),
                        ScriptedPolicyConfig(copy_correct_prob=a.copy_correct_prob,
                                             premature_answer_prob=a.premature_answer_prob,
                                             premature_from_hop=a.premature_from_hop, seed=a.seed), agent_cfg,
                        max_samples=a.max_samples, init_model=a.init_model)
    print(json.dumps(report))
    return report


if __name__ == "__main__":
    main()
