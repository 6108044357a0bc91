"""``promptfleet``: serve, work, migrate, and drive a running server (tenants, adapters,
datasets, jobs), plus the benchmarks and the one-command demo.

Client commands talk to a server over HTTP: ``--url`` (``PROMPTFLEET_URL``, default
http://127.0.0.1:8000) with ``--key`` (``PROMPTFLEET_API_KEY``, a tenant key) or, for
admin commands, ``--admin-key`` (``PROMPTFLEET_ADMIN_KEY``).
"""
from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Optional

import typer

from promptfleet.client import ClientError, PromptFleetClient
from promptfleet.settings import Settings

app = typer.Typer(help="PromptFleet: serve, work, migrate, and drive a running server (tenants, adapters, datasets, jobs); benchmarks and the one-command demo. Client commands use --url (PROMPTFLEET_URL) with --key (PROMPTFLEET_API_KEY) or --admin-key (PROMPTFLEET_ADMIN_KEY).", no_args_is_help=True, add_completion=False)
db_app = typer.Typer(help="Database schema (Alembic migrations).", no_args_is_help=True)
tenant_app = typer.Typer(help="Tenants (admin).", no_args_is_help=True)
key_app = typer.Typer(help="API keys (admin).", no_args_is_help=True)
adapter_app = typer.Typer(help="Adapters of your tenant.", no_args_is_help=True)
dataset_app = typer.Typer(help="Training datasets of your tenant.", no_args_is_help=True)
job_app = typer.Typer(help="Training jobs of your tenant.", no_args_is_help=True)
for sub, name in ((db_app, "db"), (tenant_app, "tenant"), (key_app, "key"), (adapter_app, "adapter"),
                  (dataset_app, "dataset"), (job_app, "job")):
    app.add_typer(sub, name=name)

URL = typer.Option("http://127.0.0.1:8000", "--url", envvar="PROMPTFLEET_URL", help="Server base URL.")
KEY = typer.Option(None, "--key", envvar="PROMPTFLEET_API_KEY", help="Tenant API key.")
ADMIN = typer.Option("pf-admin-dev", "--admin-key", envvar="PROMPTFLEET_ADMIN_KEY", help="Admin key.")


def _fail(message: str, code: int = 1) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def _print(obj: object) -> None:
    typer.echo(json.dumps(obj, indent=2, default=str))


def _client(url: str, key: Optional[str], *, what: str = "a tenant key (--key or PROMPTFLEET_API_KEY)"):
    if not key:
        _fail(f"this command needs {what}")
    return PromptFleetClient(url, key)


def _run(fn):
    try:
        return fn()
    except ClientError as exc:
        _fail(exc.message if exc.status else str(exc), 2 if exc.status == 0 else 1)
    except (FileNotFoundError, ValueError) as exc:
        _fail(str(exc))


# ---------------------------------------------------------------- processes
@app.command()
def serve(model: Optional[str] = typer.Option(None, help="GPT-2 checkpoint directory (or hub id)."),
          host: str = typer.Option("127.0.0.1", help="Address to bind. Beyond loopback the server needs "
                                   "PROMPTFLEET_ADMIN_KEY (16+ characters, not the dev default) and "
                                   "PROMPTFLEET_METRICS_KEY (or PROMPTFLEET_METRICS_PUBLIC=true)."),
          port: int = 8000,
          device: Optional[str] = typer.Option(None, help="cpu or cuda."),
          dtype: Optional[str] = typer.Option(None, help="float32|bfloat16 (CPU), float16|bfloat16 (CUDA)."),
          embedded_worker: Optional[bool] = typer.Option(None, "--embedded-worker/--no-embedded-worker",
                                                         help="Run a training worker inside the server.")) -> None:
    """Run the API server with the engine (and, by default, an embedded training worker)."""
    from promptfleet.api.server import UnsafeDeployment, check_deployment, run_server

    overrides = {k: v for k, v in dict(model=model, device=device, dtype=dtype,
                                       embedded_worker=embedded_worker).items() if v is not None}
    settings = serve_settings(**overrides)
    try:
        check_deployment(settings, host)
    except UnsafeDeployment as exc:
        _fail(str(exc), code=2)
    if not settings.model:
        _fail("no model: pass --model PATH or set PROMPTFLEET_MODEL")
    run_server(settings, host=host, port=port)


def serve_settings(**overrides: object) -> Settings:
    """The server's settings; a bundled model (``smollm2-135m``) is listed in /v1/models
    under its own name unless PROMPTFLEET_MODEL_ID says otherwise (not as the default
    ``gpt2``, which clients would then have to be told to send)."""
    from promptfleet.platform.weights import BUNDLED_MODELS

    settings = Settings(**overrides)
    if "model_id" not in settings.model_fields_set and settings.model in BUNDLED_MODELS:
        settings = settings.model_copy(update={"model_id": settings.model})
    return settings


@app.command()
def worker(loglevel: Optional[str] = None, hostname: Optional[str] = None) -> None:
    """Run a standalone Celery training worker (broker from PROMPTFLEET_BROKER_URL)."""
    from promptfleet.trainer.celery_app import run_worker

    run_worker(Settings(), loglevel=loglevel, hostname=hostname)


@db_app.command("upgrade")
def db_upgrade(revision: str = "head") -> None:
    """Apply migrations to PROMPTFLEET_DATABASE_URL (default: SQLite in the data dir)."""
    from promptfleet.migrate import upgrade

    url = Settings().resolved_database_url()
    upgrade(url, revision)
    typer.echo(f"database at {url.split('@')[-1]} upgraded to {revision}")


@app.command()
def gc(min_age: float = typer.Option(3600.0, help="Seconds a file must be untouched before it can go."),
       dry_run: bool = typer.Option(False, "--dry-run", help="Report what would go; delete nothing.")) -> None:
    """Delete stored blobs and KV prefixes no live adapter version or dataset refers to
    (deleted versions keep theirs until this runs); safe while the server runs."""
    from dataclasses import asdict

    from promptfleet.db import make_engine, make_session_factory
    from promptfleet.adapters.storage import StorageUnavailable
    from promptfleet.storage_gc import collect_for_settings

    from sqlalchemy.exc import SQLAlchemyError

    settings = Settings()
    url = settings.resolved_database_url()
    engine = make_engine(url)
    try:
        report = collect_for_settings(make_session_factory(engine), settings, min_age_s=min_age, dry_run=dry_run)
    except StorageUnavailable as exc:
        _fail(f"cannot reach blob storage: {exc}", code=3)
    except SQLAlchemyError as exc:
        _fail(f"cannot read the registry at {url.split('@')[-1]} (run `promptfleet db upgrade` first?): "
              f"{str(exc).splitlines()[0]}", code=2)
    finally:
        engine.dispose()
    _print(asdict(report))


@db_app.command("downgrade")
def db_downgrade(revision: str = typer.Argument(..., help="Target revision, e.g. base.")) -> None:
    """Revert migrations down to REVISION."""
    from promptfleet.migrate import downgrade

    downgrade(Settings().resolved_database_url(), revision)
    typer.echo(f"database downgraded to {revision}")


# ---------------------------------------------------------------- admin
@tenant_app.command("create")
def tenant_create(name: str, url: str = URL, admin_key: str = ADMIN) -> None:
    """Create a tenant; prints its API key once."""
    _print(_run(lambda: PromptFleetClient(url, admin_key).create_tenant(name)))


@tenant_app.command("list")
def tenant_list(url: str = URL, admin_key: str = ADMIN) -> None:
    _print(_run(lambda: PromptFleetClient(url, admin_key).list_tenants()))


@key_app.command("rotate")
def key_rotate(tenant_id: str, url: str = URL, admin_key: str = ADMIN) -> None:
    """Revoke a tenant's keys and print a new one."""
    _print(_run(lambda: PromptFleetClient(url, admin_key).rotate_key(tenant_id)))


# ---------------------------------------------------------------- tenant work
@adapter_app.command("push")
def adapter_push(directory: Path, name: str = typer.Option(..., help="Adapter name (a new version if it exists)."),
                 url: str = URL, key: Optional[str] = KEY) -> None:
    """Upload a PEFT save_pretrained directory."""
    _print(_run(lambda: _client(url, key).push_adapter(name, directory)))


@adapter_app.command("list")
def adapter_list(url: str = URL, key: Optional[str] = KEY) -> None:
    _print(_run(lambda: _client(url, key).list_adapters()))


@adapter_app.command("pull")
def adapter_pull(ref: str, out: Path = typer.Option(..., help="Directory to write the PEFT files to."),
                 url: str = URL, key: Optional[str] = KEY) -> None:
    """Download NAME or NAME@N as a PEFT directory."""
    path = _run(lambda: _client(url, key).pull_adapter(ref, out))
    typer.echo(f"wrote {path}")


@adapter_app.command("delete")
def adapter_delete(name: str, url: str = URL, key: Optional[str] = KEY) -> None:
    _run(lambda: _client(url, key).delete_adapter(name))
    typer.echo(f"deleted {name}")


@dataset_app.command("push")
def dataset_push(path: Path, url: str = URL, key: Optional[str] = KEY) -> None:
    """Upload a JSONL dataset of {"prompt", "completion"} lines."""
    _print(_run(lambda: _client(url, key).push_dataset(path)))


@job_app.command("submit")
def job_submit(adapter_name: str = typer.Option(...), dataset_id: str = typer.Option(...),
               method: str = typer.Option("prompt_tuning", help="prompt_tuning | p_tuning | prefix_tuning"),
               num_virtual_tokens: Optional[int] = None, epochs: Optional[int] = None,
               learning_rate: Optional[float] = typer.Option(None, help="Default: the method's."),
               batch_size: Optional[int] = None, seed: int = 0, init_text: Optional[str] = None,
               validation_fraction: Optional[float] = typer.Option(
                   None, help="Held out for validation (default 0.1 from 20 examples up)."),
               validation_dataset_id: Optional[str] = typer.Option(None, help="Validate on this dataset instead."),
               early_stopping_patience: Optional[int] = typer.Option(
                   None, help="Stop after this many epochs without a lower validation loss."),
               watch: bool = typer.Option(False, help="Then watch it."),
               url: str = URL, key: Optional[str] = KEY) -> None:
    """Queue a training job; unset options take the server's defaults."""
    body = dict(adapter_name=adapter_name, dataset_id=dataset_id, method=method, seed=seed)
    for name, value in [("num_virtual_tokens", num_virtual_tokens), ("epochs", epochs),
                        ("learning_rate", learning_rate), ("batch_size", batch_size), ("init_text", init_text),
                        ("validation_fraction", validation_fraction),
                        ("validation_dataset_id", validation_dataset_id),
                        ("early_stopping_patience", early_stopping_patience)]:
        if value is not None:
            body[name] = value
    job = _run(lambda: _client(url, key).submit_job(body))
    _print(job)
    if watch:
        job_watch(job["id"], url=url, key=key)


@job_app.command("watch")
def job_watch(job_id: str, interval: float = 1.0, url: str = URL, key: Optional[str] = KEY) -> None:
    """Show a job's progress bar until it ends; exit 1 unless it succeeded."""
    from promptfleet.trainer.watch import watch_job

    client = _client(url, key)
    final = _run(lambda: watch_job(lambda: client.get_job(job_id), interval=interval, out=sys.stderr))
    _print(final)
    if final.get("status") != "succeeded":
        raise typer.Exit(1)


@job_app.command("cancel")
def job_cancel(job_id: str, url: str = URL, key: Optional[str] = KEY) -> None:
    _print(_run(lambda: _client(url, key).cancel_job(job_id)))


# ---------------------------------------------------------------- kernels
kernels_app = typer.Typer(help="The native CPU kernels (platform/csrc): build them ahead of time.",
                          no_args_is_help=True)
app.add_typer(kernels_app, name="kernels")


@kernels_app.command("build")
def kernels_build(cache_dir: Optional[Path] = typer.Option(
        None, help="Where the library goes (default: $XDG_CACHE_HOME/promptfleet/kernels).")) -> None:
    """Compile the AVX-512 kernels now (an image build, a deploy step) instead of on the
    engine's first start, and load them once to check they run on this CPU. Exit 1, saying
    why, where they cannot: the engine then runs oneDNN linears and SDPA attention."""
    import time

    from promptfleet.platform.native_build import KernelUnavailable, build_library, plan_build
    from promptfleet.platform.native_kernels import load

    try:
        cached = plan_build(cache_dir=cache_dir).target.exists()
        t0 = time.perf_counter()
        path = build_library(cache_dir=cache_dir)
        kernels = load(path)
    except KernelUnavailable as exc:
        _fail(f"the native kernels cannot be built or loaded here: {exc}")
    took = "already built" if cached else f"built in {time.perf_counter() - t0:.1f} s"
    typer.echo(f"{path} ({took}; fp32{' + bf16' if kernels.bf16 else ''} kernels load on this CPU)")


# ---------------------------------------------------------------- bench and demo
@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def bench(ctx: typer.Context, which: str = typer.Argument(
        "engine", help="engine | registry | http | train | load | isolation | storage | quality | coldload | beams")) -> None:
    """Run a benchmark script; extra arguments go to it (see --help of each)."""
    import importlib

    modules = {"engine": "engine_bench", "registry": "registry_bench", "http": "http_bench", "train": "train_bench",
               "load": "load_bench", "isolation": "isolation_bench", "storage": "storage_bench",
               "quality": "quality_bench", "coldload": "coldload_bench", "beams": "beam_bench"}
    if which not in modules:
        _fail(f"unknown benchmark {which!r}; choose from {', '.join(modules)}")
    importlib.import_module(f"promptfleet.bench.{modules[which]}").main(list(ctx.args))


@app.command("gpu-check", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def gpu_check(ctx: typer.Context) -> None:
    """The prepared device check (scripts/gpu_check.sh runs it with the engine bench): logits
    against transformers' model and mixed adapter batches against SDPA and PEFT, per
    attention backend; --device cpu --dtype float32 is the dry run. Extra arguments go to
    it (see --help). Exit 1 when a check fails."""
    from promptfleet.bench.gpu_check import main as check

    raise typer.Exit(check(list(ctx.args)))


@app.command()
def demo(workdir: Optional[Path] = typer.Option(None, help="Keep the demo's data here (default: a temp dir)."),
         port: int = 0, requests: int = 24,
         model: str = typer.Option("auto", help="auto: SmolLM2 when the demo extra is installed, else "
                                               "random GPT-2; or smollm2 / gpt2-random."),
         keep: bool = typer.Option(False, "--keep", help="Leave the server up afterwards (web console at "
                                                         "/console) until Ctrl-C.")) -> None:
    """Start a server + worker on embedded defaults, run two tenants end to end (a real model
    with the demo extra: trained-adapter accuracy before/after), print a table."""
    from promptfleet.demo import run_demo

    choices = {"auto": None, "smollm2": True, "gpt2-random": False}
    if model not in choices:
        raise typer.BadParameter(f"--model must be one of {', '.join(choices)}, got {model!r}")
    code = run_demo(workdir=workdir, port=port, burst=requests, real=choices[model], keep_serving=keep)
    raise typer.Exit(code)


def main() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app()


if __name__ == "__main__":
    main()
