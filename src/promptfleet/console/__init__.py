"""The tenant web console (``/console``): a small single page served by the API app, with
every asset inside this package (no CDN, no Node at run time). ``install_console(app)``
adds the page, its static files and the console's one JSON route (``/console/api/usage``)."""
from promptfleet.console.routes import install_console

__all__ = ["install_console"]
