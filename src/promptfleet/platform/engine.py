"""The serving engine: one shared GPT-2 backbone, a continuous-batching loop in its own
thread, and an async API.

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
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import torch

from promptfleet.platform.adapter import AdapterPrefix, AdapterWeights, BackboneScale, backbone_scale, build_prefix
from promptfleet.platform.beam_group import BeamGroup
from promptfleet.platform.beam_search import BeamParams
from promptfleet.platform.config import EngineConfig, ModelConfig, resolve_dtype
from promptfleet.platform.attention_backend import choose_attention
from promptfleet.platform.kv_cache import SlotKVCache
from promptfleet.platform.llama import Llama
from promptfleet.platform.model import GPT2
from promptfleet.platform.step_input import Group, build_step_input, plan_step
from promptfleet.platform.runner import ModelRunner
from promptfleet.platform.decode_graphs import CudaGraph, DecodeGraphs, EagerGraph
from promptfleet.platform.device_sampler import SamplerPlan
from promptfleet.platform.sampling import SamplingParams
from promptfleet.platform.staging import PinnedBuffers, StepStaging
from promptfleet.platform.scheduler import QueueFullError, RequestTooLargeError, Scheduler
from promptfleet.platform.sequence import CompletionDelta, Sequence, SeqStatus
from promptfleet.platform.tokenizer import load_tokenizer
from promptfleet.platform.weights import load_model, resolve_checkpoint, weights_id

log = logging.getLogger(__name__)

__all__ = ["Engine", "EngineStats", "QueueFullError", "RequestFailedError", "RequestTooLargeError",
           "UnknownAdapterError"]

# What a client is told when its request fails inside the engine: never the exception's
# own text (it is logged with the sequence id), and never another request's failure.
NUMERICAL_ERROR = ("numerical_error", "the model produced non-finite values (NaN or Inf) for this request, most "
                   "likely from its adapter or sampling parameters; no other request was affected")
INTERNAL_ERROR = ("engine_error", "an internal engine error stopped this request (logged on the server); "
                  "no other request was affected")


class UnknownAdapterError(KeyError):
    pass


class RequestFailedError(RuntimeError):
    """One request failed inside the engine; ``code`` says how, the message is safe to show."""

    def __init__(self, message: str, code: str) -> None:
        super().__init__(message)
        self.code = code


def _refuse(seq: Sequence, message: str, code: str) -> None:
    """Fail a request that never ran, or is stopped: a beam search answers through its group."""
    if seq.beam is not None:
        seq.beam.fail(message, code=code)
    else:
        seq.fail(message, code=code)


def _put_all(items: list[tuple[asyncio.Queue, CompletionDelta]]) -> None:
    for queue, delta in items:
        queue.put_nowait(delta)


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


class Engine:
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

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._stopping = False
            self._thread = threading.Thread(target=self._loop, name="promptfleet-engine", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        with self._wake:
            self._stopping = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join(timeout=30)
        self._thread = None

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

    def _submit(self, seq: Sequence) -> None:
        with self._wake:
            if len(self.scheduler.waiting) + self._pending >= self.scheduler.max_queue:
                raise QueueFullError(f"the waiting queue is full ({self.scheduler.max_queue} requests)")
            self._pending += 1
            self._inbox.append(("add", seq))
            self._wake.notify()
        self.start()

    def _post(self, kind: str, seq: Sequence) -> None:
        with self._wake:
            self._inbox.append((kind, seq))
            self._wake.notify()

    # ------------------------------------------------------------------ engine thread
    def _loop(self) -> None:
        while True:
            with self._wake:
                while not self._inbox and not self.scheduler.has_work and not self._stopping:
                    self._wake.wait()
                if self._stopping:
                    break
                inbox, self._inbox = self._inbox, []
                self._pending -= sum(1 for kind, _ in inbox if kind == "add")
            for kind, seq in inbox:
                assert isinstance(seq, Sequence)
                if kind == "add":
                    try:
                        self.scheduler.add(seq)
                    except (QueueFullError, RequestTooLargeError) as exc:
                        _refuse(seq, str(exc), "queue_full" if isinstance(exc, QueueFullError)
                                else "context_length_exceeded")
                elif kind == "abort" and seq.status is not SeqStatus.FINISHED:
                    for member in [seq] if seq.beam is None else seq.beam.members:  # a beam search: all beams
                        member.status = SeqStatus.FINISHED
                        self.scheduler.release(member)
            try:
                self.step()
            except Exception:  # a failure step() could not pin to rows: keep the process serving
                log.exception("engine step failed outside the forward; failing the running batch")
                for seq in list(self.scheduler.running):
                    self._fail(seq, INTERNAL_ERROR)
                self._release_finished()
            self._deliver()
        for seq in list(self.scheduler.running) + list(self.scheduler.waiting):
            _refuse(seq, "the engine stopped before this request finished; retry", "engine_stopped")
            self.scheduler.release(seq)
        self._deliver()

    def _deliver(self) -> None:
        """Hand this step's deltas to their event loops: one ``call_soon_threadsafe`` per loop."""
        if not self._outbox:
            return
        outbox, self._outbox = self._outbox, []
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, CompletionDelta]]] = {}
        for loop, queue, delta in outbox:
            by_loop.setdefault(loop, []).append((queue, delta))
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_put_all, items)
            except RuntimeError:  # that loop is closed: nobody is listening any more
                pass

    @torch.inference_mode()
    def step(self) -> None:
        """Admit what fits, then ONE forward: a decode token for every running sequence
        whose prompt is cached, plus prompt chunks up to ``max_step_tokens`` (see
        ``step_input.plan_step``). A prompt arriving mid-stream costs its own tokens' share
        of a pass, and a long one is spread over steps instead of stalling every stream.

        Failures stay with the request that caused them: a row whose hidden state or
        distribution is not finite is failed alone (``_sample_rows``), and a step that
        raises is retried without its newest admissions, then row by row (``_recover``)."""
        admitted = self.scheduler.admit()
        if admitted:
            self._newest = admitted
        groups = plan_step(self.scheduler.running, max_step_tokens=self.config.max_step_tokens)
        if groups:
            t0 = time.perf_counter()
            try:
                self._forward_and_sample(groups)
            except Exception:
                log.exception("engine step over %d sequences failed; retrying without its newest admissions",
                              sum(len(g.seqs) for g in groups))
                self._recover()
            if any(g.is_prompt for g in groups):  # prompt tokens aboard: a prefill step
                self._prefill_s += time.perf_counter() - t0
            else:  # decode-only steps: what decode utilisation is measured on
                self._decode_s += time.perf_counter() - t0
                self._decode_tokens += sum(len(g.seqs) for g in groups)
        self._release_finished()
        self._steps += 1

    def _recover(self) -> None:
        """After a step raised: run it again without the newest admissions; if that works,
        run each of those alone, else every sequence alone. A sequence that still fails
        on its own is failed; everyone else advances by their step. (A failed forward
        changes no sequence's state, so running it again is safe.)"""
        running = [s for s in self.scheduler.running if s.status is not SeqStatus.FINISHED]
        newest = [s for s in running if any(s is n for n in self._newest)]
        rest = [s for s in running if not any(s is n for n in newest)]
        suspects = newest if newest and rest and self._try_alone(rest) else running
        # a beam search is one suspect (planning any of its beams plans them all)
        suspects = [s for s in suspects if s.beam is None or s is s.beam.head]
        for seq in suspects:
            if not self._try_alone([seq]):
                self._fail(seq, INTERNAL_ERROR)

    def _try_alone(self, seqs: list[Sequence]) -> bool:
        groups = plan_step(seqs, max_step_tokens=self.config.max_step_tokens)
        try:
            if groups:
                self._forward_and_sample(groups)
        except Exception:
            log.exception("engine step over sequences %s failed again", [s.id for s in seqs])
            return False
        return True

    def _fail(self, seq: Sequence, error: tuple[str, str]) -> None:
        """Finish one sequence with a client-safe error; its KV slot may hold garbage, so
        the cache zeroes that slot again before anyone reads it."""
        if seq.status is SeqStatus.FINISHED:
            return
        log.warning("sequence %d failed: %s", seq.id, error[0])
        for member in [seq] if seq.beam is None else seq.beam.members:  # a beam search fails whole
            if 0 <= member.slot < len(self.scheduler.running) and self.scheduler.running[member.slot] is member:
                self.cache.forget(member.slot)
        if seq.beam is not None:
            seq.beam.fail(error[1], code=error[0])
        else:
            seq.fail(error[1], code=error[0])

    def _release_finished(self) -> None:
        for seq in [s for s in self.scheduler.running if s.status is SeqStatus.FINISHED]:
            self.scheduler.release(seq)

    def _forward_and_sample(self, groups: list[Group]) -> None:
        rows = [s for g in groups if g.sample for s in g.seqs]
        plain = [i for i, s in enumerate(rows) if s.beam is None]
        seqs = [rows[i] for i in plain]
        # the sampler's small tensors (and each sampled row's uniform, drawn from its own
        # generator) ride in the step's one host-to-device copy with the model's inputs
        stage = StepStaging(self.device, self._pinned)
        plan = SamplerPlan.build([s.sampler_row() for s in seqs], self._rng, device=self.device, stage=stage) \
            if seqs else None
        try:
            batch = build_step_input(groups, self.cache, n_positions=self.model_config.n_positions,
                                     device=self.device, stage=stage)
            hidden = self.runner.forward(batch)
            last = hidden[0, batch.last]
            tokens = self._sample_rows(last if len(plain) == len(rows) else last[plain], plan) if seqs else []
            searches: dict[int, tuple[BeamGroup, list[int]]] = {}  # beam searches' rows (into beam_rows), by search
            beam_rows = [i for i, s in enumerate(rows) if s.beam is not None]
            for j, i in enumerate(beam_rows):
                searches.setdefault(id(rows[i].beam), (rows[i].beam, []))[1].append(j)
            beam_logits, beam_finite = self._beam_logits(last[beam_rows]) if beam_rows else (None, None)
        except Exception:
            if plan is not None:
                plan.rewind()  # the step runs again: seeded rows draw the same numbers then
            raise
        # nothing above changed a sequence's state, so a step that raised can run again
        for g in groups:
            for seq, toks in zip(g.seqs, g.new_tokens):
                seq.cached += len(toks)
                if g.is_prompt:
                    self._prompt_tokens += len(toks)
        for search, idx in searches.values():
            finite = bool(beam_finite[idx].all())
            self._advance_search(search, beam_logits[idx] if finite else None, len(idx))
        for seq, token in zip(seqs, tokens):
            if token is None:
                self._fail(seq, NUMERICAL_ERROR)
                continue
            self._generated += 1
            try:
                seq.append(token, self.max_model_len)
                seq.flush()
            except Exception:
                log.exception("sequence %d failed on token %d", seq.id, token)
                self._fail(seq, INTERNAL_ERROR)

    def _beam_logits(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Every beam row's logits this step (one LM-head matmul for all the searches, which
        read its weights once), in float32 on the host, and which rows are finite (a
        search with a non-finite row fails alone)."""
        logits = self.model.logits(hidden).float()
        return logits.cpu(), torch.isfinite(logits).all(-1).cpu()

    def _advance_search(self, search: BeamGroup, logits: torch.Tensor | None, rows: int) -> None:
        if search.finished:
            return
        if logits is None:
            self._fail(search.head, NUMERICAL_ERROR)
            return
        self._generated += rows
        try:
            search.advance(logits, self.cache)
        except Exception:
            log.exception("beam search of sequence %d failed", search.head.id)
            self._fail(search.head, INTERNAL_ERROR)

    def _sample_rows(self, last_hidden: torch.Tensor, plan: SamplerPlan) -> list[int | None]:
        """One token per sampling row, or None for a row that is not finite (its hidden
        state, or its own distribution) or draws an id outside the vocabulary: sampled on
        the logits' device (``device_sampler``); only the ``[rows]`` int32 ids come back,
        so no bad id ever reaches an embedding lookup."""
        valid = torch.isfinite(last_hidden).all(-1)
        logits = self.model.logits(last_hidden)
        # the native argmax only where the engine runs on the native kernels: a config
        # off them (linears onednn/torch, attention sdpa) makes no native call at all
        native = "avx512" in (self.model.linear_kernels, self.attention_backend)
        picked = plan.pick(logits, valid=valid, native_argmax=native,
                           vocab_size=self.model_config.vocab_size).cpu().tolist()
        return [None if t < 0 else t for t in picked]
