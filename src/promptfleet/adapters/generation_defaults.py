"""Per-adapter decoding defaults: the sampling settings a request leaves unset are taken
from the adapter version it names (then the server's). A tenant sets them with
``PATCH /v1/adapters/{name}``, or uploads them beside the adapter as transformers'
``generation_config.json`` (what ``GenerationConfig.save_pretrained`` writes), read with
transformers' meaning: greedy unless ``do_sample`` is true, beam search when ``num_beams``
is above 1 (with its ``length_penalty`` and ``early_stopping``), ``max_new_tokens`` is
``max_tokens``, ``stop_strings`` is ``stop``. Beam sampling (``do_sample`` with beams) is
not served, and is refused saying so.

Bounds are the completions API's, so a default can never be what a request could not ask
(``num_beams`` is clamped to the server's ``max_beam_width`` when applied)."""
from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictStr, ValidationError

from promptfleet.strict_json import strict_loads

GENERATION_CONFIG_NAME = "generation_config.json"
MAX_GENERATION_CONFIG_BYTES = 64 << 10
MAX_STOP = 4  # stop strings per request (the completions API's bound too: api/schemas imports these)
MAX_NUM_BEAMS = 16
LengthPenalty = Annotated[float, Field(ge=-10.0, le=10.0)]
EarlyStopping = bool | Literal["never"]
StopText = Annotated[StrictStr, Field(min_length=1, max_length=256)]
Stop = StopText | Annotated[list[StopText], Field(max_length=MAX_STOP)]  # one string, or a list of them


class GenerationDefaults(BaseModel):
    """Optional defaults for the sampling fields of ``/v1/completions`` (unset: the server's)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=-1, le=100_000)
    repetition_penalty: float | None = Field(default=None, ge=0.01, le=100.0)
    max_tokens: int | None = Field(default=None, ge=1, le=1_000_000)
    stop: Stop | None = None
    num_beams: int | None = Field(default=None, ge=1, le=MAX_NUM_BEAMS)
    length_penalty: LengthPenalty | None = None
    early_stopping: EarlyStopping | None = None

    def as_dict(self) -> dict[str, Any]:
        """The fields that are set (what is stored and applied)."""
        return self.model_dump(exclude_none=True)


class InvalidGenerationDefaults(ValueError):
    """Defaults (or a generation_config.json) that cannot be served; the message says why."""


def _describe(exc: ValidationError) -> str:
    first = exc.errors()[0]
    where = ".".join(str(p) for p in first.get("loc", ())) or "value"
    return f"{where}: {first.get('msg', 'invalid')}"


def validate_defaults(raw: Any) -> GenerationDefaults:
    if not isinstance(raw, dict):
        raise InvalidGenerationDefaults("generation defaults must be a JSON object")
    try:
        return GenerationDefaults.model_validate(raw)
    except ValidationError as exc:
        raise InvalidGenerationDefaults(f"invalid generation default {_describe(exc)}") from None


def from_generation_config(raw: Any) -> GenerationDefaults:
    """Defaults from a transformers ``generation_config.json`` object (its other keys, such
    as token ids and ``transformers_version``, are not sampling settings and are ignored)."""
    if not isinstance(raw, dict):
        raise InvalidGenerationDefaults(f"{GENERATION_CONFIG_NAME} must hold a JSON object")
    beams = raw.get("num_beams", 1)
    if not isinstance(beams, int) or isinstance(beams, bool) or beams < 1:
        raise InvalidGenerationDefaults(f"{GENERATION_CONFIG_NAME}: num_beams must be a positive integer")
    if beams > 1 and raw.get("do_sample"):
        raise InvalidGenerationDefaults(f"{GENERATION_CONFIG_NAME}: num_beams={beams} with do_sample is beam "
                                        "sampling, which is not served; save do_sample=false (beam search) or "
                                        "num_beams=1 (sampling)")
    fields: dict[str, Any] = {}
    if beams > 1:  # beam search: deterministic, with its own scoring
        fields["num_beams"] = beams
        for key in ("length_penalty", "early_stopping"):
            if raw.get(key) is not None:
                fields[key] = raw[key]
    elif raw.get("do_sample"):
        for key in ("temperature", "top_p", "top_k"):
            if raw.get(key) is not None:
                fields[key] = raw[key]
    else:  # transformers decodes greedily unless do_sample is set
        fields["temperature"] = 0.0
    for ours, theirs in (("repetition_penalty", "repetition_penalty"), ("max_tokens", "max_new_tokens"),
                         ("stop", "stop_strings")):
        if raw.get(theirs) is not None:
            fields[ours] = raw[theirs]
    try:
        return GenerationDefaults.model_validate(fields)
    except ValidationError as exc:
        raise InvalidGenerationDefaults(f"{GENERATION_CONFIG_NAME}: {_describe(exc)}") from None


def parse_generation_config(data: bytes) -> GenerationDefaults:
    """``from_generation_config`` of the file's bytes (strict JSON: no NaN or Infinity)."""
    if len(data) > MAX_GENERATION_CONFIG_BYTES:
        raise InvalidGenerationDefaults(f"{GENERATION_CONFIG_NAME} is {len(data)} bytes, over the limit of "
                                        f"{MAX_GENERATION_CONFIG_BYTES}")
    try:
        raw = strict_loads(data.decode("utf-8"))
    except (UnicodeDecodeError, RecursionError, ValueError) as exc:  # JSONDecodeError is a ValueError
        raise InvalidGenerationDefaults(f"{GENERATION_CONFIG_NAME} is not valid JSON: {exc}") from None
    return from_generation_config(raw)
