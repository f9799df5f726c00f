"""`vllm-std bench`: its arithmetic on hand-made records, and (slow) one real run of the command."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from vllm_std.bench import (
    Method,
    conditional_acceptance,
    fit_cost_model,
    methods,
    pooled_speedups,
    step_costs,
)
from vllm_std.bench_report import markdown_table, pooled_table


def test_methods_sweep_gamma_and_k_and_run_baselines_at_the_first() -> None:
    plan = methods(["none", "std", "adaptive", "ngram", "streaming", "random"], [2, 4], [256, 1024])
    assert [m.label for m in plan] == [
        "none",
        "adaptive g<=4 K256",
        "std g2 K256",
        "std g4 K256",
        "std g2 K1024",
        "ngram g2",
        "streaming g2 K256",
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
    assert Method("none", "none").speculative_config() is None


def test_conditional_acceptance() -> None:
    assert conditional_acceptance([0.8, 0.4, 0.1]) == pytest.approx([0.8, 0.5, 0.25])
    assert conditional_acceptance([0.5, 0.0, 0.0]) == [0.5, 0.0, 0.0]
    assert conditional_acceptance([]) == []


def _record(kind: str, batch: int, prompt: float, tpot: float, **extra: float) -> dict:
    return {"kind": kind, "batch": batch, "prompt_tokens": prompt, "tpot_seconds": tpot, **extra}


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
    model = fit_cost_model(dense + std, output_len=16)
    assert model is not None
    assert model.dense(1, 1008) == pytest.approx(0.003 + 0.001 + 1e-6 * 1008, rel=1e-6)
    assert model.draft(1, 308) == pytest.approx(0.004, rel=1e-6)
    assert fit_cost_model(dense, output_len=16) is None


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
    """Mean over both runs of no speculation against the method's two; methods run once are left out."""
    records = [
        {"method": m, "kind": k, "workload": "1k x1", "tpot_seconds": t}
        for m, k, t in [
            ("none", "none", 0.010),
            ("adaptive g<=6 K256", "adaptive", 0.009),
            ("std g6 K256", "std", 0.008),
            ("adaptive g<=6 K256 again", "adaptive", 0.011),
            ("none again", "none", 0.014),
        ]
    ]
    pooled = pooled_speedups(records)
    assert pooled == [
        {"method": "adaptive g<=6 K256", "workload": "1k x1", "speedup_tpot": pytest.approx(1.2)}
    ]
    assert "| adaptive g<=6 K256 | 1.20x |" in pooled_table(pooled)
    assert pooled_table([]) == ""


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
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=3000)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads((out / "bench.json").read_text())
    kinds = {r["kind"] for r in result["records"]}
    assert kinds == {"none", "std", "adaptive", "ngram", "streaming", "random"}
    assert all(r["identical_to_no_speculation"] for r in result["records"])
    assert result["cost_model"] is not None
    assert (out / "bench.md").exists() and (out / "speedup_vs_gamma.png").exists()
