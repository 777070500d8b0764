"""stepsearch.envs.gold_sft.sft_on_trajectories: one unpadded forward per trajectory, gradients accumulated and
weighted by generated tokens, must give the gradient of the padded batch's mean loss over all generated tokens."""
import torch

from stepsearch.envs.gold_sft import sft_on_trajectories
from verl.utils.tiny_model import build_tiny_causal_lm, build_tokenizer


def rows_and_model():
    tokenizer = build_tokenizer(["alpha beta gamma delta epsilon zeta eta theta"] * 4, vocab_size=300)
    model = build_tiny_causal_lm(tokenizer, hidden_size=32, num_layers=1, num_heads=2, seed=0)
    vocab = len(tokenizer)
    g = torch.Generator().manual_seed(0)
    rows = []
    for prompt_len, response_len in [(5, 9), (3, 4), (7, 12)]:
        prompt = torch.randint(3, vocab, (prompt_len,), generator=g).tolist()
        response = torch.randint(3, vocab, (response_len,), generator=g).tolist()
        mask = (torch.rand(response_len, generator=g) < 0.6).long().tolist()
        mask[0] = 1
        rows.append((prompt, response, mask))
    return model, rows


def padded_batch_loss(model, rows) -> torch.Tensor:
    """Right-padded (B, L) forward; mean next-token cross-entropy over every generated token of the batch."""
    L = max(len(p) + len(r) for p, r, _ in rows)
    ids = torch.zeros(len(rows), L, dtype=torch.long)
    attention = torch.zeros(len(rows), L, dtype=torch.long)
    loss_mask = torch.zeros(len(rows), L)
    for b, (p, r, m) in enumerate(rows):
        n = len(p) + len(r)
        ids[b, :n] = torch.tensor(p + r)
        attention[b, :n] = 1
        loss_mask[b, len(p):n] = torch.tensor(m, dtype=torch.float)
    logits = model(input_ids=ids, attention_mask=attention).logits
    logp = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None])[..., 0]
    return -(logp * loss_mask[:, 1:]).sum() / loss_mask[:, 1:].sum()


def test_accumulated_gradient_equals_the_padded_batch():
    model, rows = rows_and_model()
    reference = padded_batch_loss(model, rows)
    reference.backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    # lr tiny and one step: read the gradient AdamW saw through its first moment (m = (1 - beta1) * grad)
    captured = {}
    original_step = torch.optim.AdamW.step

    def capture(self, *args, **kwargs):
        for n, p in model.named_parameters():
            captured[n] = p.grad.clone()
        return original_step(self, *args, **kwargs)

    torch.optim.AdamW.step = capture
    try:
        losses = sft_on_trajectories(model, rows, steps=1, batch_size=3, lr=1e-9, grad_clip=1e9)
    finally:
        torch.optim.AdamW.step = original_step
    assert abs(losses[0] - reference.item()) < 1e-5
    for n, grad in expected.items():
        torch.testing.assert_close(captured[n], grad, atol=1e-6, rtol=1e-4, msg=n)


def test_loss_falls_on_repeated_trajectories():
    model, rows = rows_and_model()
    losses = sft_on_trajectories(model, rows, steps=30, batch_size=3, lr=1e-2)
    assert losses[-1] < 0.5 * losses[0]
