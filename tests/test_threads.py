"""The CPU thread policy (lctw/threads.py): decisions from given load and registry, the overrides'
precedence, the registry, and the entry point putting the policy in place before torch loads."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from lctw import threads
from lctw.threads import THREADS, WAIT, decide, omp_environment

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("cores, busy, peers, expected", [
    (2, 0.0, 0, (2, "default")),   # alone: every core, the runtime's spinning wait (fast for small models)
    (2, 0.3, 0, (2, "default")),   # a little background work is not sharing
    (2, 0.0, 1, (1, "passive")),   # a second lctw run: an equal share, no spinning
    (2, 1.0, 1, (1, "passive")),
    (2, 2.0, 0, (1, "passive")),   # other work on every core: still one thread
    (1, 0.0, 3, (1, "passive")),
    (16, 0.0, 1, (8, "passive")),
    (16, 4.2, 0, (12, "passive")),  # the free cores
    (16, 4.0, 1, (8, "passive")),
])
def test_auto_policy(cores, busy, peers, expected):
    policy = decide(cores, busy, peers, {})
    assert (policy.threads, policy.wait) == expected
    assert policy.decided_by == "auto" and policy.follows
    assert (policy.cores, policy.peers) == (cores, peers)


def test_lctw_overrides_come_first():
    env = {THREADS: "3", WAIT: "ACTIVE", "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    policy = decide(2, 0.0, 1, env)
    assert (policy.threads, policy.wait, policy.decided_by) == (3, "active", f"{THREADS},{WAIT}")
    assert not policy.follows  # a fixed count stays fixed
    assert omp_environment(policy, env) == {}  # the user's OMP_* are not rewritten


def test_user_omp_variables_are_kept():
    env = {"OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "ACTIVE"}
    policy = decide(2, 0.0, 0, env)
    assert (policy.threads, policy.wait, policy.decided_by) == (1, "active", "OMP_NUM_THREADS,OMP_WAIT_POLICY")
    assert omp_environment(policy, env) == {}


def test_a_fixed_wait_policy_keeps_the_count_automatic():
    policy = decide(2, 0.0, 1, {WAIT: "active"})
    assert (policy.threads, policy.wait, policy.follows) == (1, "active", True)
    assert omp_environment(policy, {}) == {"OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "ACTIVE"}


def test_values_lctw_set_are_decided_again_in_a_child_process():
    """A launcher's worker inherits the parent's OMP_* values; those lctw set are not the user's."""
    env = {"OMP_NUM_THREADS": "2", threads.OURS: "OMP_NUM_THREADS=2"}
    policy = decide(2, 0.0, 1, env)
    assert (policy.threads, policy.wait, policy.decided_by) == (1, "passive", "auto")
    assert omp_environment(policy, env) == {"OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    alone = decide(2, 0.0, 0, {"OMP_WAIT_POLICY": "PASSIVE", threads.OURS: "OMP_WAIT_POLICY=PASSIVE"})
    assert omp_environment(alone, {threads.OURS: "OMP_WAIT_POLICY=PASSIVE"})["OMP_WAIT_POLICY"] is None  # unset


def test_off_leaves_the_runtime_defaults():
    policy = decide(2, 2.0, 3, {THREADS: "off"})
    assert (policy.threads, policy.wait, policy.follows) == (2, "default", False)
    assert omp_environment(policy, {}) == {"OMP_NUM_THREADS": None, "OMP_WAIT_POLICY": None}
    user = {THREADS: "off", "OMP_NUM_THREADS": "1"}
    kept = decide(2, 0.0, 0, user)
    assert kept.threads == 1 and "OMP_NUM_THREADS" not in omp_environment(kept, user)


@pytest.mark.parametrize("env", [{THREADS: "0"}, {THREADS: "two"}, {WAIT: "spin"}, {"OMP_NUM_THREADS": "x"}])
def test_bad_overrides_are_refused(env):
    with pytest.raises(ValueError, match="LCTW_|OMP_"):
        decide(2, 0.0, 0, env)


def test_registry_counts_live_runs_only(tmp_path, monkeypatch):
    monkeypatch.setattr(threads, "registry", lambda: tmp_path)
    parent = os.getppid()
    (tmp_path / str(parent)).write_text(threads._start_time(parent))  # a live run
    (tmp_path / str(os.getpid())).write_text(threads._start_time(os.getpid()))  # this process: not a peer
    (tmp_path / str(parent + 1_000_000)).write_text("1")  # no such process
    (tmp_path / "1").write_text("0")  # a reused pid: another start time
    assert threads._peers() == [parent]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([str(parent), str(os.getpid())])  # stale ones removed


def test_busy_between_subtracts_this_process():
    cpus = os.cpu_count()
    hz = os.sysconf("SC_CLK_TCK")
    total = cpus * hz  # one second of every CPU
    assert threads._busy_between((0, 0), (hz, total), 0.0) == pytest.approx(1.0)  # one core busy, not us
    assert threads._busy_between((0, 0), (hz, total), 1.0) == pytest.approx(0.0)  # that core was us


def test_entry_point_sets_the_policy_before_torch_loads(tmp_path):
    """train.py with another lctw run registered: OpenMP reads a passive wait and one thread when torch
    loads it (OMP_DISPLAY_ENV prints what the runtime read), and the run records its policy."""
    registry = tmp_path / f"lctw-{os.getuid()}" / "runs"
    registry.mkdir(parents=True)
    (registry / str(os.getpid())).write_text(threads._start_time(os.getpid()))  # this test is the other run
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OMP_", "LCTW_"))}
    env.update(TMPDIR=str(tmp_path), OMP_DISPLAY_ENV="true", WANDB_MODE="offline")
    run_dir = tmp_path / "run"
    # a bad option: the run stops in its first check, after the entry point has loaded torch
    out = subprocess.run([sys.executable, "train.py", "weighting=sparse", "weighting.kappa=1.5", "logger=none",
                          f"hydra.run.dir={run_dir}"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and "kappa" in out.stderr + out.stdout
    assert "OMP_WAIT_POLICY = 'PASSIVE'" in out.stderr
    assert "OMP_NUM_THREADS = '1'" in out.stderr
    record = json.loads((run_dir / "threads.json").read_text())
    assert (record["threads"], record["wait"], record["peers"], record["decided_by"]) == (1, "passive", 1, "auto")
    assert "CPU threads: 1, OpenMP wait policy passive" in (run_dir / "train.log").read_text()
