"""The serving engine: one shared GPT-2 backbone, a continuous-batching loop in its own
thread (``engine_loop.EngineLoop``), and an async API (here).

    engine = Engine.from_pretrained("ckpt/", EngineConfig())
    engine.add_adapter("support-bot", load_adapter_dir("peft_out/"))
    async for delta in engine.generate("Hello", SamplingParams(max_tokens=32), adapter="support-bot"):
        print(delta.text, end="")

Each loop iteration admits waiting requests (an adapter's virtual tokens are copied from
its shared prefix: only prompt tokens are ever prefilled), then runs ONE forward over
every running sequence whatever its adapter: decode tokens and prompt chunks together.
"""
from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import torch

from promptfleet.platform.adapter import AdapterPrefix, AdapterWeights, BackboneScale, backbone_scale, build_prefix
from promptfleet.platform.beam_group import BeamGroup
from promptfleet.platform.engine_loop import INTERNAL_ERROR, NUMERICAL_ERROR, EngineLoop
from promptfleet.platform.beam_search import BeamParams
from promptfleet.platform.config import EngineConfig, ModelConfig, resolve_dtype
from promptfleet.platform.attention_backend import choose_attention
from promptfleet.platform.kv_cache import SlotKVCache
from promptfleet.platform.llama import Llama
from promptfleet.platform.model import GPT2
from promptfleet.platform.runner import ModelRunner
from promptfleet.platform.decode_graphs import CudaGraph, DecodeGraphs, EagerGraph
from promptfleet.platform.sampling import SamplingParams
from promptfleet.platform.staging import PinnedBuffers
from promptfleet.platform.scheduler import QueueFullError, RequestTooLargeError, Scheduler
from promptfleet.platform.sequence import CompletionDelta, Sequence, SeqStatus
from promptfleet.platform.tokenizer import load_tokenizer
from promptfleet.platform.weights import load_model, resolve_checkpoint, weights_id

log = logging.getLogger(__name__)

__all__ = ["Engine", "EngineStats", "INTERNAL_ERROR", "NUMERICAL_ERROR", "QueueFullError", "RequestFailedError",
           "RequestTooLargeError", "UnknownAdapterError"]

class UnknownAdapterError(KeyError):
    pass


class RequestFailedError(RuntimeError):
    """One request failed inside the engine; ``code`` says how, the message is safe to show."""

    def __init__(self, message: str, code: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class EngineStats:
    running: int
    waiting: int
    kv_reserved_tokens: int
    kv_budget_tokens: int
    steps: int
    tokens_generated: int
    prompt_tokens: int
    decode_seconds: float = 0.0      # wall time inside decode-only steps
    decode_row_tokens: int = 0       # tokens produced by decode-only steps
    prefill_seconds: float = 0.0     # wall time inside steps that carried prompt tokens (decode rows too)
    kv_allocated_bytes: int = 0      # what the KV cache allocated (on the engine's device)
    kv_budget_bytes: int = 0         # kv_cache_bytes: what it may allocate


class Engine(EngineLoop):
    def __init__(self, model: GPT2 | Llama, tokenizer, config: EngineConfig | None = None) -> None:
        self.config = config or EngineConfig()
        self.model = model
        self.tokenizer = tokenizer
        self.model_config: ModelConfig = model.config
        self.device = model.wte.weight.device
        self.dtype = model.wte.weight.dtype
        c = self.config
        self.max_model_len = min(c.max_model_len or self.model_config.n_positions, self.model_config.n_positions)
        # an explicit backend that cannot run here is refused now, saying why (ValueError)
        choice = choose_attention(c.attention, self.device, self.dtype, self.model_config.head_dim)
        log.info("attention backend %s (%s)", choice.name, choice.reason)
        backend = self.attention_backend = choice.name
        self.attention_reason = choice.reason
        # the cache allocates what kv_cache_bytes holds: slots of max_model_len positions
        self.cache = SlotKVCache.for_budget(
            self.model_config, budget_bytes=c.kv_cache_bytes, max_slots=c.max_batch_size, max_len=self.max_model_len,
            device=self.device, dtype=self.dtype, backend=backend)
        log.info("KV cache: %d slots of %d positions, %d of %d budget bytes allocated", self.cache.max_slots,
                 self.cache.max_len, self.cache.allocated_bytes, c.kv_cache_bytes)
        if self.cache.max_slots < c.max_batch_size:
            log.warning("kv_cache_bytes %d holds %d sequences of %d tokens (max_batch_size %d): raise it, or lower "
                        "max_model_len, to run more at once", c.kv_cache_bytes, self.cache.max_slots,
                        self.cache.max_len, c.max_batch_size)
        self.scheduler = Scheduler(self.cache, max_batch_size=c.max_batch_size, max_queue=c.max_queue,
                                   max_model_len=self.max_model_len)
        self.runner = ModelRunner(model, self.cache, self._decode_graphs())  # the one place the fast path is chosen
        self.adapters: dict[str, AdapterPrefix] = {}
        self._inbox: list[tuple[str, object]] = []
        # deltas produced by the engine thread, handed to their event loops once per step
        # (one wake-up per loop, not one per request and token)
        self._outbox: list[tuple[asyncio.AbstractEventLoop, asyncio.Queue, CompletionDelta]] = []
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._pending = 0
        self._rng = torch.Generator().manual_seed(0)
        self._pinned = PinnedBuffers()  # the step's host-to-device copy reads from these (CUDA)
        self._steps = self._generated = self._prompt_tokens = self._decode_tokens = 0
        self._decode_s = self._prefill_s = 0.0
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._newest: list[Sequence] = []  # the latest admissions (suspects when a step fails)
        self._scale: BackboneScale | None = None  # what adapters' values are measured against
        self.checkpoint_path: Path | None = None
        self._weights_id: str | None = None
        self._detokenize = lambda ids: tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)

    # ------------------------------------------------------------------ construction
    def _decode_graphs(self) -> DecodeGraphs | None:
        """Decode-only steps as CUDA graphs per batch bucket: on CUDA with a ragged decode
        kernel (flash, flex); ``eager`` runs the same static-buffer path without capture."""
        mode = self.config.decode_graphs
        if mode not in ("auto", "off", "eager"):
            raise ValueError(f"decode_graphs must be auto, off or eager, not {mode!r}")
        if mode == "eager":
            return DecodeGraphs(self.model, self.cache, graph=EagerGraph)
        if mode == "auto" and self.device.type == "cuda" and self.attention_backend in ("flash", "flex"):
            return DecodeGraphs(self.model, self.cache, graph=CudaGraph)
        return None

    @classmethod
    def from_pretrained(cls, name_or_path: str | Path, config: EngineConfig | None = None) -> "Engine":
        config = config or EngineConfig()
        path = resolve_checkpoint(name_or_path)
        dtype = resolve_dtype(config.device, config.dtype)
        if config.num_threads:
            torch.set_num_threads(config.num_threads)
        # the family (GPT-2 or Llama) comes from the checkpoint's config
        model = load_model(path, device=config.device, dtype=dtype, linear_kernels=config.linear_kernels)
        engine = cls(model, load_tokenizer(path), config)
        engine.checkpoint_path = path
        return engine

    @property
    def weights_id(self) -> str:
        """sha256 of the loaded checkpoint's weights (computed once, on first use)."""
        if self._weights_id is None:
            self._weights_id = weights_id(self.checkpoint_path) if self.checkpoint_path else f"unsaved-{id(self)}"
        return self._weights_id

    # ------------------------------------------------------------------ adapters
    def build_adapter(self, weights: AdapterWeights, key: str) -> AdapterPrefix:
        """Validate ``weights`` against this backbone (shapes, and values finite in the
        serving dtype and within ``ADAPTER_SCALE_LIMIT`` of the backbone's own scale) and
        compute its shared KV prefix; ``AdapterError`` says what is wrong."""
        if self._scale is None:
            self._scale = backbone_scale(self.model)
        return build_prefix(self.model, weights, key, self._scale)

    def check_adapter(self, weights: AdapterWeights) -> None:
        """Refuse (``AdapterError``) an adapter this engine could not serve: what an upload
        runs before anything is stored."""
        self.build_adapter(weights, "upload-check")

    def add_adapter(self, key: str, weights: AdapterWeights | AdapterPrefix) -> AdapterPrefix:
        prefix = weights if isinstance(weights, AdapterPrefix) else self.build_adapter(weights, key)
        self.adapters[key] = prefix
        return prefix

    def remove_adapter(self, key: str) -> None:
        """Forget an adapter; requests already running on it keep their own copy and finish."""
        self.adapters.pop(key, None)

    def stats(self) -> EngineStats:
        s = self.scheduler
        return EngineStats(running=len(s.running), waiting=len(s.waiting) + self._pending,
                           kv_reserved_tokens=s.reserved_tokens, kv_budget_tokens=s.budget_tokens,
                           steps=self._steps, tokens_generated=self._generated, prompt_tokens=self._prompt_tokens,
                           decode_seconds=self._decode_s, decode_row_tokens=self._decode_tokens,
                           prefill_seconds=self._prefill_s, kv_allocated_bytes=self.cache.allocated_bytes,
                           kv_budget_bytes=self.config.kv_cache_bytes)

    # ------------------------------------------------------------------ public async API
    def encode(self, prompt: str) -> list[int]:
        return self.tokenizer.encode(prompt)

    async def generate(self, prompt: str | list[int], params: SamplingParams | None = None,
                       adapter: str | AdapterPrefix | None = None) -> AsyncIterator[CompletionDelta]:
        """Stream the deltas of one request. Closing the iterator cancels the request."""
        params = params or SamplingParams()
        prefix, ids = self._request(prompt, adapter)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[CompletionDelta] = asyncio.Queue()
        seq = Sequence(prompt_ids=ids, params=params, adapter=prefix,
                       emit=lambda d: self._outbox.append((loop, queue, d)),
                       detokenize=self._detokenize, eos_token_ids=self.model_config.eos_token_ids,
                       repetition=self.config.repetition)
        self.scheduler.check_fits(seq)
        self._submit(seq)
        try:
            while True:
                delta = await queue.get()
                if delta.error:
                    raise RequestFailedError(delta.error, delta.error_code or INTERNAL_ERROR[0])
                yield delta
                if delta.finish_reason is not None:
                    return
        finally:
            if seq.status is not SeqStatus.FINISHED:
                self._post("abort", seq)

    async def beam_search(self, prompt: str | list[int], params: SamplingParams, beam: BeamParams,
                          adapter: str | AdapterPrefix | None = None) -> list[CompletionDelta]:
        """The best ``beam.num_return`` beams of a beam search (best first), each a whole
        completion; ``params`` gives max_tokens, stop, ignore_eos and repetition_penalty
        (temperature, top_p, top_k and seed do not apply). Cancelling the call cancels
        the search."""
        prefix, ids = self._request(prompt, adapter)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[list[CompletionDelta]] = asyncio.Queue()
        group = BeamGroup.create(prompt_ids=ids, params=params, beam=beam, adapter=prefix,
                                 emit=lambda results: self._outbox.append((loop, queue, results)),
                                 detokenize=self._detokenize, eos_token_ids=self.model_config.eos_token_ids,
                                 repetition=self.config.repetition, max_model_len=self.max_model_len)
        head = group.head
        self.scheduler.check_fits(head)
        self._submit(head)
        try:
            results = await queue.get()
        finally:
            if head.status is not SeqStatus.FINISHED:
                self._post("abort", head)
        if results and results[0].error:
            raise RequestFailedError(results[0].error, results[0].error_code or INTERNAL_ERROR[0])
        return results

    def _request(self, prompt: str | list[int], adapter: str | AdapterPrefix | None) -> tuple[AdapterPrefix | None,
                                                                                               list[int]]:
        """The request's adapter prefix (checked) and prompt ids (checked; BOS for an empty prompt)."""
        prefix = self._resolve_adapter(adapter)
        ids = self.encode(prompt) if isinstance(prompt, str) else list(prompt)
        if not ids:
            # an empty prompt starts from BOS (GPT-2's is its EOS, <|endoftext|>)
            bos = self.model_config.bos_token_id
            ids = [self.model_config.eos_token_id if bos is None else bos]
        if any((not isinstance(t, int)) or t < 0 or t >= self.model_config.vocab_size for t in ids):
            raise ValueError(f"token ids must be integers in [0, {self.model_config.vocab_size})")
        if prefix is not None:
            self._check_prefix(prefix)
        return prefix, ids

    async def complete(self, prompt: str | list[int], params: SamplingParams | None = None,
                       adapter: str | AdapterPrefix | None = None) -> CompletionDelta:
        """The whole completion as one delta (text and tokens joined)."""
        text, tokens, last = [], [], None
        async for delta in self.generate(prompt, params, adapter):
            text.append(delta.text)
            tokens.extend(delta.token_ids)
            last = delta
        assert last is not None
        return CompletionDelta("".join(text), tokens, last.finish_reason, last.prompt_tokens, last.completion_tokens)

    def _check_prefix(self, prefix: AdapterPrefix) -> None:
        """Refuse a prefix that does not fit this engine's cache or is not finite (a stored
        prefix read back from disk, say), before it can reach a batch."""
        _, _, heads, head_dim = self.cache.k[0].shape  # KV heads, as the cache holds them
        want = (self.model_config.n_layer, heads, prefix.num_virtual_tokens, head_dim)
        if tuple(prefix.k.shape) != want or tuple(prefix.v.shape) != want:
            raise ValueError(f"adapter {prefix.key!r} has KV prefix shape {list(prefix.k.shape)}; this backbone "
                             f"needs {list(want)}")
        if prefix.k.dtype != self.dtype or prefix.k.device != self.device or prefix.v.dtype != self.dtype:
            raise ValueError(f"adapter {prefix.key!r} was built for {prefix.k.dtype} on {prefix.k.device}; "
                             f"this engine serves {self.dtype} on {self.device}")
        if not (bool(torch.isfinite(prefix.k).all()) and bool(torch.isfinite(prefix.v).all())):
            raise ValueError(f"adapter {prefix.key!r} has non-finite values in its KV prefix")

    def _resolve_adapter(self, adapter: str | AdapterPrefix | None) -> AdapterPrefix | None:
        if adapter is None or isinstance(adapter, AdapterPrefix):
            return adapter
        try:
            return self.adapters[adapter]
        except KeyError:
            raise UnknownAdapterError(f"adapter {adapter!r} is not loaded") from None
