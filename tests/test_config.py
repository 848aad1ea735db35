"""Every YAML in conf/ composes and instantiates; bad options stop before any model loads."""

from pathlib import Path

import pytest
import torch
from conftest import CONF, compose
from hydra.errors import ConfigCompositionException
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ModelCheckpoint, TQDMProgressBar
from omegaconf import open_dict

from lctw import models
from lctw.config import TRAIN_KEYS, check_keys, check_ranges
from lctw.config import validate as build_parts
from lctw.runs import loggers
from lctw.training.callbacks import TokenWeights
from lctw.training.curve import LearningCurve
from lctw.training.preemption import RequeueCheckpoint
from lctw.training.trainer import check_trainer

# Files starting with "_" hold keys shared by a group's options through `defaults:`; they are not options.
GROUPS = {p.name: sorted(f.stem for f in p.glob("*.yaml") if not f.stem.startswith("_"))
          for p in Path(CONF).iterdir() if p.is_dir()}
DATA = Path(CONF).parent / "tests" / "data"  # data=files refuses a path that does not exist
# the paper's experiments compute the accumulation from the number of GPUs (trainer.devices=-1: all, none here)
PAPER = ["trainer.devices=8"]
REQUIRED = {("model", "hf"): ["model.name_or_path=some/model"], ("data", "files"): [f"data.path={DATA}"],
            ("eval", "harness"): ["eval.data_dir=tests/data/harness"], ("experiment", "paper_llama3"): PAPER,
            ("experiment", "paper_phi2"): PAPER}
CHEAP = ("weighting", "context", "scorer", "model")


def _option_names(group: str) -> dict[str, str]:
    """option -> the name the built part reports for itself (weighting/scorer .name, context .method)."""
    out = {}
    for option in GROUPS[group]:
        extra = ["weighting=uniform"] if (group, option) == ("scorer", "none") else []
        part = instantiate(compose([f"{group}={option}", *extra])[group])
        out[option] = part.method if group == "context" else part.name
    return out


@pytest.mark.parametrize("group", ["weighting", "scorer", "context"])
def test_each_method_option_builds_the_part_it_names(group):
    """The option a user types is the part that runs: its YAML builds the class of the same name (a preset
    of a part, such as scorer=small_llama32_1b, is named <part>_<preset>)."""
    names = _option_names(group)
    assert names == {o: o.split("_")[0] for o in GROUPS[group]}


def test_the_configuration_reference_lists_every_option():
    reference = (Path(CONF).parent / "docs" / "configuration.md").read_text()
    for group in ("scorer", "weighting", "context", "model", "data", "trainer", "logger", "eval"):
        row = next(line for line in reference.splitlines() if line.startswith(f"| `{group}` |"))
        missing = [o for o in GROUPS[group] if f"`{o}`" not in row]
        assert not missing, f"docs/configuration.md: the {group} row lacks {missing}"


# sweep presets hold hydra.sweeper settings: tests/test_sweeps.py composes them and checks their values
@pytest.mark.parametrize("group, option", [(g, o) for g, opts in GROUPS.items() if g not in ("hydra", "sweep")
                                           for o in opts])
def test_every_option_composes_and_instantiates(group, option, tmp_path):
    overrides = [f"{group}={option}", *REQUIRED.get((group, option), [])]
    if group == "scorer" and option == "none" or group == "weighting" and option != "uniform":
        overrides += ["scorer=frozen"] if group == "weighting" else ["weighting=uniform"]
    cfg = compose(overrides, cache=str(tmp_path))
    check_keys(cfg, TRAIN_KEYS)  # every value has its target's annotated type: no false alarm of the type checks
    check_ranges(cfg)
    check_trainer(cfg, machine=cfg.trainer.accelerator == "cpu")
    built = {key: instantiate(cfg[key]) for key in CHEAP}
    if group in ("weighting", "scorer"):
        assert built[group].name == option.split("_")[0]  # a preset of a part: <part>_<preset>
    if group == "context":
        assert built[group].method == option
    if group == "model":
        assert isinstance(built["model"], models.HFModel)
    if group == "eval":
        kinds = {"ppl": "PositionPerplexity", "ruler": "Ruler", "harness": "Harness", "all": "Suite",
                 "recall": "Recall", "study": "Suite", "copy": "Copying"}
        assert type(instantiate(cfg.eval)).__name__ == kinds[option]
    data = instantiate(cfg.data, tokenizer=None)
    assert data.max_len == cfg.N
    params = [torch.nn.Parameter(torch.zeros(2))]
    optimizer = instantiate(cfg.optimizer)(params)
    instantiate(cfg.scheduler)(optimizer)
    trainer_overrides = {} if cfg.trainer.accelerator == "cpu" else {"accelerator": "cpu", "precision": "32-true",
                                                                      "devices": 1, "strategy": "auto"}
    instantiate(cfg.trainer, **trainer_overrides, logger=False, enable_progress_bar=False)
    callbacks = [instantiate(c) for c in (cfg.callbacks or {}).values()]
    allowed = (ModelCheckpoint, TQDMProgressBar, TokenWeights, RequeueCheckpoint, LearningCurve)
    assert all(isinstance(c, allowed) for c in callbacks)
    logger = instantiate(cfg.logger, _partial_=True)(save_dir=str(tmp_path), name="t", group=None,
                                                     hparams={"a": 1})
    loggers.finish()
    if option == "none" and group == "logger":
        assert logger is False
    else:
        assert Path(logger.save_dir) == tmp_path


@pytest.mark.parametrize("scorer", ["frozen", "none"])
@pytest.mark.parametrize("experiment", GROUPS["experiment"])
def test_experiments_compose_as_deltas(experiment, scorer, tmp_path):
    extra = ["weighting=uniform"] if scorer == "none" else []
    extra += PAPER if experiment.startswith("paper") else []
    cfg = compose([f"experiment={experiment}", f"scorer={scorer}", *extra], cache=str(tmp_path))
    if experiment.startswith("base") and scorer != "none":  # the base stage trains at N = n: no θ' can be shorter
        with pytest.raises(ValueError, match=r"scorer\.n=256 must be smaller than max_len=256"):
            build_parts(cfg)
        return
    for key in CHEAP:
        instantiate(cfg[key])
    if experiment.startswith("base"):
        assert (cfg.N, cfg.context.method, cfg.model.pretrained, cfg.trainer.val_check_interval) == (
            cfg.n, "none", False, cfg.trainer.max_steps)
    if experiment == "paper_llama3" and scorer == "frozen":
        assert (cfg.n, cfg.N, cfg.context.rope_theta) == (8192, 32768, 15300000)
        assert instantiate(cfg.scorer).short.stride == 6144  # the paper's (1 - n/N)·n
        assert cfg.trainer.strategy._target_ == "lctw.training.distributed.FSDP2Strategy"
        assert (cfg.trainer.strategy.param_dtype, cfg.model.dtype) == ("bfloat16", "float32")  # fp32 masters
        assert cfg.global_batch == 16 and cfg.trainer.accumulate_grad_batches == 2  # 1 × 8 GPUs × 2
        assert cfg.weighting.lam == 0.75 and cfg.optimizer.lr == 2e-5 and list(cfg.optimizer.betas) == [0.9, 0.95]
        assert (cfg.scheduler.num_warmup_steps, cfg.trainer.max_steps) == (20, 240)


def test_group_interpolations_follow_n_and_N(tmp_path):
    cfg = compose(["n=100", "N=800", "context=yarn", "scorer=self"], cache=str(tmp_path))
    assert cfg.context.factor == 8.0 and cfg.context.original_max_position_embeddings == 100
    assert (cfg.scorer.n, cfg.scorer.max_len, cfg.data.max_len) == (100, 800, 800)


@pytest.mark.parametrize("sink", ["false", "true", "in_range"])
def test_window_sink_and_kernel_compose_from_the_command_line(sink, tmp_path):
    cfg = compose(["scorer=self", "scorer.mode=window", f"scorer.sink={sink}", "scorer.attention=flex"],
                  cache=str(tmp_path))
    scorer = instantiate(cfg.scorer)
    assert scorer.short.sink == {"false": False, "true": True}.get(sink, sink) and scorer.short.attention == "flex"


BAD = [
    (["weighting.lam=1.5"], r"weighting\.lam=1\.5 is out of range: allowed \[0, 1\]"),
    (["weighting=sparse", "weighting.kappa=0"], r"weighting\.kappa=0 is out of range: allowed \(0, 1\]"),
    (["weighting=longce", "weighting.gamma=0"], r"weighting\.gamma=0 is out of range: allowed > 0"),
    (["n=1024", "N=1024"], r"n=1024 must be smaller than N=1024"),
    (["scorer.stride=256"], r"scorer\.stride=256 does not fit windows of n=256 tokens: allowed 1 … 255"),
    (["scorer=none"], r"weighting=dense needs a scorer: scorer=none allows only weighting=uniform"),
    (["scorer.mode=exact"], r"scorer\.mode='exact' is not allowed: choose one of \['chunked', 'window'\]"),
    (["scorer.sink=begin"], r"scorer\.sink='begin' is not allowed: choose one of \[False, True, 'in_range'\]"),
    (["scorer.attention=fast"], r"scorer\.attention='fast' is not allowed: choose one of \['auto', 'flex', 'sdpa'"),
    (["scorer.mode=window", "scorer.sink=in_range", "scorer.attention=dense"],
     r"scorer\.sink=in_range needs attention in"),
]


@pytest.mark.parametrize("overrides, match", BAD)
def test_bad_input_stops_before_any_model_loads(overrides, match, tmp_path, monkeypatch):
    monkeypatch.setattr(models.HFModel, "load", lambda self: pytest.fail("a model was loaded"))
    monkeypatch.setattr(models.HFModel, "tokenizer", lambda self: pytest.fail("a tokenizer was loaded"))
    with pytest.raises(ValueError, match=match):
        build_parts(compose(overrides, cache=str(tmp_path)))


def test_unknown_group_option_lists_the_allowed_values(tmp_path):
    with pytest.raises(ConfigCompositionException) as err:
        compose(["weighting=fancy"], cache=str(tmp_path))
    message = str(err.value)
    assert "weighting/fancy" in message
    for option in ("dense", "sparse", "longce", "ppmi", "npmi", "uniform"):
        assert option in message


def test_small_scorer_with_another_vocabulary_is_refused_before_loading(cache_dir, tmp_path, monkeypatch):
    models.bpe_tokenizer(["another vocabulary entirely"] * 10, 300).save_pretrained(tmp_path)
    monkeypatch.setattr(models.HFModel, "load", lambda self: pytest.fail("a model was loaded"))
    cfg = compose(["scorer=small"], cache=cache_dir)
    with open_dict(cfg):
        cfg.scorer.model = {"_target_": "lctw.models.HFModel", "name_or_path": str(tmp_path)}
    with pytest.raises(ValueError, match=r"scorer=small: scorer\.model .* different vocabulary"):
        build_parts(cfg)


@pytest.mark.parametrize("weighting", ["dense", "sparse"])
@pytest.mark.parametrize("scorer", ["frozen", "self"])
@pytest.mark.parametrize("lam", [0.25, 0.5])
def test_the_headline_sweep_composes_for_every_job(weighting, scorer, lam, tmp_path):
    """Each job of `train.py -m weighting=dense,sparse scorer=frozen,self weighting.lam=0.25,0.5`."""
    cfg = compose([f"weighting={weighting}", f"scorer={scorer}", f"weighting.lam={lam}"], cache=str(tmp_path))
    assert instantiate(cfg.weighting).lam == lam
