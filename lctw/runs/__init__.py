"""Run records: what a run leaves on disk and how runs are compared.

* :mod:`.jobs`         run directories, ``status.json`` and ``metrics.json``, the job wrapper of every entry point.
* :mod:`.checkpoints`  checkpoint files with checksums, the resume check, which keys change θ.
* :mod:`.loggers`      W&B (offline by default), CSV, none.
* :mod:`.sweep`        the Hydra callback that summarises a sweep and, when asked, builds its report.
* :mod:`.report`       tables, paired tests and plots over a sweep (``python -m lctw.runs.report``).

May import: :mod:`lctw.errors`; the report also reads the eval and training records. Run records never
import the report (only the sweep-end callback does, when the sweep ends).
"""
