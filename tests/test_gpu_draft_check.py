"""`scripts/gpu_draft_check.py`, the check to run on a GPU machine without vLLM, runs its CPU-runnable
parts here at a tiny shape: with its pure-torch attention, and with vLLM's Triton kernel carried out of
the installed vLLM by its `prepare` step (stubbed vLLM names only) and run under Triton's interpreter."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_draft_check.py"
TINY = [
    "--tiny",
    "--batches",
    "1,2",
    "--contexts",
    "512,1024",
    "--repeats",
    "1",
    "--top-k",
    "128",
    "--text",
    "32",
]


def run(tmp_path: Path, *args: str) -> dict:
    out = tmp_path / "check.json"
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    subprocess.run(
        [sys.executable, str(SCRIPT), "run", *TINY, "--out", str(out), *args],
        check=True,
        env=env,
        timeout=600,
    )
    return json.loads(out.read_text())


def test_checks_time_and_project_with_torch_attention(tmp_path: Path) -> None:
    report = run(tmp_path)
    assert report["attention"] == "torch-gather"  # vLLM turns Triton off on a CPU
    assert report["checks"]["graph_vs_eager"] <= 2e-2
    assert report["checks"]["piecewise_vs_eager"] <= 2e-2
    assert report["checks"]["slots_changed_outside_true_slots"] == 0
    assert report["checks"]["failed"] == []
    kinds = {(s["kind"], s["mode"], s["batch"], s["context"]) for s in report["steps"]}
    # per setting: dense, verify as vLLM launches it and packed, draft as one graph, as pieces and op by op;
    # per batch: the weights-only step
    assert len(kinds) == len(report["steps"]) == 6 * 2 * 2 + 2
    assert all(s["bandwidth_bound_ratio"] > 0 for s in report["steps"])
    assert set(report["projection"]) == {"graph drafts", "piecewise drafts", "eager drafts"}
    assert {(r["batch"], r["alpha"]) for r in report["projection"]["piecewise drafts"]} == {
        (1, 0.8),
        (1, 0.9),
        (2, 0.8),
        (2, 0.9),
    }
    assert {(r["batch"], r["context"], r["drafts"]) for r in report["measured"]} == {
        (b, c, m) for b in (1, 2) for c in (512, 1024) for m in ("graph", "piecewise", "eager")
    }


@pytest.mark.slow  # about 140 s under Triton's interpreter; the pure-torch path above runs by default
def test_prepared_kernel_runs_without_vllm_and_matches_torch(tmp_path: Path) -> None:
    kernels = tmp_path / "kernels"
    subprocess.run(
        [sys.executable, str(SCRIPT), "prepare", "--kernel-dir", str(kernels)], check=True, timeout=300
    )
    files = [p for p in kernels.rglob("*.py")]
    assert sum(p.stat().st_size for p in files) < 128 * 1024
    # float16: Triton's CPU interpreter reads bf16 wrongly (numpy has no bf16); the GPU run uses bf16.
    report = run(
        tmp_path, "--kernel-dir", str(kernels), "--batches", "1", "--contexts", "512", "--dtype", "float16"
    )
    assert report["attention"] == "vllm-triton"
    assert report["checks"]["failed"] == []
    assert report["checks"]["kernel_vs_torch"] <= 2e-2
    assert report["checks"]["piecewise_vs_eager"] <= 2e-2
    assert report["checks"]["slots_changed_outside_true_slots"] == 0
