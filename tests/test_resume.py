"""Interrupted training resumes exactly: a real train.py process is killed with SIGKILL between two
checkpoints, started again with the same command (same run directory), and ends with the weights and
metrics of an uninterrupted run, bitwise on the CPU."""

import csv
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from conftest import ROOT, SMALL
from safetensors.torch import load_file

# sparse weighting: its tie-breaking generator must be restored too; checkpoints every 4 steps
RUN = [*SMALL, "weighting=sparse", "trainer.max_steps=8", "trainer.val_check_interval=4", "checkpoint_every=4"]
TIMING = ("train/tokens_per_s",)  # wall-clock rates differ between any two runs


def train(run_dir, cache_dir, *extra, run=RUN):
    # WANDB_SERVICE: earlier in-process tests started a W&B service whose address wandb exports; a job
    # started afresh (a requeued SLURM job) has its own, so the subprocess must not share pytest's
    env = {k: v for k, v in os.environ.items() if k != "WANDB_SERVICE"}
    env.update(PYTHONPATH=os.pathsep.join([ROOT, os.path.join(ROOT, "tests")]), OMP_NUM_THREADS="1",
               WANDB_MODE="offline")
    cmd = [sys.executable, "train.py", *run, f"paths.cache={cache_dir}", f"hydra.run.dir={run_dir}", *extra]
    # a session of its own: the injected SIGKILL takes down the run's whole process group, not pytest
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    _, proc.stderr_text = proc.communicate(timeout=600)
    return proc


def wait_for_orphans(pid, timeout=60.0):
    """W&B's service process outlives a SIGKILLed run by a few seconds (it polls its parent); a requeued
    job starts after it is gone (another node, or later), so the resumed run here does too."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = subprocess.run(["pgrep", "-f", f"wandb-core.*--pid {pid}"], capture_output=True, text=True)
        if not found.stdout.strip():
            return
        time.sleep(0.5)


@pytest.mark.process
def test_sigkill_between_checkpoints_then_the_same_command_resumes_exactly(cache_dir, tmp_path):
    whole = train(tmp_path / "whole", cache_dir)
    assert whole.returncode == 0, whole.stderr_text[-3000:]

    crash = ["+callbacks.crash._target_=toy_parts.Crash", "+callbacks.crash.step=6"]
    killed = train(tmp_path / "resumed", cache_dir, *crash)
    assert killed.returncode == -signal.SIGKILL  # killed at step 6, after the step-4 checkpoint
    assert torch.load(tmp_path / "resumed/checkpoints/last.ckpt", weights_only=True)["global_step"] == 4
    assert json.loads((tmp_path / "resumed/status.json").read_text())["status"] == "running"
    wait_for_orphans(killed.pid)

    again = train(tmp_path / "resumed", cache_dir)
    assert again.returncode == 0, again.stderr_text[-3000:]
    assert "resuming from" in again.stderr_text and "last.ckpt" in again.stderr_text
    a, b = load_file(tmp_path / "whole/hf/model.safetensors"), load_file(tmp_path / "resumed/hf/model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # bitwise
    ma = json.loads((tmp_path / "whole/metrics.json").read_text())
    mb = json.loads((tmp_path / "resumed/metrics.json").read_text())
    assert "val/ce_before" in mb  # measured before the interruption, kept
    assert {k: v for k, v in ma.items() if k not in TIMING} == {k: v for k, v in mb.items() if k not in TIMING}
    # the score/weight samples of the sweep report: those taken before the kill travel in the checkpoint
    sa, sb = np.load(tmp_path / "whole/token_weights.npz"), np.load(tmp_path / "resumed/token_weights.npz")
    assert len(sa["step_ess"]) == 8 and all(np.array_equal(sa[k], sb[k]) for k in sa.files)
    assert json.loads((tmp_path / "resumed/status.json").read_text())["status"] == "completed"
    # the same W&B run continues: one run id in the run directory
    ids = {p.name.rsplit("-", 1)[-1] for p in (tmp_path / "resumed/wandb").glob("offline-run-*")}
    assert len(ids) == 1, ids


# the same run logged to metrics.csv at every step (logger=csv: the base stage's and the miniature study's)
CSV_RUN = [*(o for o in RUN if not o.startswith("logger.")), "logger=csv", "trainer.log_every_n_steps=1"]


@pytest.fixture(scope="module")
def whole_csv(cache_dir, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("whole-csv")
    proc = train(run_dir, cache_dir, run=CSV_RUN)
    assert proc.returncode == 0, proc.stderr_text[-3000:]
    return run_dir


def history(run_dir):
    """metrics.csv's rows without the wall-clock rates."""
    with open(run_dir / "csv" / "metrics.csv", newline="") as f:
        return [{k: v for k, v in row.items() if k not in TIMING} for row in csv.DictReader(f)]


def same_weights(a, b):
    a, b = load_file(a / "hf/model.safetensors"), load_file(b / "hf/model.safetensors")
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.process
def test_a_resumed_runs_csv_history_is_the_uninterrupted_runs(whole_csv, cache_dir, tmp_path):
    """Lightning's CSV logger deleted metrics.csv when it reopened the run directory: after a SIGKILL and
    the automatic resume the history started at the checkpoint. Now the rows logged before the checkpoint
    stay, those logged after it and before the kill are replaced (not duplicated)."""
    crash = ["+callbacks.crash._target_=toy_parts.Crash", "+callbacks.crash.step=6"]
    killed = train(tmp_path, cache_dir, *crash, run=CSV_RUN)
    assert killed.returncode == -signal.SIGKILL
    assert max(int(r["step"]) for r in history(tmp_path)) >= 4  # rows after the step-4 checkpoint were logged
    again = train(tmp_path, cache_dir, run=CSV_RUN)
    assert again.returncode == 0, again.stderr_text[-3000:]
    assert "will be deleted" not in again.stderr_text
    assert history(tmp_path) == history(whole_csv)  # every step once, the values of the uninterrupted run
    assert same_weights(tmp_path, whole_csv)


@pytest.mark.process
def test_slurms_warning_signal_saves_at_the_next_step_and_the_requeued_run_loses_none(whole_csv, cache_dir,
                                                                                       tmp_path):
    """USR2 (what SLURM sends before a time limit or a preemption) arrives in the middle of step 6, two steps
    after the step-4 checkpoint: last.ckpt is written at the end of step 6 and the process then ends as
    the signal says (submitit's handler would requeue it). The restarted run continues from step 6, with
    the uninterrupted run's weights and history."""
    usr2 = ["+callbacks.usr2._target_=toy_parts.Signal", "+callbacks.usr2.batch=5"]  # batch 5 is step 6
    signalled = train(tmp_path, cache_dir, *usr2, run=CSV_RUN)
    assert signalled.returncode == 128 + signal.SIGUSR2, signalled.stderr_text[-3000:]  # as a shell reports it
    assert torch.load(tmp_path / "checkpoints/last.ckpt", weights_only=True)["global_step"] == 6
    assert json.loads((tmp_path / "status.json").read_text())["status"] == "running"  # to be requeued, not failed
    again = train(tmp_path, cache_dir, run=CSV_RUN)
    assert again.returncode == 0, again.stderr_text[-3000:]
    assert same_weights(tmp_path, whole_csv)
    assert history(tmp_path) == history(whole_csv)


@pytest.mark.process
def test_the_warning_signal_goes_on_to_the_handler_installed_before(tmp_path):
    """submitit's handler (here one that records its calls and returns, as submitit's does on ranks other
    than 0) is called once, after the checkpoint of the step the signal arrived in; until then the signal
    only marks the step. A handler that returns lets training go on, and it is restored after fit."""
    import lightning as L
    from conftest import tiny_llama
    from torch.utils.data import DataLoader

    from lctw.data import collate
    from lctw.method.scorers import SelfScorer
    from lctw.method.weighting import Dense
    from lctw.training.module import TokenWeightingLM
    from lctw.training.preemption import RequeueCheckpoint

    calls = []

    class Probe(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if batch_idx == 2:  # step 2 is batches 2 and 3 (2 accumulated): its first micro-batch ends mid-step
                os.kill(os.getpid(), signal.SIGUSR2)
                calls.append(("signalled", trainer.global_step))

    def submitit(signum, frame):
        last = torch.load(tmp_path / "checkpoints/last.ckpt", weights_only=True)
        calls.append(("handler", signum, last["global_step"]))

    g = torch.Generator().manual_seed(0)
    rows = [{"input_ids": torch.cat([torch.ones(1, dtype=torch.long), torch.randint(3, 64, (15,), generator=g)]),
             "length": 16} for _ in range(6)]
    module = TokenWeightingLM(tiny_llama(layers=1).train(), SelfScorer(n=8, max_len=16), Dense(0.5), n=8,
                              optimizer=lambda p: torch.optim.SGD(p, lr=0.1))
    trainer = L.Trainer(max_steps=3, accumulate_grad_batches=2, accelerator="cpu", logger=False,
                        callbacks=[Probe(), RequeueCheckpoint()], enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, default_root_dir=str(tmp_path))
    previous = signal.signal(signal.SIGUSR2, submitit)
    try:
        trainer.fit(module, train_dataloaders=DataLoader(rows, batch_size=1, collate_fn=collate))
        assert signal.getsignal(signal.SIGUSR2) is submitit  # restored after fit
    finally:
        signal.signal(signal.SIGUSR2, previous)
    assert calls == [("signalled", 1), ("handler", signal.SIGUSR2, 2)]  # saved at the end of step 2, not mid-step
    assert trainer.global_step == 3  # the handler returned: training went on
