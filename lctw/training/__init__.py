"""Training: the LightningModule, one ``run()`` for every training stage, and the stages an entry point chains.

* :mod:`.module`       ``TokenWeightingLM``: scorer + weighting + θ → the weighted next-token loss.
* :mod:`.experiment`   ``run(cfg)``: validate, build the parts, fit, save, evaluate.
* :mod:`.base`         the base stage (θ0 at n) and :func:`~lctw.training.base.prepare`, which the entry
  points call before any model is built; it refuses a θ0 that does not copy when the run asks for one.
* :mod:`.phases`       a run in phases (the copying base: short rows, then rows of n), each a ``run()``.
* :mod:`.schedule`     warm-up, constant, cosine decay: one learning-rate schedule over all phases.
* :mod:`.curve`        learning curves: an evaluation at chosen steps during training, ``<metric>@<step>``.
* :mod:`.callbacks`    progress, weight diagnostics, token views.
* :mod:`.trainer`      the Lightning Trainer (``conf/trainer/``): its values and this machine checked before
  anything loads, the ranks and who starts them, the global batch.
* :mod:`.distributed`  FSDP2 (``fully_shard``) strategy and sharded checkpoints; :mod:`.consolidate` merges them.
* :mod:`.preemption`   SLURM's warning signal: every rank saves ``last.ckpt`` at the next step, then requeues.

May import everything below it (method, models, data, cache, config, runs); nothing imports it except the
entry points, :mod:`lctw.cache.fill` and :mod:`lctw.tools`, and the config layer, which checks with the
Trainer's own checks (:mod:`.trainer`) and the module's fault policy (:func:`.module.check_nonfinite`); those
two import nothing of the config layer.
"""
