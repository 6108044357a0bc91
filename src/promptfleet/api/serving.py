"""From an OpenAI completion request to engine work: resolve ``model`` (the base model id,
an adapter ``name`` or ``name@N`` of the tenant) to a KV prefix from the device cache,
turn the prompt into token-id lists, and build one ``SamplingParams`` per choice.
Every refusal is an ``APIError`` that says what is wrong."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from sqlalchemy.orm import Session

from promptfleet.adapters.device_cache import AdapterCache
from promptfleet.adapters.errors import AdapterIncompatible, AdapterNotFound, AdapterRejected
from promptfleet.adapters.service import cache_key, load_adapter_weights, resolve_adapter
from promptfleet.adapters.storage import BlobNotFoundError, BlobStorage, CorruptBlobError
from promptfleet.api.errors import APIError, bad_request
from promptfleet.api.schemas import MAX_CHOICES, CompletionRequest
from promptfleet.platform.adapter import AdapterError, AdapterPrefix
from promptfleet.platform.beam_search import BeamParams
from promptfleet.platform.engine import Engine
from promptfleet.platform.sampling import SAMPLING_EPS, SamplingParams
from promptfleet.settings import Settings


@dataclass(frozen=True)
class ResolvedModel:
    name: str                   # what the client asked for (echoed in responses)
    label: str                  # metrics label: the base model id or the adapter name
    scope: str                  # generation-cache scope: "base" or "<version id>:<sha256>"
    prefix: AdapterPrefix | None
    defaults: dict[str, Any] = field(default_factory=dict)  # the adapter version's decoding defaults


def resolve_model(session: Session, *, engine: Engine, adapter_cache: AdapterCache, storage: BlobStorage,
                  settings: Settings, tenant_id: str, model: str) -> ResolvedModel:
    """Blocking (database, blob storage, prefix build on a cache miss): run it in a thread."""
    if model == settings.model_id:
        return ResolvedModel(name=model, label=model, scope="base", prefix=None)
    try:
        version = resolve_adapter(session, tenant_id=tenant_id, ref=model, model_config=engine.model_config)
    except AdapterNotFound:
        raise APIError(404, f"the model {model!r} does not exist: use {settings.model_id!r} or one of your "
                            "adapters (GET /v1/models)", code="model_not_found", param="model") from None
    except AdapterIncompatible as exc:
        raise bad_request(str(exc), code="adapter_incompatible", param="model") from None
    try:
        prefix = adapter_cache.get_or_load(cache_key(version),
                                           lambda: load_adapter_weights(storage=storage, version=version))
    except (AdapterRejected, AdapterError) as exc:
        raise APIError(422, f"adapter {version.ref!r} cannot be served: {exc}", code="adapter_unusable") from None
    except (BlobNotFoundError, CorruptBlobError) as exc:
        raise APIError(500, f"adapter {version.ref!r} cannot be read from storage: {exc}",
                       code="storage_error") from None
    return ResolvedModel(name=model, label=version.name, scope=f"{version.id}:{version.sha256}", prefix=prefix,
                         defaults=dict(version.generation_defaults or {}))


def with_defaults(req: CompletionRequest, defaults: dict[str, Any]) -> CompletionRequest:
    """``req`` with each sampling field it left unset (absent, or null) taken from the
    adapter's ``defaults`` (validated against the same bounds when they were stored)."""
    unset = {k: v for k, v in defaults.items()
             if k in CompletionRequest.model_fields and (k not in req.model_fields_set or getattr(req, k) is None)}
    return req.model_copy(update=unset) if unset else req


# fields refused when set to anything truthy (their defaults are falsy)
_UNSUPPORTED = (("echo", "echo"), ("logprobs", "logprobs"), ("suffix", "suffix"),
                ("frequency_penalty", "frequency_penalty (use repetition_penalty)"),
                ("presence_penalty", "presence_penalty (use repetition_penalty)"), ("logit_bias", "logit_bias"))


def check_supported(req: CompletionRequest) -> None:
    """Refuse the OpenAI parameters this server does not implement (when set to a non-default)."""
    unsupported = [label for field, label in _UNSUPPORTED if getattr(req, field)]
    n = req.n or 1
    if req.best_of is not None and req.best_of < n:
        raise bad_request(f"best_of ({req.best_of}) must be at least n ({n}): it is how many candidates the best n "
                          "are chosen from", code="invalid_best_of", param="best_of")
    if req.best_of is not None and req.best_of > n and not req.use_beam_search:
        unsupported.append("best_of greater than n without use_beam_search (sampled candidates); set "
                           "use_beam_search=true for beam search with best_of beams")
    if unsupported:
        raise bad_request(f"not supported: {', '.join(unsupported)}", code="unsupported_parameter",
                          param=unsupported[0].split(" ")[0])


def beam_search_params(req: CompletionRequest, *, settings: Settings,
                       defaults: dict[str, Any] | None = None) -> BeamParams | None:
    """The request's beam search, or None to sample. Explicit (``use_beam_search``: width
    ``best_of`` or ``n``), or the adapter's ``num_beams`` default for a request that leaves
    every decoding choice to the adapter (no temperature, top_p, top_k, best_of or
    use_beam_search of its own) and does not stream. ``req`` is the request as sent."""
    defaults = defaults or {}
    n = req.n or 1
    sent = {f for f in req.model_fields_set if getattr(req, f) is not None}
    if req.use_beam_search:
        width = req.best_of if req.best_of is not None else n
        if req.stream:
            raise bad_request("beam search cannot be streamed: the best beams are known only when the search ends "
                              "(their ranking can change until the last step); send stream=false",
                              code="beam_search_not_streamable", param="stream")
        neutral = {"temperature": req.temperature is None or req.temperature < SAMPLING_EPS,
                   "top_p": req.top_p is None or req.top_p == 1.0, "top_k": req.top_k in (None, 0, -1)}
        bad = [f for f, ok in neutral.items() if f in sent and not ok]
        if bad:
            raise bad_request(f"beam search is deterministic: {', '.join(bad)} does not apply; leave it unset "
                              "(or temperature 0, top_p 1, top_k 0)", code="invalid_beam_search", param=bad[0])
        if width < 2:
            raise bad_request("beam search needs at least 2 beams: set best_of to the beam width (n beams are "
                              "returned)", code="invalid_beam_search", param="best_of")
        if width > settings.max_beam_width:
            raise bad_request(f"best_of={width} beams is more than this server's max_beam_width="
                              f"{settings.max_beam_width}", code="invalid_beam_search", param="best_of")
    else:
        width = min(int(defaults.get("num_beams") or 1), settings.max_beam_width)
        chosen = sent & {"temperature", "top_p", "top_k", "best_of", "use_beam_search"}
        if width < 2 or req.stream or chosen:
            return None
        width = max(width, n) if n <= settings.max_beam_width else 0
        if width < 2:
            return None
    length_penalty = req.length_penalty if "length_penalty" in sent else defaults.get("length_penalty", 1.0)
    early = req.early_stopping if "early_stopping" in sent else defaults.get("early_stopping", False)
    try:
        return BeamParams(width, n, length_penalty=float(length_penalty), early_stopping=early)
    except ValueError as exc:
        raise bad_request(str(exc), code="invalid_beam_search") from None


def check_beam_rows(prompts: list[list[int]], beam: BeamParams | None, *, engine: Engine) -> None:
    """A beam search holds a batch row per beam: refuse a width the engine cannot run at
    once, and more rows in one request (prompts x beams) than ``MAX_CHOICES``, the bound a
    sampled request has (prompts x n), so beams do not let one request take more of the batch."""
    if beam is None:
        return
    rows = engine.scheduler.max_batch_size
    if beam.num_beams > rows:
        raise bad_request(f"best_of={beam.num_beams} beams is more than this server runs at once ({rows} sequences)",
                          code="invalid_beam_search", param="best_of")
    if len(prompts) * beam.num_beams > MAX_CHOICES:
        raise bad_request(f"{len(prompts)} prompts x {beam.num_beams} beams is more than {MAX_CHOICES} sequences in "
                          "one request", code="too_many_choices", param="best_of")


def prompt_token_ids(req: CompletionRequest, *, engine: Engine, settings: Settings) -> list[list[int]]:
    """Each prompt as token ids, checked against ``max_prompt_tokens`` and the vocabulary."""
    p = req.prompt
    if isinstance(p, str):
        prompts: list = [p]
    elif p and isinstance(p[0], int):
        prompts = [p]
    else:
        prompts = list(p)
    vocab = engine.model_config.vocab_size
    out: list[list[int]] = []
    for i, prompt in enumerate(prompts):
        ids = engine.encode(prompt) if isinstance(prompt, str) else list(prompt)
        where = f"prompt {i}" if len(prompts) > 1 else "the prompt"
        if len(ids) > settings.max_prompt_tokens:
            raise bad_request(f"{where} has {len(ids)} tokens, more than the limit max_prompt_tokens="
                              f"{settings.max_prompt_tokens}", code="prompt_too_long", param="prompt")
        bad = next((t for t in ids if t >= vocab), None)
        if bad is not None:
            raise bad_request(f"{where} holds token id {bad}, outside the vocabulary [0, {vocab})",
                              code="invalid_token_id", param="prompt")
        out.append(ids)
    return out


def sampling_params(req: CompletionRequest, *, settings: Settings) -> list[SamplingParams]:
    """One ``SamplingParams`` per sample (``n``); seeded samples get ``seed + j``."""
    max_tokens = 16 if req.max_tokens is None else req.max_tokens
    if max_tokens > settings.max_tokens_limit:
        raise bad_request(f"max_tokens={max_tokens} is more than the limit max_tokens_limit="
                          f"{settings.max_tokens_limit}", code="max_tokens_too_large", param="max_tokens")
    stop = (req.stop,) if isinstance(req.stop, str) else tuple(req.stop or ())
    n = req.n or 1
    base = dict(max_tokens=max_tokens, temperature=1.0 if req.temperature is None else req.temperature,
                top_p=1.0 if req.top_p is None else req.top_p, top_k=max(0, req.top_k or 0),
                repetition_penalty=1.0 if req.repetition_penalty is None else req.repetition_penalty,
                stop=stop, ignore_eos=bool(req.ignore_eos))
    out = []
    for j in range(n):
        seed = None if req.seed is None else (req.seed + j) % (2**64)
        try:
            out.append(SamplingParams(seed=seed, **base))
        except ValueError as exc:
            raise bad_request(str(exc), code="invalid_sampling_params") from None
    return out


def check_context(prompts: list[list[int]], params: list[SamplingParams], *, model: ResolvedModel,
                  max_model_len: int) -> None:
    """Refuse, as OpenAI does, a prompt whose tokens (plus the adapter's virtual tokens)
    and ``max_tokens`` do not fit the context window."""
    n_virtual = 0 if model.prefix is None else model.prefix.num_virtual_tokens
    max_tokens = max(p.max_tokens for p in params)
    for i, ids in enumerate(prompts):
        need = n_virtual + len(ids) + max_tokens
        if need > max_model_len:
            where = f"prompt {i}" if len(prompts) > 1 else "the prompt"
            virtual = f" + {n_virtual} virtual tokens of the adapter" if n_virtual else ""
            raise bad_request(f"this model's context is {max_model_len} tokens, but {where} has {len(ids)} tokens"
                              f"{virtual} + max_tokens {max_tokens} = {need}; shorten the prompt or lower "
                              "max_tokens", code="context_length_exceeded", param="max_tokens")


@dataclass(frozen=True)
class Choice:
    index: int
    prompt_ids: list[int]
    params: SamplingParams


def plan_choices(prompts: list[list[int]], params: list[SamplingParams]) -> list[Choice]:
    """Choice ``i * n + j`` is sample ``j`` of prompt ``i`` (OpenAI's order)."""
    if len(prompts) * len(params) > MAX_CHOICES:
        raise bad_request(f"{len(prompts)} prompts x n={len(params)} is more than {MAX_CHOICES} choices",
                          code="too_many_choices", param="n")
    return [Choice(i * len(params) + j, ids, sp) for i, ids in enumerate(prompts) for j, sp in enumerate(params)]
