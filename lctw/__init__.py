"""lctw: long-context token weighting.

The package, from the paper outwards (each folder's docstring says what it owns and what it may import;
``tests/test_architecture.py`` holds the code to these rules and to an import graph without cycles):

* ``method/``   what the paper defines: short-context scoring, the scorers θ′, score → weight, context
  extension, attention windows, the weighted LM-head loss kernels. Imports nothing of lctw above it.
* ``models/``   model specs (data plus a loader), the tiny model's tokenizer, building θ for training,
  scoring and evaluation.
* ``data/``     long documents, planted facts and copy spans, batching.
* ``training/`` the LightningModule that composes a scorer, a weighting and a context, one ``run()`` for
  every training stage, the stages an entry point chains (the base stage θ0), callbacks, FSDP2.
* ``cache/``    the score cache: a fixed scorer's log-probs computed once (``score.py``) and read back.
* ``eval/``     RULER, LongBench/MMLU/BBH through lm-eval, recall of planted facts, position-resolved CE.
* ``runs/``     what a run leaves on disk: status and metrics, checkpoints, loggers, the sweep report.
* ``config/``   the one validation layer the entry points run before anything loads.
* ``tools/``    the token view: where the scores land in a text.

Two leaf modules sit beside them: ``errors.py`` (the configuration error every layer raises) and
``threads.py`` (the CPU thread policy the entry points set before torch loads; standard library only).
"""
