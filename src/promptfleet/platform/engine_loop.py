"""The engine's thread: the continuous-batching loop, one step at a time, and what keeps a
failure with the request that caused it.

``Engine`` (``platform.engine``: construction, adapters, the async API) derives from
``EngineLoop`` and sets everything the loop reads (``scheduler``, ``cache``, ``runner``,
``model``, ``config``, the inbox/outbox and their lock, counters). Requests reach the
loop through ``_submit``/``_post``; each iteration admits what fits, runs ONE forward over
every running sequence (decode rows, prompt chunks, beam searches' beams), samples or
advances the searches, and hands the deltas to their event loops once per step.
"""
from __future__ import annotations

import asyncio
import logging
import threading
import time

import torch

from promptfleet.platform.beam_group import BeamGroup
from promptfleet.platform.device_sampler import SamplerPlan
from promptfleet.platform.scheduler import QueueFullError, RequestTooLargeError
from promptfleet.platform.sequence import CompletionDelta, Sequence, SeqStatus
from promptfleet.platform.staging import StepStaging
from promptfleet.platform.step_input import Group, build_step_input, plan_step

log = logging.getLogger("promptfleet.platform.engine")  # the engine's one logger, whichever half logs

# What a client is told when its request fails inside the engine: never the exception's
# own text (it is logged with the sequence id), and never another request's failure.
NUMERICAL_ERROR = ("numerical_error", "the model produced non-finite values (NaN or Inf) for this request, most "
                   "likely from its adapter or sampling parameters; no other request was affected")
INTERNAL_ERROR = ("engine_error", "an internal engine error stopped this request (logged on the server); "
                  "no other request was affected")


def _refuse(seq: Sequence, message: str, code: str) -> None:
    """Fail a request that never ran, or is stopped: a beam search answers through its group."""
    if seq.beam is not None:
        seq.beam.fail(message, code=code)
    else:
        seq.fail(message, code=code)


def _put_all(items: list[tuple[asyncio.Queue, CompletionDelta]]) -> None:
    for queue, delta in items:
        queue.put_nowait(delta)


class EngineLoop:
    """The engine thread's half of ``Engine`` (see the module docstring)."""

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
