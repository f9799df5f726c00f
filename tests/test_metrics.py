"""STD's metrics cross the process boundary the way vLLM's multi-process metrics do (no engine needed).

The worker side runs in a spawned process, as vLLM's engine core and workers are; the front end reads the
default Prometheus registry, as `/metrics` and `LLM.get_metrics()` do. The end-to-end checks (offline and
`/metrics` of a real server) are in test_std_lossless.py and test_server.py.
"""

import multiprocessing
import os
from collections.abc import Iterator
from types import SimpleNamespace

import pytest
from prometheus_client import REGISTRY, Histogram, values

from vllm_std.gamma_policy import Decision
from vllm_std.metrics import METRICS_DIR_ENV, SKIP_REASONS, BulkHistogram, FrontendCollector, STDMetrics

LABELS = {"model_name": "tiny", "engine": "0"}


def _worker(tp_rank: int) -> None:
    config = SimpleNamespace(
        model_config=SimpleNamespace(served_model_name="tiny"),
        parallel_config=SimpleNamespace(data_parallel_rank=0),
    )
    metrics = STDMetrics.for_worker(config, tp_rank)
    if metrics is None:
        return
    metrics.request_scored(num_visual_tokens=1000, num_kept_visual_tokens=250, seconds=0.02)
    metrics.request_scored(num_visual_tokens=500, num_kept_visual_tokens=500, seconds=0.01)
    metrics.request_skipped("no_visual_input")
    metrics.draft_seconds.observe(0.3)
    idle, paying = Decision(0, "not_paying"), Decision(4, "paying")
    metrics.gammas_chosen([idle, paying, idle, paying, idle, Decision(1, "probe")])


def _run_workers(*tp_ranks: int) -> None:
    context = multiprocessing.get_context("spawn")
    for rank in tp_ranks:
        process = context.Process(target=_worker, args=(rank,))
        process.start()
        process.join(60)
        assert process.exitcode == 0


def _sample(name: str, **labels: str) -> float | None:
    return REGISTRY.get_sample_value(name, {**LABELS, **labels})


@pytest.fixture
def collector(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """A front-end collector of its own; the process's previous one (if any) is put back afterwards."""
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    monkeypatch.setenv(METRICS_DIR_ENV, "")
    previous = FrontendCollector._current
    if previous is not None:
        REGISTRY.unregister(previous._collector)
    FrontendCollector._current = None
    FrontendCollector.install()
    yield
    REGISTRY.unregister(FrontendCollector._current._collector)
    FrontendCollector._current._dir.cleanup()
    FrontendCollector._current = previous
    if previous is not None:
        REGISTRY.register(previous._collector)


def test_worker_metrics_reach_the_front_end_registry(collector: None) -> None:
    _run_workers(0, 1)  # rank 1 writes nothing: each value below is counted once

    assert _sample("vllm:std_requests_scored_total") == 2
    assert _sample("vllm:std_visual_tokens_total") == 1500
    assert _sample("vllm:std_kept_visual_tokens_total") == 750
    assert _sample("vllm:std_requests_skipped_total", reason="no_visual_input") == 1
    for reason in SKIP_REASONS[1:]:
        assert _sample("vllm:std_requests_skipped_total", reason=reason) == 0
    assert _sample("vllm:std_kept_visual_fraction_count") == 2
    assert _sample("vllm:std_kept_visual_fraction_sum") == pytest.approx(1.25)
    assert _sample("vllm:std_kept_visual_fraction_bucket", le="0.3") == 1
    assert _sample("vllm:std_prefill_scoring_seconds_sum") == pytest.approx(0.03)
    assert _sample("vllm:std_draft_seconds_count") == 1
    assert _sample("vllm:std_gamma_count") == 6
    assert _sample("vllm:std_gamma_sum") == 9
    assert [_sample("vllm:std_gamma_bucket", le=le) for le in ("0.0", "1.0", "3.0", "4.0")] == [3, 4, 4, 6]
    decisions = {"fixed": 0, "paying": 2, "probe": 1, "not_paying": 3}
    for decision, count in decisions.items():
        assert _sample("vllm:std_gamma_decisions_total", decision=decision) == count


def test_bulk_observations_match_repeated_ones() -> None:
    """`BulkHistogram.observe_times` mirrors prometheus_client's `observe`: the same series and values."""
    buckets = (0, 1, 2, 4, 8)
    one = Histogram("one", "d", registry=None, buckets=buckets)
    bulk = BulkHistogram("bulk", "d", registry=None, buckets=buckets)
    for amount, times in ((0, 3), (1, 2), (0.5, 1), (3, 4), (8, 1), (9, 2)):
        for _ in range(times):
            one.observe(amount)
        bulk.observe_times(amount, times)

    def samples(histogram: Histogram) -> list[tuple[str, dict[str, str], float]]:
        (metric,) = histogram.collect()
        return [
            (s.name.split("_", 1)[1], s.labels, s.value) for s in metric.samples if "created" not in s.name
        ]

    assert samples(bulk) == samples(one)


def test_each_engine_starts_from_zero(collector: None) -> None:
    _run_workers(0)
    FrontendCollector.install()
    assert _sample("vllm:std_requests_scored_total") is None
    _run_workers(0)
    assert _sample("vllm:std_requests_scored_total") == 2


def test_vllm_multiprocess_mode_is_left_to_vllm(
    tmp_path: os.PathLike, monkeypatch: pytest.MonkeyPatch, collector: None
) -> None:
    """With `PROMETHEUS_MULTIPROC_DIR` set (vLLM's --api-server-count > 1) the worker writes there."""
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    before = FrontendCollector._current
    FrontendCollector.install()
    assert FrontendCollector._current is before
    _run_workers(0)
    assert any(f.startswith("counter_") for f in os.listdir(tmp_path))
    assert os.listdir(os.environ[METRICS_DIR_ENV]) == []


def test_worker_leaves_prometheus_in_memory_mode(collector: None) -> None:
    """Metrics created after STD's (vLLM's own, maybe in this very process) must stay in memory."""
    _worker(0)
    assert values.ValueClass is values.MutexValue
    assert "PROMETHEUS_MULTIPROC_DIR" not in os.environ
