"""Bad configuration is refused before any model or data loads, naming the key, the value and what is allowed.

The catalogue is the reliability QA list (types not coerced, values that failed late or obscurely, paths
that do not exist, devices this machine lacks) plus neighbours of each. Every case composes the real
config (train.py's ``config`` or eval.py's ``evaluate``) and calls the validation its entry point calls,
with model loading, the tiny base and its tokenizer, ``torch.load`` and data loading made to fail the
test: a refusal has to come before all of them.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from typing import Any

import pytest
import torch
from conftest import ROOT, compose
from hydra.errors import ConfigCompositionException

from lctw import data, models
from lctw.config import ConfigError, build, validate, validate_evaluation
from lctw.config.types import check_value, parameters
from lctw.training import base

pytestmark = pytest.mark.usefixtures("hydra_conf")
CORES = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
cpu_only = pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal of a GPU on a machine without one")


def train(*overrides):
    return "config", list(overrides)


def evaluate(*overrides):
    """eval.py's config; ``{run}`` (a run directory) unless the case names another ckpt."""
    ckpt = [] if any(o.startswith("ckpt=") for o in overrides) or overrides == ("<none>",) else ["ckpt={run}"]
    return "evaluate", [*ckpt, *(o for o in overrides if o != "<none>")]


# ((config, overrides), regex of the message); {name} is a path of the `files` fixture
CASES = [
    # the fault policy and the resume point
    (train("nonfinite.policy=ignore"), r"^nonfinite\.policy='ignore' is not allowed: choose one of \['skip', 'stop'\]"),
    (train("nonfinite.max_skipped=-1"), r"^nonfinite\.max_skipped=-1 is out of range: allowed an int >= 0"),
    (train("checkpoint_every=0"), r"^checkpoint_every=0 is out of range: allowed >= 1"),
    (train("checkpoint_every=often"), r"^checkpoint_every='often' has the wrong type: expected int$"),
    # types: never coerced
    (train("weighting.lam=abc"), r"^weighting\.lam='abc' has the wrong type: expected float$"),
    (train("weighting.lam=true"), r"^weighting\.lam=True has the wrong type: expected float$"),
    (train("weighting=sparse", "weighting.seed=1.5"), r"^weighting\.seed=1\.5 has the wrong type: expected int$"),
    (train("data.drop_remainder=maybe"), r"^data\.drop_remainder='maybe' has the wrong type: expected bool"),
    (train("data.batch_size=2.0"), r"^data\.batch_size=2\.0 has the wrong type: expected int$"),
    (train("seed=abc"), r"^seed='abc' has the wrong type: expected int$"),
    (train("chunk_size=abc"), r"^chunk_size='abc' has the wrong type: expected int or null$"),
    (train("name=123"), r"^name=123 has the wrong type: expected str or null \(to pass it as text, quote it: "
                        r"name='123'\)"),
    (train("++trainer.max_steps=abc"), r"^trainer\.max_steps='abc' has the wrong type: expected int$"),
    (train("scorer.cache=1.5"), r"^scorer\.cache=1\.5 has the wrong type: expected bool \(true or false\), str or "
                                r"null \(to pass it as text, quote it: scorer\.cache='1\.5'\)$"),
    (train("optimizer.lr=abc"), r"^optimizer\.lr='abc' has the wrong type: expected float or Tensor$"),
    (train("logger.project=123"), r"^logger\.project=123 has the wrong type: expected str \(to pass it as text"),
    (train("context=yarn", "context.beta_fast=abc"), r"^context\.beta_fast='abc' has the wrong type: expected a "
                                                     r"number"),
    (evaluate("ckpt=123"), r"^ckpt=123 has the wrong type: expected str \(to pass it as text"),
    (evaluate("n=abc"), r"^n='abc' has the wrong type: expected int$"),
    (evaluate("eval.lengths=512"), r"^eval\.lengths=512 has the wrong type: expected list of int$"),
    (evaluate("eval.lengths=[512,abc]"), r"^eval\.lengths=\[512, 'abc'\] has the wrong type: expected list of int"),
    # allowed values
    (train("trainer.precision=fp7"), r"^trainer\.precision='fp7' is not allowed: choose one of \[64, 32, 16, .*"
                                     r"'bf16-mixed'"),
    (train("trainer.accelerator=quantum"), r"^trainer\.accelerator='quantum' is not allowed: choose one of "
                                           r"\[.*'cpu'"),
    (evaluate("dtype=fp8"), r"^dtype='fp8' is not allowed: choose one of \['float32', 'bfloat16', 'float16'\]"),
    (evaluate("eval.tasks=[niah_foo]"), r"^eval\.tasks: unknown \['niah_foo'\]"),
    # values that failed late: a ZeroDivisionError, after a validation pass, a math domain error, empty metrics
    (train("++trainer.max_steps=0"), r"^trainer\.max_steps=0 is out of range: allowed >= 1 .*or -1"),
    (train("trainer.accumulate_grad_batches=0"), r"^trainer\.accumulate_grad_batches=0 is out of range: allowed "
                                                 r">= 1"),
    (train("++trainer.val_check_interval=0"), r"^trainer\.val_check_interval=0 is out of range: allowed an int "
                                              r">= 1"),
    (train("trainer.val_check_interval=0.5"), r"^trainer\.val_check_interval=0\.5 is a fraction of an epoch, which "
                                              r"needs trainer\.check_val_every_n_epoch"),
    (train("trainer.val_check_interval=often"), r"^trainer\.val_check_interval='often' is not allowed: .*"
                                                r"'DD:HH:MM:SS'"),
    (train("trainer.limit_val_batches=0"), r"^trainer\.limit_val_batches=0 is out of range: allowed an int >= 1 "
                                           r".*\(0, 1\]"),
    (train("trainer.gradient_clip_val=-1"), r"^trainer\.gradient_clip_val=-1 is out of range: allowed >= 0"),
    (train("trainer.max_steps=-1"), r"^scheduler\.num_training_steps=-1 is out of range: .*trainer\.max_steps"),
    (train("data.batch_size=0"), r"^data\.batch_size=0 is out of range: allowed >= 1"),
    (train("context=yarn", "context.beta_fast=-1"), r"^context\.beta_fast=-1 is out of range: allowed > 0"),
    (train("context=yarn", "context.beta_fast=1", "context.beta_slow=2"),
     r"^context\.beta_fast=1 must be greater than beta_slow=2"),
    (train("context=llama3", "context.high_freq_factor=1"),
     r"^context\.high_freq_factor=1 must be greater than low_freq_factor=1\.0"),
    (train("chunk_size=0"), r"^chunk_size=0 is out of range: allowed >= 1"),
    (train("trainer=fsdp", "trainer.accelerator=cpu", "trainer.devices=2", "eval=ppl"),
     r"^eval is not run inside a trainer=fsdp run .*python eval\.py ckpt=<run dir>"),
    (train("global_batch=16", "trainer.accumulate_grad_batches=3"),
     r"^global_batch=16 but data\.batch_size=2 × 1 ranks × trainer\.accumulate_grad_batches=3 = 6 sequences"),
    (train("experiment=paper_llama3", "trainer.accelerator=cpu", "trainer.devices=1", "data.batch_size=3"),
     r"^global_batch=16 sequences per step is not a multiple of data\.batch_size=3 × 1 ranks"),
    (train("experiment=paper_phi2", "trainer.accelerator=cpu"),
     r"^trainer\.devices=-1 means every GPU, but torch sees none"),
    (train("scorer.n=1024"), r"^scorer\.n=1024 must be smaller than max_len=1024"),  # N = 1024: blames scorer.n
    (train("scorer.stride=0"), r"^scorer\.stride=0 does not fit windows of n=256 tokens: allowed 1 … 255"),
    (train("scorer=self", "+scorer.cache=true"), r"^scorer\.cache=True needs a fixed scorer"),
    (train("eval=ruler", "eval.lengths=[10]"), r"^eval\.lengths=\[10\] is out of range: allowed lengths >= 256"),
    (evaluate("eval=ruler", "eval.lengths=[10]"), r"^eval\.lengths=\[10\] is out of range: allowed lengths >= 256 "
                                                  r"tokens"),
    (evaluate("eval=ppl", "eval.batch_size=0"), r"^eval\.batch_size=0 is out of range: allowed >= 1"),
    (evaluate("eval=all", "eval.ruler.lengths=[100]"), r"^eval\.ruler\.lengths=\[100\] is out of range"),
    # keys that are not options: the nearest valid one
    (train("+weighting.lamm=0.5"),
     r"^weighting\.lamm is not an option of weighting \(lctw\.method\.weighting\.Dense\): "
     r"did you mean weighting\.lam\?"),
    (train("+trainer.max_step=3"), r"^trainer\.max_step is not an option of trainer \(lightning\.Trainer\): did you "
                                   r"mean trainer\.max_steps\?"),
    (train("+scorer.strid=3"), r"^scorer\.strid is not an option of scorer .*did you mean scorer\.stride\?"),
    (evaluate("+eval.sample=3"), r"^eval\.sample is not an option of eval .*did you mean eval\.samples\?"),
    # paths that do not exist, files that are not checkpoints, values that are missing
    (train("model=hf", "model.name_or_path=/nope/model"), r"^model\.name_or_path='/nope/model' does not exist"),
    (train("model=hf", "model.name_or_path='~/nope-lctw'"), r"^model\.name_or_path='~/nope-lctw' does not exist"),
    (train("model=hf", "model.name_or_path=org/m", "model.tokenizer_path=../nope"),
     r"^model\.tokenizer_path='\.\./nope' does not exist"),
    (train("model=hf"), r"^model\.name_or_path is missing \(\?\?\?\): give it on the command line"),
    (train("data=files", "data.path=/nope"), r"^data\.path='/nope' does not exist"),
    (train("ckpt_path=/nope.ckpt"), r"^ckpt_path='/nope\.ckpt' does not exist"),
    (train("ckpt_path={garbage_ckpt}"), r"^ckpt_path='.*garbage\.ckpt' is not a PyTorch checkpoint"),
    (train("ckpt_path={empty_dir}"), r"^ckpt_path='.*empty' is a directory, not a checkpoint file"),
    (evaluate("ckpt=/nope/run"), r"^ckpt='/nope/run' does not exist"),
    (evaluate("ckpt=outputs/runs/nope/12-00-00"), r"^ckpt='outputs/runs/nope/12-00-00' does not exist"),
    (evaluate("ckpt={garbage_ckpt}"), r"^ckpt='.*garbage\.ckpt' is not a PyTorch checkpoint"),
    (evaluate("ckpt={empty_dir}"), r"^ckpt='.*empty' is neither a run directory \(hf/config\.json\) nor a Hugging "
                                   r"Face model directory"),
    (evaluate("ckpt={empty_dir}", "gguf_file=model.gguf"), r"^gguf_file='model\.gguf' does not exist in ckpt="),
    (evaluate("<none>"), r"^ckpt is missing \(\?\?\?\)"),
    (evaluate("eval=harness"), r"^eval\.data_dir is missing \(\?\?\?\)"),
    # this machine
    pytest.param(train("trainer.accelerator=gpu"), r"^trainer\.accelerator=gpu is not available on this machine",
                 marks=cpu_only),
    pytest.param(train("trainer=gpu"), r"^trainer\.accelerator=gpu is not available", marks=cpu_only),
    pytest.param(train("trainer.devices=-1"), r"^trainer\.devices=-1 is not allowed with accelerator=cpu",
                 marks=cpu_only),
    (train(f"trainer.devices={CORES + 1}"), rf"^trainer\.devices={CORES + 1} is (not allowed|out of range)"),
    (train("trainer.devices=0"), r"^trainer\.devices=0 is (not allowed|out of range)"),
    pytest.param(evaluate("device=cuda"), r"^device=cuda is not available on this machine", marks=cpu_only),
    (evaluate("device=gpu"), r"^device='gpu' is not a device: allowed auto, cpu, cuda"),
]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Paths the cases refer to: a garbage and a real checkpoint, an empty directory, a run directory, a
    Hugging Face model directory (a tokenizer and a config.json, no weights) and non-UTF-8 documents."""
    root = tmp_path_factory.mktemp("files")
    paths = {name: root / name for name in ("garbage.ckpt", "real.ckpt", "empty", "run", "hf", "latin", "latin-json")}
    paths["garbage.ckpt"].write_bytes(b"\x80\x04 not a checkpoint")
    torch.save({"state_dict": {}}, paths["real.ckpt"])
    paths["empty"].mkdir()
    (paths["run"] / "hf").mkdir(parents=True)
    (paths["run"] / "hf" / "config.json").write_text("{}")
    models.bpe_tokenizer(["short documents for a tokenizer"] * 4, 300, add_bos=True).save_pretrained(paths["hf"])
    (paths["hf"] / "config.json").write_text(json.dumps({"model_type": "llama", "max_position_embeddings": 128}))
    for kind, folder, text in (("txt", "latin", "caf\xe9 au lait"), ("jsonl", "latin-json", '{"text": "caf\xe9"}')):
        paths[folder].mkdir()
        (paths[folder] / f"a.{kind}").write_bytes(text.encode("latin-1"))
        (paths[folder] / f"b.{kind}").write_text("fine" if kind == "txt" else '{"text": "fine"}')
    names = {"garbage_ckpt": "garbage.ckpt", "real_ckpt": "real.ckpt", "empty_dir": "empty", "run": "run",
             "hf_dir": "hf", "latin_dir": "latin", "latin_json": "latin-json"}
    return {key: str(paths[name]) for key, name in names.items()}


@pytest.fixture
def nothing_loads(monkeypatch):
    """Loading a model, building the tiny base or its tokenizer, unpickling a checkpoint or reading data
    fails the test."""
    for cls in (models.HFModel, models.TinyLlama):
        monkeypatch.setattr(cls, "load", lambda self, weights=True: pytest.fail("a model was loaded"))
    monkeypatch.setattr(base, "build_base", lambda *a, **k: pytest.fail("the tiny base was built"))
    monkeypatch.setattr(models.TinyLlama, "tokenizer", lambda self: pytest.fail("the tiny tokenizer was built"))
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("a checkpoint was unpickled"))
    monkeypatch.setattr(data.LongDocuments, "setup", lambda self, stage=None: pytest.fail("data was loaded"))
    monkeypatch.setattr(data.LongDocuments, "_build", lambda self: pytest.fail("data was loaded"))


def _compose(config, overrides, files, tmp_path):
    return compose([o.format(**files) for o in overrides], cache=str(tmp_path), config_name=config)


@pytest.mark.parametrize("case, match", CASES)
def test_bad_config_is_refused_before_anything_loads(case, match, files, nothing_loads, tmp_path):
    config, overrides = case
    cfg = _compose(config, overrides, files, tmp_path)
    with pytest.raises(ConfigError, match=match):
        validate(cfg) if config == "config" else validate_evaluation(cfg)


# Edge values that are allowed: validation runs to the end, still without loading anything (train.py's
# config with a local Hugging Face model, whose tokenizer is cheap).
ACCEPTED = [
    train("weighting.lam=1"),  # an int where a float is expected
    train("trainer.max_steps=-1", "scheduler=constant"),  # no step limit: trainer.max_epochs decides
    train("trainer.val_check_interval=00:00:10:00"),  # Lightning's time-based validation interval
    train("trainer.precision=32", "trainer.devices=auto"),
    train("ckpt_path={real_ckpt}"),
    train("data=files", "data.path={latin_dir}"),  # exists; its encoding shows when the documents are read
    evaluate("ckpt={real_ckpt}"),
    evaluate("ckpt=org/model", "dtype=bfloat16", "device=cpu"),  # a hub name is not a missing path
]


@pytest.mark.parametrize("case", ACCEPTED)
def test_allowed_edge_values_pass(case, files, nothing_loads, tmp_path):
    config, overrides = case
    if config == "config":
        overrides = ["model=hf", "model.name_or_path={hf_dir}", *overrides]
        assert validate(_compose(config, overrides, files, tmp_path)).model_spec.name_or_path == files["hf_dir"]
    else:
        assert type(validate_evaluation(_compose(config, overrides, files, tmp_path))).__name__ == "Ruler"


def test_a_hub_name_is_not_taken_for_a_missing_path(nothing_loads, tmp_path):
    """org/name stays a hub name: the spec builds (its tokenizer would come from the hub)."""
    cfg = compose(["model=hf", "model.name_or_path=meta-llama/Meta-Llama-3-8B"], cache=str(tmp_path))
    assert build(cfg.model, "model").name_or_path == "meta-llama/Meta-Llama-3-8B"


@pytest.mark.parametrize("folder", ["latin_dir", "latin_json"])
def test_a_document_that_is_not_utf8_is_named(folder, files, monkeypatch, tmp_path):
    """Reading the documents is the first point where their encoding shows; no model has loaded by then."""
    monkeypatch.setattr(models.HFModel, "load", lambda self, weights=True: pytest.fail("a model was loaded"))
    cfg = compose(["model=hf", f"model.name_or_path={files['hf_dir']}", "data=files", f"data.path={files[folder]}"],
                  cache=str(tmp_path))
    parts = validate(cfg)
    datamodule = build(cfg.data, "data", tokenizer=parts.tokenizer)
    with pytest.raises(ValueError, match=r"data\.path=.*: .*a\.(txt|jsonl) is not UTF-8 text \(byte 0xe9"):
        datamodule.setup("fit")


def test_a_scorer_window_beyond_the_pretrained_length_is_warned_about(files, nothing_loads, tmp_path, caplog):
    """scorer.n=512 against a θ0 pretrained at 128 (its config.json) is a legitimate experiment: a warning."""
    hf = ["model=hf", f"model.name_or_path={files['hf_dir']}", "n=100"]
    with caplog.at_level(logging.WARNING, logger="lctw.method.scorers"):
        validate(compose([*hf, "scorer.n=512"], cache=str(tmp_path)))
    assert "scorer.n=512 is longer than the 128 tokens θ′ (model) was pretrained at" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="lctw.method.scorers"):
        validate(compose(hf, cache=str(tmp_path)))
    assert "longer than" not in caplog.text  # scorer.n = n = 100 fits in 128
    assert models.TinyLlama(n=256).pretrained_length() == 256  # the tiny θ0 is pretrained at model.n


class _Extension:
    """A part written outside lctw whose annotation names a class imported only for type checkers."""

    def __init__(self, model: NotImportedHere, lam: float = 0.5):  # noqa: F821
        self.model, self.lam = model, lam


def test_an_annotation_that_cannot_be_resolved_accepts_anything_and_keeps_the_others():
    params, accepts_any = parameters(_Extension)
    assert params == {"model": Any, "lam": float} and not accepts_any
    with pytest.raises(ConfigError, match=r"^weighting\.lam='high' has the wrong type: expected float$"):
        check_value("weighting.lam", "high", params["lam"])


def test_a_mistyped_key_without_plus_is_refused_by_hydra_itself(tmp_path):
    """Composition, before any of our code runs: Hydra names the key but offers no nearest one."""
    with pytest.raises(ConfigCompositionException, match=r"Could not override 'weighting\.lamm'"):
        compose(["weighting.lamm=0.5"], cache=str(tmp_path))


@pytest.mark.slow  # tests/test_train.py::test_bad_option_on_the_command_line_names_the_key covers it in CI
def test_the_message_reaches_the_console_of_train_py(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"}
    cmd = [sys.executable, "train.py", "weighting.lam=true", f"hydra.run.dir={tmp_path}/run"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "weighting.lam=True has the wrong type: expected float" in proc.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()
