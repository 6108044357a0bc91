"""The tenant web console (``/console``): a small single page served by the API app, with
every asset inside this package (no CDN, no Node at run time). ``install_console(app)``
adds the page, its static files and the console's one JSON route (``/console/api/usage``).

The routes are imported when the console is installed: they use the API's dependencies,
and ``promptfleet.api.app`` imports this package, so importing them here would be circular."""
from __future__ import annotations

from typing import Any


def install_console(app: Any) -> None:
    from promptfleet.console.routes import install_console as install

    install(app)


__all__ = ["install_console"]
