"""STD's metrics on vLLM's `/metrics`, and a reader of vLLM's own spec-decode counters.

What only STD knows (selections, skips, scoring and drafting time) lives in the worker process, while
`/metrics` is served by the API server (or read by `LLM.get_metrics()` in the offline process). They meet
the way vLLM's own multi-process metrics do: the worker writes prometheus_client's multiprocess files, and
the front end's registry collects them. When vLLM itself runs in multiprocess mode (`--api-server-count > 1`
sets `PROMETHEUS_MULTIPROC_DIR`) its registry already reads that directory and STD just writes there;
otherwise the front end makes a private directory for each engine it builds and hands it to the worker
through `VLLM_STD_METRICS_DIR`. Only tensor-parallel rank 0 writes, so nothing is counted twice.
"""

import bisect
import collections
import contextlib
import os
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, Literal, get_args

from prometheus_client import REGISTRY, Counter, Histogram
from prometheus_client import values as prometheus_values
from prometheus_client.multiprocess import MultiProcessCollector

from vllm_std.gamma_policy import NOT_PAYING, REASONS, Decision

PREFIX = "vllm:spec_decode_"
METRICS_DIR_ENV = "VLLM_STD_METRICS_DIR"
_VLLM_MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

SkipReason = Literal[
    "no_visual_input", "too_few_visual_tokens", "no_text_after_visual", "incomplete_capture", "drafter_fault"
]
"""Why a request decodes without drafts (the `reason` label of `vllm:std_requests_skipped_total`)."""
SKIP_REASONS: tuple[SkipReason, ...] = get_args(SkipReason)
FAULT_STAGES = ("planning", "scoring", "drafting", "self_check")
"""Where the drafter caught an exception (the `stage` label of `vllm:std_drafter_faults_total`); `self_check`:
the start-up self-check failed and STD is off for the engine."""
DRAFT_SOURCES = ("sparse", "lookup")
"""Where a draft token came from (the `source` label of `vllm:std_draft_tokens_total`): the sparse drafter's
forward passes, or the request's own text (`vllm_std.lookup`)."""
_LABELLED = {
    "requests_skipped": "reason",
    "gamma_decisions": "decision",
    "drafter_faults": "stage",
    "draft_tokens": "source",
}


def spec_decode_counters(llm: Any) -> dict[str, Any]:
    """`{"num_drafts": ..., "num_draft_tokens": ..., "num_accepted_tokens": ..., "..._per_pos": [...]}`."""
    return {
        m.name.removeprefix(PREFIX): getattr(m, "values", None) or m.value
        for m in llm.get_metrics()
        if m.name.startswith(PREFIX)
    }


def std_metrics(llm: Any) -> dict[str, Any]:
    """STD's own series from an offline `LLM` (built with `disable_log_stats=False`, as `get_metrics` needs).

    By name without the `vllm:std_` prefix, summed over engines: counters give their value
    (`requests_skipped` a dict by reason, `gamma_decisions` by decision), histograms `(count, sum)`.
    """
    out: dict[str, Any] = {name: collections.Counter() for name in _LABELLED}
    for m in llm.get_metrics():
        name = m.name.removeprefix("vllm:std_")
        if name == m.name:
            continue
        if name in _LABELLED:
            out[name][m.labels[_LABELLED[name]]] += m.value
        elif hasattr(m, "buckets"):
            count, total = out.get(name, (0, 0.0))
            out[name] = (count + m.count, total + m.sum)
        else:
            out[name] = out.get(name, 0) + m.value
    return out | {name: dict(out[name]) for name in _LABELLED}


def acceptance_rate(counters: dict[str, Any]) -> float:
    """Accepted draft tokens over proposed draft tokens."""
    return counters["num_accepted_tokens"] / counters["num_draft_tokens"]


class FrontendCollector:
    """Makes the worker's STD metrics visible in this (front-end) process's default Prometheus registry."""

    _current: "FrontendCollector | None" = None

    def __init__(self) -> None:
        self._dir = tempfile.TemporaryDirectory(prefix="vllm-std-metrics-")
        self._collector = MultiProcessCollector(None, path=self._dir.name)

    @classmethod
    def install(cls) -> None:
        """Called where the engine config is built, before vLLM starts the engine's processes.

        Each engine gets a fresh directory, so a second `LLM` in one process does not inherit the first's
        counts (vLLM resets its own metrics per engine the same way).
        """
        if os.environ.get(_VLLM_MULTIPROC_ENV):
            return
        if cls._current is not None:
            REGISTRY.unregister(cls._current._collector)
            cls._current._dir.cleanup()
        cls._current = cls()
        REGISTRY.register(cls._current._collector)
        os.environ[METRICS_DIR_ENV] = cls._current._dir.name


@contextlib.contextmanager
def _multiprocess_values(directory: str) -> Iterator[None]:
    """Creates metric values backed by files in `directory` inside this block.

    prometheus_client picks file-backed values from a module global and the directory from the environment;
    both are restored, so vLLM metrics created later in this process (which may be the front end itself)
    stay in memory. The files stay open for the life of the process, like any multiprocess metric's.
    """
    saved_class, saved_dir = prometheus_values.ValueClass, os.environ.get(_VLLM_MULTIPROC_ENV)
    if saved_class._multiprocess and saved_dir == directory:
        # prometheus_client is already in multiprocess mode on this directory (`--api-server-count > 1`):
        # its own files must be shared, a second writer on them would overwrite their entries.
        yield
        return
    prometheus_values.ValueClass = prometheus_values.MultiProcessValue()
    os.environ[_VLLM_MULTIPROC_ENV] = directory
    try:
        yield
    finally:
        prometheus_values.ValueClass = saved_class
        if saved_dir is None:
            del os.environ[_VLLM_MULTIPROC_ENV]
        else:
            os.environ[_VLLM_MULTIPROC_ENV] = saved_dir


class BulkHistogram(Histogram):
    """A histogram that records several equal observations with one write per series.

    Each write of a file-backed value costs a few microseconds, and adaptive gamma records one observation
    per request and step; prometheus_client has no bulk `observe`, so this one mirrors `Histogram.observe`
    (the test of `tests/test_metrics.py` compares the two, and fails when prometheus_client changes).
    """

    def observe_times(self, amount: float, times: int) -> None:
        self._raise_if_not_observable()
        if amount:
            self._sum.inc(amount * times)
        self._buckets[bisect.bisect_left(self._upper_bounds, amount)].inc(times)


class STDMetrics:
    """STD's counters and histograms, written by the drafting worker (vLLM's label names and values).

    Every labelled child is created up front: children are file-backed only when created inside
    `_multiprocess_values`, and a series that exists from the start reads 0 rather than missing.
    """

    def __init__(self, model_name: str, engine: int) -> None:
        labels = {"model_name": model_name, "engine": str(engine)}
        names = list(labels)

        def counter(name: str, doc: str) -> Any:
            return Counter(name, doc, names, registry=None).labels(**labels)

        def histogram(name: str, doc: str, buckets: tuple[float, ...], kind: type = Histogram) -> Any:
            return kind(name, doc, names, registry=None, buckets=buckets).labels(**labels)

        self.scored = counter(
            "vllm:std_requests_scored", "Requests scored at prefill that draft with a top-K selection."
        )
        skipped = Counter(
            "vllm:std_requests_skipped",
            "Requests that decode without STD drafts, by reason.",
            [*names, "reason"],
            registry=None,
        )
        self.skipped = {reason: skipped.labels(**labels, reason=reason) for reason in SKIP_REASONS}
        faults = Counter(
            "vllm:std_drafter_faults",
            "Exceptions the drafter caught (its requests then decode without drafts), by stage: planning, "
            "scoring, drafting; self_check: the start-up self-check failed and STD is off for this engine.",
            [*names, "stage"],
            registry=None,
        )
        self.faults = {stage: faults.labels(**labels, stage=stage) for stage in FAULT_STAGES}
        self.visual_tokens = counter("vllm:std_visual_tokens", "Visual tokens in scored requests.")
        self.kept_visual_tokens = counter(
            "vllm:std_kept_visual_tokens",
            "Visual tokens each layer's drafter still reads, summed over scored requests.",
        )
        self.kept_fraction = histogram(
            "vllm:std_kept_visual_fraction",
            "Per scored request, the fraction of its visual tokens the drafter keeps.",
            (0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0),
        )
        self.scoring_seconds = histogram(
            "vllm:std_prefill_scoring_seconds",
            "Per scored request, seconds spent computing block scores at prefill.",
            (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
        )
        self.draft_seconds = histogram(
            "vllm:std_draft_seconds",
            "Seconds per drafting round: the gamma sparse forwards of one step, for the whole batch.",
            (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
        )

        sources = Counter(
            "vllm:std_draft_tokens",
            "Draft tokens proposed, by source: sparse (the sparse drafter's forward passes) or lookup (the "
            "tokens that followed the same n-gram earlier in the request's prompt or output).",
            [*names, "source"],
            registry=None,
        )
        self.draft_tokens = {source: sources.labels(**labels, source=source) for source in DRAFT_SOURCES}
        self.gamma = histogram(
            "vllm:std_gamma",
            "Per drafting-eligible request and step, the draft length chosen (0: no drafts this step).",
            (0, 1, 2, 3, 4, 5, 6, 8, 10, 12, 16, 24, 32),
            BulkHistogram,
        )
        decisions = Counter(
            "vllm:std_gamma_decisions",
            "Per drafting-eligible request and step, why it drafts as it does: fixed (adaptive off), paying "
            "(the cost model's best gamma), probe (the fewest drafts that could pay, to re-measure "
            "acceptance and a round's cost), not_paying (no gamma predicted to beat plain decoding).",
            [*names, "decision"],
            registry=None,
        )
        self.decisions = {reason: decisions.labels(**labels, decision=reason) for reason in REASONS}

    @classmethod
    def for_worker(cls, vllm_config: Any, tp_rank: int) -> "STDMetrics | None":
        """The worker's metrics, or None where nothing should be written (ranks > 0, no collector)."""
        directory = os.environ.get(_VLLM_MULTIPROC_ENV) or os.environ.get(METRICS_DIR_ENV)
        if tp_rank != 0 or not directory or not os.path.isdir(directory):
            return None
        with _multiprocess_values(directory):
            return cls(
                vllm_config.model_config.served_model_name, vllm_config.parallel_config.data_parallel_rank
            )

    def request_scored(self, num_visual_tokens: int, num_kept_visual_tokens: int, seconds: float) -> None:
        self.scored.inc()
        self.visual_tokens.inc(num_visual_tokens)
        self.kept_visual_tokens.inc(num_kept_visual_tokens)
        self.kept_fraction.observe(num_kept_visual_tokens / num_visual_tokens)
        self.scoring_seconds.observe(seconds)

    def request_skipped(self, reason: SkipReason) -> None:
        self.skipped[reason].inc()

    def drafter_fault(self, stage: str) -> None:
        self.faults[stage].inc()

    def drafts_proposed(self, sparse: int, lookup: int) -> None:
        """One round's draft tokens, by source."""
        if sparse:
            self.draft_tokens["sparse"].inc(sparse)
        if lookup:
            self.draft_tokens["lookup"].inc(lookup)

    def gammas_chosen(self, decisions: Sequence[Decision]) -> None:
        """One step's decisions, each series written once per distinct decision (a write costs a few
        microseconds, the step of a small model a few milliseconds, and a batch mostly decides alike)."""
        if not decisions:
            return
        first = decisions[0]
        if decisions.count(first) == len(decisions):  # the whole batch alike, as in most steps
            groups: Iterable[tuple[Decision, int]] = ((first, len(decisions)),)
        else:
            groups = collections.Counter(decisions).items()
        for decision, count in groups:
            self._chosen(decision, count)

    def not_paying(self, times: int) -> None:
        """`times` requests of a step that repeats a plan drafting nothing (`GammaPolicy.repeat_idle`)."""
        self._chosen(NOT_PAYING, times)

    def _chosen(self, decision: Decision, times: int) -> None:
        self.gamma.observe_times(decision.gamma, times)
        self.decisions[decision.reason].inc(times)
