"""Rollout with HF transformers `generate` (CPU or GPU): left-padded batches, stop strings, optional log-probs."""
from __future__ import annotations

import torch

from verl.workers.rollout.base import (GenerationOutput, RolloutBackend, SamplingConfig, StopCutter, check_prompts,
                                       eos_ids_of)


class HFRolloutBackend(RolloutBackend):
    """Generates with `model.generate`.

    `model` may be the actor module itself (then `load_weights` is a no-op, the rollout sees every update)
    or a separate copy that receives the trainer's weights through `load_weights`.
    `micro_batch_size` splits large batches to bound memory (None: one call for the whole batch).
    `enable_sleep_mode`: `sleep` moves a GPU-resident copy to host memory and `wake_up` moves it back, so the
    rollout copy does not sit beside the trainer's state during updates (a no-op on CPU). Only for a separate
    copy: never enable it on a backend that wraps the actor module itself.
    """

    def __init__(self, model, tokenizer, micro_batch_size: int | None = None, enable_sleep_mode: bool = False):
        if tokenizer.pad_token_id is None:
            raise ValueError("[rollout.hf] the tokenizer has no pad_token_id; set tokenizer.pad_token (e.g. to eos)")
        if micro_batch_size is not None and micro_batch_size < 1:
            raise ValueError(f"[rollout.hf] micro_batch_size must be >= 1 or None, got {micro_batch_size}")
        self.model = model
        self.tokenizer = tokenizer
        self.micro_batch_size = micro_batch_size
        self.sleep_enabled = enable_sleep_mode
        self._awake_device: torch.device | None = None  # set while asleep: where wake_up moves the model back
        self.eos_token_ids = eos_ids_of(tokenizer, getattr(model, "generation_config", None))
        self.cutter = StopCutter(tokenizer, self.eos_token_ids)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def sleep(self) -> None:
        if not self.sleep_enabled or self._awake_device is not None or self.device.type == "cpu":
            return
        self._awake_device = self.device
        self.model.to("cpu")
        torch.cuda.empty_cache()

    def wake_up(self) -> None:
        if self._awake_device is not None:
            self.model.to(self._awake_device)
            self._awake_device = None

    def _check_awake(self, what: str) -> None:
        if self._awake_device is not None:
            raise RuntimeError(f"[rollout.hf] {what} on a sleeping backend; call wake_up() first")

    def generate(self, prompt_ids: list[list[int]], params: SamplingConfig) -> list[GenerationOutput]:
        check_prompts(prompt_ids)
        self._check_awake("generate")
        step = self.micro_batch_size or len(prompt_ids)
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            if params.seed is not None:
                torch.manual_seed(params.seed)
            outputs: list[GenerationOutput] = []
            for start in range(0, len(prompt_ids), step):
                outputs.extend(self._generate_batch(prompt_ids[start:start + step], params))
        return outputs

    def _left_pad(self, prompt_ids: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, P) input ids and attention mask, left-padded with the pad id."""
        P = max(len(ids) for ids in prompt_ids)
        input_ids = torch.full((len(prompt_ids), P), self.tokenizer.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(prompt_ids), P), dtype=torch.long)
        for i, ids in enumerate(prompt_ids):
            input_ids[i, P - len(ids):] = torch.tensor(ids, dtype=torch.long)
            attention_mask[i, P - len(ids):] = 1
        return input_ids.to(self.device), attention_mask.to(self.device)

    @torch.no_grad()
    def _generate_batch(self, prompt_ids: list[list[int]], params: SamplingConfig) -> list[GenerationOutput]:
        input_ids, attention_mask = self._left_pad(prompt_ids)
        sampling = dict(do_sample=False) if params.greedy else dict(
            do_sample=True, temperature=params.temperature, top_p=params.top_p,
            top_k=0 if params.top_k == -1 else params.top_k)  # HF: top_k=0 disables the filter
        out = self.model.generate(
            input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=params.max_new_tokens,
            stop_strings=list(params.stop) or None, tokenizer=self.tokenizer,
            eos_token_id=self.eos_token_ids, pad_token_id=self.tokenizer.pad_token_id,
            return_dict_in_generate=True, output_logits=params.logprobs, **sampling)
        new_ids = out.sequences[:, input_ids.shape[1]:].cpu()  # (B, n)
        token_log_probs = self._sampled_log_probs(out.logits, new_ids) if params.logprobs else None
        results = []
        for i in range(new_ids.shape[0]):
            kept, finish = self.cutter.cut(new_ids[i].tolist(), params.stop)
            lps = token_log_probs[i, :len(kept)].tolist() if token_log_probs is not None else None
            results.append(GenerationOutput(token_ids=kept, log_probs=lps, finish_reason=finish))
        return results

    @staticmethod
    def _sampled_log_probs(logits: tuple[torch.Tensor, ...], new_ids: torch.Tensor) -> torch.Tensor:
        """log π(o_s | context) of each sampled id under the raw model logits (no temperature or top-p).

        logits: n tensors (B, V), one per step; new_ids: (B, n). Returns (B, n) float32. One step at a time
        so that memory stays O(B·V) rather than O(B·n·V).
        """
        cols = []
        for s, step_logits in enumerate(logits):
            log_probs = torch.log_softmax(step_logits.float(), dim=-1).cpu()  # (B, V)
            cols.append(log_probs.gather(1, new_ids[:, s:s + 1]))
        return torch.cat(cols, dim=1) if cols else torch.zeros(new_ids.shape, dtype=torch.float32)

    def _shares_parameters(self, state_dict: dict[str, torch.Tensor]) -> bool:
        own = dict(self.model.named_parameters())
        common = [name for name in state_dict if name in own]
        return bool(common) and all(state_dict[name].data_ptr() == own[name].data_ptr() for name in common)

    def load_weights(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Copy `state_dict` (HF names) into the rollout model; a no-op when it holds the model's own tensors."""
        if not state_dict:
            raise ValueError("[rollout.hf] load_weights got an empty state_dict")
        self._check_awake("load_weights")
        if self._shares_parameters(state_dict):
            return
        result = self.model.load_state_dict(state_dict, strict=False)
        tied = {"lm_head.weight"} if getattr(self.model.config, "tie_word_embeddings", False) else set()
        missing = [k for k in result.missing_keys if k not in tied]
        if missing or result.unexpected_keys:
            raise KeyError(f"[rollout.hf] load_weights: state_dict does not match the rollout model: "
                           f"missing {missing[:5]}, unexpected {result.unexpected_keys[:5]}")
