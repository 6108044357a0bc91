"""The OpenAI-shaped error body every JSON error of the API must have."""
from __future__ import annotations

from typing import Any


def api_error(response: Any, status: int, code: str | None = None, *, type: str | None = None) -> dict:
    """Assert ``response`` is an OpenAI-shaped error (``{"error": {message, type, code}}``)
    with this status (and code / type when given); returns the error object."""
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and {"message", "type", "code"} <= set(body["error"]), body
    err = body["error"]
    assert err["message"] and err["type"], err
    if type is not None:
        assert err["type"] == type, err
    if code is not None:
        assert err["code"] == code, err
    return err
