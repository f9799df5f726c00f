"""`vllm-std bench`: its arithmetic on hand-made records, and (slow) one real run of the command."""

import argparse
import json
import subprocess
import sys
import tomllib
from pathlib import Path

import numpy as np
import pytest

from vllm_std.bench import command
from vllm_std.bench.analysis import (
    conditional_acceptance,
    exit_status,
    fit_cost_model,
    method_records,
    pooled_speedups,
    step_costs,
    summarize,
)
from vllm_std.bench.command import add_arguments, sample_methods
from vllm_std.bench.engines import Batch, VideoQuestion, figures, snapshot
from vllm_std.bench.methods import BASELINES, Method, Workload, methods, suffix_decoding_installed
from vllm_std.bench.report import markdown, markdown_table, pooled_table
from vllm_std.bench.workloads import LookupQuestions, lookup_episode


def test_methods_sweep_gamma_and_k_and_run_baselines_at_the_first() -> None:
    plan = methods(
        ["none", "std", "adaptive", "adaptive_sparse", "ngram", "suffix", *BASELINES],
        [2, 4],
        [256, 1024],
    )
    assert [m.label for m in plan] == [
        "none",
        "adaptive g<=4 K256",
        "adaptive g<=4 K256 sparse only",
        "std g2 K256",
        "std g4 K256",
        "std g2 K1024",
        "ngram g2",
        "suffix g2",
        "streaming g2 K256",
        "recent_visual g2 K256",
        "random g2 K256",
        "adaptive g<=4 K256 again",
        "none again",
    ]
    assert Method("x", "streaming", 4, 256).speculative_config() == {
        "method": "std",
        "num_speculative_tokens": 4,
        "top_k": 256,
        "selection": "streaming",
        "adaptive": False,
    }
    assert Method("x", "adaptive", 6, 256).speculative_config() == {
        "method": "std",
        "num_speculative_tokens": 6,
        "top_k": 256,
        "selection": "attention",
        "adaptive": True,
    }
    assert Method("x", "adaptive_sparse", 6, 256).speculative_config() == Method(
        "x", "adaptive", 6, 256
    ).speculative_config() | {"lookup": False}
    assert Method("none", "none").speculative_config() is None
    assert Method("x", "suffix", 4).speculative_config() == {"method": "suffix", "num_speculative_tokens": 4}


def test_std_onehot_is_std_verifying_argmax_drafts_as_one_hot() -> None:
    """`std_onehot`: fixed-gamma STD with `"draft_probs": false`, once at the first gamma and K, right after
    the `std` sweep, and only when `--methods` names it."""
    assert Method("x", "std_onehot", 4, 256).speculative_config() == Method(
        "x", "std", 4, 256
    ).speculative_config() | {"draft_probs": False}
    plan = methods(["none", "std", "std_onehot", "ngram"], [2, 4], [256])
    assert [(m.label, m.kind) for m in plan][1:4] == [
        ("std g2 K256", "std"),
        ("std g4 K256", "std"),
        ("std-onehot g2 K256", "std_onehot"),
    ]
    assert "std_onehot" not in {m.kind for m in command._plan(_bench_args())}
    assert [m.kind for m in command._plan(_bench_args("--methods", "none,std_onehot"))] == [
        "none",
        "std_onehot",
        "none",
    ]


def test_default_plan_has_adaptive_std_with_and_without_look_ups() -> None:
    """By default adaptive STD runs with look-up drafts and, right after, without them (sparse drafts only),
    beside ngram; only the first has a second engine (`... again`), which the pooled table pairs with it."""
    plan = command._plan(_bench_args("--gamma", "4,6", "--top-k", "1024"))
    labels = [m.label for m in plan]
    assert labels[:3] == ["none", "adaptive g<=6 K1024", "adaptive g<=6 K1024 sparse only"]
    assert plan[2] == Method("adaptive g<=6 K1024 sparse only", "adaptive_sparse", 6, 1024)
    assert "ngram g4" in labels and labels[-2:] == ["adaptive g<=6 K1024 again", "none again"]
    assert [m.label for m in plan if m.label.endswith(" again")] == labels[-2:]


def _bench_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(list(argv))


@pytest.mark.parametrize("installed", [True, False])
def test_suffix_decoding_runs_where_arctic_inference_is_installed(
    installed: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The default methods include vLLM's suffix decoding only where it can run; asking for it where it
    cannot stops the bench at once, with the install line."""
    monkeypatch.setattr(command, "suffix_decoding_installed", lambda: installed)
    assert ("suffix" in {m.kind for m in command._plan(_bench_args())}) == installed
    asked = _bench_args("--methods", "none,suffix")
    if installed:
        assert [m.label for m in command._plan(asked)] == ["none", "suffix g4", "none again"]
    else:
        with pytest.raises(SystemExit, match="pip install arctic-inference"):
            command._plan(asked)


def test_temperature_argument(capsys: pytest.CaptureFixture[str]) -> None:
    """`--temperature`: greedy by default; a negative one is a usage error that says what is expected."""
    assert _bench_args().temperature == 0.0
    assert _bench_args("--temperature", "0.7").temperature == 0.7
    with pytest.raises(SystemExit):
        _bench_args("--temperature", "-0.5")
    assert "argument --temperature: expected a number >= 0 (0: greedy), got '-0.5'" in capsys.readouterr().err


def test_servers_replace_the_methods(capsys: pytest.CaptureFixture[str]) -> None:
    """Each `--server LABEL=URL` is one method, in the order given; a malformed one is a usage error."""
    args = _bench_args("--server", "none=http://127.0.0.1:8000/", "--server", "std=http://10.0.0.2:8001")
    assert args.server == [("none", "http://127.0.0.1:8000"), ("std", "http://10.0.0.2:8001")]
    assert command._plan(args) == [Method("none", "server"), Method("std", "server")]
    with pytest.raises(SystemExit):
        _bench_args("--server", "127.0.0.1:8000")
    assert "expected LABEL=URL" in capsys.readouterr().err


def test_conditional_acceptance() -> None:
    assert conditional_acceptance([0.8, 0.4, 0.1]) == pytest.approx([0.8, 0.5, 0.25])
    assert conditional_acceptance([0.5, 0.0, 0.0]) == [0.5, 0.0, 0.0]
    assert conditional_acceptance([]) == []


def _record(kind: str, batch: int, prompt: float, tpot: float, **extra: float) -> dict:
    return dict(kind=kind, batch=batch, prompt_tokens=prompt, tpot_seconds=tpot, output_tokens=16, **extra)


def test_fit_cost_model_from_records() -> None:
    """Dense steps from runs without speculation; draft and verify step costs from STD's."""
    dense = [
        _record("none", b, p, 0.003 + 0.001 * b + 1e-6 * b * (p + 8)) for b in (1, 4) for p in (1000, 8000)
    ]
    std = []
    for b in (1, 4):
        for p in (1000, 8000):
            # Two batches of 5 rounds each: a request's decode time is half the workload's.
            r = _record("std", b, p, 0.0, gamma=4, sparse_context=300.0, draft_steps=10, batches=2)
            r |= {"decode_seconds": 5 * (4 * 0.004 + 0.02 + 1e-6 * b * p), "draft_seconds": 10 * 4 * 0.004}
            step_costs(r, 4)
            assert r["verify_step_seconds"] == pytest.approx(0.02 + 1e-6 * b * p)
            std.append(r)
    model = fit_cost_model(dense + std)
    assert model is not None
    assert model.dense(1, 1008) == pytest.approx(0.003 + 0.001 + 1e-6 * 1008, rel=1e-6)
    assert model.draft(1, 308) == pytest.approx(0.004, rel=1e-6)
    assert fit_cost_model(dense) is None


def test_markdown_table_marks_differing_output() -> None:
    records = [
        {
            "method": "none",
            "workload": "1k x1",
            "acceptance_rate": None,
            "speedup_tpot": 1.0,
            "identical_to_no_speculation": True,
        },
        {
            "method": "std g4 K256",
            "workload": "1k x1",
            "acceptance_rate": 0.5,
            "speedup_tpot": 1.25,
            "predicted_speedup": 1.2,
            "identical_to_no_speculation": False,
        },
    ]
    table = markdown_table(records)
    assert "| none | — / 1.00x |" in table
    assert "| std g4 K256 | 50 % / 1.25x (1.20x) ✗ |" in table


def test_pooled_speedups_pair_each_method_with_its_repeat() -> None:
    """Both runs of no speculation against the method's two, from the means and batch by batch (median);
    methods run once are left out; the second run without speculation against the first is the noise."""
    records = [
        {"method": m, "kind": k, "workload": "1k x1", "tpot_seconds": sum(t) / 3, "tpot_seconds_by_batch": t}
        for m, k, t in [
            ("none", "none", [0.010, 0.010, 0.010]),
            ("adaptive g<=6 K256", "adaptive", [0.009, 0.009, 0.009]),
            ("adaptive g<=6 K256 sparse only", "adaptive_sparse", [0.009, 0.009, 0.009]),  # run once
            ("std g6 K256", "std", [0.008, 0.008, 0.008]),
            ("adaptive g<=6 K256 again", "adaptive", [0.011, 0.011, 0.042]),  # a stall in its last batch
            ("none again", "none", [0.014, 0.014, 0.014]),
        ]
    ]
    pooled = pooled_speedups(records)
    assert [(p["method"], p["workload"]) for p in pooled] == [
        ("adaptive g<=6 K256", "1k x1"),
        ("none again", "1k x1"),
    ]
    adaptive, noise = pooled
    assert adaptive["speedup_tpot"] == pytest.approx(0.072 / 0.091)
    assert adaptive["speedup_tpot_by_batch"] == pytest.approx([1.2, 1.2, 0.024 / 0.051])
    assert adaptive["speedup_tpot_median"] == pytest.approx(1.2)
    assert noise["speedup_tpot"] == noise["speedup_tpot_median"] == pytest.approx(0.010 / 0.014)
    table = pooled_table(pooled)
    assert "| adaptive g<=6 K256 | 0.79x / 1.20x |" in table and "| none again | 0.71x / 0.71x |" in table
    assert pooled_table([]) == ""


class _Engine:
    """Stands in for `EngineProcess` (a real one is a vLLM engine): logs what it runs, answers with a sample
    whose time per output token is its call count."""

    def __init__(self, label: str, log: list[tuple[str, str, int]]) -> None:
        self.label, self.log, self.closed = label, log, False

    def sample(self, batch: Batch, output_len: int, turns: int = 1) -> list[dict]:
        self.log.append((self.label, batch[0].question, output_len))
        return [{"tpot": (1, float(len(self.log))), "turn": t} for t in range(1, turns + 1)]

    def close(self) -> None:
        self.closed = True


@pytest.mark.parametrize("interleaved", [True, False])
def test_sample_methods_take_turns_and_warm_up_each_workload(interleaved: bool) -> None:
    """Interleaved, every round's batch runs on each engine in turn, the order reversed every other round,
    after one unmeasured batch of each workload's shape; sequential, one engine runs every round."""
    plan = [Method("none", "none"), Method("std g2 K64", "std", 2, 64)]
    rounds = [(Workload(1024, 1), 0), (Workload(1024, 1), 1000), (Workload(4096, 1), 2000)]
    log: list[tuple[str, str, int]] = []
    engines: list[_Engine] = []

    def start(m: Method) -> _Engine:
        engines.append(_Engine(m.label, log))
        return engines[-1]

    samples = sample_methods(
        plan,
        rounds,
        start,
        lambda w, seed: [VideoQuestion(f"{w.label} {seed}", np.zeros(0), 0)],
        64,
        interleaved,
    )
    warm, measured = [e for e in log if e[2] == 8], [e for e in log if e[2] == 64]
    assert {w[1] for w in warm} == {"1k x1 1000000", "4k x1 1002000"} and len(warm) == 4
    if interleaved:
        assert [(label, prompt) for label, prompt, _ in measured] == [
            ("none", "1k x1 0"),
            ("std g2 K64", "1k x1 0"),
            ("std g2 K64", "1k x1 1000"),
            ("none", "1k x1 1000"),
            ("none", "4k x1 2000"),
            ("std g2 K64", "4k x1 2000"),
        ]
    else:
        assert [label for label, *_ in measured] == ["none"] * 3 + ["std g2 K64"] * 3
    assert all(e.closed for e in engines) and len(engines) == 2
    assert [len(samples[m.label, "1k x1"]) for m in plan] == [2, 2]


def test_each_turn_of_a_conversation_is_a_workload() -> None:
    """With `--turns`, an engine runs a batch's conversations at once; each turn's sample goes to the
    workload of that turn."""
    log: list[tuple[str, str, int]] = []
    questions = lambda w, seed: [VideoQuestion(f"{w.label} {seed}", np.zeros(0), 0)]  # noqa: E731
    start = lambda m: _Engine(m.label, log)  # noqa: E731
    rounds = [(Workload(1024, 4), 0), (Workload(1024, 4), 1000)]
    samples = sample_methods([Method("none", "none")], rounds, start, questions, 64, True, turns=3)
    assert set(samples) == {("none", "1k x4"), ("none", "1k x4 turn 2"), ("none", "1k x4 turn 3")}
    assert [s["turn"] for s in samples["none", "1k x4 turn 3"]] == [3, 3]
    assert Workload(8192, 4).turns(2) == [Workload(8192, 4), Workload(8192, 4, turn=2)]


SOURCES = ("sparse", "lookup")


def _batch(ids: list[int], tpot: float, drafts: int, accepted: int) -> dict:
    """One request's batch as `vllm_std.bench.engines.sample` returns it."""
    return {
        "token_ids": [ids],
        "prompt_tokens": [100],
        "wall_seconds": 1.0,
        "tpot": (1, tpot),
        "decode": (1, tpot * len(ids)),
        "drafts": drafts,
        "draft_tokens": 2 * drafts,
        "accepted_tokens": accepted,
        "accepted_per_pos": [accepted, 0],
        "draft_time": (drafts, 0.01 * drafts),
        "chosen_gamma": None,
        "gamma_decisions": dict.fromkeys(("fixed", "paying", "probe", "not_paying"), None),
        "draft_tokens_by_source": {"sparse": 2 * drafts, "lookup": 0} if drafts else dict.fromkeys(SOURCES),
    }


def test_summarize_pools_batches() -> None:
    """Counters and histograms add up over a workload's batches; outputs are concatenated in order."""
    record = summarize([_batch([1, 2], 0.01, 4, 2), _batch([3, 4], 0.03, 6, 3)])
    assert record["token_ids"] == [[1, 2], [3, 4]]
    assert record["tpot_seconds"] == pytest.approx(0.02)
    assert record["tpot_seconds_by_batch"] == pytest.approx([0.01, 0.03])
    assert record["acceptance_rate"] == pytest.approx(5 / 20)
    assert record["accepted_at"] == pytest.approx([0.5, 0.0])
    assert record["draft_steps"] == 10 and record["batches"] == 2
    assert record["output_tokens_per_second"] == pytest.approx(2.0)
    assert record["mean_chosen_gamma"] is None


@pytest.mark.parametrize("temperature", [0.0, 0.7])
def test_sampled_outputs_are_not_compared_with_no_speculation(temperature: float) -> None:
    """Greedy, an output that differs from no speculation's is marked and fails the command; sampled, it
    differs legitimately: not compared (None), not marked, the command passes, and `bench.md` says so once,
    above the table."""
    plan = [Method("none", "none"), Method("std g2 K64", "std", 2, 64)]
    samples = {
        ("none", "1k x1"): [_batch([1, 2], 0.02, 0, 0)],
        ("std g2 K64", "1k x1"): [_batch([1, 3], 0.01, 1, 1)],
    }
    records = method_records(plan, [Workload(1024, 1)], samples, temperature)
    result = {
        "model": "m",
        "environment": {"vllm": "0.32.0", "cpus": 2},
        "command": vars(_bench_args("--temperature", str(temperature))),
        "records": records,
        "pooled": [],
    }
    report = markdown(result)
    std_row = next(line for line in report.splitlines() if line.startswith("| std g2 K64 | 50 % / "))
    identical = [r["identical_to_no_speculation"] for r in records]
    if temperature == 0:
        assert identical == [True, False] and exit_status(records) == 1
        assert std_row.endswith(" ✗ |")
    else:
        assert identical == [None, None] and exit_status(records) == 0
        assert "✗" not in report
        note = "Outputs sampled at temperature 0.7, so not compared token by token"
        assert report.count(note) == 1 and report.index(note) < report.index("| method |")


def test_one_pass_answers_hold_no_token_twice() -> None:
    """A one-pass request asks about the only clip of its video, one of every content word, and its output is
    capped at the answer's end (the marker's name, then the clip's words), where no token has come twice:
    nothing to copy from the text before it. Cycling requests stay the fixture's default episodes."""
    from transformers import AutoTokenizer

    from vllm_std.fixtures.sparse import CONTENT_WORDS, sparse_episode, sparse_model

    model = str(sparse_model())
    tokenizer = AutoTokenizer.from_pretrained(model)
    one_pass = Workload(2048, 2, answers="one-pass")
    requests = LookupQuestions(model).requests(one_pass, 3000)
    assert [q.max_tokens for q in requests] == [len(CONTENT_WORDS) + 1] * 2 == [49, 49]
    assert [q.output_len(64) for q in requests] == [49, 49] and requests[0].output_len(16) == 16
    for i, q in enumerate(requests):
        episode = lookup_episode(one_pass, 3000 + i)
        assert episode.markers() == [episode.marker] and len(episode.cycle) == len(CONTENT_WORDS)
        answer = tokenizer.encode("".join(" " + w for w in episode.answer_words(q.max_tokens)))
        assert len(answer) == len(set(answer)) == 49
        assert len(q.frames) == 2 * 2048  # one visual token a tile, two frames a tile
    cycling = LookupQuestions(model).requests(Workload(2048, 1), 3000)[0]
    assert cycling.max_tokens is None and cycling.output_len(64) == 64
    default, asked = sparse_episode(2048, 3000), lookup_episode(Workload(2048, 1), 3000)
    assert asked.cycle == default.cycle and np.array_equal(asked.tiles, default.tiles)


def test_workload_labels() -> None:
    """Cycling workloads keep the labels of earlier tables; one-pass ones say so, before the turn."""
    assert Workload(4096, 4).label == "4k x4"
    assert Workload(4096, 4, answers="one-pass").label == "4k x4 one-pass"
    assert Workload(512, 1, answers="one-pass").label == "512 x1 one-pass"
    assert Workload(8192, 4, turn=2).label == "8k x4 turn 2"


def test_answers_argument(capsys: pytest.CaptureFixture[str]) -> None:
    """`--answers`: by default both workloads on the look-up fixture (cycling only with follow-ups), cycling
    for other models; one-pass is refused, in one line, for other models and with follow-ups."""
    assert _bench_args("--answers", "one-pass,cycling,one-pass").answers == ["one-pass", "cycling"]
    with pytest.raises(SystemExit):
        _bench_args("--answers", "cycling,once")
    assert "argument --answers: expected comma-separated cycling, one-pass; got 'cycling,once'" in (
        capsys.readouterr().err
    )
    assert command._answers(_bench_args(), lookup=True) == ["cycling", "one-pass"]
    assert command._answers(_bench_args("--turns", "2"), lookup=True) == ["cycling"]
    assert command._answers(_bench_args(), lookup=False) == ["cycling"]
    assert command._answers(_bench_args("--answers", "cycling"), lookup=False) == ["cycling"]
    other = _bench_args("--answers", "cycling,one-pass", "--model", "Qwen/Qwen2-VL-2B-Instruct")
    refusal = "vllm-std bench: error: argument --answers: one-pass needs the look-up fixture"
    with pytest.raises(SystemExit, match=refusal) as refused:
        command._answers(other, lookup=False)
    assert "\n" not in str(refused.value) and str(refused.value).endswith("not Qwen/Qwen2-VL-2B-Instruct")
    with pytest.raises(SystemExit, match="one-pass has no follow-ups"):
        command._answers(_bench_args("--answers", "one-pass", "--turns", "2"), lookup=True)


class _Metrics:
    """What `snapshot` reads of an offline `LLM`: its `get_metrics()`, here a fixed list of vLLM's own metric
    records (`vllm.v1.metrics.reader`), as an engine with STD's counters reports them."""

    def __init__(self, metrics: list) -> None:
        self.metrics = metrics

    def get_metrics(self) -> list:
        return self.metrics


def _engine_metrics(sparse: int, lookup: int, finished: int) -> _Metrics:
    """An engine's metrics after `finished` requests of 49 tokens at 10 ms a token, with these draft tokens
    (all accepted) by source."""
    from vllm.v1.metrics.reader import Counter, Histogram, Vector

    labels = {"engine": "0", "model_name": "m"}
    rounds = (sparse + lookup) // 4  # of 4 drafts each
    return _Metrics(
        [
            Histogram("vllm:request_time_per_output_token_seconds", labels, finished, 0.01 * finished, {}),
            Histogram("vllm:request_decode_time_seconds", labels, finished, 0.49 * finished, {}),
            Counter("vllm:spec_decode_num_drafts", labels, rounds),
            Counter("vllm:spec_decode_num_draft_tokens", labels, sparse + lookup),
            Counter("vllm:spec_decode_num_accepted_tokens", labels, sparse + lookup),
            Vector("vllm:spec_decode_num_accepted_tokens_per_pos", labels, [rounds] * 4),
            Counter("vllm:std_draft_tokens", labels | {"source": "sparse"}, sparse),
            Counter("vllm:std_draft_tokens", labels | {"source": "lookup"}, lookup),
            Counter("vllm:std_gamma_decisions", labels | {"decision": "paying"}, rounds),
        ]
    )


def test_draft_tokens_by_source_reach_the_record_and_the_table() -> None:
    """STD's draft tokens by source are differenced around a batch like its decisions by reason, pooled over
    a workload's batches, kept in the record (bench.json) with the look-up share, and shown in the cell of a
    method whose drafts include look-ups."""
    before = snapshot(_engine_metrics(0, 0, 0))
    batches = [
        figures(snapshot(_engine_metrics(sparse, lookup, 1)), before)
        for sparse, lookup in [(20, 0), (16, 64)]
    ]
    assert batches[1]["draft_tokens_by_source"] == {"sparse": 16, "lookup": 64}
    assert batches[1]["gamma_decisions"]["paying"] == 20 and batches[1]["draft_tokens"] == 80
    outputs = {"token_ids": [list(range(49))], "prompt_tokens": [4100], "wall_seconds": 1.0}
    samples = {
        ("none", "4k x1 one-pass"): [_batch(list(range(49)), 0.02, 0, 0) for _ in batches],
        ("adaptive", "4k x1 one-pass"): [b | outputs for b in batches],
    }
    plan = [Method("none", "none"), Method("adaptive", "adaptive", 6, 1024)]
    records = method_records(plan, [Workload(4096, 1, answers="one-pass")], samples, 0.0)
    none, adaptive = records
    assert adaptive["draft_tokens_by_source"] == {"sparse": 36, "lookup": 64}
    assert adaptive["lookup_share"] == pytest.approx(0.64) and none["lookup_share"] is None
    assert adaptive["answers"] == "one-pass" and adaptive["output_tokens"] == 49
    assert adaptive["mean_acceptance_length"] == 5.0
    table = markdown_table(records)
    assert "| adaptive | 100 % / 2.00x · 64 % look-up |" in table and "| none | — / 1.00x |" in table
    result = {
        "model": "m",
        "environment": {"vllm": "0.32.0", "cpus": 2},
        "command": vars(_bench_args()),
        "records": records,
        "pooled": [],
    }
    report = markdown(result)
    note = "`one-pass`: each video has one marked clip of all 48 content words"
    assert report.count(note) == 1 and report.index("| adaptive |") < report.index(note)
    assert "49 tokens a request here" in report


def test_the_run_records_the_code_it_measured() -> None:
    """A published run names vllm-std's version and, installed from a checkout, its commit (`+` when the
    package has uncommitted changes); `bench.md` says both above the table."""
    env = command.environment()
    root = Path(command.__file__).resolve().parents[2]
    head = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True)
    if head.returncode != 0:
        pytest.skip("vllm-std is not installed from a git checkout")
    dirty = subprocess.run(
        ["git", "-C", str(root), "status", "--porcelain", "--", "vllm_std"], capture_output=True, text=True
    ).stdout.strip()
    assert env["vllm_std_commit"] == head.stdout.strip() + ("+" if dirty else "")
    version = tomllib.loads((root / "pyproject.toml").read_text())["project"]["version"]
    assert env["vllm_std"] == version
    result = {"model": "m", "environment": env, "command": vars(_bench_args()), "records": [], "pooled": []}
    commit = env["vllm_std_commit"]
    assert f"; vllm-std {version} at `{commit[:12]}{commit[40:]}`, vLLM 0.32.0, " in markdown(result)


@pytest.mark.slow
def test_bench_command(tmp_path: Path) -> None:
    """The documented command on the smallest sweep: every method's output equals no speculation's, and the
    JSON, the table and the plots are written."""
    out = tmp_path / "bench"
    cmd = [
        str(Path(sys.executable).with_name("vllm-std")),
        "bench",
        "--visual-tokens",
        "512",
        "--batch",
        "1,2",
    ]
    cmd += ["--gamma", "2,4", "--top-k", "256", "--output-len", "16", "--repeats", "2", "--out", str(out)]
    cmd += ["--turns", "2"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=3000)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads((out / "bench.json").read_text())
    kinds = {r["kind"] for r in result["records"]}
    suffix = {"suffix"} if suffix_decoding_installed() else set()
    assert kinds == {"none", "std", "adaptive", "adaptive_sparse", "ngram", *BASELINES, *suffix}
    assert all(r["identical_to_no_speculation"] for r in result["records"])
    assert {r["workload"] for r in result["records"]} == {
        "512 x1",
        "512 x2",
        "512 x1 turn 2",
        "512 x2 turn 2",
    }
    assert result["cost_model"] is not None
    assert (out / "bench.md").exists() and (out / "speedup_vs_gamma.png").exists()
