"""Warm start of a real chat model on gold MuSiQue trajectories: teaches the tag format and the hop-by-hop
procedure before RL (docs/real_model.md, "A real-data StePPO run").

    python -m stepsearch.envs.gold_sft --records runs/real/split/train.jsonl --model models/smollm2-135m-instruct \\
        --out runs/real/sft_model [--steps 30 --batch_size 4 --lr 3e-5]

A gold trajectory follows the record's `question_decomposition`: per hop a short generated turn
(`<think>`, then `<search>` with the hop's search key, earlier hops' answers filled in), the observation the agent
loop would append (an `<information>` block of the hop's supporting paragraph first and topk-1 other paragraphs of
the record, through the loop's own `ObservationEncoder`), then a final `<think>`/`<answer>` turn and EOS. The prompt
is the paper template rendered with the model's chat template, as the trainer's dataset renders it. SFT puts the
loss on the generated tokens only; every trajectory is its own forward (no padding), gradients are accumulated
over a batch and weighted by generated tokens.
"""
from __future__ import annotations

import argparse
import itertools
import logging
import os
import random
import time

import torch

from stepsearch.data.io import write_json_atomic
from stepsearch.envs.warmstart import save_model_dir, sft_step_loss

logger = logging.getLogger(__name__)

Trajectory = tuple[list[int], list[int], list[int]]   # (prompt ids, response ids, loss mask over the response)


def gold_trajectory(tokenizer, loc, rng: random.Random, topk: int, max_obs_length: int) -> Trajectory:
    """(prompt ids, response ids, response loss mask) of one answerable MuSiQue record (`Located`); the mask is 1 on
    generated tokens and 0 on observations."""
    from stepsearch.agent.observations import ObservationEncoder
    from stepsearch.data.formats import to_row
    from stepsearch.data.musique import from_original

    example = from_original(loc)
    paragraphs = loc.record["paragraphs"]
    messages = to_row(example, "musique", "train", 0, template="paper")["prompt"]
    prompt = tokenizer(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False),
                       add_special_tokens=False)["input_ids"]
    encoder = ObservationEncoder(tokenizer)
    response, mask = [], []

    def add(ids: list[int], generated: bool) -> None:
        response.extend(ids)
        mask.extend([int(generated)] * len(ids))

    hops = loc.record["question_decomposition"]
    for h, hop in enumerate(hops):
        key = example.search_keys[h][0]
        thought = (f"First I need to know: {key}" if h == 0 else
                   f"So it is {hops[h - 1]['answer']}. Next I need to know: {key}")
        add(tokenizer(f"<think> {thought} </think>\n<search> {key} </search>", add_special_tokens=False)["input_ids"],
            True)
        support = next(p for p in paragraphs if p["idx"] == hop["paragraph_support_idx"])
        others = rng.sample([p for p in paragraphs if p is not support], topk - 1)
        hits = [{"document": {"id": str(p["idx"]), "title": p["title"], "text": p["paragraph_text"]}}
                for p in [support] + others]
        [obs] = encoder.information([hits], caps=[max_obs_length], final_warning=[False])
        add(obs.token_ids, False)
    final = f"<think> So the answer is {example.answers[0]}. </think>\n<answer> {example.answers[0]} </answer>"
    add(tokenizer(final, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id], True)
    return prompt, response, mask


def gold_trajectories(tokenizer, paths: list[str], topk: int, max_obs_length: int, seed: int = 0,
                      limit: int | None = None) -> list[Trajectory]:
    """The gold trajectories of the answerable records in `paths` (JSON/JSONL), in file order: every one, or the
    first `limit` (the same trajectories as the first `limit` of all: one seeded generator draws in file order)."""
    from stepsearch.data.io import iter_records

    rng = random.Random(seed)
    answerable = (loc for path in paths for loc in iter_records(path, show_progress=False)
                  if loc.record.get("answerable", True) is not False)
    return [gold_trajectory(tokenizer, loc, rng, topk, max_obs_length) for loc in itertools.islice(answerable, limit)]


def sft_on_trajectories(model, rows: list[Trajectory], steps: int, batch_size: int, lr: float, seed: int = 0,
                        grad_clip: float = 1.0, log_every_s: float = 20.0) -> list[float]:
    """AdamW SFT: each step draws `batch_size` trajectories (without replacement within an epoch), runs each as its
    own (1, L) forward and accumulates the gradient of the token-weighted mean cross-entropy on generated tokens.
    Returns the per-step losses."""
    rng = random.Random(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    order: list[int] = []
    losses = []
    model.train()
    t0 = last_log = time.perf_counter()
    for step in range(steps):
        if len(order) < batch_size:
            order += rng.sample(range(len(rows)), len(rows))
        batch, order = order[:batch_size], order[batch_size:]
        n_gen = sum(sum(rows[i][2]) for i in batch)
        opt.zero_grad()
        total = 0.0
        for i in batch:
            prompt, response, mask = rows[i]
            ids = torch.tensor([prompt + response])                                  # (1, L)
            loss_mask = torch.tensor([[0.0] * len(prompt) + [float(m) for m in mask]])  # (1, L)
            ones = torch.ones_like(ids)
            positions = torch.arange(ids.shape[1]).unsqueeze(0)
            weight = sum(mask) / n_gen                    # token-weighted: the batch loss is a mean over its tokens
            loss = sft_step_loss(model, ids, ones, positions, loss_mask) * weight
            loss.backward()
            total += float(loss.detach())
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        opt.step()
        losses.append(total)
        now = time.perf_counter()
        if step == 0 or step + 1 == steps or now - last_log >= log_every_s:
            logger.info("gold sft step %d/%d loss %.4f (%.0f s)", step + 1, steps, total, now - t0)
            last_log = now
    model.eval()
    return losses


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--records", nargs="+", required=True, help="MuSiQue JSON/JSONL with question_decomposition")
    p.add_argument("--model", required=True, help="HF folder of the model to warm-start (model + tokenizer)")
    p.add_argument("--out", required=True, help="HF folder to write (replaced atomically)")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--batch_size", type=int, default=4)
    p.add_argument("--lr", type=float, default=3e-5)
    p.add_argument("--topk", type=int, default=3, help="passages per observation (agent.topk)")
    p.add_argument("--max_obs_length", type=int, default=512, help="tokens per observation (agent.max_obs_length)")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    if a.steps < 1 or a.batch_size < 1 or a.lr <= 0:
        p.error(f"--steps ({a.steps}), --batch_size ({a.batch_size}) and --lr ({a.lr}) must be positive")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(a.seed)
    t0 = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(a.model)
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32)
    rows = gold_trajectories(tokenizer, a.records, a.topk, a.max_obs_length, a.seed)
    if not rows:
        raise SystemExit(f"[gold_sft] no answerable records in {a.records}")
    lengths = [len(pr) + len(r) for pr, r, _ in rows]
    logger.info("%d gold trajectories, %d-%d tokens (mean %.0f), %.0f generated tokens each on average", len(rows),
                min(lengths), max(lengths), sum(lengths) / len(rows), sum(sum(m) for *_, m in rows) / len(rows))
    t_sft = time.perf_counter()
    losses = sft_on_trajectories(model, rows, a.steps, a.batch_size, a.lr, a.seed)
    sft_s = time.perf_counter() - t_sft
    save_model_dir(model, tokenizer, a.out)
    report = {"records": a.records, "init_model": a.model, "num_trajectories": len(rows),
              "tokens": {"min": min(lengths), "mean": round(sum(lengths) / len(rows), 1), "max": max(lengths)},
              "steps": a.steps, "batch_size": a.batch_size, "lr": a.lr, "topk": a.topk,
              "max_obs_length": a.max_obs_length, "seed": a.seed, "losses": [round(x, 4) for x in losses],
              "sft_s": round(sft_s, 1), "total_s": round(time.perf_counter() - t0, 1),
              "torch_threads": torch.get_num_threads(), "out": a.out}
    write_json_atomic(os.path.join(a.out, "warm_start.json"), report)
    logger.info("warm start saved to %s: loss %.3f -> %.3f in %.0f s", a.out, losses[0], losses[-1], sft_s)
    return report


if __name__ == "__main__":
    main()
