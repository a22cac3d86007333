"""BuiltinExecutor: runs scheduled steps of a Llama-family model with PyTorch, on CPU or CUDA.

Contract (`tandem.engine.executor.Executor`): `execute(out)` computes KV for each scheduled
request's tokens `all_token_ids[start:start + num_new_tokens]` into the request's blocks
(`ScheduledRequest.block_ids`), and for each request whose `samples` is True returns the next token
and, if asked, its logprob. Per-request sampler state (seeded generators) is dropped when a request
id shows up in `out.finished_request_ids`. The executor never decides what runs: the scheduler
does, by block ids and token counts.

The KV cache is one tensor, `kv_cache: [num_layers, num_blocks, 2, kv_heads, block_size, head_dim]`
(see `kv_cache.py`); `kv_caches[layer]` are its per-layer views. A KV connector's worker side, if
given, may allocate the tensor (`allocate_kv_cache(shape, dtype, device)`, e.g. in shared memory)
and, if it has `register_kv_caches`, is handed the whole tensor to copy blocks in and out.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

import torch

from tandem import env
from tandem.engine.config import EngineConfig
from tandem.engine.executor import ExecutorOutput, SchedulerOutput
from tandem.engine.request import Request
from tandem.engines.builtin.attention import build_step
from tandem.engines.builtin.dtypes import DTYPES, compute_dtype
from tandem.engines.builtin.kv_cache import (
    allocate_kv_cache,
    bytes_per_block,
    kv_cache_shape,
    num_blocks_for_bytes,
)
from tandem.engines.builtin.model import DecoderModel
from tandem.engines.builtin.sampler import Sampler

log = logging.getLogger(__name__)


class BuiltinExecutor:
    def __init__(
        self,
        model_dir: str | Path,
        config: EngineConfig,
        *,
        dtype: str = "bfloat16",
        device: str = "cpu",
        kv_connector_worker: Any = None,
        num_threads: int | None = None,
    ) -> None:
        """`num_threads`: torch intra-op threads on CPU; None reads TANDEM_TORCH_THREADS, then
        OMP_NUM_THREADS, then uses the cores this process may run on (see `_configure_threads`).
        `dtype` is what is asked for; on a CPU that only emulates it the engine runs in float32
        (`dtypes.compute_dtype`), and `self.dtype` says what it runs in."""
        self.config = config
        self.device = torch.device(device)
        ran = compute_dtype(dtype, self.device)
        if ran != dtype:
            log.info(
                "this CPU has no %s arithmetic (emulated, several times slower than float32): "
                "computing in %s (TANDEM_CPU_HALF=native keeps %s)",
                dtype,
                ran,
                dtype,
            )
        self.dtype = DTYPES[ran]
        self.block_size = config.block_size
        _configure_threads(self.device, num_threads)
        t0 = time.perf_counter()
        with torch.inference_mode():
            self.model = DecoderModel.load(model_dir, self.dtype, self.device, config.max_model_len)
            self.weights_packed = env.pack_weights() and self.model.pack_weights()
        cfg = self.model.cfg
        self.model_config = cfg
        self.max_model_len: int = cfg.max_position_embeddings
        self.eos_token_ids: tuple[int, ...] = cfg.eos_token_ids
        self.vocab_size: int = cfg.vocab_size
        self.num_blocks: int = config.num_blocks or num_blocks_for_bytes(
            cfg, self.block_size, self.dtype, config.kv_cache_bytes
        )
        if kv_connector_worker is not None and hasattr(kv_connector_worker, "allocate_kv_cache"):
            # The connector may place the cache in shared memory so a same-host peer reads it directly.
            shape = kv_cache_shape(cfg, self.num_blocks, self.block_size)
            self.kv_cache = kv_connector_worker.allocate_kv_cache(shape, self.dtype, self.device)
        else:
            self.kv_cache = allocate_kv_cache(cfg, self.num_blocks, self.block_size, self.dtype, self.device)
        self.kv_caches: list[torch.Tensor] = list(self.kv_cache.unbind(0))
        """Per layer: [num_blocks, 2, kv_heads, block_size, head_dim], views of `kv_cache`."""
        self.sampler = Sampler(self.device)
        self._seeded: dict[str, Request] = {}
        """Requests that own a generator in the sampler, to drop it once they finish."""
        self.kv_connector_worker = kv_connector_worker
        if kv_connector_worker is not None and hasattr(kv_connector_worker, "register_kv_caches"):
            kv_connector_worker.register_kv_caches(self.kv_cache)
        log.info(
            "loaded %s (%d layers, %s, %s) in %.2fs; %d KV blocks of %d tokens (%.1f MiB)",
            cfg.architecture,
            cfg.num_layers,
            dtype,
            self.device,
            time.perf_counter() - t0,
            self.num_blocks,
            self.block_size,
            self.num_blocks * bytes_per_block(cfg, self.block_size, self.dtype) / 2**20,
        )

    def execute(self, out: SchedulerOutput) -> ExecutorOutput:
        t0 = time.perf_counter()
        self._drop_finished(out.finished_request_ids)
        if out.empty:
            return ExecutorOutput(step_seconds=time.perf_counter() - t0)
        with torch.inference_mode():
            batch = build_step(
                out.scheduled, self.block_size, self.model_config.num_kv_heads, self.device, self.dtype
            )
            logits = self.model.forward(
                batch.input_ids, batch.positions, batch.attn, self.kv_caches, batch.sample_rows
            )
            sampled: dict[str, tuple[int, float | None]] = {}
            if batch.sample_items:
                reqs = [(s.request.request_id, s.request.sampling) for s in batch.sample_items]
                self._seeded.update(
                    (s.request.request_id, s.request)
                    for s in batch.sample_items
                    if s.request.sampling.seed is not None
                )
                # The sampler's .tolist() waits for the device, so the timing covers the whole step.
                for (rid, _), result in zip(reqs, self.sampler(logits, reqs), strict=True):
                    sampled[rid] = result
            elif self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
        return ExecutorOutput(sampled=sampled, step_seconds=time.perf_counter() - t0)

    def _drop_finished(self, finished: set[str]) -> None:
        # EngineCore skips `execute` on an empty step, so ids finished just before the engine goes
        # idle never arrive in `finished_request_ids`; the request's own status catches those.
        done = finished | {rid for rid, req in self._seeded.items() if req.status.finished}
        for rid in done:
            self._seeded.pop(rid, None)
        self.sampler.drop(done)


def _configure_threads(device: torch.device, num_threads: int | None) -> None:
    """On CPU use the cores this process may run on: torch counts the host's cores, which in a
    container limited by CPU affinity oversubscribes (and a worker pinned to one core gets one
    thread). An explicit count, TANDEM_TORCH_THREADS or OMP_NUM_THREADS wins, in that order: with
    other processes busy on the same cores, fewer threads avoid OpenMP regions that wait on a
    descheduled thread."""
    if device.type != "cpu":
        return
    n = num_threads or env.torch_threads()
    if n is not None:
        torch.set_num_threads(n)
        return
    if "OMP_NUM_THREADS" in os.environ:
        return
    usable = env.usable_cpus()
    if torch.get_num_threads() > usable:
        torch.set_num_threads(usable)
