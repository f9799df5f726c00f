"""`scripts/gpu_step_costs.py`, which made the GPU projection in docs/benchmarks.md, still runs and fits:
here on the CPU with a tiny decoder (on a GPU the same code replays CUDA graphs)."""

import json
import subprocess
import sys
from pathlib import Path

from vllm_std.cost_model import CostModel

ROOT = Path(__file__).resolve().parents[1]


def test_times_fits_and_projects(tmp_path: Path) -> None:
    args = ["--tiny", "--contexts", "1024,2048", "--batches", "1,2", "--queries", "1,3", "--repeats", "2"]
    script = ROOT / "scripts" / "gpu_step_costs.py"
    subprocess.run([sys.executable, str(script), "--out", str(tmp_path), *args], check=True, timeout=300)
    result = json.loads((tmp_path / "step_costs.json").read_text())
    measured = {(s["batch"], s["context"], s["queries"], s["mode"]) for s in result["steps"]}
    assert len(measured) == len(result["steps"]) == 2 * 2 * 2 * 2
    assert all(s["seconds"] > 0 for s in result["steps"])
    profile = CostModel.from_json(result["profile"])
    assert profile.dense(1, 1024) > 0 and profile.verify(1, 1024, 2) > 0
    assert set(result["projection"]) == {"drafter_graph", "drafter_eager", "bandwidth_model"}
    # The paper's settings: 4 contexts x 2 batches x 4 acceptances per model.
    assert all(len(rows) == 32 for rows in result["projection"].values())
    table = (tmp_path / "projection.md").read_text().splitlines()
    assert table[0].startswith("| context | batch | drafter_graph, α 0.7")
    assert len(table) == 2 + 4 * 2
