"""Which tokens get weight: python -m lctw.tools.view on a tiny model, and the training callback's samples."""

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import SMALL, compose
from transformers import LlamaConfig, LlamaForCausalLM

from lctw.config import ConfigError
from lctw.method.scoring import model_logprobs
from lctw.method.weighting import weight_stats
from lctw.models import bpe_tokenizer
from lctw.tools.tokenview import visible
from lctw.tools.view import inspect_text
from lctw.training.callbacks import TokenWeights

pytestmark = pytest.mark.usefixtures("hydra_conf")  # Hydra initialized once for the module's compositions
TEXT = ("The secret number of Dovak is 4 7 1 9. Many essays begin with a date and a question. "
        "What makes a startup grow? Later, the secret number of Dovak is 4 7 1 9 again. ") * 3


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-hf")
    tokenizer = bpe_tokenizer([TEXT] * 4, 300)
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         intermediate_size=64, vocab_size=len(tokenizer), max_position_embeddings=128,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    (path.parent / "text.txt").write_text(TEXT)
    return path


@pytest.mark.integration
def test_inspect_writes_the_text_coloured_by_score_and_weight(tiny_hf, tmp_path):
    cfg = compose([f"ckpt={tiny_hf}", f"text={tiny_hf.parent / 'text.txt'}", "n=8", "N=64", "context=none",
                   "scorer=self", "weighting=dense", "weighting.lam=0.5", "top_k=5"], config_name="inspect")
    result = inspect_text(cfg, tmp_path)
    assert result["tokens"] == 64  # BOS + 63 tokens of the text: max_tokens defaults to N
    page = (tmp_path / "tokens.html").read_text()
    assert page.count('title="position ') == 2 * 63  # every target, coloured by score and by weight
    top = result["top"]
    assert len(top) == 5 and [t["rank"] for t in top] == [1, 2, 3, 4, 5]
    assert all(t["position"] > 8 for t in top)  # scorer=self: the first n targets see their whole context
    assert [t["score"] for t in top] == sorted((t["score"] for t in top), reverse=True)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, tok = AutoModelForCausalLM.from_pretrained(tiny_hf).eval(), AutoTokenizer.from_pretrained(tiny_hf)
    ids = torch.tensor([[tok.bos_token_id] + tok(TEXT, add_special_tokens=False)["input_ids"][:63]])
    with torch.no_grad():
        long = model_logprobs(model, ids)[0]
    for t in top:
        j = t["position"] - 1
        assert t["logp_long"] == pytest.approx(float(long[j]), abs=1e-5)
        assert t["score"] == pytest.approx(abs(t["logp_short"] - t["logp_long"]), abs=1e-6)
        # dense: w = lam + (1 - lam) · s / mean(s)
        assert t["weight"] == pytest.approx(0.5 + 0.5 * t["score"] / result["score_mean"], rel=1e-5)
        assert f"<b>{visible(t['token'])}</b>" in page
        assert f"<td>{t['score']:.3f}</td>" in page
    assert json.loads((tmp_path / "tokens.json").read_text())["top"][0]["position"] == top[0]["position"]
    assert (tmp_path / "tokens.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.integration
@pytest.mark.parametrize("override, message", [
    ("text=/no/such/file.txt", r"^text='/no/such/file.txt' is not a file"),
    ("scorer=none", r"^scorer=none has no scores to show"),
    ("top_k=0", r"^top_k=0 is out of range"),
])
def test_inspect_refuses_bad_options_before_loading_anything(tiny_hf, override, message):
    extra = ["weighting=uniform"] if override == "scorer=none" else []
    cfg = compose([f"ckpt={tiny_hf}", f"text={tiny_hf.parent / 'text.txt'}", "n=8", "N=64", "context=none",
                   override, *extra], config_name="inspect")
    with pytest.raises(ConfigError, match=message):
        inspect_text(cfg, "/nonexistent/never/written")


def _step(callback, batches, n=4, rows=2, cols=16):
    module = SimpleNamespace(n=n)
    for _ in range(batches):
        mask = torch.ones(rows, cols, dtype=torch.bool)
        mask[1, 12:] = False  # padding is never sampled
        weights = torch.rand(rows, cols) * mask
        callback.on_train_batch_end(None, module, {"loss": None, "scores": weights * 2, "weights": weights,
                                                    "mask": mask, "stats": weight_stats(weights, mask, n)}, None, 0)


def test_training_samples_stay_bounded_spread_over_the_run_and_survive_a_resume():
    callback = TokenWeights(per_step=8, max_samples=40, seed=1)
    _step(callback, 20)
    # 40 samples = 5 sampled batches; past that every other one is dropped and sampling halves its rate
    assert len(callback.sampled) * 8 <= 40 and callback.every == 4
    assert callback.sampled == [0, 4, 8, 12, 16]
    out = callback.arrays()
    assert len(out["step_ess"]) == 20 and len(out["weights"]) <= 40
    assert np.allclose(out["scores"], 2 * out["weights"])  # score and weight of the same target
    assert ((out["positions"] >= 1) & (out["positions"] <= 16)).all()
    resumed = TokenWeights(per_step=8, max_samples=40, seed=1)
    resumed.load_state_dict(callback.state_dict())
    torch.manual_seed(0)
    _step(callback, 6)
    torch.manual_seed(0)
    _step(resumed, 6)
    a, b = callback.arrays(), resumed.arrays()
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


@pytest.mark.integration
def test_inspect_a_run_with_its_frozen_scorer(trained_run, cache_dir, tmp_path, caplog):
    """python -m lctw.tools.view on a run directory: θ from hf/, θ0 (scorer=frozen) from the run's model spec."""
    from lctw.tools.view import inspect_text

    run_dir, _ = trained_run
    text = tmp_path / "essay.txt"
    text.write_text("Procrastination feeds on distractions. " * 40)
    cfg = compose([f"ckpt={run_dir}", f"text={text}", *SMALL[:2], "top_k=3"], cache=cache_dir, config_name="inspect")
    result = inspect_text(cfg, tmp_path / "out")
    assert result["tokens"] == 128 and len(result["top"]) == 3 and result["score_mean"] > 0
    assert "other settings than the run" not in caplog.text  # the run's own n, N, scorer and weighting
    assert "scorer=frozen" in (tmp_path / "out" / "tokens.html").read_text()
