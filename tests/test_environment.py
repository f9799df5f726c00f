"""The CPU environment the README builds works, not just installs (the end state of scripts/setup-cpu.sh)."""

import importlib.metadata
import subprocess
import sys
from pathlib import Path

import pytest

from vllm_std import doctor

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", list(doctor.CHECKS))
def test_doctor_check_passes(name: str) -> None:
    doctor.CHECKS[name]()


def test_torchvision_imports_beside_cpu_torch() -> None:
    import torch
    import torchvision.transforms.v2.functional as tvF

    assert torch.version.cuda is None, "a CUDA torch was pulled into the CPU environment"
    resized = tvF.resize(torch.zeros(3, 8, 8), [4, 4])
    assert resized.shape == (3, 4, 4)


def test_vllm_serve_help_runs() -> None:
    """`vllm serve` (not only `--version`) starts its CLI with the plugin loaded."""
    exe = Path(sys.executable).with_name("vllm")
    out = subprocess.run([exe, "serve", "--help=Speculative"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "--speculative-config" in out.stdout


def test_plugin_entry_point_is_declared() -> None:
    eps = importlib.metadata.entry_points(group="vllm.general_plugins")
    assert {ep.name: ep.value for ep in eps}.get("std") == "vllm_std.plugin:register"


def test_ci_runs_the_readme_test_command() -> None:
    readme = (REPO / "README.md").read_text()
    ci = [
        line.strip()
        for line in (REPO / ".ci" / "run").read_text().splitlines()
        if line.strip() and not line.lstrip().startswith("#") and not line.startswith(("set ", "cd "))
    ]
    assert ci == ["bash scripts/test.sh"]
    assert "bash scripts/test.sh" in readme
    assert "bash scripts/demo.sh" in readme
