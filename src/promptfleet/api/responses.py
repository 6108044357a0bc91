"""OpenAPI declarations of the error responses a route can give (all ``ErrorResponse``)."""
from __future__ import annotations

from typing import Any

from promptfleet.api.schemas import ErrorResponse

_DESCRIPTIONS = {
    400: "Invalid request (the message says what is wrong).",
    401: "Missing or invalid API key.",
    404: "Not found (another tenant's resources look missing too).",
    409: "Conflict with the current state.",
    413: "Upload or body larger than the limit.",
    422: "The body or parameters do not match the schema.",
    429: "Rate or concurrency limit reached; see Retry-After.",
    503: "Overloaded or not ready; see Retry-After.",
}


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """``statuses``' declarations, and always 400: any route can be sent a malformed request
    (validation errors are 400, as OpenAI gives them)."""
    return {status: {"model": ErrorResponse, "description": _DESCRIPTIONS.get(status, "Error.")}
            for status in sorted({400, *statuses})}
