"""Runs sharing the cores: each run's wall time alone and beside another, with lctw's thread policy
(``after``) and without it (``before``: ``LCTW_THREADS=off``, torch's and OpenMP's defaults).

Why: on a laptop two runs at once used to take 3.8-7x as long as one alone (OpenMP threads spinning
on oversubscribed cores, lctw/threads.py); the target is at most 2.2x, and a run alone no slower.
Every figure is a ratio measured in this one session, modes interleaved, medians over repeats:

    python benchmarks/threads.py --repeats 2 --out outputs/benchmarks/threads.json
    python benchmarks/threads.py --scenarios alone submitit eval --modes after --repeats 1

Scenarios (each run is ``python train.py`` with ``--overrides``, the default experiment unless told):

* ``alone``: one run; ``together``: two runs started at the same moment (each run's own time).
* ``base``: one run on an empty cache (the tiny base is built first), alone.
* ``joblib`` / ``submitit``: ``train.py -m`` with two jobs side by side through Hydra's joblib
  launcher (``pip install hydra-joblib-launcher``, or ``--plugin-path``) or submitit's local one;
  the multirun's wall time, against the same launcher's multirun of one job (``joblib_one``,
  ``submitit_one``: the launcher's own start-up is then in both) and against ``alone``.
* ``eval``: ``eval.py eval=ppl`` on the ``alone`` scenario's run (``eval_alone``), and the same
  started ``--eval-delay`` s after a training run (``beside``: the evaluation's and the training's times).

Also recorded per measurement: the CPU time other processes used meanwhile (``other_cores``: cores
busy with work that is not this benchmark's) and each run's ``threads.json``. Public tools only
(subprocess, time); nothing here imports lctw or torch.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCENARIOS = ("alone", "together", "base", "joblib", "submitit", "eval")
SHARED = ("together", "joblib", "submitit", "beside")  # compared with the same mode's run alone
MODES = {"before": {"LCTW_THREADS": "off"}, "after": {}}


def cpu_ticks() -> tuple[int, int]:
    with open("/proc/stat") as f:
        ticks = [int(v) for v in f.readline().split()[1:9]]
    return sum(ticks) - ticks[3] - ticks[4], sum(ticks)


def children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def launch(script: str, args: list[str], env: dict, log: Path) -> subprocess.Popen:
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as out:  # the child keeps its own handle
        return subprocess.Popen([sys.executable, script, *args], cwd=ROOT, env=env, stdout=out,
                                stderr=subprocess.STDOUT)


def measure(commands: list[tuple], env: dict, logs: Path) -> dict:
    """Start every (name, script, args[, delay s]) at once or that many seconds later; each one's wall
    time from its own start, and the other processes' load meanwhile."""
    ticks, cpu, start = cpu_ticks(), children_cpu_s(), time.monotonic()
    waiting = sorted(((c[3] if len(c) > 3 else 0.0), c[:3]) for c in commands)
    procs, started, seconds = {}, {}, {}
    while waiting or procs:
        while waiting and time.monotonic() - start >= waiting[0][0]:
            name, script, args = waiting.pop(0)[1]
            procs[name], started[name] = launch(script, args, env, logs / f"{name}.log"), time.monotonic()
        for name, proc in list(procs.items()):
            if proc.poll() is not None:
                if proc.returncode != 0:
                    for other in procs.values():  # no run left behind to load the next measurement
                        other.kill()
                        other.wait()
                    raise SystemExit(f"{name} failed (exit {proc.returncode}): see {logs / f'{name}.log'}")
                seconds[name] = round(time.monotonic() - started[name], 2)
                del procs[name]
        time.sleep(0.05)
    busy, total = (a - b for a, b in zip(cpu_ticks(), ticks, strict=True))
    cpus = os.cpu_count() or 1
    wall = time.monotonic() - start
    other = busy / total * cpus - (children_cpu_s() - cpu) / wall if total else 0.0
    policies = {p.parent.name: json.loads(p.read_text()) for p in sorted(logs.rglob("threads.json"))}
    return {"seconds": seconds, "other_cores": round(max(other, 0.0), 2), "policies": policies}


def scenario_commands(name: str, args, run_dir) -> list[tuple[str, str, list[str]]]:
    """The processes one measurement of ``name`` starts together."""
    def train(tag, *extra):
        return (tag, "train.py", [*args.overrides, f"hydra.run.dir={run_dir / tag}", *extra])

    if name == "alone":
        return [train("run")]
    if name == "together":
        return [train("first"), train("second")]
    if name == "base":
        return [train("run", f"paths.cache={run_dir / 'cache'}")]
    if name.startswith(("joblib", "submitit")):
        launcher = "joblib" if name.startswith("joblib") else "submitit_local"
        grid = "weighting.lam=0.7" if name.endswith("_one") else "weighting.lam=0.7,0.75"
        return [("sweep", "train.py", ["-m", f"hydra/launcher={launcher}", grid, *args.overrides,
                                       f"hydra.sweep.dir={run_dir / 'sweep'}"])]
    raise ValueError(name)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scenarios", nargs="+", choices=SCENARIOS, default=["alone", "together"])
    p.add_argument("--modes", nargs="+", choices=list(MODES), default=list(MODES))
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--overrides", nargs="*", default=[], help="train.py overrides of every run (default: none)")
    p.add_argument("--eval-delay", type=float, default=15.0, help="seconds between the training run and eval.py")
    p.add_argument("--plugin-path", default=None, help="a folder holding hydra_plugins/hydra_joblib_launcher")
    p.add_argument("--workdir", default=None, help="run directories (default: a temporary folder, removed)")
    p.add_argument("--out", default=None, help="JSON file of every measurement and the table")
    args = p.parse_args()

    env = {k: v for k, v in os.environ.items() if not k.startswith(("OMP_", "LCTW_", "GOMP_", "KMP_"))}
    env["WANDB_MODE"] = "offline"
    if args.plugin_path:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [args.plugin_path, env.get("PYTHONPATH")]))
    keep = args.workdir is not None
    work = Path(args.workdir or tempfile.mkdtemp(prefix="lctw-threads-"))
    results = []
    for repeat in range(args.repeats):
        for scenario in args.scenarios:
            modes = args.modes if repeat % 2 == 0 else args.modes[::-1]  # interleaved: drift hits both modes
            for mode in modes:
                if scenario == "eval":
                    results += measure_eval(args, {**env, **MODES[mode]}, work, mode, repeat)
                    continue
                for name in ([f"{scenario}_one", scenario] if scenario in ("joblib", "submitit") else [scenario]):
                    run_dir = work / name / mode / str(repeat)
                    m = measure(scenario_commands(name, args, run_dir), {**env, **MODES[mode]}, run_dir)
                    results.append({"scenario": name, "mode": mode, "repeat": repeat, **m})
                    print(f"{name:>12} {mode:>6} #{repeat}: {m['seconds']} s (other load {m['other_cores']} cores)",
                          flush=True)
    table = summarise(results)
    print_table(table)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"setup": setup(args), "table": table, "measurements": results},
                                             indent=2))
    if not keep:
        subprocess.run(["rm", "-rf", str(work)], check=False)


def measure_eval(args, env: dict, work: Path, mode: str, repeat: int) -> list[dict]:
    """eval.py alone on a trained run, then the same evaluation started ``--eval-delay`` s after a
    training run (so it starts beside a run that is training)."""
    run_dir = work / "eval" / mode / str(repeat)
    trained = work / "alone" / mode / str(repeat) / "run"
    if not (trained / "hf").is_dir():
        trained = run_dir / "trained"
        measure([("train", "train.py", [*args.overrides, f"hydra.run.dir={trained}"])], env, run_dir / "prepare")
    evaluation = ["eval=ppl", f"ckpt={trained}"]
    rows = []
    for name, commands in (
            ("eval_alone", [("eval", "eval.py", [*evaluation, f"hydra.run.dir={run_dir / 'eval_alone' / 'eval'}"])]),
            ("beside", [("train", "train.py", [*args.overrides, f"hydra.run.dir={run_dir / 'beside' / 'train'}"]),
                        ("eval", "eval.py", [*evaluation, f"hydra.run.dir={run_dir / 'beside' / 'eval'}"],
                         args.eval_delay)])):
        m = measure(commands, env, run_dir / name)
        rows.append({"scenario": name, "mode": mode, "repeat": repeat, **m})
        print(f"{name:>12} {mode:>6} #{repeat}: {m['seconds']} s (other load {m['other_cores']} cores)", flush=True)
    return rows


def summarise(results: list[dict]) -> list[dict]:
    """Median seconds per (scenario, mode, process) and the ratio to the same mode's run alone."""
    groups: dict[tuple, list[float]] = {}
    for r in results:
        for name, s in r["seconds"].items():
            groups.setdefault((r["scenario"], r["mode"], name), []).append(s)
    median = {k: statistics.median(v) for k, v in groups.items()}
    table = []
    for (scenario, mode, name), seconds in median.items():
        alone = median.get(("eval_alone", mode, "eval") if name == "eval" else
                           (f"{scenario}_one", mode, "sweep") if scenario in ("joblib", "submitit") else
                           ("alone", mode, "run"))
        before = median.get((scenario, "before", name))
        table.append({"scenario": scenario, "mode": mode, "process": name, "median_s": seconds,
                      "n": len(groups[(scenario, mode, name)]),
                      "vs_alone": round(seconds / alone, 2) if alone and scenario in SHARED else None,
                      "vs_before": round(seconds / before, 3) if before and mode == "after" else None})
    return table


def print_table(table: list[dict]) -> None:
    print(f"\n{'scenario':>12} {'mode':>6} {'process':>8} {'median s':>9} {'n':>2} {'x alone':>8} {'x before':>9}")
    for row in table:
        print(f"{row['scenario']:>12} {row['mode']:>6} {row['process']:>8} {row['median_s']:9.1f} {row['n']:2d} "
              f"{row['vs_alone'] or '':>8} {row['vs_before'] or '':>9}")


def setup(args) -> dict:
    load = Path("/proc/loadavg").read_text().split()[:3]
    return {"cores": len(os.sched_getaffinity(0)), "cpu": platform.processor() or platform.machine(),
            "python": platform.python_version(), "overrides": args.overrides, "repeats": args.repeats,
            "loadavg_at_end": load, "time": time.strftime("%Y-%m-%dT%H:%M:%S")}


if __name__ == "__main__":
    main()
