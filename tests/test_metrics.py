"""kvd.metrics: gauges and counters from Engine.stats()-shaped dicts, served over HTTP."""

import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from kvd.metrics import Metrics


def stats(**over):
    base = {
        "waiting": 3,
        "running": 2,
        "blocks_total": 100,
        "blocks_free": 60,
        "blocks_cached_only": 15,
        "blocks_held": 25,
        "prefix_hit_rate": 0.5,
        "prefix_hit_tokens": 64,
        "preemptions": 1,
        "generated_tokens": 10,
        "prompt_tokens": 17,
        "time": 1.0,
        "integrity_ok": True,
        "processes": {"daemon": True, "worker-0": True},
    }
    return base | over


def samples(text: str) -> dict[tuple, float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


@pytest.fixture
def metrics():
    m = Metrics()
    yield m
    m.close()


def test_http_exporter_serves_updated_values(metrics):
    port = metrics.start_http("127.0.0.1", 0)
    assert port > 0
    metrics.update(stats())
    metrics.update(stats(generated_tokens=25, waiting=0, processes={"worker-0": False}, integrity_ok=False))
    metrics.observe_ttft(0.02)
    metrics.observe_finish("stop", 0.3)
    metrics.observe_finish("error", 0.01)  # failed before its first token: no TTFT
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        assert resp.status == 200
        got = samples(resp.read().decode())
    assert got[("kvd_queue_length", ())] == 0
    assert got[("kvd_running_requests", ())] == 2
    assert got[("kvd_blocks_free", ())] == 60
    assert got[("kvd_blocks_used", ())] == 25
    assert got[("kvd_blocks_cached_only", ())] == 15
    assert got[("kvd_blocks_total", ())] == 100
    assert got[("kvd_prefix_cache_hit_rate", ())] == 0.5
    assert got[("kvd_integrity_ok", ())] == 0
    assert got[("kvd_process_up", (("process", "daemon"),))] == 1
    assert got[("kvd_process_up", (("process", "worker-0"),))] == 0
    assert got[("kvd_generation_tokens_total", ())] == 25
    assert got[("kvd_preemptions_total", ())] == 1
    assert got[("kvd_prefix_cache_hit_tokens_total", ())] == 64
    assert got[("kvd_requests_finished_total", (("finish_reason", "stop"),))] == 1
    assert got[("kvd_requests_finished_total", (("finish_reason", "error"),))] == 1
    assert got[("kvd_prompt_tokens_total", ())] == 17
    assert got[("kvd_time_to_first_token_seconds_count", ())] == 1
    assert got[("kvd_time_to_first_token_seconds_bucket", (("le", "0.025"),))] == 1
    assert got[("kvd_time_to_first_token_seconds_bucket", (("le", "0.01"),))] == 0
    assert got[("kvd_e2e_request_latency_seconds_count", ())] == 2
    assert got[("kvd_e2e_request_latency_seconds_sum", ())] == pytest.approx(0.31)


def test_counters_stay_monotonic_when_the_source_restarts(metrics):
    metrics.update(stats(generated_tokens=100))
    metrics.update(stats(generated_tokens=7))  # a rebuilt engine counts from zero again
    metrics.update(stats(generated_tokens=9))
    assert samples(metrics.render().decode())[("kvd_generation_tokens_total", ())] == 109


def test_absent_keys_leave_metrics_unchanged(metrics):
    metrics.update(stats())
    metrics.update({"running": 5})
    got = samples(metrics.render().decode())
    assert got[("kvd_running_requests", ())] == 5 and got[("kvd_queue_length", ())] == 3
    assert got[("kvd_generation_tokens_total", ())] == 10


def test_private_registries_and_one_server_each():
    a, b = Metrics(), Metrics()
    try:
        pa, pb = a.start_http(port=0), b.start_http(port=0)
        assert pa != pb
        with pytest.raises(RuntimeError, match="already running"):
            a.start_http(port=0)
    finally:
        a.close()
        b.close()
    a.close()  # idempotent
