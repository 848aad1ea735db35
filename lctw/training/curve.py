"""Learning curves: an evaluation run at chosen optimizer steps during training (``callbacks=curve``).

Why: the study asks how *fast* each weighting teaches an extended model to use the new positions, and
uniform training is near its ceiling after about 150 steps, so one number at the end would hide the
difference; the early points carry the comparison. :class:`LearningCurve` runs its evaluation (an object
with ``measure(model, tokenizer, datamodule, n, N) -> (metrics, rows)``, such as
:class:`lctw.eval.copying.Copying`) on θ before the first step when ``0`` is among ``steps`` and after
each listed optimizer step, and records every metric as ``<metric>@<step>``: to the run's logger (with
the step) and into the run's final metrics (``metrics.json``, which the sweep report reads for its
curves and paired tests at each step). The evaluation runs in eval mode without gradients; training's
random streams are untouched (the probes have their own seed), so a curve does not change the run.
"""

from __future__ import annotations

import logging

from lightning.pytorch.callbacks import Callback

log = logging.getLogger(__name__)


class LearningCurve(Callback):
    """``evaluation`` at the optimizer steps ``steps``; metrics as ``<metric>@<step>`` in :attr:`metrics`."""

    def __init__(self, evaluation, steps: list[int], n: int, N: int):
        if not steps or any(s < 0 for s in steps):
            raise ValueError(f"steps={list(steps)} is out of range: allowed a non-empty list of optimizer steps >= 0")
        if not callable(getattr(evaluation, "measure", None)):
            raise ValueError(f"evaluation={type(evaluation).__name__} has no measure(model, tokenizer, datamodule, "
                             "n, N): allowed lctw.eval.copying.Copying")
        self.evaluation, self.steps, self.n, self.N = evaluation, sorted(set(steps)), n, N
        self.metrics: dict[str, float] = {}
        self.done: set[int] = set()

    def _measure(self, trainer, pl_module, step: int) -> None:
        if step not in self.steps or step in self.done:
            return
        self.done.add(step)
        measured, _ = self.evaluation.measure(pl_module.model, trainer.datamodule.tokenizer, trainer.datamodule,
                                              self.n, self.N)
        points = {f"{k}@{step}": v for k, v in measured.items()}
        self.metrics.update(points)
        if trainer.logger:
            trainer.logger.log_metrics(points, step=step)
        shown = {k.split("/", 2)[-1]: round(v, 3) for k, v in measured.items() if "gain_" in k and k.endswith("_n")}
        log.info("learning curve at step %d: %s", step, shown)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == 0:
            self._measure(trainer, pl_module, 0)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._measure(trainer, pl_module, trainer.global_step)

    def on_train_end(self, trainer, pl_module) -> None:
        missing = [s for s in self.steps if s not in self.done]
        if missing:
            log.warning("learning curve: steps %s were not reached (trainer.max_steps=%s)", missing,
                        trainer.max_steps)
