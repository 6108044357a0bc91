"""``/console``: the page, its static files (``/console/static``) and the usage route.

The page is static: it holds no data and no secret. It signs in with an API key kept in
``sessionStorage`` and calls the public API with ``Authorization: Bearer``; a strict
Content-Security-Policy lets it load only this server's own scripts and styles."""
from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, FastAPI
from fastapi.responses import FileResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles

from promptfleet.console import usage

STATIC_DIR = Path(__file__).parent / "static"

# Only this origin's files; connect-src for fetch/SSE to the same API; no inline script.
CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
       "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'none'")
PAGE_HEADERS = {"Content-Security-Policy": CSP, "Referrer-Policy": "no-referrer", "Cache-Control": "no-cache",
                "X-Content-Type-Options": "nosniff"}

router = APIRouter(tags=["console"], include_in_schema=False)


@router.get("/console")
def console_page() -> FileResponse:
    """The single page; every view is drawn by ``static/js``."""
    return FileResponse(STATIC_DIR / "index.html", media_type="text/html", headers=PAGE_HEADERS)


@router.get("/console/")
def console_slash() -> RedirectResponse:
    return RedirectResponse("/console", status_code=308)


def install_console(app: FastAPI) -> None:
    """Mount the console on ``app``: the page, ``/console/static`` and ``/console/api/usage``."""
    app.include_router(router)
    app.include_router(usage.router)
    app.mount("/console/static", StaticFiles(directory=STATIC_DIR, check_dir=True), name="console-static")
