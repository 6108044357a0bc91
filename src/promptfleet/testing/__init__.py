"""Helpers for the test suites, benchmarks and demo, one job per module:

- ``peft``: PEFT-made adapters and PEFT's own greedy answer (the reference);
- ``polling``: wait for a state with a deadline that fails loudly (never a bare sleep);
- ``archives``: zip/tar.gz builders, hostile members included;
- ``errors``: the OpenAI-shaped error assertion;
- ``engine_gate``: hold an engine between steps, so a test sees a state, not a race;
- ``services``: PostgreSQL/Redis for tests (a missing one fails under ``CI=true``);
- ``skips``: the one place that says why a test may be skipped (no GPU, CPU features);
- ``live_server``: an app under uvicorn in a thread; ``api_app``: in-process API apps;
- ``processes``, ``tcp_proxy``, ``stack``, ``sse``: real server/worker processes, a TCP
  proxy that takes a database away, and an SSE reader, for the end-to-end tests.
- ``fleet``: a deployment across hosts (N ``serve``, M ``worker`` processes, each with its
  own empty data dir, on one PostgreSQL, Redis and S3 bucket); ``failover``: clients that
  retry on the next replica as a load balancer does; ``s3``: moto S3 fixtures.

The names most suites use are importable from here.
"""
from promptfleet.testing.archives import tar_gz_with, tar_link
from promptfleet.testing.errors import api_error
from promptfleet.testing.peft import make_peft_adapter, peft_greedy
from promptfleet.testing.polling import wait_for, wait_for_async

__all__ = ["api_error", "make_peft_adapter", "peft_greedy", "tar_gz_with", "tar_link", "wait_for", "wait_for_async"]
