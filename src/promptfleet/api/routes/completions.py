"""``POST /v1/completions``: OpenAI's completions protocol, plain or streamed (SSE).

Order of checks: API key (401), request rate (429), body (400), unsupported parameters
and limits (400), concurrency (429), model (404), prompt (400), engine queue (503).
Deterministic choices (greedy, seeded, or beam search) are answered from the generation
cache when possible -- streamed ones too, as one chunk. Beam search (``use_beam_search``,
or an adapter's ``num_beams`` default) answers each prompt's n best beams when its search
ends. ``finish_reason`` is ``stop``, ``length``
or ``repetition`` (the engine cut a degenerate loop); the OpenAI client accepts it.
"""
from __future__ import annotations

import json
import time
import uuid
from typing import Any

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response

from promptfleet.api.deps import LimitedTenantDep, StateDep, tenant_limits
from promptfleet.api.errors import APIError, error_body, too_many_requests
from promptfleet.api.generation import ClientDisconnected, Generation, until_disconnect
from promptfleet.api.limits import ConcurrencySlot, LimitExceeded
from promptfleet.api.responses import error_responses
from promptfleet.api.schemas import CompletionRequest, CompletionResponse
from promptfleet.api.serving import (ResolvedModel, beam_search_params, check_beam_rows, check_context, check_supported,
                                     plan_choices, prompt_token_ids, resolve_model, sampling_params, with_defaults)
from promptfleet.api.sse import SSEResponse, sse_data
from promptfleet.api.state import AppState
from promptfleet.tenants.models import Tenant

router = APIRouter(tags=["completions"])

# One server-sent event (OpenAPI < 3.2: the media type's schema describes each event).
_STREAM_DOC = {"text/event-stream": {"schema": {
    "type": "object", "required": ["data"],
    "properties": {"event": {"type": "string"}, "data": {
        "type": "string", "contentMediaType": "application/json",
        "description": "A completion chunk (the completion object's fields with one choice), an error object, "
                       "a final usage chunk (stream_options.include_usage), or the closing `[DONE]`."}}}}}


def _prepare(state: AppState, tenant: Tenant, body: CompletionRequest) -> tuple[ResolvedModel, list[list[int]]]:
    """Resolve the model and tokenize (blocking: runs in a worker thread), with a session of
    its own, closed before generating so no database connection is held meanwhile."""
    with state.session_factory() as session:
        model = resolve_model(session, engine=state.engine, adapter_cache=state.adapter_cache,
                              storage=state.storage, settings=state.settings, tenant_id=tenant.id, model=body.model)
    return model, prompt_token_ids(body, engine=state.engine, settings=state.settings)


class _Recorder:
    """Metrics and the concurrency slot of one request, settled exactly once."""

    def __init__(self, state: AppState, tenant: Tenant, slot: ConcurrencySlot) -> None:
        self.state, self.tenant, self.slot = state, tenant, slot
        self.start = time.perf_counter()
        self.model_label = "unknown"
        self.stream_error: int | None = None  # the status of an error sent inside a started stream
        self._done = False

    def finish(self, status: int, gen: Generation | None) -> None:
        if self._done:
            return
        self._done = True
        self.slot.release()
        m, t, label = self.state.metrics, self.tenant.name, self.model_label
        m.requests.labels(t, label, str(status)).inc()
        if gen is None:
            return
        if status == 200:
            m.latency.labels(t, label).observe(time.perf_counter() - self.start)
        if gen.ttft is not None:
            m.ttft.labels(t, label).observe(gen.ttft)
            per_choice = gen.total_completion_tokens / max(1, len(gen.choices))
            if status == 200 and per_choice > 1:
                m.tpot.labels(t, label).observe((time.perf_counter() - gen.first_token_at) / (per_choice - 1))
        m.prompt_tokens.labels(t, label).inc(gen.prompt_tokens)
        m.completion_tokens.labels(t, label).inc(gen.total_completion_tokens)
        if gen.cache_hits:
            m.gen_cache_hits.labels(t, label).inc(gen.cache_hits)
        if gen.cache_misses:
            m.gen_cache_misses.labels(t, label).inc(gen.cache_misses)


def _choice(index: int, text: str, finish_reason: str | None) -> dict[str, Any]:
    return {"index": index, "text": text, "finish_reason": finish_reason, "logprobs": None}


def _usage(gen: Generation) -> dict[str, int]:
    completion = gen.total_completion_tokens
    return {"prompt_tokens": gen.prompt_tokens, "completion_tokens": completion,
            "total_tokens": gen.prompt_tokens + completion}


async def _events(gen: Generation, head: dict[str, Any], include_usage: bool, rec: _Recorder):
    try:
        async for index, delta in gen.deltas():
            if not delta.text and delta.finish_reason is None:
                continue
            chunk = {**head, "choices": [_choice(index, delta.text, delta.finish_reason)]}
            if include_usage:
                chunk["usage"] = None
            yield sse_data(json.dumps(chunk))
    except APIError as exc:  # the status line is sent: report it in the stream, as OpenAI does
        rec.stream_error = exc.status
        yield sse_data(json.dumps(error_body(exc.message, status=exc.status, code=exc.code)))
        return
    if include_usage:
        yield sse_data(json.dumps({**head, "choices": [], "usage": _usage(gen)}))
    yield sse_data("[DONE]")


@router.post("/v1/completions", response_model=CompletionResponse,
             responses={200: {"content": _STREAM_DOC}, **error_responses(400, 401, 404, 413, 422, 429, 503)})
async def create_completion(body: CompletionRequest, request: Request, tenant: LimitedTenantDep,
                            state: StateDep) -> Response:
    check_supported(body)
    beam = beam_search_params(body, settings=state.settings)
    params = sampling_params(body, settings=state.settings)
    try:
        slot = state.limiter.acquire(tenant.id, tenant_limits(tenant, state.settings))
    except LimitExceeded as exc:
        state.metrics.rejected.labels(tenant.name, "concurrency").inc()
        raise too_many_requests(str(exc), retry_after=exc.retry_after) from exc
    rec = _Recorder(state, tenant, slot)
    gen: Generation | None = None
    try:
        model, prompts = await run_in_threadpool(_prepare, state, tenant, body)
        rec.model_label = model.label
        if model.defaults:  # the adapter's decoding defaults fill the fields the request left unset
            params = sampling_params(with_defaults(body, model.defaults), settings=state.settings)
            beam = beam_search_params(body, settings=state.settings, defaults=model.defaults)
        check_context(prompts, params, model=model, max_model_len=state.engine.max_model_len)
        check_beam_rows(prompts, beam, engine=state.engine)
        gen = Generation(engine=state.engine, cache=state.gen_cache, tenant_id=tenant.id, model=model,
                         choices=plan_choices(prompts, params), prompt_tokens=sum(map(len, prompts)), beam=beam)
        head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": body.model}
        if body.stream:
            await until_disconnect(request, gen.start())
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            stream_gen = gen

            async def on_close(completed: bool) -> None:
                await stream_gen.aclose()
                rec.finish(rec.stream_error or (200 if completed else 499), stream_gen)

            return SSEResponse(_events(gen, head, include_usage, rec), on_close=on_close)
        await until_disconnect(request, gen.collect())
        result = {**head, "choices": [_choice(c.index, gen.text(c.index), gen.finish.get(c.index))
                                      for c in gen.choices], "usage": _usage(gen)}
        rec.finish(200, gen)
        return JSONResponse(result)
    except BaseException as exc:
        if gen is not None:
            await gen.aclose()
        status = exc.status if isinstance(exc, APIError) else 499 if isinstance(exc, ClientDisconnected) else 500
        rec.finish(status, gen)
        if isinstance(exc, ClientDisconnected):
            raise APIError(499, "the client closed the request", code="client_closed_request") from None
        raise
