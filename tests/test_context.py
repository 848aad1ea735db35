"""Context extension sets transformers' own RoPE for each method; θ0 keeps the original."""

import pytest
import torch
from conftest import tiny_llama
from oracles import frozen_copy
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from lctw.method.context import ContextExtension, rotary_dim

N, n = 256, 64

CASES = [
    ("theta", {"rope_theta": 500000.0}, {"rope_type": "default", "rope_theta": 500000.0}),
    ("linear", {"factor": 4.0}, {"rope_type": "linear", "factor": 4.0}),
    ("dynamic", {"factor": 4.0}, {"rope_type": "dynamic", "factor": 4.0}),
    ("yarn", {"factor": 4.0, "original_max_position_embeddings": n},
     {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": n}),
    ("llama3", {"factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": n},
     {"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
      "original_max_position_embeddings": n}),
]


@pytest.mark.parametrize("method, params, expected", CASES)
def test_inverse_frequencies_equal_transformers(method, params, expected):
    model = tiny_llama(max_position_embeddings=n)
    ContextExtension(method, max_len=N, n=n, **params).apply(model)
    rope = {"rope_theta": 10000.0, **expected}
    assert model.config.rope_parameters == rope
    max_pos = n if method == "dynamic" else N
    assert model.config.max_position_embeddings == max_pos
    # transformers' own model with the same settings, built from scratch
    reference = LlamaForCausalLM(LlamaConfig(**{**model.config.to_dict(), "rope_parameters": rope,
                                                "max_position_embeddings": max_pos}))
    torch.testing.assert_close(model.model.rotary_emb.inv_freq, reference.model.rotary_emb.inv_freq, rtol=0, atol=0)
    assert model.model.rotary_emb.attention_scaling == reference.model.rotary_emb.attention_scaling
    if method != "dynamic":
        init = ROPE_INIT_FUNCTIONS.get(rope["rope_type"])
        if init is not None:
            torch.testing.assert_close(model.model.rotary_emb.inv_freq, init(model.config, None)[0])


def test_dynamic_ntk_rescales_beyond_n_like_transformers():
    model = tiny_llama(max_position_embeddings=n)
    ContextExtension("dynamic", max_len=N, n=n, factor=4.0).apply(model)
    ids = torch.randint(3, 60, (1, N))
    with torch.no_grad():
        model(input_ids=ids)
    expected, _ = ROPE_INIT_FUNCTIONS["dynamic"](model.config, None, seq_len=N)
    torch.testing.assert_close(model.model.rotary_emb.inv_freq, expected)
    assert not torch.equal(expected, model.model.rotary_emb.original_inv_freq)


def test_theta_default_is_the_ntk_aware_base():
    model = tiny_llama(max_position_embeddings=n)
    ContextExtension("theta", max_len=N, n=n).apply(model)
    d = model.config.hidden_size // model.config.num_attention_heads
    assert rotary_dim(model.config) == d  # Llama rotates the whole head
    assert model.config.rope_parameters["rope_theta"] == pytest.approx(10000.0 * 4 ** (d / (d - 2)))


def test_theta_default_counts_only_the_rotated_dimensions_of_partial_rotary_models():
    """phi-2 rotates 32 of its 80 head dimensions: the NTK rule's exponent is d/(d-2) over those 32."""
    from transformers import PhiConfig, PhiForCausalLM

    config = PhiConfig(hidden_size=320, num_attention_heads=4, intermediate_size=64, num_hidden_layers=1,
                       vocab_size=64, max_position_embeddings=n, partial_rotary_factor=0.4)
    model = PhiForCausalLM(config)
    assert rotary_dim(model.config) == 32 and model.model.rotary_emb.inv_freq.numel() == 16
    ContextExtension("theta", max_len=N, n=n).apply(model)
    assert model.config.rope_parameters["rope_theta"] == pytest.approx(10000.0 * 4 ** (32 / 30))
    assert model.model.rotary_emb.inv_freq.numel() == 16  # still 32 rotated dims, new base
    assert model.model.rotary_emb.inv_freq[1] == pytest.approx(model.config.rope_parameters["rope_theta"] ** (-2 / 32))


def test_none_keeps_rope_and_frozen_theta0_keeps_the_original_frequencies():
    model = tiny_llama(max_position_embeddings=n)
    original = model.model.rotary_emb.inv_freq.clone()
    ContextExtension("none", max_len=N, n=n).apply(model)
    assert torch.equal(model.model.rotary_emb.inv_freq, original)

    model = tiny_llama(max_position_embeddings=n)
    scorer = frozen_copy(model, n=n, max_len=N)
    ContextExtension("linear", max_len=N, n=n, factor=4.0).apply(model)
    assert torch.equal(scorer.model.model.rotary_emb.inv_freq, original)
    assert scorer.model.config.rope_parameters == {"rope_theta": 10000.0, "rope_type": "default"}
    assert torch.equal(model.model.rotary_emb.inv_freq, original / 4.0)


@pytest.mark.parametrize(
    "kwargs, match",
    [(dict(method="ntk"), r"^method='ntk'.*\['none', 'theta'"),
     (dict(method="linear", factor=0.5), r"^factor=0\.5.*>= 1"),
     (dict(method="theta", rope_theta=-1.0), r"^rope_theta=-1\.0"),
     (dict(method="linear", n=N), r"^n=256 must be smaller than max_len=256")],
)
def test_bad_context_arguments_name_the_argument(kwargs, match):
    """Plain errors about the class's own arguments; the config layer adds ``context.`` (test_config)."""
    kwargs = {"max_len": N, "n": n, **kwargs}
    with pytest.raises(ValueError, match=match):
        ContextExtension(**kwargs)
