"""Metric labels a tenant or client chooses are bounded: past ``metrics_max_models`` adapter
names, ``metrics_max_tenants`` tenants, or the standard HTTP methods, new values are
counted under ``_other`` instead of adding series."""
from __future__ import annotations

import threading

import pytest
from prometheus_client.parser import text_string_to_metric_families

from promptfleet.api.metrics import OVERFLOW_LABEL, LabelBound


def label_values(text: str, metric: str, label: str) -> dict[str, float]:
    """``{label value: summed sample value}`` of one metric family's samples."""
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == metric:
                out[s.labels[label]] = out.get(s.labels[label], 0.0) + s.value
    return out


def series_count(text: str) -> int:
    return sum(len(f.samples) for f in text_string_to_metric_families(text))


def complete(api, headers, model: str) -> None:
    r = api.client.post("/v1/completions", headers=headers,
                        json={"model": model, "prompt": "hi", "max_tokens": 1, "temperature": 0})
    assert r.status_code == 200, r.text


def test_label_bound_keeps_the_first_values_and_always_ones():
    bound = LabelBound(2, always=["gpt2"])
    assert [bound(v) for v in ["a", "gpt2", "b", "c", "a", "gpt2", "d"]] == \
        ["a", "gpt2", "b", OVERFLOW_LABEL, "a", "gpt2", OVERFLOW_LABEL]
    with pytest.raises(ValueError):
        LabelBound(0)


def test_label_bound_under_threads_never_admits_more_than_its_limit():
    bound = LabelBound(10)
    kept: set[str] = set()
    lock = threading.Lock()

    def work(i: int) -> None:
        for j in range(200):
            v = bound(f"v{i}-{j}")
            with lock:
                kept.add(v)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(kept - {OVERFLOW_LABEL}) == 10


def test_adapter_names_beyond_the_cap_share_one_series(make_api, peft_zips):
    api = make_api(metrics_max_models=3)
    _, h = api.new_tenant("many")
    names = [f"ad{i}" for i in range(8)]
    for name in names:
        assert api.upload(h, name, peft_zips["pt"]).status_code == 201
    complete(api, h, "gpt2")  # the base model never counts against the cap
    for name in names:
        complete(api, h, name)
    before = api.client.get("/metrics").text
    models = label_values(before, "promptfleet_completion_requests_total", "model")
    assert set(models) == {"gpt2", "ad0", "ad1", "ad2", OVERFLOW_LABEL}
    assert models[OVERFLOW_LABEL] == 5 and sum(models.values()) == 9
    for family in ("promptfleet_prompt_tokens_total", "promptfleet_completion_latency_seconds_count"):
        assert set(label_values(before, family, "model")) == set(models)
    # more new names, more requests: the number of series does not move
    for i in range(8, 12):
        assert api.upload(h, f"ad{i}", peft_zips["pt"]).status_code == 201
        complete(api, h, f"ad{i}")
    after = api.client.get("/metrics").text
    assert label_values(after, "promptfleet_completion_requests_total", "model")[OVERFLOW_LABEL] == 9
    completion_series = lambda text: sum(  # noqa: E731
        len(f.samples) for f in text_string_to_metric_families(text) if f.name.startswith("promptfleet_completion"))
    assert completion_series(after) == completion_series(before)


def test_tenants_beyond_the_cap_share_one_series(make_api):
    api = make_api(metrics_max_tenants=2)
    for i in range(5):
        _, h = api.new_tenant(f"ten{i}")
        complete(api, h, "gpt2")
    tenants = label_values(api.client.get("/metrics").text, "promptfleet_completion_requests_total", "tenant")
    assert len(tenants) == 3 and tenants[OVERFLOW_LABEL] == 3


def test_made_up_http_methods_do_not_add_series(api):
    base = series_count(api.client.get("/metrics").text)
    for i in range(30):
        api.client.request(f"BREW{i}", "/healthz")
    text = api.client.get("/metrics").text
    methods = label_values(text, "promptfleet_http_requests_total", "method")
    assert set(methods) <= {"GET", "POST", OVERFLOW_LABEL}
    assert methods[OVERFLOW_LABEL] == 30
    assert series_count(text) - base < 5
