"""Run directories and what they record: a unique directory per run, its status and metrics.

* Every run directory is unique, even when many runs start in the same second: the directory names in
  ``conf/hydra/default.yaml`` end with ``${run_token:}``, a token drawn once per process (its pid and
  random bits), so two processes never share a directory and one process always names its own the same.
* ``status.json`` in the run directory says where the run stands, machine-readably: ``running``,
  ``completed`` or ``failed`` (with the error's type, its first line and the traceback); the error is
  also logged to ``train.log``. A run that fails before doing anything leaves exactly that stub.
* A multirun goes on when one job fails: :func:`run_job` records the failure and returns, and
  :class:`lctw.runs.sweep.SweepSummary` (a Hydra callback) prints one line per job (status, directory, error) and
  writes ``summary.json`` and ``summary.md`` in the sweep directory; the sweep then exits non-zero.
"""

from __future__ import annotations

import json
import logging
import math
import os
import secrets
import socket
import time
import traceback
from collections.abc import Callable
from pathlib import Path

from omegaconf import DictConfig

log = logging.getLogger(__name__)

STATUS = "status.json"
_TOKEN = f"{os.getpid()}{secrets.token_hex(2)}"  # once per process: stable across re-resolution


def run_token() -> str:
    return _TOKEN


def write_status(run_dir: Path, status: str, **fields) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    record = {"status": status, "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "host": socket.gethostname(),
              "pid": os.getpid(), **fields}
    tmp = run_dir / f".{STATUS}.tmp"
    tmp.write_text(json.dumps(record, indent=2, sort_keys=True))
    os.replace(tmp, run_dir / STATUS)


def read_status(run_dir: Path) -> dict | None:
    f = Path(run_dir) / STATUS
    return json.loads(f.read_text()) if f.exists() else None


def write_metrics(path: Path, metrics: dict[str, float]) -> None:
    """Strict JSON: a non-finite value is written as null, never as a bare NaN that parsers reject."""
    clean = {k: (v if math.isfinite(v) else None) for k, v in metrics.items()}
    path.write_text(json.dumps(clean, indent=2, sort_keys=True, allow_nan=False))


def read_metrics(path: Path, suffix: str = "") -> dict[str, float]:
    """The finite values of a metrics file whose keys end with ``suffix`` ({} if there is none)."""
    if not path.exists():
        return {}
    return {k: v for k, v in json.loads(path.read_text()).items() if k.endswith(suffix) and v is not None}


def run_job(cfg: DictConfig, fn: Callable[[DictConfig], dict]) -> dict | None:
    """Run ``fn(cfg)`` in the Hydra job's directory, recording its status; in a multirun a failure is
    recorded and the sweep goes on, in a single run it is raised (non-zero exit)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    overrides = list(hydra_cfg.overrides.task)
    write_status(run_dir, "running", overrides=overrides)
    try:
        metrics = fn(cfg)
    except Exception as err:
        log.exception("run failed: %s", err)  # into train.log, with the traceback
        write_status(run_dir, "failed", overrides=overrides, error=type(err).__name__,
                     message=str(err).strip().splitlines()[0] if str(err).strip() else "",
                     traceback=traceback.format_exc())
        if hydra_cfg.mode == RunMode.MULTIRUN:
            return None
        raise
    write_status(run_dir, "completed", overrides=overrides)
    return metrics


def objective(cfg: DictConfig, metrics: dict | None) -> float | None:
    """The value a sweeper optimises: the run's ``cfg.objective`` metric, or None when the run failed or
    the value is missing or not finite. Optuna records a None as a failed trial and goes on; a NaN
    would stop the study (the Hydra sweeper then tells Optuna the value of a failed trial)."""
    value = (metrics or {}).get(cfg.objective)
    if value is None or not math.isfinite(value):
        if metrics is not None:
            log.warning("objective %s is %s in this run's metrics: the sweeper counts the run as failed",
                        cfg.objective, "missing" if value is None else value)
        return None
    return float(value)
