"""Short-context log-probs against brute force, and the scorers' contracts.

Brute force is one forward pass per target on its own context. Tolerances: all paths run the same
float32 model on the same tokens; they differ only in the order of floating-point reductions
(attention over different key sets padded by masking), so 1e-5 absolute on log-probs is ample.
"""

import copy

import pytest
import torch
from conftest import tiny_llama
from transformers import MistralConfig, MistralForCausalLM

from lctw.context import ContextExtension
from lctw.scoring import (
    FrozenScorer,
    SelfScorer,
    brute_force_logprobs,
    default_stride,
    logprobs_of,
    model_logprobs,
    shared_targets,
    short_context_logprobs,
)

TOL = dict(atol=1e-5, rtol=1e-5)


def sequences(b=2, t=29, vocab=64, bos=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (b, t), generator=g)
    if bos:
        ids[:, 0] = 1
    return ids


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("sink", [False, True])
def test_window_equals_brute_force_for_one_layer(attn, sink):
    model = tiny_llama(layers=1, attn=attn)
    ids = sequences()
    got = short_context_logprobs(model, ids, n=6, mode="window", sink=sink)
    torch.testing.assert_close(got, brute_force_logprobs(model, ids, n=6, sink=sink), **TOL)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_window_equals_transformers_sliding_window_attention(attn):
    """With several layers, window mode is sliding-window attention (Mistral's, same weights)."""
    model = tiny_llama(layers=3, attn=attn)
    swa = MistralForCausalLM(MistralConfig(**{**model.config.to_dict(), "sliding_window": 6}))
    swa.load_state_dict(model.state_dict())
    swa.config._attn_implementation = attn
    ids = sequences()
    with torch.no_grad():
        reference = model_logprobs(swa.eval(), ids)
    torch.testing.assert_close(short_context_logprobs(model, ids, 6, "window"), reference, **TOL)


def test_window_with_several_layers_is_not_per_target_truncation():
    """Documents why window mode is not brute force for L > 1: the receptive field is L·(n-1)+1."""
    model = tiny_llama(layers=2)
    ids = sequences(b=1, t=20)
    n, target = 4, 19  # token 19 is predicted from position q = 18, which sees q - L·(n-1) … q = 12 … 18
    q = target - 1
    far, beyond = ids.clone(), ids.clone()
    far[0, q - 2 * (n - 1)] = (ids[0, q - 2 * (n - 1)] + 1) % 60 + 3  # inside the receptive field
    beyond[0, q - 2 * (n - 1) - 1] = (ids[0, q - 2 * (n - 1) - 1] + 1) % 60 + 3  # just outside
    base = short_context_logprobs(model, ids, n, "window")[0, target - 1]
    assert short_context_logprobs(model, far, n, "window")[0, target - 1] != base
    assert short_context_logprobs(model, beyond, n, "window")[0, target - 1] == base


def chunked_brute_force(model, ids, n, stride):
    """Each target on the context its chunked window gives it: the window's start token is BOS."""
    b, t = ids.shape
    out = torch.empty(b, t - 1)
    with torch.no_grad():
        for i in range(1, t):
            if i <= n - 1:
                start = 0
            else:
                k = -(-(i - (n - 1)) // stride)  # the first window whose kept targets reach i
                start = min(k * stride, t - n)
            ctx = ids[:, start:i].clone()
            bos_rows = ids[:, 0] == 1
            ctx[bos_rows, 0] = 1
            logits = model(input_ids=ctx, use_cache=False).logits[:, -1:]
            out[:, i - 1] = logprobs_of(logits, ids[:, i : i + 1])[:, 0]
    return out


@pytest.mark.parametrize("t, stride", [(29, 5), (28, 5), (26, 4), (12, 7), (10, 9)])
def test_chunked_equals_per_window_brute_force(t, stride):
    model = tiny_llama(layers=2)
    ids = sequences(t=t)
    ids[1, 0] = 5  # a sequence without BOS keeps its own first tokens
    got = short_context_logprobs(model, ids, n=10, mode="chunked", stride=stride)
    torch.testing.assert_close(got, chunked_brute_force(model, ids, 10, stride), **TOL)


def test_chunked_targets_see_between_n_minus_stride_and_n_tokens():
    """Changing a token outside a target's window never changes its chunked log-prob."""
    model = tiny_llama(layers=2)
    ids = sequences(b=1, t=40)
    n, stride = 10, 6
    base = short_context_logprobs(model, ids, n, "chunked", stride=stride)
    moved = ids.clone()
    moved[0, 5] = (ids[0, 5] + 1) % 60 + 3
    changed = (short_context_logprobs(model, moved, n, "chunked", stride=stride) != base)[0]
    # token 5 is in windows starting at 0 (targets 1..9) only; the window at 6 replaces its first token
    assert changed[5:9].all() and not changed[9:].any()


def test_short_sequences_and_the_paper_stride():
    model = tiny_llama(layers=2)
    ids = sequences(t=8)
    full = model_logprobs(model, ids).detach()
    torch.testing.assert_close(short_context_logprobs(model, ids, 8, "chunked"), full, **TOL)
    torch.testing.assert_close(short_context_logprobs(model, ids, 8, "window"), full, **TOL)
    assert default_stride(8192, 32768) == 6144


@pytest.mark.parametrize("mode", ["chunked", "window"])
def test_first_shared_targets_equal_the_long_pass(mode):
    model = tiny_llama(layers=2)
    ids = sequences()
    k = shared_targets(mode, 8)
    torch.testing.assert_close(short_context_logprobs(model, ids, 8, mode)[:, :k],
                               model_logprobs(model, ids).detach()[:, :k], **TOL)


@pytest.mark.parametrize("mode", ["chunked", "window"])
def test_self_scorer_reuses_long_logprobs_and_matches_plain_scoring(mode):
    model = tiny_llama(layers=2)
    ids = sequences()
    scorer = SelfScorer(n=8, max_len=29, mode=mode, stride=5)
    long = model_logprobs(model, ids)
    short = scorer(model, ids, long)
    k = shared_targets(mode, 8)
    assert torch.equal(short[:, :k], long.detach()[:, :k])  # reused, not recomputed: score exactly 0
    torch.testing.assert_close(short, short_context_logprobs(model, ids, 8, mode, stride=5), **TOL)
    assert not short.requires_grad and model.training is False


def test_frozen_scorer_keeps_theta0_through_extension_and_training():
    model = tiny_llama(layers=2)
    original = copy.deepcopy(model)
    scorer = FrozenScorer(n=8, max_len=32)
    scorer.setup(model)
    ContextExtension("linear", max_len=32, n=8).apply(model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1)  # θ trains away from θ0
    ids = sequences(t=32)
    expected = short_context_logprobs(original, ids, 8, "chunked")
    torch.testing.assert_close(scorer(model, ids, None), expected, **TOL)
    assert not any(p.requires_grad for p in scorer.model.parameters())


@pytest.mark.parametrize(
    "kwargs, match",
    [(dict(n=8, max_len=32, stride=8), r"scorer\.stride=8 .*allowed 1 … 7"),
     (dict(n=8, max_len=32, stride=0), r"scorer\.stride=0"),
     (dict(n=8, max_len=32, mode="sliding"), r"scorer\.mode='sliding'.*\['chunked', 'window'\]"),
     (dict(n=32, max_len=32), r"n=32 must be smaller than N=32")],
)
def test_bad_scorer_arguments_name_the_key(kwargs, match):
    with pytest.raises(ValueError, match=match):
        FrozenScorer(**kwargs)
