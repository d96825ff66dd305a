"""scripts/gpu_check.sh on a machine without CUDA: a summary that says so, nothing else run, exit status 0."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(torch.cuda.is_available(), reason="with CUDA the check runs for minutes: run it by hand")
def test_without_cuda_the_check_says_so_and_exits_0(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "OUT": str(out), "PYTHON": sys.executable}
    result = subprocess.run(["bash", "scripts/gpu_check.sh"], cwd=REPO, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert [p.name for p in out.iterdir()] == ["summary.md"]
    summary = (out / "summary.md").read_text()
    assert f"**no CUDA**: torch {torch.__version__} sees no GPU here, so nothing ran" in summary
    assert "| step | status | seconds | log |" in summary and "| tests |" not in summary
