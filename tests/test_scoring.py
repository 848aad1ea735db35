"""Short-context log-probs against brute force, and the scorers' contracts.

Brute force is one forward pass per target on its own context. Tolerances: all paths run the same
float32 model on the same tokens; they differ only in the order of floating-point reductions
(attention over different key sets padded by masking), so 1e-5 absolute on log-probs is ample.
"""

import copy

import pytest
import torch
from conftest import tiny_llama
from oracles import brute_force_logprobs, frozen_copy
from transformers import MistralConfig, MistralForCausalLM

from lctw.method.context import ContextExtension
from lctw.method.scorers import FrozenScorer, SelfScorer
from lctw.method.scoring import (
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


KERNELS = [("sdpa", "sdpa"), ("sdpa", "flex"), ("sdpa", "dense"), ("eager", "dense"), ("eager", "sdpa")]


@pytest.mark.parametrize("attn, attention", KERNELS)
@pytest.mark.parametrize("sink", [False, True, "in_range"])
def test_window_equals_brute_force_for_one_layer(attn, attention, sink):
    """Every kernel and sink, on a length that is not a multiple of the window (blocked kernel's padding)."""
    if sink == "in_range" and attention == "dense":
        pytest.skip("the dense mask cannot move the sink (a clear error, tested in test_config)")
    model = tiny_llama(layers=1, attn=attn)
    ids = sequences()
    got = short_context_logprobs(model, ids, n=6, mode="window", sink=sink, attention=attention)
    torch.testing.assert_close(got, brute_force_logprobs(model, ids, n=6, sink=sink), **TOL)


def test_in_range_sink_is_the_window_a_model_trained_at_n_sees():
    """One layer: in_range equals chunked at stride 1 (every target on [BOS, its n-1 predecessors])."""
    model = tiny_llama(layers=1)
    ids = sequences(t=40)
    for n in (5, 8):
        window = short_context_logprobs(model, ids, n, "window", sink="in_range")
        torch.testing.assert_close(window, short_context_logprobs(model, ids, n, "chunked", stride=1), **TOL)


def test_in_range_sink_under_yarn_undoes_the_attention_factor():
    """YaRN scales cos/sin (and so the sink's key) by its attention factor; moving the sink must not
    apply it twice. Brute force runs the same extended model on each window."""
    model = tiny_llama(layers=1, max_position_embeddings=64)
    ContextExtension("yarn", 64, 16, original_max_position_embeddings=16).apply(model)
    assert model.base_model.rotary_emb.attention_scaling != 1.0
    ids = sequences(t=50)
    for attention in ("sdpa", "flex"):
        got = short_context_logprobs(model, ids, 8, "window", sink="in_range", attention=attention)
        torch.testing.assert_close(got, brute_force_logprobs(model, ids, 8, sink="in_range"), **TOL)


@pytest.mark.parametrize("sink", [False, True, "in_range"])
def test_window_kernels_agree_with_several_layers(sink):
    """blocked sdpa, FlexAttention and (where it can) the dense mask compute the same thing, GQA, batch 2."""
    model = tiny_llama(layers=3)
    assert model.config.num_key_value_heads < model.config.num_attention_heads
    for t in (23, 40, 56, 131):
        ids = sequences(t=t, seed=t)
        sdpa = short_context_logprobs(model, ids, 8, "window", sink=sink, attention="sdpa")
        torch.testing.assert_close(short_context_logprobs(model, ids, 8, "window", sink=sink, attention="flex"),
                                   sdpa, **TOL)
        if sink != "in_range":
            torch.testing.assert_close(
                short_context_logprobs(model, ids, 8, "window", sink=sink, attention="dense"), sdpa, **TOL)


@pytest.mark.parametrize("sink", [False, True, "in_range"])
def test_blocked_sdpa_kernel_for_every_block_size(sink):
    """The blocked kernel alone, against FlexAttention on the same q/k/v: blocks smaller than, equal to
    and larger than the window, and lengths that are not multiples of the block."""
    from lctw.method.attention import Window, flex_window, sdpa_window

    g = torch.Generator().manual_seed(0)
    for t, w in ((37, 8), (64, 16), (50, 5)):
        q, k, v = (torch.randn(2, heads, t, 16, generator=g) for heads in (4, 2, 2))
        rope = (torch.randn(t, 16, generator=g), torch.randn(t, 16, generator=g)) if sink == "in_range" else None
        want = flex_window(q, k, v, Window(w, sink, "flex", rope), 0.25)
        for block in (1, 3, w // 2, w, 2 * w + 1, None):
            got = sdpa_window(q, k, v, Window(w, sink, "sdpa", rope, block=block), 0.25)
            torch.testing.assert_close(got, want, **TOL)


def test_auto_falls_back_to_sdpa_when_flex_fails(monkeypatch, caplog):
    """Under ``auto`` a failing FlexAttention (e.g. no compiler on a GPU node) degrades to sdpa with a
    warning, through the real scoring call; an explicit ``attention=flex`` raises."""
    from lctw.method import attention

    def broken(*args, **kwargs):
        raise RuntimeError("no triton")

    monkeypatch.setattr(attention, "flex_window", broken)
    monkeypatch.setattr(attention, "_FLEX_FAILED", [])
    monkeypatch.setattr(attention, "flex_available", lambda: True)
    real_resolve = attention.resolve_attention
    monkeypatch.setattr(attention, "resolve_attention", lambda k, device: real_resolve(k, "cuda"))  # as on a GPU
    model, ids = tiny_llama(layers=2), sequences(t=40)
    want = short_context_logprobs(model, ids, 8, "window", sink="in_range", attention="sdpa")
    with caplog.at_level("WARNING", logger="lctw.method.attention"):
        got = short_context_logprobs(model, ids, 8, "window", sink="in_range", attention="auto")
    torch.testing.assert_close(got, want)
    assert "FlexAttention failed" in caplog.text and attention._FLEX_FAILED
    assert real_resolve("auto", "cuda") == "sdpa"  # for the rest of the process
    with pytest.raises(RuntimeError, match="no triton"):
        short_context_logprobs(model, ids, 8, "window", attention="flex")


def test_in_range_sink_follows_length_dependent_rope():
    """Dynamic NTK picks its frequencies from the pass's length: the sink must be rotated with the
    frequencies of the same pass (the rotary embedding evaluated at the pass's positions)."""
    from lctw.method.attention import sink_rope

    model = tiny_llama(layers=1, max_position_embeddings=64)
    ContextExtension("dynamic", 256, 16).apply(model)
    t, width = 200, 6
    cos, sin = sink_rope(model, t, width, "cpu")
    full_cos, full_sin = model.base_model.rotary_emb(torch.zeros(1), torch.arange(t)[None])
    pos = (torch.arange(t) - width).clamp(min=0)
    torch.testing.assert_close(cos, full_cos[0, pos] / full_cos[0, :1])
    torch.testing.assert_close(sin, full_sin[0, pos] / full_cos[0, :1])
    torch.testing.assert_close(short_context_logprobs(model, sequences(t=t), 8, "window", sink="in_range",
                                                      attention="flex"),
                               short_context_logprobs(model, sequences(t=t), 8, "window", sink="in_range"), **TOL)


def test_window_refuses_attention_options_it_does_not_implement():
    """Soft-capped attention logits (Gemma 2) would be silently dropped: refused with a clear error."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    model = Gemma2ForCausalLM(Gemma2Config(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                           num_key_value_heads=1, head_dim=16, intermediate_size=64,
                                           attn_logit_softcapping=50.0, sliding_window=64,
                                           attn_implementation="eager")).eval()
    with pytest.raises(ValueError, match=r"scorer\.mode=window cannot run this model's attention \(softcap\)"):
        short_context_logprobs(model, sequences(t=30), 8, "window")


def test_window_kernel_choice_and_restored_attention():
    from lctw.method.attention import resolve_attention, windowed

    assert resolve_attention("auto", "cpu") == "sdpa"
    assert resolve_attention("auto", "cuda") == "flex"  # where FlexAttention exists (torch >= 2.5)
    assert resolve_attention("dense", "cuda") == "dense"
    model = tiny_llama(layers=1)
    with pytest.raises(RuntimeError, match="boom"), windowed(model, 10, 4, False, "sdpa", "cpu"):
        assert model.config._attn_implementation == "lctw_window"
        raise RuntimeError("boom")
    assert model.config._attn_implementation == "sdpa"
    with torch.no_grad():  # outside windowed() the model is the plain causal model again
        torch.testing.assert_close(model_logprobs(model, sequences()), brute_force_logprobs(model, sequences(), 64))


@pytest.mark.parametrize("attn, attention", [("sdpa", "sdpa"), ("sdpa", "flex"), ("sdpa", "dense"),
                                             ("eager", "dense")])
def test_window_equals_transformers_sliding_window_attention(attn, attention):
    """With several layers, window mode is sliding-window attention (Mistral's, same weights)."""
    model = tiny_llama(layers=3, attn=attn)
    swa = MistralForCausalLM(MistralConfig(**{**model.config.to_dict(), "sliding_window": 6}))
    swa.load_state_dict(model.state_dict())
    swa.config._attn_implementation = attn
    ids = sequences()
    with torch.no_grad():
        reference = model_logprobs(swa.eval(), ids)
    torch.testing.assert_close(short_context_logprobs(model, ids, 6, "window", attention=attention), reference,
                               **TOL)


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


MODES = [("chunked", False), ("window", False), ("window", True), ("window", "in_range")]


@pytest.mark.parametrize("mode, sink", MODES)
def test_first_shared_targets_equal_the_long_pass(mode, sink):
    model = tiny_llama(layers=2)
    ids = sequences()
    k = shared_targets(mode, 8, sink)
    short, long = short_context_logprobs(model, ids, 8, mode, sink=sink), model_logprobs(model, ids).detach()
    torch.testing.assert_close(short[:, :k], long[:, :k], **TOL)
    if sink is not True:  # tight: the next target already sees less (with a true sink, one more is shared)
        assert (short[:, k] - long[:, k]).abs().min() > 1e-4


@pytest.mark.parametrize("mode, sink", MODES)
def test_self_scorer_reuses_long_logprobs_where_the_whole_context_fits_in_n(mode, sink):
    """The first n targets (x_2 … x_{n+1}) have at most n tokens before them: for ``self`` short = long
    there by definition, in every mode (the paper's code reuses n); the rest is the plain scoring."""
    n = 8
    model = tiny_llama(layers=2)
    ids = sequences()
    scorer = SelfScorer(n=n, max_len=29, mode=mode, stride=5, sink=sink)
    long = model_logprobs(model, ids)
    short = scorer(model, {"input_ids": ids}, long)
    assert torch.equal(short[:, :n], long.detach()[:, :n])  # reused, not recomputed: score exactly 0
    # brute force on the whole context of each of those targets gives the same (they fit in n)
    torch.testing.assert_close(brute_force_logprobs(model, ids, n, targets=list(range(n)))[:, :n], long[:, :n].detach(),
                               **TOL)
    plain = short_context_logprobs(model, ids, n, mode, stride=5, sink=sink)
    torch.testing.assert_close(short[:, n:], plain[:, n:], **TOL)
    assert not short.requires_grad and model.training is False


def test_self_scorer_scores_in_eval_mode_whatever_the_dropout():
    """θ' is the model with dropout off (documented in lctw.method.scoring.ShortContext): scoring a model with
    dropout in train mode gives the eval-mode log-probs, every time, and leaves θ in train mode."""
    model = tiny_llama(layers=2, attention_dropout=0.5).train()
    ids = sequences()
    scorer = SelfScorer(n=8, max_len=29, mode="chunked", stride=5)
    long = model_logprobs(model, ids).detach()
    first = scorer(model, {"input_ids": ids}, long)
    second = scorer(model, {"input_ids": ids}, long)
    assert model.training  # restored
    torch.testing.assert_close(first, second, rtol=0, atol=0)  # no dropout sample in the scores
    expected = short_context_logprobs(model.eval(), ids, 8, "chunked", stride=5)
    torch.testing.assert_close(first[:, 8:], expected[:, 8:], **TOL)
    with torch.no_grad():
        noisy = model.train()(input_ids=ids).logits
        clean = model.eval()(input_ids=ids).logits
    assert (noisy - clean).abs().max() > 1e-3  # the model really has dropout in train mode


@pytest.mark.integration
def test_frozen_scorer_keeps_theta0_through_extension_and_training():
    model = tiny_llama(layers=2)
    original = copy.deepcopy(model)
    scorer = frozen_copy(model, n=8, max_len=32)
    ContextExtension("linear", max_len=32, n=8).apply(model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1)  # θ trains away from θ0
    ids = sequences(t=32)
    expected = short_context_logprobs(original, ids, 8, "chunked")
    torch.testing.assert_close(scorer(model, {"input_ids": ids}, None), expected, **TOL)
    assert not any(p.requires_grad for p in scorer.model.parameters())
    scorer.train()  # the LightningModule's train() reaches the scorer: θ0 stays in eval mode
    assert not scorer.model.training


@pytest.mark.parametrize(
    "kwargs, match",
    [(dict(n=8, max_len=32, stride=8), r"^stride=8 .*allowed 1 … 7"),
     (dict(n=8, max_len=32, stride=0), r"^stride=0"),
     (dict(n=8, max_len=32, mode="sliding"), r"^mode='sliding'.*\['chunked', 'window'\]"),
     (dict(n=32, max_len=32), r"^n=32 must be smaller than max_len=32")],
)
def test_bad_scorer_arguments_name_the_argument(kwargs, match):
    """Plain errors about the scorer's own arguments; the config layer adds ``scorer.`` (test_config)."""
    with pytest.raises(ValueError, match=match):
        FrozenScorer(**kwargs)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU (compiled FlexAttention)")
@pytest.mark.parametrize("sink", [False, True, "in_range"])
def test_window_kernels_on_cuda(sink):
    """Compiled FlexAttention and blocked sdpa on the GPU agree with the CPU reference (float32) and
    with each other in bfloat16."""
    cpu = tiny_llama(layers=2, max_position_embeddings=512)
    ids = sequences(t=300, seed=1)
    ref = short_context_logprobs(cpu, ids, 64, "window", sink=sink, attention="sdpa")
    gpu = copy.deepcopy(cpu).cuda()
    for attention in ("flex", "sdpa"):
        got = short_context_logprobs(gpu, ids.cuda(), 64, "window", sink=sink, attention=attention).cpu()
        torch.testing.assert_close(got, ref, atol=2e-4, rtol=2e-4)
    half = gpu.to(torch.bfloat16)
    flex = short_context_logprobs(half, ids.cuda(), 64, "window", sink=sink, attention="flex")
    sdpa = short_context_logprobs(half, ids.cuda(), 64, "window", sink=sink, attention="sdpa")
    assert (flex - sdpa).abs().mean() < 0.05


def test_brute_force_on_selected_targets():
    model = tiny_llama(layers=1)
    ids = sequences(t=20)
    full = brute_force_logprobs(model, ids, 6, "in_range")
    some = brute_force_logprobs(model, ids, 6, "in_range", targets=[3, 11, 18])
    torch.testing.assert_close(some[:, [3, 11, 18]], full[:, [3, 11, 18]])
    assert some.isnan().sum() == 2 * (19 - 3)
