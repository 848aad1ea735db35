"""The sweep's end: a summary of its jobs and, when asked, its report (a Hydra callback).

``conf/hydra/default.yaml`` installs :class:`SweepSummary` for every multirun. Hydra builds it before the
first job, so it imports nothing heavy (the report, and with it torch, only when the sweep ends): the
entry points set the thread policy before torch loads (:mod:`lctw.threads`).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from lctw.runs.jobs import STATUS, read_status


class SweepSummary(Callback):
    """At the end of a multirun: one line per job on the console and ``summary.{json,md}`` in the sweep
    directory; a sweep with a failed job then exits non-zero.

    ``report`` (``hydra.callbacks.summary.report``, e.g. set by ``sweep=mini_repro``): when not null, the
    sweep's report (:func:`lctw.runs.report.report`, written to ``<sweep>/report/``) is built from the completed
    jobs before that, with these options (``tradeoff``, ``paired_metrics``, ``length_patterns``). A report
    that fails is a warning: the jobs' results are already on disk.
    """

    def __init__(self, report: dict | None = None):
        self.report = None if report is None else dict(report)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep = Path(config.hydra.sweep.dir)
        jobs = []
        for job_dir in sorted((p for p in sweep.iterdir() if (p / STATUS).exists()), key=_job_number):
            status = read_status(job_dir)
            jobs.append({"job": job_dir.name, "status": status["status"], "dir": str(job_dir),
                         "error": f"{status.get('error', '')}: {status.get('message', '')}".strip(": ")})
        (sweep / "summary.json").write_text(json.dumps(jobs, indent=2))
        lines = ["| job | status | error |", "|---|---|---|"]
        lines += [f"| {j['job']} | {j['status']} | {j['error']} |" for j in jobs]
        (sweep / "summary.md").write_text("\n".join(lines) + "\n")
        failed = [j for j in jobs if j["status"] != "completed"]
        print(f"\nsweep {sweep}: {len(jobs) - len(failed)} of {len(jobs)} jobs completed")
        for j in jobs:
            print(f"  {j['status']:<9} {j['dir']}" + (f"  {j['error']}" if j["error"] else ""))
        if self.report is not None and len(failed) < len(jobs):
            self._report(sweep)
        if failed:  # a non-zero exit for scripts and CI (Hydra turns a callback's exception into a warning)
            print(f"{len(failed)} of {len(jobs)} jobs failed (see {sweep / 'summary.md'})", file=sys.stderr)
            raise SystemExit(1)

    def _report(self, sweep: Path) -> None:
        from omegaconf import OmegaConf

        from lctw.runs.report import report

        options = {k: OmegaConf.to_container(v) if OmegaConf.is_config(v) else v for k, v in self.report.items()}
        if "tradeoff" in options:
            options["tradeoff"] = tuple(options["tradeoff"])
        try:
            out = report(str(sweep), **options)
        except (Exception, SystemExit) as error:  # noqa: BLE001 - the jobs' results stay valid without it
            print(f"the sweep report was not written: {type(error).__name__}: {error}", file=sys.stderr)
            return
        print(f"report of the sweep written to {out / 'report.md'}")


def _job_number(path: Path) -> tuple[int, str]:
    head = path.name.split("_", 1)[0]
    return (int(head) if head.isdigit() else 1 << 30, path.name)
