"""A requeued job loses no step: on SLURM's warning signal every rank saves ``last.ckpt`` at the next step.

SLURM signals a job (``USR2``, ``signal_delay_s`` seconds before its time limit or on preemption,
``conf/hydra/launcher/slurm.yaml``) and submitit's handler requeues it and exits at once, in the middle of a
step: the requeued job resumed from the last periodic checkpoint and trained up to ``checkpoint_every`` steps
again. :class:`RequeueCheckpoint` (``conf/callbacks/default.yaml``) takes the signal first:

* the handler only notes it. Nothing else is safe there: it runs between two bytecodes of whatever the main
  thread does, possibly inside a collective, and a checkpoint of a sharded θ is itself a collective;
* at the next optimizer-step boundary (the end of the batch that stepped, where the periodic checkpoint is
  written, so the data position, the loops and every callback's state are the same) the ranks agree
  whether any of them was signalled (one all-reduce of a flag per step; SLURM signals every task, but not
  at the same instant, and ranks that disagree would deadlock), and every rank saves
  ``<run dir>/checkpoints/last.ckpt`` together;
* once that step is logged (and validated, if a validation is due: the resumed run repeats neither), the
  signal goes where it would have gone: to the handler that was installed before (submitit's: rank
  0 requeues the job and exits, the other ranks return and are ended with the job), or, where there was
  none, the process ends as the signal's default action would, through ``SystemExit`` (status 128 + the
  signal's number) so that Lightning and the loggers finish writing. A handler that returns lets training
  go on.

A signal ignored (``SIG_IGN``) before training starts stays ignored.
"""

from __future__ import annotations

import logging
import signal
import threading
from pathlib import Path

from lightning.pytorch.callbacks import Checkpoint

log = logging.getLogger(__name__)


class RequeueCheckpoint(Checkpoint):
    """Save ``last.ckpt`` at the step boundary after ``signal`` arrives, then pass the signal on.

    A :class:`~lightning.pytorch.callbacks.Checkpoint` so that Lightning runs it after the other callbacks
    at the end of a batch, as it runs ``ModelCheckpoint``: their state for that batch is in the checkpoint.

    Args:
        signal: the signal's name without ``SIG`` (submitit and ``hydra/launcher=slurm`` use ``USR2``).
    """

    def __init__(self, signal: str = "USR2"):
        import signal as signals

        number = getattr(signals, f"SIG{signal}", None)
        if not isinstance(number, signals.Signals) or number in (signals.SIGKILL, signals.SIGSTOP):
            raise ValueError(f"signal={signal!r} is not allowed: a catchable signal's name without SIG (e.g. USR2)")
        self.signum = number
        self.requested = False
        self._previous = None  # the handler installed before training, while this one is installed
        self._step: int | None = None
        self._saved = False  # last.ckpt saved for the signal, which is still to be passed on

    def _note(self, signum, frame) -> None:
        self.requested = True  # nothing else: see the module docstring

    def on_fit_start(self, trainer, pl_module) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # Python runs signal handlers in the main thread only
        previous = signal.getsignal(self.signum)
        if previous is signal.SIG_IGN or previous is None:  # None: a handler not installed from Python
            return
        self._previous = previous
        signal.signal(self.signum, self._note)

    def on_train_start(self, trainer, pl_module) -> None:
        self._step = trainer.global_step  # after a resume: the restored step (not yet restored at fit start)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self._step:
            return  # inside an accumulation window: not a step boundary
        self._step = trainer.global_step
        requested = self.requested
        if trainer.world_size > 1:
            requested = trainer.strategy.reduce_boolean_decision(requested, all=False)
        if not requested:
            return
        path = Path(trainer.default_root_dir) / "checkpoints" / "last.ckpt"  # where the requeued job looks
        log.warning("signal %s: saving %s at step %d before passing the signal on", self.signum.name, path,
                    trainer.global_step)
        trainer.save_checkpoint(path)
        trainer.strategy.barrier("lctw.requeue_checkpoint")
        self.requested, self._saved = False, True

    # after the step's logging (and a validation due at that step), which come after this batch-end hook
    # and which the resumed run does not repeat: passed on at the next batch's start, or at the end
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self._saved:
            self._pass_on()

    def on_train_end(self, trainer, pl_module) -> None:
        if self._saved:
            self._pass_on()

    def _pass_on(self) -> None:
        self._saved = False
        previous = self._restore()
        if callable(previous):
            previous(self.signum, None)  # submitit: rank 0 requeues and exits; other ranks return
            signal.signal(self.signum, self._note)  # it returned: training goes on, still watching
            self._previous = previous
        else:  # SIG_DFL: USR1, USR2 and TERM end the process; by SystemExit, with the status a shell gives a
            # process the signal ended, so that Lightning and the loggers finish (W&B's service loses what it
            # has not written when its process is killed)
            raise SystemExit(128 + self.signum)

    def _restore(self):
        previous, self._previous = self._previous, None
        if previous is not None:
            signal.signal(self.signum, previous)
        return previous

    def teardown(self, trainer, pl_module, stage: str) -> None:
        self._restore()
