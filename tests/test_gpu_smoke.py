"""benchmarks/gpu_smoke.py is run by hand on GPU nodes: these tests keep it from rotting on a CPU-only CI."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).parents[1] / "benchmarks" / "gpu_smoke.py"


def test_without_cuda_it_says_so_and_exits_2(capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: run the script itself")
    spec = importlib.util.spec_from_file_location("gpu_smoke", SCRIPT)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert script.main(["--lengths", "8192"]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err


def test_its_code_runs_on_the_cpu(tmp_path):
    """--cpu-check: the same code on gloo with a tiny Llama; every check passes, every figure is there."""
    out = tmp_path / "smoke.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_PORT": "29533"}
    subprocess.run([sys.executable, str(SCRIPT), "--cpu-check", "--hidden", "32", "--layers", "2", "--heads", "4",
                    "--kv-heads", "2", "--vocab", "256", "--lengths", "128", "--steps", "1", "--warmup", "0",
                    "--out", str(out)], check=True, env=env, timeout=300)
    report = json.loads(out.read_text())
    assert set(report["checks"]) == {"fsdp2", "fp32_masters", "loss_kernels", "flex_window"}
    assert all(check["ok"] for check in report["checks"].values()), report["checks"]
    assert report["checks"]["fp32_masters"]["changed_fraction"] > 0.99
    assert [(f["N"], f["scorer"]) for f in report["figures"]] == [(128, "none"), (128, "self"), (128, "frozen")]
    assert all(f["tokens_per_s_per_gpu"] > 0 for f in report["figures"])
