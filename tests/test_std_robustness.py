"""Preemption and aborted requests under STD: still lossless, and no per-request state left behind."""

import time

import pytest
from fault_injection import STAGES
from helpers import drafter_report, engine, token_ids
from vllm import LLM, SamplingParams

from vllm_std.fixtures.models import tiny_model
from vllm_std.fixtures.prompts import vllm_request
from vllm_std.fixtures.video import synthetic_frames
from vllm_std.metrics import spec_decode_counters, std_metrics

# 20 KV blocks of 128 tokens for four ~1k-token video prompts that each grow past 9 blocks: vLLM must
# preempt and recompute. Prefix caching off, so a recompute really re-runs (and re-scores) the prefill.
TIGHT = {
    "num_gpu_blocks_override": 20,
    "max_model_len": 2048,
    "enable_prefix_caching": False,
    "max_num_batched_tokens": 512,
}
LONG = SamplingParams(max_tokens=128, temperature=0.0, ignore_eos=True)
SPEC = {"method": "std", "num_speculative_tokens": 4, "top_k": 512, "adaptive": False}


def _videos(path: str, count: int) -> list[dict]:
    return [
        vllm_request(path, "What happens in the video?", videos=[synthetic_frames(32, 224, 224, seed=10 + i)])
        for i in range(count)
    ]


def _abort_scenario(llm: LLM, path: str) -> dict[str, list[int]]:
    """Three requests; one aborted mid-decode, one aborted mid-prefill; returns the finished outputs."""
    engine_ = llm.llm_engine
    requests = _videos(path, 3)
    for name, request in zip(("keep", "abort-decode", "abort-prefill"), requests, strict=True):
        engine_.add_request(name, request, LONG)
    finished: dict[str, list[int]] = {}
    steps = 0
    while engine_.has_unfinished_requests():
        steps += 1
        for out in engine_.step():
            if out.finished:
                finished[out.request_id] = list(out.outputs[0].token_ids)
            elif out.request_id == "abort-decode" and len(out.outputs[0].token_ids) >= 6:
                engine_.abort_request(["abort-decode"])
        if steps == 1:
            engine_.abort_request(["abort-prefill"])  # its 1k-token prompt needs several 512-token chunks
    return finished


@pytest.fixture(scope="module")
def baseline() -> dict:
    path = str(tiny_model("qwen2_vl"))
    with engine("qwen2_vl", **TIGHT) as llm:
        return {
            "preempt": token_ids(llm.generate(_videos(path, 4), LONG)),
            "abort": _abort_scenario(llm, path),
        }


def test_preemption_is_lossless(baseline: dict) -> None:
    path = str(tiny_model("qwen2_vl"))
    with engine("qwen2_vl", speculative_config=SPEC, **TIGHT) as llm:
        outputs = token_ids(llm.generate(_videos(path, 4), LONG))
        preemptions = next(m.value for m in llm.get_metrics() if m.name == "vllm:num_preemptions")
        counters = spec_decode_counters(llm)
        aborted = _abort_scenario(llm, path)
        llm.generate([vllm_request(path, "Tell me about the red car.")], SamplingParams(max_tokens=4))
        # The engine is idle now: vLLM drops the last request in the step without tokens that it takes
        # after it, and the drafter must drop its state then too (no forward pass follows to notice it).
        deadline = time.monotonic() + 60
        while (live := drafter_report(llm)["live"]) and time.monotonic() < deadline:
            time.sleep(0.1)

    assert preemptions > 0, "the KV cache was not tight enough to force preemption"
    assert outputs == baseline["preempt"]
    assert counters["num_drafts"] > 0
    # Aborted requests end early; the survivor's output is the one without speculation.
    assert set(aborted) == {"keep"} | (set(baseline["abort"]) - {"keep"}) and "abort-prefill" not in aborted
    assert aborted["keep"] == baseline["abort"]["keep"]
    # Nothing is tracked for the finished, aborted or preempted requests once vLLM dropped them.
    assert live == []


FAULT_SPEC = {"method": "std", "num_speculative_tokens": 4, "top_k": 256, "adaptive": False}


# test_server.py's test_drafter_faults_cost_drafts_not_answers injects the same faults into a running server.
@pytest.mark.slow
def test_drafter_faults_cost_drafts_never_outputs(capfd: pytest.CaptureFixture[str]) -> None:
    """An exception while scoring a prompt, selecting its blocks, or in the middle of a drafting round is
    caught where it happens: the requests it touched decode without drafts, one warning line names them,
    `vllm:std_drafter_faults_total` counts it, every output equals the engine's without speculation, and
    the engine goes on drafting for the requests after."""
    path = str(tiny_model("qwen2_vl"))
    batches = {stage: _videos(path, 2 + i)[i:] for i, stage in enumerate(STAGES)}  # other videos each
    after = [vllm_request(path, "What happens?", videos=[synthetic_frames(32, 224, 224, seed=30)])]
    with engine("qwen2_vl", max_num_batched_tokens=512) as llm:
        expected = {stage: token_ids(llm.generate(batch, LONG)) for stage, batch in batches.items()}
        expected["after"] = token_ids(llm.generate(after, LONG))
    got = {}
    injector = {"worker_extension_cls": "fault_injection.FaultInjector"}
    with engine("qwen2_vl", speculative_config=FAULT_SPEC, max_num_batched_tokens=512, **injector) as llm:
        for stage, batch in batches.items():
            llm.collective_rpc("inject_fault", args=(stage,))
            got[stage] = token_ids(llm.generate(batch, LONG))
        before = spec_decode_counters(llm)["num_drafts"]
        got["after"] = token_ids(llm.generate(after, LONG))
        drafted_after = spec_decode_counters(llm)["num_drafts"] - before
        std = std_metrics(llm)
    assert got == expected
    assert std["drafter_faults"] == {"planning": 0, "scoring": 2, "drafting": 1, "self_check": 0}
    assert std["requests_skipped"]["drafter_fault"] >= 3
    assert drafted_after > 0
    log = "".join(capfd.readouterr())
    for stage in ("scoring", "drafting"):
        assert f"STD {stage} failed (RuntimeError: injected" in log
    assert "decode without drafts, the engine goes on" in log


@pytest.fixture(scope="module")
def two_videos() -> tuple[list[dict], list[list[int]]]:
    """Two video requests and their outputs without speculation."""
    requests = _videos(str(tiny_model("qwen2_vl")), 2)
    with engine("qwen2_vl") as llm:
        return requests, token_ids(llm.generate(requests, LONG))


@pytest.mark.parametrize(
    ("broken", "error"),
    [
        pytest.param(
            "view",
            "with every block kept, the draft step's logits differ from the dense step's",
            marks=pytest.mark.slow,
        ),
        ("write", "the draft step changed KV blocks"),
    ],
)
def test_failed_self_check_turns_std_off(
    broken: str,
    error: str,
    two_videos: tuple[list[dict], list[list[int]]],
    monkeypatch: pytest.MonkeyPatch,
    capfd: pytest.CaptureFixture[str],
) -> None:
    """A draft path broken on purpose (tests/broken_adapter.py: tables read in the wrong order, or KV
    written into blocks the draft does not own) fails the start-up self-check: one warning line names the
    backend and what differed, `vllm:std_drafter_faults_total{stage="self_check"}` is 1, and the engine
    serves every request without a draft, with the outputs of an engine without speculation."""
    requests, expected = two_videos
    monkeypatch.setenv("STD_TEST_BREAK", broken)
    broken_drafter = {"worker_extension_cls": "broken_adapter.BrokenDrafter"}
    with engine("qwen2_vl", speculative_config=FAULT_SPEC, **broken_drafter) as llm:
        got = token_ids(llm.generate(requests, LONG))
        counters = spec_decode_counters(llm)
        std = std_metrics(llm)
    assert got == expected
    assert counters["num_drafts"] == 0
    assert std["drafter_faults"]["self_check"] == 1
    log = "".join(capfd.readouterr())
    failures = [line for line in log.splitlines() if "STD self-check failed" in line]
    assert len(failures) == 1
    assert "on the CPU_ATTN attention backend (" + error in failures[0]
    assert "STD is off for this engine, which serves without speculation" in failures[0]
    assert "STD on:" not in log


def test_full_graphs_that_cannot_be_captured_fall_back_to_the_piecewise_path(
    two_videos: tuple[list[dict], list[list[int]]],
    capfd: pytest.CaptureFixture[str],
) -> None:
    """Where STD's own full graphs of the draft step fail to capture (tests/full_graphs_on.py turns them on
    on this CPU, which has none), one warning line names the backend and the error, and the draft steps
    run as they would without them: the self-check passes on that path, requests are drafted, and the
    outputs equal no speculation's."""
    requests, expected = two_videos
    with engine(
        "qwen2_vl", speculative_config=FAULT_SPEC, worker_extension_cls="full_graphs_on.FullGraphsOn"
    ) as llm:
        got = token_ids(llm.generate(requests, LONG))
        counters = spec_decode_counters(llm)
        std = std_metrics(llm)
    assert got == expected
    assert counters["num_drafts"] > 0
    assert sum(std["drafter_faults"].values()) == 0
    log = "".join(capfd.readouterr())
    failures = [line for line in log.splitlines() if "full CUDA graphs of the draft step failed" in line]
    assert len(failures) == 1, failures
    assert "failed their capture on the CPU_ATTN attention backend (" in failures[0]
    assert "draft steps run eager instead" in failures[0]  # this CPU has no piecewise graphs either
    assert "CPU_ATTN, draft steps eager (self-check passed in" in log


def test_draft_steps_padded_as_for_cuda_graphs_are_lossless(
    two_videos: tuple[list[dict], list[list[int]]],
) -> None:
    """Draft batches padded to a graph size, as `RunnerView.draft_logits` pads them for vLLM's piecewise
    CUDA graphs on a GPU (tests/padded_drafts.py pads every one here, with the real padding code): the
    outputs equal no speculation's, and the drafts and acceptances equal unpadded drafting's."""
    requests, expected = two_videos
    runs = {}
    for name, extension in (
        ("plain", {}),
        ("padded", {"worker_extension_cls": "padded_drafts.PaddedDrafts"}),
    ):
        with engine("qwen2_vl", speculative_config=FAULT_SPEC, **extension) as llm:
            outputs = token_ids(llm.generate(requests, LONG))
            counters = spec_decode_counters(llm)
            padded_steps = llm.collective_rpc("padded_steps")[0] if extension else 0
        runs[name] = (outputs, counters["num_drafts"], counters["num_accepted_tokens"], padded_steps)
    assert runs["plain"][0] == runs["padded"][0] == expected
    assert runs["plain"][1:3] == runs["padded"][1:3] and runs["plain"][1] > 0
    assert runs["padded"][3] > 0  # the padding path ran (every drafter forward goes through it)


def test_layer_hooks_stand_still_while_a_graph_is_captured(
    two_videos: tuple[list[dict], list[list[int]]],
) -> None:
    """While a CUDA graph is captured (tests/graph_capture.py answers "capturing" for every step here), the
    layer hooks neither score nor raise; the step is still planned and closed without them (a step replayed
    as a full graph runs no hook): each prompt is left unscored as an incomplete capture, and decodes
    without sparse drafts, with the outputs of no speculation."""
    requests, expected = two_videos
    with engine(
        "qwen2_vl", speculative_config=FAULT_SPEC, worker_extension_cls="graph_capture.AlwaysCapturing"
    ) as llm:
        llm.collective_rpc("capture_forever")
        got = token_ids(llm.generate(requests, LONG))
        std = std_metrics(llm)
        report = drafter_report(llm)
    assert got == expected
    assert report["skip_counts"] == {"incomplete_capture": 2}
    assert report["history"] == []
    assert std["draft_tokens"].get("sparse", 0) == 0
    assert sum(std["drafter_faults"].values()) == 0
