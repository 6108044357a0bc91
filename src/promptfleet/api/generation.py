"""Running one completion request's choices on the engine, with the generation cache.

``Generation.start()`` submits every uncached choice and waits for each one's first
delta, so refusals (queue full, too large) surface before an HTTP status is sent;
``deltas()`` then yields ``(choice index, delta)`` as the engine produces them, and
``aclose()`` cancels whatever is still running (the engine aborts those sequences and
frees their KV slots at once). Streams and plain responses share this one path.

With ``beam`` set, each prompt's ``n`` choices come from one beam search (choice
``i * n + j`` is the j-th best beam of prompt i), answered whole when the search ends
(never streamed); the generation cache keys each choice by the beam settings and rank.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable
from contextlib import suppress
from typing import TypeVar

from fastapi import Request

from promptfleet.api.errors import APIError, bad_request, overloaded
from promptfleet.api.gen_cache import CachedCompletion, CacheKey, GenerationCache
from promptfleet.api.serving import Choice, ResolvedModel
from promptfleet.platform.beam_search import BeamParams
from promptfleet.platform.engine import Engine, QueueFullError, RequestFailedError, RequestTooLargeError
from promptfleet.platform.sequence import CompletionDelta

log = logging.getLogger(__name__)
T = TypeVar("T")
_DONE = object()


# RequestFailedError.code -> HTTP status: a request whose own adapter or parameters made
# the model produce NaN/Inf is unprocessable (422); the rest are the server's.
_FAILURE_STATUS = {"numerical_error": 422, "context_length_exceeded": 400, "queue_full": 503,
                   "engine_stopped": 503, "engine_error": 500}


def engine_error(exc: BaseException) -> APIError:
    """The HTTP error for an exception raised by ``Engine.generate``."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, QueueFullError):
        return overloaded(f"the server is busy: {exc}; retry shortly")
    if isinstance(exc, RequestTooLargeError):
        return bad_request(str(exc), code="context_length_exceeded", param="max_tokens")
    if isinstance(exc, ValueError):
        return bad_request(str(exc))
    if isinstance(exc, RequestFailedError):  # the engine's message is written for clients
        log.warning("generation failed in the engine: %s", exc.code)
        status = _FAILURE_STATUS.get(exc.code, 500)
        if status == 503:
            return overloaded(str(exc), code=exc.code)
        return APIError(status, str(exc), code=exc.code)
    # never an exception's own text to the client: it is logged here, with the request id
    log.error("generation failed: %r", exc, exc_info=exc)
    return APIError(500, "generation failed: internal error (logged on the server with this request's id)",
                    code="engine_error")


def _cached_delta(hit: CachedCompletion) -> CompletionDelta:
    """A generation-cache entry as the one, final delta of its choice."""
    return CompletionDelta(hit.text, [], hit.finish_reason, hit.prompt_tokens, hit.completion_tokens)


class Generation:
    def __init__(self, *, engine: Engine, cache: GenerationCache, tenant_id: str, model: ResolvedModel,
                 choices: list[Choice], prompt_tokens: int, beam: BeamParams | None = None) -> None:
        self.engine = engine
        self.beam = beam
        self.cache = cache
        self.model = model
        self.choices = choices
        self.started_at = time.perf_counter()
        self.first_token_at: float | None = None
        self.cache_hits = 0
        self.cache_misses = 0
        self.texts: dict[int, list[str]] = {c.index: [] for c in choices}
        self.finish: dict[int, str] = {}
        self.completion_tokens: dict[int, int] = {c.index: 0 for c in choices}
        self.prompt_tokens = prompt_tokens  # each prompt once, however many samples (n) it has
        self._keys: dict[int, CacheKey | None] = {
            c.index: cache.key(tenant_id=tenant_id, model_scope=model.scope, prompt_ids=c.prompt_ids, params=c.params,
                               variant=() if beam is None else (beam, c.index % beam.num_return))
            for c in choices}
        self._ready: list[tuple[int, CompletionDelta]] = []
        self._gens: dict[int, AsyncIterator[CompletionDelta]] = {}
        self._fresh: set[int] = set()  # choices generated now (not answered from the cache)
        self._searches: list[asyncio.Future] = []
        self._pumps: list[asyncio.Task] = []
        self._queue: asyncio.Queue = asyncio.Queue()
        self._closed = False

    # ---------------------------------------------------------------- start
    async def start(self) -> None:
        """Answer cached choices, submit the others and wait for their first deltas."""
        if self.beam is not None:
            await self._search()
            return
        for c in self.choices:
            hit = self.cache.get(self._keys[c.index])
            if hit is not None:
                self.cache_hits += 1
                self._ready.append((c.index, _cached_delta(hit)))
            else:
                self.cache_misses += self._keys[c.index] is not None
                self._gens[c.index] = self.engine.generate(c.prompt_ids, c.params, self.model.prefix)
        firsts = await self._first_results([anext(g) for g in self._gens.values()])
        self._fresh.update(self._gens)
        for index, first in zip(self._gens, firsts):
            self._ready.append((index, first))
            if first.finish_reason is None:
                self._pumps.append(asyncio.create_task(self._pump(index, self._gens[index])))

    async def _first_results(self, tasks: list[Awaitable]) -> list:
        """Await what the engine answers first for each submitted choice (first deltas, or
        whole beam searches); on any refusal, cancel everything and raise its HTTP error."""
        results = await asyncio.gather(*tasks, return_exceptions=True)
        if tasks:
            self.first_token_at = time.perf_counter()
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            await self.aclose()
            raise engine_error(errors[0])
        return results

    async def _search(self) -> None:
        """One beam search per prompt whose choices are not all cached."""
        beam = self.beam
        assert beam is not None
        by_prompt = [self.choices[i:i + beam.num_return] for i in range(0, len(self.choices), beam.num_return)]
        hits = [[self.cache.get(self._keys[c.index]) for c in group] for group in by_prompt]
        todo = [(group, hit) for group, hit in zip(by_prompt, hits) if any(h is None for h in hit)]
        for group, hit in zip(by_prompt, hits):
            if all(h is not None for h in hit):
                self.cache_hits += len(group)
                self._ready.extend((c.index, _cached_delta(h)) for c, h in zip(group, hit))
        self.cache_misses += sum(self._keys[c.index] is not None for group, _ in todo for c in group)
        self._searches = [asyncio.ensure_future(self.engine.beam_search(group[0].prompt_ids, group[0].params, beam,
                                                                        self.model.prefix)) for group, _ in todo]
        results = await self._first_results(self._searches)
        for (group, _), beams in zip(todo, results):
            if len(beams) != len(group):
                raise engine_error(RuntimeError(f"beam search returned {len(beams)} beams for {len(group)} choices"))
            self._fresh.update(c.index for c in group)
            self._ready.extend((c.index, delta) for c, delta in zip(group, beams))

    async def _pump(self, index: int, gen: AsyncIterator[CompletionDelta]) -> None:
        try:
            async for delta in gen:
                self._queue.put_nowait((index, delta))
        except Exception as exc:
            self._queue.put_nowait((index, exc))
        finally:
            self._queue.put_nowait((index, _DONE))

    # ---------------------------------------------------------------- consume
    def _record(self, index: int, delta: CompletionDelta) -> None:
        self.texts[index].append(delta.text)
        self.completion_tokens[index] = delta.completion_tokens
        if delta.finish_reason is not None:
            self.finish[index] = delta.finish_reason
            if index in self._fresh:  # generated now, not answered from the cache
                self.cache.put(self._keys[index], CachedCompletion("".join(self.texts[index]), delta.finish_reason,
                                                                   delta.prompt_tokens, delta.completion_tokens))

    async def deltas(self) -> AsyncIterator[tuple[int, CompletionDelta]]:
        """``(choice index, delta)`` until every choice has finished; raises ``APIError``."""
        for index, delta in self._ready:
            self._record(index, delta)
            yield index, delta
        self._ready.clear()
        remaining = len(self._pumps)
        while remaining:
            index, item = await self._queue.get()
            if item is _DONE:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise engine_error(item)
            else:
                self._record(index, item)
                yield index, item

    async def collect(self) -> None:
        """Run every choice to the end (the non-streaming path)."""
        await self.start()
        async for _ in self.deltas():
            pass

    async def aclose(self) -> None:
        """Cancel what still runs; the engine frees those sequences' KV slots."""
        if self._closed:
            return
        self._closed = True
        for task in self._pumps + self._searches:
            task.cancel()
        for gen in self._gens.values():
            # A generator still being iterated (by a pump, or by a cancelled first-delta
            # task) refuses aclose(); its cancellation closes it instead.
            with suppress(RuntimeError):
                await gen.aclose()
        if self._pumps or self._searches:
            await asyncio.wait(self._pumps + self._searches)

    # ---------------------------------------------------------------- results
    @property
    def total_completion_tokens(self) -> int:
        return sum(self.completion_tokens.values())

    @property
    def ttft(self) -> float | None:
        return None if self.first_token_at is None else self.first_token_at - self.started_at

    def text(self, index: int) -> str:
        return "".join(self.texts[index])


class ClientDisconnected(Exception):
    pass


async def _wait_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def until_disconnect(request: Request, work: Awaitable[T]) -> T:
    """Await ``work``, cancelling it (and raising ``ClientDisconnected``) if the client goes away."""
    task = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(_wait_disconnect(request))
    try:
        done, _ = await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            return task.result()
        task.cancel()
        with suppress(BaseException):
            await task
        raise ClientDisconnected()
    finally:
        watch.cancel()
        if not task.done():
            task.cancel()
