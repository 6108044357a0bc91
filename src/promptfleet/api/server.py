"""Run the API under uvicorn (``promptfleet serve`` calls ``run_server``).

Before binding, ``check_deployment`` refuses settings that are only safe on loopback: the
development admin key (or any short one) and an open ``/metrics`` (whose labels carry
tenant and adapter names) on an address other machines can reach."""
from __future__ import annotations

import ipaddress
import logging

import uvicorn

from promptfleet.api.app import create_app
from promptfleet.api.logs import configure_logging
from promptfleet.settings import Settings

log = logging.getLogger(__name__)

DEV_ADMIN_KEY = "pf-admin-dev"
MIN_ADMIN_KEY_LEN = 16


class UnsafeDeployment(ValueError):
    """Settings that must not face a network: the message names the setting to change."""


def is_loopback(host: str) -> bool:
    """True for ``localhost``, 127.0.0.0/8 and ::1 (also IPv4-mapped and bracketed);
    False for wildcard addresses (0.0.0.0, ::) and any other name or address."""
    host = host.strip().strip("[]").lower()
    if host == "localhost":
        return True
    try:
        addr = ipaddress.ip_address(host)
    except ValueError:
        return False  # a host name other than localhost may resolve anywhere
    mapped = getattr(addr, "ipv4_mapped", None)
    return (mapped or addr).is_loopback


def check_deployment(settings: Settings, host: str) -> None:
    """Raise ``UnsafeDeployment`` when ``host`` is not loopback and the admin key is the
    development default or shorter than ``MIN_ADMIN_KEY_LEN``, or ``/metrics`` would be
    open (empty ``metrics_key``) without the ``metrics_public`` opt-out. Loopback
    addresses accept anything (the demo and the tests use the development key)."""
    if is_loopback(host):
        return
    key = settings.admin_key
    if key == DEV_ADMIN_KEY or len(key) < MIN_ADMIN_KEY_LEN:
        why = "the development default" if key == DEV_ADMIN_KEY else f"shorter than {MIN_ADMIN_KEY_LEN} characters"
        raise UnsafeDeployment(
            f"refusing to serve on {host}: the admin key is {why}; set PROMPTFLEET_ADMIN_KEY to a secret of at "
            f"least {MIN_ADMIN_KEY_LEN} characters (e.g. the output of `python -c \"import secrets; "
            "print(secrets.token_urlsafe(32))\"`), or bind 127.0.0.1")
    if not settings.metrics_key and not settings.metrics_public:
        raise UnsafeDeployment(
            f"refusing to serve on {host}: /metrics would be open to anyone reaching the port (its labels carry "
            "tenant and adapter names); set PROMPTFLEET_METRICS_KEY to the bearer key your scraper sends, or "
            "PROMPTFLEET_METRICS_PUBLIC=true to serve it without a key, or bind 127.0.0.1")


def run_server(settings: Settings, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Check the deployment (``UnsafeDeployment``), configure logging (``log_level``,
    ``log_json``) and serve until interrupted.

    One process holds one engine: scale out with more processes or machines, each its own
    server, not with uvicorn workers inside one."""
    check_deployment(settings, host)
    configure_logging(level=settings.log_level, json_lines=settings.log_json)
    config = uvicorn.Config(create_app(settings), host=host, port=port, log_config=None, access_log=False, timeout_keep_alive=30,
                            timeout_graceful_shutdown=10, lifespan="on")
    log.info("PromptFleet API on http://%s:%d", host, port)
    uvicorn.Server(config).run()
