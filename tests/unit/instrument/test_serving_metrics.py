"""The serving processes' Prometheus metrics: names, labels and bucket boundaries as
scraped (parsed back from the text format), and what one request observes."""

from __future__ import annotations

import math

import pytest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from tokentrace.instrument import ServingMetrics, TokenRecorder
from tokentrace.instrument.metrics import TPOT_BUCKETS_S, TTFT_BUCKETS_S

# The OpenTelemetry GenAI semantic conventions' recommended boundaries, written out
# here rather than imported, so a change to the constants fails this test.
SEMCONV_TTFT = [
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
]  # fmt: skip
SEMCONV_TPOT = [0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5]
SEMCONV_REQUEST_DURATION = [
    0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92,
]  # fmt: skip


def _samples(metrics: ServingMetrics) -> list[Sample]:
    text = metrics.render().decode()
    return [s for family in text_string_to_metric_families(text) for s in family.samples]


def _buckets(samples: list[Sample], name: str) -> list[float]:
    return sorted(
        {float(s.labels["le"]) for s in samples if s.name == f"{name}_bucket"} - {math.inf}
    )


def _value(samples: list[Sample], name: str, **labels: str) -> float:
    found = [s.value for s in samples if s.name == name and labels.items() <= s.labels.items()]
    assert len(found) == 1, (name, labels, found)
    return found[0]


def test_genai_histograms_use_the_semantic_conventions_names_and_boundaries() -> None:
    metrics = ServingMetrics("router-0", "router")
    metrics.observe_request("m", ok=True, e2e_s=1.0, ttft_s=0.1, output_tokens=10)
    samples = _samples(metrics)
    assert _buckets(samples, "gen_ai_server_time_to_first_token_seconds") == SEMCONV_TTFT
    assert _buckets(samples, "gen_ai_server_time_per_output_token_seconds") == SEMCONV_TPOT
    assert _buckets(samples, "gen_ai_server_request_duration_seconds") == SEMCONV_REQUEST_DURATION
    assert list(TTFT_BUCKETS_S) == SEMCONV_TTFT and list(TPOT_BUCKETS_S) == SEMCONV_TPOT


def test_every_metric_is_labelled_with_node_role_and_model() -> None:
    metrics = ServingMetrics("decode-3", "decode")
    metrics.observe_request("m", ok=False, e2e_s=0.5, ttft_s=None, output_tokens=None)
    metrics.observe_gaps("m", [0.01])
    metrics.observe_kv_transfer("m", ok=True, duration_s=0.002, nbytes=4096)
    metrics.track_engine("m", waiting=lambda: 3, running=lambda: 5)
    names = set()
    for s in _samples(metrics):
        if s.name.endswith("_created"):
            continue
        names.add(s.name)
        identity = (s.labels["node"], s.labels["role"], s.labels["model"])
        assert identity == ("decode-3", "decode", "m"), s
    assert {
        "gen_ai_server_request_duration_seconds_count",
        "tokentrace_requests_total",
        "tokentrace_inter_token_latency_seconds_count",
        "tokentrace_kv_transfer_duration_seconds_count",
        "tokentrace_kv_transfer_bytes_count",
        "tokentrace_queue_depth",
        "tokentrace_running_batch_size",
    } <= names


def test_a_request_observes_what_its_requests_row_holds() -> None:
    metrics = ServingMetrics("router-0", "router")
    metrics.observe_request("m", ok=True, e2e_s=1.3, ttft_s=0.1, output_tokens=5)
    metrics.observe_request("m", ok=True, e2e_s=0.2, ttft_s=0.2, output_tokens=1)  # no TPOT
    metrics.observe_request("m", ok=False, e2e_s=0.05, ttft_s=None, output_tokens=None)
    s = _samples(metrics)
    assert _value(s, "tokentrace_requests_total", status="ok") == 2
    assert _value(s, "tokentrace_requests_total", status="error") == 1
    assert _value(s, "gen_ai_server_request_duration_seconds_count") == 3
    assert _value(s, "gen_ai_server_time_to_first_token_seconds_count") == 2
    assert _value(s, "gen_ai_server_time_per_output_token_seconds_count") == 1
    assert _value(s, "gen_ai_server_time_per_output_token_seconds_sum") == pytest.approx(0.3)


def test_gaps_are_the_intervals_between_emissions_without_the_first() -> None:
    recorder = TokenRecorder(4)
    recorder.start()
    for t_ns in (1_000_000_000, 1_010_000_000, 1_030_000_000, 1_060_000_000):
        recorder.record_at(t_ns, tokens=1, step=0, batch_size=1)
    assert recorder.gaps_s() == pytest.approx([0.01, 0.02, 0.03])
    metrics = ServingMetrics("decode-0", "decode")
    assert metrics.observe_emissions("m", recorder) == 3
    s = _samples(metrics)
    assert _value(s, "tokentrace_inter_token_latency_seconds_count") == 3
    assert _value(s, "tokentrace_inter_token_latency_seconds_sum") == pytest.approx(0.06)


def test_engine_gauges_are_read_when_scraped() -> None:
    depth = [0]
    metrics = ServingMetrics("decode-0", "decode")
    metrics.track_engine("m", waiting=lambda: depth[0], running=lambda: 2)
    assert _value(_samples(metrics), "tokentrace_queue_depth") == 0
    depth[0] = 7
    assert _value(_samples(metrics), "tokentrace_queue_depth") == 7
    assert _value(_samples(metrics), "tokentrace_running_batch_size") == 2


def test_two_instances_keep_separate_numbers() -> None:
    a, b = ServingMetrics("a", "decode"), ServingMetrics("b", "decode")
    a.observe_gaps("m", [0.1, 0.2])
    assert _value(_samples(a), "tokentrace_inter_token_latency_seconds_count") == 2
    assert not [s for s in _samples(b) if s.name == "tokentrace_inter_token_latency_seconds_count"]


@pytest.mark.parametrize(("node", "role"), [("", "decode"), ("n", "")])
def test_empty_identity_is_refused(node: str, role: str) -> None:
    with pytest.raises(ValueError, match="must not be empty"):
        ServingMetrics(node, role)
