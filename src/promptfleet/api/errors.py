"""OpenAI-shaped errors: every error body is ``{"error": {"message", "type", "code"}}``.

Routes raise :class:`APIError` (or one of its helpers); :func:`install_error_handlers`
renders it, FastAPI's validation errors (422), Starlette's HTTP errors (404 for unknown
routes, 405, ...) and unexpected exceptions (500, logged) in the same shape.
"""
from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy import exc as sa_exc
from starlette.exceptions import HTTPException as StarletteHTTPException

from promptfleet.adapters.storage import StorageUnavailable

log = logging.getLogger(__name__)

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
          404: "invalid_request_error", 405: "invalid_request_error", 409: "invalid_request_error",
          413: "invalid_request_error", 415: "invalid_request_error", 422: "invalid_request_error",
          429: "rate_limit_error", 499: "invalid_request_error", 503: "server_overloaded"}
_CODES = {400: "bad_request", 401: "invalid_api_key", 403: "forbidden", 404: "not_found",
          405: "method_not_allowed", 409: "conflict", 413: "request_too_large", 415: "unsupported_media_type",
          422: "invalid_parameters", 429: "rate_limit_exceeded", 503: "service_unavailable"}


def error_type(status: int) -> str:
    return _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")


def error_body(message: str, *, status: int, code: str | None = None, type: str | None = None,
               param: str | None = None) -> dict[str, Any]:
    err: dict[str, Any] = {"message": message, "type": type or error_type(status),
                           "code": code or _CODES.get(status, "server_error" if status >= 500 else "error")}
    if param is not None:
        err["param"] = param
    return {"error": err}


class APIError(Exception):
    """An error answered to the client; ``message`` says what is wrong."""

    def __init__(self, status: int, message: str, *, code: str | None = None, type: str | None = None,
                 param: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.type = type
        self.param = param
        self.headers = headers or {}

    def response(self) -> JSONResponse:
        return JSONResponse(error_body(self.message, status=self.status, code=self.code, type=self.type,
                                       param=self.param), status_code=self.status, headers=self.headers)


def bad_request(message: str, *, code: str = "bad_request", param: str | None = None) -> APIError:
    return APIError(400, message, code=code, param=param)


def not_found(message: str, *, code: str = "not_found") -> APIError:
    return APIError(404, message, code=code)


def unauthorized(message: str) -> APIError:
    return APIError(401, message, code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})


def too_many_requests(message: str, *, retry_after: float, code: str = "rate_limit_exceeded") -> APIError:
    return APIError(429, message, code=code, headers={"Retry-After": str(max(1, int(-(-retry_after // 1))))})


def overloaded(message: str, *, retry_after: int = 1, code: str = "queue_full") -> APIError:
    return APIError(503, message, code=code, headers={"Retry-After": str(retry_after)})


def too_large(message: str) -> APIError:
    return APIError(413, message, code="request_too_large")


def _loc(loc: tuple | list) -> str:
    return ".".join(str(p) for p in loc)


def validation_message(errors: list[dict[str, Any]]) -> tuple[str, str | None]:
    """One readable line for pydantic/FastAPI errors, and the first offending parameter."""
    parts = []
    for err in errors[:5]:
        where = _loc(err.get("loc", ()))
        parts.append(f"{where}: {err.get('msg', 'invalid')}" if where else str(err.get("msg", "invalid")))
    if len(errors) > 5:
        parts.append(f"... and {len(errors) - 5} more")
    first = errors[0].get("loc", ()) if errors else ()
    param = _loc(first[1:]) if len(first) > 1 and first[0] in ("body", "query", "path", "header") else None
    return "; ".join(parts) or "invalid request", param or None


async def _api_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, APIError)
    return exc.response()


async def _validation_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    message, param = validation_message(list(exc.errors()))
    # 400, as OpenAI answers a body or parameter out of its schema (with ``param``)
    return JSONResponse(error_body(message, status=400, code="invalid_parameters", param=param), status_code=400)


async def _http_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    status = exc.status_code
    detail = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
    if status == 404 and detail == "Not Found":
        detail = "no such route"
    headers = dict(exc.headers or {})
    return JSONResponse(error_body(detail, status=status), status_code=status, headers=headers)


DB_RETRY_AFTER_S = 2


def database_unavailable(exc: BaseException) -> bool:
    """True for errors that mean "the database cannot be reached right now" (connection
    refused or dropped, pool exhausted) rather than a bug in a query."""
    if isinstance(exc, (sa_exc.OperationalError, sa_exc.InterfaceError, sa_exc.TimeoutError)):
        return True
    return isinstance(exc, sa_exc.DBAPIError) and bool(exc.connection_invalidated)


async def _database_error(request: Request, exc: Exception) -> JSONResponse:
    """503 + Retry-After while the database is unreachable (it recovers by itself: the pool
    pre-pings and reconnects); any other database error is a 500 like every unexpected one."""
    if not database_unavailable(exc):
        return await _unexpected(request, exc)
    first_line = str(getattr(exc, "orig", None) or exc).strip().splitlines()[:1]
    log.warning("database unavailable on %s %s: %s: %s", request.method, request.url.path, type(exc).__name__,
                first_line[0] if first_line else "")
    return JSONResponse(error_body("the database is temporarily unavailable; retry later", status=503,
                                   code="database_unavailable"),
                        status_code=503, headers={"Retry-After": str(DB_RETRY_AFTER_S)})


STORAGE_RETRY_AFTER_S = 5


async def _storage_unavailable(request: Request, exc: Exception) -> JSONResponse:
    """503 + Retry-After while blob storage (S3) cannot be reached, after the client's own
    retries; nothing was stored that a row points to."""
    log.warning("blob storage unavailable on %s %s: %s", request.method, request.url.path, exc)
    return JSONResponse(error_body("blob storage is temporarily unavailable; retry later", status=503,
                                   code="storage_unavailable"),
                        status_code=503, headers={"Retry-After": str(STORAGE_RETRY_AFTER_S)})


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return JSONResponse(error_body("internal server error", status=500), status_code=500)


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(APIError, _api_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(sa_exc.SQLAlchemyError, _database_error)
    app.add_exception_handler(StorageUnavailable, _storage_unavailable)
    app.add_exception_handler(Exception, _unexpected)
