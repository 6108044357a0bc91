"""Request and response bodies. Completions mirror OpenAI's legacy completions API
(``/v1/completions``) with extensions: ``top_k``, ``repetition_penalty``, ``ignore_eos``,
and beam search as vLLM exposed it (``use_beam_search``, ``length_penalty``,
``early_stopping``)."""
from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr

from promptfleet.adapters.generation_defaults import EarlyStopping, GenerationDefaults, LengthPenalty, Stop

MAX_PROMPTS = 64            # prompts in one request (each is its own choice)
MAX_CHOICES = 64            # prompts x n
MAX_PROMPT_CHARS = 200_000  # per prompt string, before tokenization

TokenId = Annotated[StrictInt, Field(ge=0, le=2**31 - 1)]
PromptText = Annotated[StrictStr, Field(max_length=MAX_PROMPT_CHARS)]


# --- errors ---------------------------------------------------------------------------

class ErrorDetail(BaseModel):
    message: str
    type: str
    code: str | None = None
    param: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


# --- completions ----------------------------------------------------------------------

class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    include_usage: bool = False


class CompletionRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, json_schema_extra={"examples": [
        {"model": "gpt2", "prompt": "Hello", "max_tokens": 4, "temperature": 0},
        {"model": "gpt2", "prompt": ["Once upon", "a time"], "max_tokens": 4, "temperature": 0.7, "seed": 1,
         "stop": ["\n"], "stream": True, "stream_options": {"include_usage": True}},
        {"model": "gpt2", "prompt": [[15496, 995], [50256]], "max_tokens": 3, "top_k": 40, "top_p": 0.9,
         "repetition_penalty": 1.2, "n": 2}]})

    model: StrictStr = Field(min_length=1, max_length=200,
                             description="An adapter name, `name@N`, or the base model id.")
    prompt: (PromptText | Annotated[list[PromptText], Field(min_length=1, max_length=MAX_PROMPTS)]
             | Annotated[list[TokenId], Field(min_length=1, max_length=4096)]
             | Annotated[list[Annotated[list[TokenId], Field(min_length=1, max_length=4096)]],
                         Field(min_length=1, max_length=MAX_PROMPTS)]) = Field(
        description="A string, a list of strings, a list of token ids, or a list of token-id lists; "
                    "each prompt is its own choice.")
    max_tokens: int | None = Field(default=16, ge=1, le=1_000_000)
    temperature: float | None = Field(default=1.0, ge=0.0, le=2.0,
                                      description="0, or anything below 1e-5, samples greedily.")
    top_p: float | None = Field(default=1.0, gt=0.0, le=1.0)
    n: int | None = Field(default=1, ge=1, le=MAX_CHOICES)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    stop: Stop | None = None
    seed: int | None = Field(default=None, ge=-(2**63), le=2**64 - 1)
    echo: bool | None = False
    logprobs: int | None = Field(default=None, ge=0, le=5)
    best_of: int | None = Field(default=None, ge=1, le=MAX_CHOICES)
    frequency_penalty: float | None = Field(default=0.0, ge=-2.0, le=2.0)
    presence_penalty: float | None = Field(default=0.0, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = None
    suffix: str | None = Field(default=None, max_length=MAX_PROMPT_CHARS)
    user: str | None = Field(default=None, max_length=256)
    # extensions
    top_k: int | None = Field(default=0, ge=-1, le=100_000, description="0 or -1: off.")
    repetition_penalty: float | None = Field(default=1.0, ge=0.01, le=100.0,
                                             description="1: off (HF semantics); in [0.01, 100].")
    ignore_eos: bool | None = Field(default=False, description="Keep generating past the end-of-text token.")
    use_beam_search: bool | None = Field(
        default=False, description="Beam search with `best_of` beams (or `n` when best_of is unset); the `n` best "
                                   "finished beams are returned, best first. Deterministic (temperature, top_p and "
                                   "top_k must be left unset or neutral) and not streamable.")
    length_penalty: LengthPenalty | None = Field(
        default=1.0, description="Beam search: a beam scores sum(logprobs) / length ** length_penalty "
                                 "(transformers' definition; > 0 favours longer completions).")
    early_stopping: EarlyStopping | None = Field(
        default=False, description="Beam search: true stops once best_of beams have finished; false (transformers' "
                                   "default) stops when no running beam can beat them at its current length; "
                                   "\"never\" only when none could at max_tokens.")


class CompletionChoice(BaseModel):
    index: int
    text: str
    finish_reason: str | None = Field(description="stop, length, or repetition (a degenerate loop was cut).")
    logprobs: None = None


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage
    system_fingerprint: str | None = None


# --- models ---------------------------------------------------------------------------

class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
    has_more: bool = Field(default=False, description="More items follow: ask again with `after=<last_id>`.")
    first_id: str | None = None
    last_id: str | None = None


# --- adapters -------------------------------------------------------------------------

class AdapterOut(BaseModel):
    object: Literal["adapter"] = "adapter"
    id: str = Field(description="`name@version`")
    name: str
    version: int
    peft_type: str
    num_virtual_tokens: int
    sha256: str
    size_bytes: int
    created_at: datetime
    generation_defaults: dict[str, Any] | None = Field(
        default=None, description="Sampling fields a request that names this version inherits when it leaves "
                                  "them unset (temperature, top_p, top_k, repetition_penalty, max_tokens, stop, "
                                  "length_penalty, early_stopping); num_beams > 1 serves the requests that leave "
                                  "temperature, top_p, top_k, best_of and use_beam_search unset and do not stream "
                                  "with beam search of that width.")


class AdapterPatch(BaseModel):
    """``PATCH /v1/adapters/{name}``: replace the version's decoding defaults (null clears them)."""

    model_config = ConfigDict(extra="forbid")
    generation_defaults: GenerationDefaults | None


class AdapterList(BaseModel):
    object: Literal["list"] = "list"
    data: list[AdapterOut]
    has_more: bool = Field(default=False, description="More items follow: ask again with `after=<last_id>`.")
    first_id: str | None = None
    last_id: str | None = None


# --- datasets and jobs ----------------------------------------------------------------

class DatasetOut(BaseModel):
    object: Literal["dataset"] = "dataset"
    id: str
    num_examples: int
    num_tokens: int
    size_bytes: int
    sha256: str
    created_at: datetime


class DatasetList(BaseModel):
    object: Literal["list"] = "list"
    data: list[DatasetOut]
    has_more: bool = Field(default=False, description="More items follow: ask again with `after=<last_id>`.")
    first_id: str | None = None
    last_id: str | None = None


class JobCreated(BaseModel):
    id: str
    status: str


class JobOut(BaseModel):
    object: Literal["training_job"] = "training_job"
    id: str
    status: str
    progress: float
    step: int
    total_steps: int | None
    metrics: dict[str, Any]
    adapter: str | None
    error: str | None
    adapter_name: str
    dataset_id: str
    method: str
    params: dict[str, Any]
    cancel_requested: bool
    attempts: int
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None


class JobList(BaseModel):
    object: Literal["list"] = "list"
    data: list[JobOut]
    has_more: bool = Field(default=False, description="More items follow: ask again with `after=<last_id>`.")
    first_id: str | None = None
    last_id: str | None = None


# --- admin ----------------------------------------------------------------------------

class TenantCreate(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    name: StrictStr = Field(min_length=1, max_length=64)
    max_concurrent: int | None = Field(default=None, ge=1, le=100_000)
    rate_per_s: float | None = Field(default=None, gt=0, le=1e6)
    rate_burst: int | None = Field(default=None, ge=1, le=1_000_000)


class TenantLimitsPatch(BaseModel):
    """``PATCH /admin/tenants/{id}``: the limits given change (null: back to the server's
    default); the ones left out stay as they are."""

    model_config = ConfigDict(extra="forbid", strict=True)
    max_concurrent: int | None = Field(default=None, ge=1, le=100_000)
    rate_per_s: float | None = Field(default=None, gt=0, le=1e6)
    rate_burst: int | None = Field(default=None, ge=1, le=1_000_000)


class TenantOut(BaseModel):
    object: Literal["tenant"] = "tenant"
    id: str
    name: str
    created_at: datetime
    max_concurrent: int | None
    rate_per_s: float | None
    rate_burst: int | None


class TenantCreated(TenantOut):
    api_key: str = Field(description="Shown once; only its SHA-256 is stored.")


class TenantKey(BaseModel):
    id: str
    name: str
    api_key: str


class TenantList(BaseModel):
    object: Literal["list"] = "list"
    data: list[TenantOut]
    has_more: bool = Field(default=False, description="More items follow: ask again with `after=<last_id>`.")
    first_id: str | None = None
    last_id: str | None = None


class Health(BaseModel):
    status: str
    checks: dict[str, str] = {}
