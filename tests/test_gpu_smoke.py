"""benchmarks/gpu_smoke.py is run by hand on GPU nodes: these tests keep it from rotting on a CPU-only CI."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).parents[1] / "benchmarks" / "gpu_smoke.py"
TINY = ["--cpu-check", "--hidden", "32", "--layers", "2", "--heads", "4", "--kv-heads", "2", "--vocab", "256",
        "--lengths", "128", "--steps", "1", "--warmup", "0"]


def test_without_cuda_it_says_so_and_exits_2(capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: run the script itself")
    spec = importlib.util.spec_from_file_location("gpu_smoke", SCRIPT)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert script.main(["--lengths", "8192"]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err


@pytest.mark.process
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


def _two_ranks_with_oom(tmp_path: Path, where: str, ranks: str, limit: float = 240) -> tuple[int, str, Path, float]:
    """torchrun, 2 gloo ranks, an out-of-memory error injected by tests/gpu_smoke_oom.py during the scorer=self
    measurement: (exit status, output, --out path, seconds). The whole process group is killed if it hangs."""
    out = tmp_path / "smoke.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(Path(__file__).parent / "gpu_smoke_oom.py"), where, ranks, str(SCRIPT), *TINY,
           "--oom-timeout", "10", "--out", str(out)]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        log, _ = proc.communicate(timeout=limit)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail(f"gpu_smoke.py hung after an out-of-memory error on rank(s) {ranks} ({where})")
    return proc.returncode, log, out, time.perf_counter() - start


def _rows(report: dict) -> dict:
    return {f["scorer"]: f for f in report["figures"]}


@pytest.mark.process
def test_an_oom_on_one_rank_is_agreed_on_and_reported(tmp_path):
    """Issue 19: rank 1 runs out of memory in AdamW's step of scorer=self (after the step's collectives).
    Before, rank 1 alone noted it and rank 0 reported a timing; now both ranks agree, rank 0 reports the
    OOM row, and the next measurement (frozen) runs normally on both."""
    status, log, out, _ = _two_ranks_with_oom(tmp_path, "optimizer", "1")
    assert status == 0, log
    rows = _rows(json.loads(out.read_text()))
    assert rows["self"] == {"N": 128, "n": 32, "scorer": "self", "oom": True, "oom_ranks": [1]}
    assert rows["none"]["tokens_per_s_per_gpu"] > 0 and rows["frozen"]["tokens_per_s_per_gpu"] > 0
    assert "out of memory on rank(s) [1]" in log


@pytest.mark.slow  # 25-30 s of torchrun ranks; the agreed-OOM case runs in CI
def test_an_oom_the_other_ranks_cannot_reach_ends_the_run_quickly(tmp_path):
    """Rank 1 runs out of memory before the step's first all-gather, where rank 0 waits for it: before, rank
    1 went on to the next measurement and its collectives paired with rank 0's (on NCCL: a hang until the
    timeout); now rank 1 waits --oom-timeout (10 s) for an agreement, writes its report with the OOM row
    and exits with status 3, which ends the job."""
    status, log, out, seconds = _two_ranks_with_oom(tmp_path, "start", "1")
    assert status != 0 and seconds < 120, log
    assert "exitcode  : 3" in log and "did not reach the agreement within --oom-timeout=10 s" in log
    report = json.loads(out.with_suffix(".rank1.json").read_text())
    row = report["figures"][-1]
    assert (row["scorer"], row["oom"], row["oom_ranks"]) == ("self", True, [1]) and "agreement" in row
    assert not out.exists()  # rank 0 never finished


@pytest.mark.slow  # 25-30 s of torchrun ranks; the agreed-OOM case runs in CI
def test_an_oom_on_every_rank_skips_the_rest(tmp_path):
    """Every rank out of memory: they may have stopped at different collectives, so nothing else is measured."""
    status, log, out, _ = _two_ranks_with_oom(tmp_path, "start", "0,1")
    assert status == 0, log
    rows = _rows(json.loads(out.read_text()))
    assert rows["self"]["oom_ranks"] == [0, 1]
    assert rows["frozen"]["skipped"].startswith("every rank ran out of memory at N=128, scorer=self")
