"""``python -m promptfleet.trainer.worker_main``: a standalone trainer worker configured
from ``PROMPTFLEET_*`` environment variables (what ``promptfleet worker`` also runs)."""
from __future__ import annotations

import argparse

from promptfleet.settings import Settings
from promptfleet.trainer.celery_app import run_worker


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Run a PromptFleet training worker.")
    parser.add_argument("--loglevel", default=None)
    parser.add_argument("--hostname", default=None, help="Celery node name (default worker-<pid>@<host>)")
    args = parser.parse_args(argv)
    run_worker(Settings(), loglevel=args.loglevel, hostname=args.hostname)


if __name__ == "__main__":
    main()
