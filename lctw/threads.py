"""CPU threads: fast when a run has the cores to itself, fair when other work shares them.

Why: the tiny models trained on a laptop run many short parallel regions per step, and OpenMP's
worker threads spin at every barrier. Alone, that spinning is what makes two threads fast; when two
runs share two cores, each spinner steals the core from the thread it waits for and both runs
collapse (3.8-7x slower, README "Score cache and speed"). A passive wait policy fixes sharing but
costs a third when alone. The wait policy is read once, when torch loads its OpenMP runtime, so it
is chosen here, before torch is imported (the entry points call :func:`configure` first); the
thread count can change later, and :func:`follow` changes it as other runs start and end.

The policy (``LCTW_THREADS=auto``, ``LCTW_WAIT_POLICY=auto``):

* threads = the cores not busy with other work, shared equally among the lctw runs on the machine,
  at least 1. Other lctw runs are found in a per-user registry of process ids (so a run started a
  second after another knows of it at once); other work by sampling ``/proc/stat`` for 0.2 s.
* wait policy: the OpenMP runtime's default (spin, then sleep) when alone; passive when sharing.
* while it runs, every few seconds, the thread count is decided again (registry and CPU use since
  the last check): a run alone drops to the fair share when a second one starts and comes back up
  when that one ends.

Overrides: ``LCTW_THREADS=<int>`` fixes the thread count (``off``: no policy, the runtime's defaults),
``LCTW_WAIT_POLICY=active|passive`` the wait
policy; ``OMP_NUM_THREADS`` / ``OMP_WAIT_POLICY`` set by the user are kept as they are. What a run used
is logged and written to ``threads.json`` in its run directory.

Standard library only: this module is imported before torch.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import sys
import tempfile
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from pathlib import Path

log = logging.getLogger(__name__)

THREADS = "LCTW_THREADS"  # auto | <int> | off
WAIT = "LCTW_WAIT_POLICY"  # auto | active | passive
OURS = "LCTW_OMP_SET"  # the OMP_* values lctw set, as VAR=value,...: a launcher's worker processes inherit
# them and decide again, whereas values the user set are kept
SAMPLE_S = 0.2  # CPU use sampled before deciding
RECHECK_S = 2.0  # while running: how often the thread count is decided again
RECORD = "threads.json"


@dataclass(frozen=True)
class Policy:
    threads: int  # intra-op threads
    wait: str  # default (the runtime's: spin, then sleep) | active | passive
    decided_by: str  # auto, or the variables that fixed the thread count or wait policy
    follows: bool  # the thread count is decided again while the run goes (automatic count)
    cores: int  # cores this process may run on
    busy: float  # cores busy with other work when decided
    peers: int  # other lctw runs when decided


def decide(cores: int, busy: float, peers: int, env: Mapping[str, str]) -> Policy:
    """The policy for a run on ``cores`` cores while ``busy`` of them do other work and ``peers``
    other lctw runs are going, given the overrides in ``env``."""
    user = _user_set(env)
    if env.get(THREADS) == "off":  # as without this module: torch's thread count, the runtime's wait policy
        threads = _count("OMP_NUM_THREADS", user["OMP_NUM_THREADS"].split(",")[0]) if "OMP_NUM_THREADS" in user \
            else cores
        return Policy(threads, user.get("OMP_WAIT_POLICY", "default").lower(), f"{THREADS}=off", False, cores, 0.0,
                      peers)
    fixed = []
    threads = max(1, min(cores - round(busy), cores // (peers + 1)))
    if env.get(THREADS, "auto") != "auto":
        threads, fixed = _count(THREADS, env[THREADS]), [THREADS]
    elif "OMP_NUM_THREADS" in user:
        threads, fixed = _count("OMP_NUM_THREADS", user["OMP_NUM_THREADS"].split(",")[0]), ["OMP_NUM_THREADS"]
    wait = "passive" if peers or round(busy) else "default"
    if env.get(WAIT, "auto") != "auto":
        wait, fixed = env[WAIT].lower(), [*fixed, WAIT]
        if wait not in ("active", "passive"):
            raise ValueError(f"{WAIT}={env[WAIT]}: auto, active or passive")
    elif "OMP_WAIT_POLICY" in user:
        wait, fixed = user["OMP_WAIT_POLICY"].lower(), [*fixed, "OMP_WAIT_POLICY"]
    return Policy(threads, wait, ",".join(fixed) or "auto", not fixed or fixed[0] in (WAIT, "OMP_WAIT_POLICY"), cores,
                  round(busy, 2), peers)


def _count(name: str, value: str) -> int:
    if not value.strip().isdigit() or int(value) < 1:
        raise ValueError(f"{name}={value}: a thread count >= 1" + (", auto or off" if name == THREADS else ""))
    return int(value)


def omp_environment(policy: Policy, env: Mapping[str, str]) -> dict[str, str | None]:
    """The OMP_* variables that put ``policy`` in place before torch loads (None: unset), the user's
    own left alone."""
    user = _user_set(env)
    if policy.decided_by == f"{THREADS}=off":
        return {k: None for k in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY") if k not in user}
    wanted = {"OMP_NUM_THREADS": str(policy.threads),
              "OMP_WAIT_POLICY": None if policy.wait == "default" else policy.wait.upper()}
    return {k: v for k, v in wanted.items() if k not in user}


_policy: Policy | None = None
_record: Path | None = None
_changes: list[tuple[float, int]] = []
_registered: set[Path] = set()


def configure() -> Policy:
    """Decide this process's policy and set the OMP_* variables; register it as a running lctw run.
    Call it before torch is imported (once per process; later calls return the same policy).

    A multirun's launcher process is registered only when it runs a job itself (:func:`follow`). A
    launcher's worker process (joblib, submitit_local) loads torch with the pickled job before any
    lctw code runs: there the wait policy is the one inherited from the launcher, and only the thread
    count is decided (and followed)."""
    global _policy
    if _policy is not None:
        return _policy
    if not {"-m", "--multirun"} & set(sys.argv):
        _register()
    busy = 0.0 if os.environ.get(THREADS) == "off" else _busy_cores(SAMPLE_S)
    _policy = decide(cores(), busy, len(_peers()), os.environ)
    if "torch" in sys.modules:  # too late for OMP_*: record the wait policy the runtime read
        _policy = replace(_policy, wait=os.environ.get("OMP_WAIT_POLICY", "default").lower())
    else:
        set_here = omp_environment(_policy, os.environ)
        for key, value in set_here.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        os.environ[OURS] = ",".join(f"{k}={v}" for k, v in set_here.items() if v is not None)
    _changes.append((0.0, _policy.threads))
    return _policy


def follow(run_dir: str | os.PathLike | None = None) -> None:
    """Once torch is loaded: set the thread count, record the policy in ``run_dir/threads.json`` and the
    log, and, when the count is automatic, decide it again every few seconds as runs start and end
    (checked at module calls, on the thread that runs them)."""
    global _record
    policy = configure()
    _register()
    torch = sys.modules["torch"]
    if policy.decided_by != f"{THREADS}=off":
        torch.set_num_threads(policy.threads)
    log.info("CPU threads: %d, OpenMP wait policy %s (decided by %s; %d cores, %.1f busy with other work, "
             "%d other lctw runs)", policy.threads, policy.wait, policy.decided_by, policy.cores, policy.busy,
             policy.peers)
    if run_dir is not None:
        _record = Path(run_dir) / RECORD
        _write_record()
    if not policy.follows or _Follower.active:
        return
    follower = _Follower(torch, policy)
    torch.nn.modules.module.register_module_forward_pre_hook(follower.on_call)
    _Follower.active = True


class _Follower:
    """Decides the thread count again every RECHECK_S seconds. torch.set_num_threads only affects the
    calling thread, so this runs in hooks on the thread that computes, not in a thread of its own."""

    active = False

    def __init__(self, torch, policy: Policy):
        self.torch, self.policy = torch, policy
        self.start = self.last = time.monotonic()
        self.cpu = _cpu_jiffies()
        self.own = _own_cpu_s()

    def on_call(self, *args) -> None:
        now = time.monotonic()
        if now - self.last < RECHECK_S:
            return
        cpu, own = _cpu_jiffies(), _own_cpu_s()
        busy = _busy_between(self.cpu, cpu, own - self.own)
        self.last, self.cpu, self.own = now, cpu, own
        threads = decide(self.policy.cores, busy, len(_peers()), {}).threads
        if threads != self.torch.get_num_threads():
            self.torch.set_num_threads(threads)
            _changes.append((round(now - self.start, 1), threads))
            log.info("CPU threads: %d (%.1f cores busy with other work)", threads, busy)
            _write_record()


def _write_record() -> None:
    if _record is None or not _record.parent.is_dir():
        return
    record = {**asdict(_policy), "changes": [{"after_s": t, "threads": n} for t, n in _changes]}
    _record.write_text(json.dumps(record, indent=2) + "\n")


def _user_set(env) -> dict[str, str]:
    """The OMP_* variables in ``env`` that lctw did not set itself."""
    ours = dict(item.split("=", 1) for item in env.get(OURS, "").split(",") if "=" in item)
    return {k: env[k] for k in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY") if k in env and ours.get(k) != env[k]}


def cores() -> int:
    """The CPU cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


# --- the registry of running lctw processes: one file per process, named by its pid, holding its
# start time (a pid reused by another process is not mistaken for a run)

def registry() -> Path:
    return Path(tempfile.gettempdir()) / f"lctw-{os.getuid()}" / "runs"


def _register() -> None:
    path = registry() / str(os.getpid())
    if path in _registered:
        return
    _registered.add(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(_start_time(os.getpid()) or "")
    atexit.register(path.unlink, missing_ok=True)


def _peers() -> list[int]:
    """The other lctw processes running now; stale entries are removed."""
    peers = []
    for path in registry().glob("[0-9]*"):
        pid = int(path.name)
        if pid == os.getpid():
            continue
        try:
            recorded = path.read_text()
        except OSError:
            continue
        if _start_time(pid) == recorded and recorded:
            peers.append(pid)
        else:
            path.unlink(missing_ok=True)
    return peers


def _start_time(pid: int) -> str | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]  # field 22, after the command name (which may hold spaces)


# --- CPU use by other work, from /proc/stat (all zeros where there is none: nothing is counted busy)

def _cpu_jiffies() -> tuple[int, int]:
    """(busy, total) clock ticks of all CPUs since boot."""
    try:
        with open("/proc/stat") as f:
            ticks = [int(v) for v in f.readline().split()[1:9]]
    except OSError:
        return 0, 0
    idle = ticks[3] + ticks[4]
    return sum(ticks) - idle, sum(ticks)


def _own_cpu_s() -> float:
    t = os.times()
    return t.user + t.system


def _busy_between(before: tuple[int, int], after: tuple[int, int], own_s: float) -> float:
    """Cores busy with work other than this process's between two /proc/stat readings."""
    busy, total = after[0] - before[0], after[1] - before[1]
    if total <= 0:
        return 0.0
    cpus = os.cpu_count() or 1
    seconds = total / cpus / os.sysconf("SC_CLK_TCK")
    return max(0.0, (busy / total * cpus) - own_s / seconds)


def _busy_cores(seconds: float) -> float:
    before, own = _cpu_jiffies(), _own_cpu_s()
    time.sleep(seconds)
    return _busy_between(before, _cpu_jiffies(), _own_cpu_s() - own)

