"""Property-based tests from the app's own OpenAPI schema (schemathesis): with a valid
tenant key (the admin key for /admin), no operation answers 5xx, and every answer matches
its declared status codes, content types, headers and body schema."""
from __future__ import annotations

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import (content_type_conformance, not_a_server_error, response_headers_conformance,
                                 response_schema_conformance, status_code_conformance)

from promptfleet.api import create_app

CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_headers_conformance,
          response_schema_conformance]


@pytest.fixture(scope="module")
def live_api(api_engine, small_checkpoint, tmp_path_factory, helpers, peft_zips):
    settings_ = helpers.api_settings(tmp_path_factory.mktemp("fuzz"), small_checkpoint, max_tokens_limit=8,
                                     max_prompt_tokens=64, max_upload_mb=1, max_dataset_mb=1,
                                     tenant_rate_per_s=1e6, tenant_rate_burst=1_000_000, tenant_max_concurrent=1000)
    app = create_app(settings_, engine=api_engine)
    with helpers.live_server(app) as server:
        admin = {"Authorization": f"Bearer {settings_.admin_key}"}
        with httpx.Client(base_url=server.base_url, timeout=60) as http:
            r = http.post("/admin/tenants", json={"name": "fuzzer"}, headers=admin)
            tenant = {"Authorization": f"Bearer {r.json()['api_key']}"}
            assert http.post("/v1/adapters", data={"name": "gpt2x"}, headers=tenant,
                             files={"file": ("a.zip", peft_zips["prefix"], "application/zip")}).status_code == 201
            server.headers = {"admin": admin, "tenant": tenant}
        yield server


@pytest.fixture(scope="module")
def api_schema(live_api):
    return schemathesis.openapi.from_url(f"{live_api.base_url}/openapi.json")


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@settings(max_examples=15, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_server_errors_and_honest_schema(case, live_api):
    headers = live_api.headers["admin" if case.operation.path.startswith("/admin") else "tenant"]
    case.call_and_validate(headers=headers, checks=CHECKS, timeout=60)
