"""Property-based tests from the app's own OpenAPI schema (schemathesis 4): with a valid
tenant key (the admin key for /admin), no operation answers 5xx, and every answer matches
its declared status codes, content types, headers and body schema.

Driven through schemathesis's Python API (one hypothesis run per operation), not its
pytest plugin: the plugin's lazily loaded schemas (``schemathesis.pytest.from_fixture``)
build pytest items from pytest internals that pytest 9.2 removed."""
from __future__ import annotations

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import (content_type_conformance, not_a_server_error, response_headers_conformance,
                                 response_schema_conformance, status_code_conformance)
from schemathesis.core.result import Ok

from promptfleet.api import create_app
from promptfleet.testing.api_app import api_settings
from promptfleet.testing.live_server import live_server

CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_headers_conformance,
          response_schema_conformance]


@pytest.fixture(scope="module")
def live_api(api_engine, small_checkpoint, tmp_path_factory, peft_zips):
    settings_ = api_settings(tmp_path_factory.mktemp("fuzz"), small_checkpoint, max_tokens_limit=8,
                             max_prompt_tokens=64, max_upload_mb=1, max_dataset_mb=1,
                             tenant_rate_per_s=1e6, tenant_rate_burst=1_000_000, tenant_max_concurrent=1000)
    app = create_app(settings_, engine=api_engine)
    with live_server(app) as server:
        admin = {"Authorization": f"Bearer {settings_.admin_key}"}
        with httpx.Client(base_url=server.base_url, timeout=60) as http:
            r = http.post("/admin/tenants", json={"name": "fuzzer"}, headers=admin)
            tenant = {"Authorization": f"Bearer {r.json()['api_key']}"}
            assert http.post("/v1/adapters", data={"name": "gpt2x"}, headers=tenant,
                             files={"file": ("a.zip", peft_zips["prefix"], "application/zip")}).status_code == 201
            server.headers = {"admin": admin, "tenant": tenant}
        yield server


def test_no_server_errors_and_honest_schema(live_api):
    schema = schemathesis.openapi.from_url(f"{live_api.base_url}/openapi.json")
    results = list(schema.get_all_operations())
    broken = [result.err() for result in results if not isinstance(result, Ok)]
    assert not broken, f"operations schemathesis cannot read: {broken}"
    operations = [result.ok() for result in results]
    paths = {op.path for op in operations}
    assert {"/v1/completions", "/v1/adapters", "/v1/jobs", "/admin/tenants", "/healthz"} <= paths, paths
    for operation in operations:
        headers = live_api.headers["admin" if operation.path.startswith("/admin") else "tenant"]

        @given(case=operation.as_strategy())
        @settings(max_examples=15, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        def check(case) -> None:
            case.call_and_validate(headers=headers, checks=CHECKS, timeout=60)

        try:
            check()
        except BaseException as exc:
            exc.add_note(f"operation: {operation.label}")
            raise
