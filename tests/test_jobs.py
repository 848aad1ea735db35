"""Nothing is lost or mixed: a directory per run even when runs start together, a status for every run
(failures included, with the error in train.log), and a sweep that survives a failing job."""

import json
import os
import subprocess
import sys

import pytest
from conftest import ROOT, SMALL

QUICK = [*SMALL, "trainer.max_steps=1", "trainer.val_check_interval=1", "trainer.limit_val_batches=1",
         "validate_first=false", "callbacks=none"]


def env(cache_dir):
    return {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline",
            "LCTW_CACHE": cache_dir}


@pytest.mark.process
def test_four_runs_started_together_get_four_directories(cache_dir, tmp_path):
    lams = ["0.1", "0.3", "0.6", "0.9"]
    procs = [subprocess.Popen([sys.executable, os.path.join(ROOT, "train.py"), *QUICK, f"weighting.lam={lam}",
                               f"paths.cache={cache_dir}"], cwd=tmp_path, env=env(cache_dir),
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for lam in lams]
    errors = [p.communicate(timeout=600)[1] for p in procs]
    assert all(p.returncode == 0 for p in procs), [e[-2000:] for e in errors]
    runs = sorted((tmp_path / "outputs" / "runs").glob("*/*"))
    assert len(runs) == 4
    seen = set()
    for run in runs:
        overrides = (run / ".hydra" / "overrides.yaml").read_text()
        lam = next(x for x in lams if f"weighting.lam={x}" in overrides)
        config = (run / "hf" / "lctw.yaml").read_text()
        assert f"lam: {lam}" in config  # the exported model is this run's own
        assert json.loads((run / "status.json").read_text())["status"] == "completed"
        assert json.loads((run / "metrics.json").read_text())["train/loss"] > 0
        seen.add(lam)
    assert seen == set(lams)


@pytest.mark.process
def test_a_failed_run_records_its_error(tmp_path):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), "weighting.lam=2"], cwd=tmp_path,
                          env=env(str(tmp_path / "cache")), capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "weighting.lam=2 is out of range" in proc.stderr
    (run,) = (tmp_path / "outputs" / "runs").glob("*/*")
    status = json.loads((run / "status.json").read_text())
    assert status["status"] == "failed" and status["error"] == "ConfigError"
    assert status["message"].startswith("weighting.lam=2 is out of range")
    assert "weighting.lam=2 is out of range" in (run / "train.log").read_text()
    assert not (run / "checkpoints").exists() and not (run / "hf").exists()  # a stub: status, log, config


@pytest.mark.process
def test_a_failing_job_does_not_take_the_sweep_down(cache_dir, tmp_path):
    """... and the sweep's report (``hydra.callbacks.summary.report``, as sweep=mini_repro sets it) is built
    from the job that completed, before the sweep exits non-zero."""
    sweep = tmp_path / "sweep"
    report = "++hydra.callbacks.summary.report={tradeoff:[val/ce_within_n,val/ce_beyond_n]}"
    proc = subprocess.run([sys.executable, "train.py", "-m", "weighting.lam=0.5,2.0", *QUICK, report,
                           f"paths.cache={cache_dir}", f"hydra.sweep.dir={sweep}"], cwd=ROOT, env=env(cache_dir),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0  # the sweep reports its failure
    summary = json.loads((sweep / "summary.json").read_text())
    assert [(j["job"].split("_")[0], j["status"]) for j in summary] == [("0", "completed"), ("1", "failed")]
    assert "weighting.lam=2.0 is out of range" in summary[1]["error"]
    assert (sweep / summary[0]["job"] / "hf" / "config.json").exists()  # the good job finished
    assert "1 of 2 jobs completed" in proc.stdout and "weighting.lam=2.0 is out of range" in proc.stdout
    table = (sweep / "summary.md").read_text()
    assert f"| {summary[1]['job']} | failed | ConfigError: weighting.lam=2.0 is out of range" in table
    assert f"report of the sweep written to {sweep / 'report' / 'report.md'}" in proc.stdout
    written = (sweep / "report" / "report.md").read_text()
    assert "| 0.5 |" in written and "weighting=dense,weighting.lam=2.0" not in written.split("eft out")[0]
    assert summary[1]["job"] in written.split("eft out")[-1]  # the failed job is listed as left out


@pytest.mark.process
@pytest.mark.parametrize("script", ["train.py", "eval.py", "score.py"])
def test_each_entry_point_resolves_its_run_directory(script):
    """The run directory names ${run_token:}, a resolver lctw registers: an entry point that does not import
    it before Hydra resolves hydra.run.dir stops before doing anything (score.py did)."""
    proc = subprocess.run([sys.executable, script, "--cfg", "hydra", "--resolve"], cwd=ROOT, capture_output=True,
                          text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "run_token" not in proc.stdout and "dir: outputs/" in proc.stdout
