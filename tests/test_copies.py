"""Copy spans (data.copies), row mixtures (data.mixture), the copying evaluation (eval=copy) and its learning
curve, on the local tokenizer and real essays."""

import math
import random

import pytest
import torch
from test_facts import Induction

from lctw.config import ConfigError, build
from lctw.data import LongDocuments, essays
from lctw.data.copies import Copies, Vocabulary, held_out
from lctw.data.facts import Facts
from lctw.data.mixture import Mixture
from lctw.eval.copying import Copying
from lctw.models import TinyLlama


@pytest.fixture(scope="module")
def tokenizer(cache_dir):
    return TinyLlama(n=32, cache_dir=cache_dir, corpus=essays).tokenizer()


def test_spans_are_restated_verbatim_at_their_distances_without_overlap_until_the_density_is_reached():
    copies = Copies(density=0.4, min_length=4, max_length=16, random=0.5)
    vocabulary = Vocabulary(4096, [0, 1, 2])
    prose = list(range(5000, 5127))  # ids no random span uses: every prose token is recognisable
    rng = random.Random(0)
    kinds = []
    for _ in range(200):
        ids, spans = copies.plant(prose, vocabulary, "train", rng)
        assert len(ids) == len(prose)
        covered = [0] * len(ids)
        for first, second, length, kind in spans:
            assert ids[first : first + length] == ids[second : second + length]
            assert length + 1 <= second - first and second + length <= len(ids)  # d in [L + 1, as far as fits]
            if kind == "prose":
                assert ids[first : first + length] == prose[first : first + length]  # the prose already there
            else:
                assert all(t < 5000 for t in ids[first : first + length]) and not held_out(ids[first : first + 2])
            for p in (*range(first, first + length), *range(second, second + length)):
                covered[p] += 1
            kinds.append(kind)
        assert max(covered, default=0) <= 1  # no two occurrences overlap
        untouched = [i for i, c in enumerate(covered) if not c]
        assert [ids[i] for i in untouched] == [prose[i] for i in untouched]
        restated = sum(length for *_, length, _ in spans)
        assert restated >= 0.4 * len(prose) - 1 or len(spans) >= 3  # the density, unless the row filled up
    assert 0.4 < kinds.count("random") / len(kinds) < 0.6


def test_held_out_random_spans_are_never_drawn_for_training_and_only_they_for_evaluation():
    vocabulary = Vocabulary(4096, [0, 1, 2])
    rng = random.Random(1)
    train = [vocabulary.span(8, "train", rng) for _ in range(3000)]
    heldout = [vocabulary.span(8, "heldout", rng) for _ in range(3000)]
    assert not any(held_out(s) for s in train) and all(held_out(s) for s in heldout)
    assert not {tuple(s) for s in train} & {tuple(s) for s in heldout}
    assert all(min(s) >= 3 for s in train + heldout)  # never a special token
    assert 0.17 < sum(held_out([a, b]) for a in range(3, 203) for b in range(3, 203)) / 200**2 < 0.23  # a fifth
    probes = Copying(samples=50, seed=3).span_probes("random", vocabulary, list(range(5000, 6000)), 0, 128, 24, 112,
                                                     random.Random(0))
    for ids, control, second, distance in probes:
        first = second - distance
        assert held_out(ids[second : second + 2]) and ids[first : first + 8] == ids[second:]
        assert control[second:] == ids[second:] and control[first : first + 8] != ids[first : first + 8]


def test_a_mixture_draws_its_rows_with_the_given_shares_and_validation_plants_only_held_out_spans(tokenizer,
                                                                                               cache_dir):
    options = dict(copies={"density": 0.4}, facts={"rate": 30, "min_distance": 16, "max_distance": 48},
                   mixture={"plain": 0.25, "facts": 0.25, "repeats": 0.25, "copies": 0.25})
    dm = LongDocuments(max_len=64, tokenizer=tokenizer, cache_dir=cache_dir, max_docs=20, val_fraction=0.2, passes=2,
                       **options)
    dm.setup()
    once = LongDocuments(max_len=64, tokenizer=tokenizer, cache_dir=cache_dir, max_docs=20, val_fraction=0.2,
                         **options)
    once.setup()
    assert 1.9 < len(dm.train_set) / len(once.train_set) < 2.1  # each pass plants the documents anew
    assert len(dm.val_set) == len(once.val_set)  # validation is planted once
    rows = dm.train_set[:]["input_ids"]
    repeats = [r for r in rows if any(len(set(r[1:].tolist())) <= L and
                                      torch.equal(r[1 : 64 - L], r[1 + L :]) for L in range(4, 17))]
    assert 0.18 < len(repeats) / len(rows) < 0.32
    facts = [r for r in rows if "The secret number of" in tokenizer.decode(r)]
    assert 0.15 < len(facts) / len(rows) < 0.40  # facts rows (a fact in a copies row restates prose rarely)
    for r in dm.val_set[:]["input_ids"][:200]:  # a repeats row in validation repeats a held-out span
        r = r.tolist()
        for L in range(4, 17):
            if len(set(r[1:])) <= L and r[1 : 64 - L] == r[1 + L :]:
                assert held_out(r[1:3])


@pytest.mark.parametrize("options, match", [
    ({"copies": {"density": 1.5}}, r"data: copies\.density=1\.5 is out of range"),
    ({"copies": {"min_distance": 10}}, r"copies\.min_distance=10 is out of range: allowed > max_length"),
    ({"copies": {"spans": 3}}, r"copies\.spans is not an option of copies"),
    ({"copies": {}, "facts": {}}, r"facts and copies share the rows by mixture: set mixture"),
    ({"copies": {}, "mixture": {"plain": 0.5, "copies": 0.6}}, r"the shares must be >= 0 and sum to 1"),
    ({"mixture": {"plain": 0.5, "facts": 0.5}}, r"mixture\.facts > 0 needs facts"),
    ({"copies": {}, "mixture": {"plain": 0.5, "quotes": 0.5}}, r"mixture\.quotes is not a kind of row"),
    ({"passes": 3}, r"passes=3 is out of range: allowed >= 1, and 1 without facts or copies"),
])
def test_bad_copies_and_mixture_options_are_named(options, match):
    from omegaconf import OmegaConf

    node = OmegaConf.create({"_target_": "lctw.data.LongDocuments", "max_len": 64, **options})
    with pytest.raises(ConfigError, match=match):
        build(node, "data")


def test_a_facts_only_mixture_plants_what_data_facts_always_planted(tokenizer):
    facts = Facts(rate=12, min_distance=40, max_distance=120)
    prose = list(range(5000, 5400))
    a, b = random.Random(4), random.Random(4)
    for _ in range(20):
        ids, _, used = facts.plant(prose, 255, tokenizer, "train", a)
        assert Mixture({"facts": 1.0}, facts).row(prose, 255, tokenizer, None, "train", b) == (ids, used)


def test_copying_gives_the_gain_of_a_model_built_to_copy_and_zero_beyond_its_reach(tokenizer, cache_dir, tmp_path):
    """Induction (tests/test_facts.py) puts logit 20 on the token after the latest earlier occurrence of the
    last three tokens. On a restated random span of 8 tokens it predicts tokens 4..8 (the trigram needs the
    span's first two tokens), 5 of the 7 counted; the control (another span first) has no such trigram, so
    those tokens are uniform there: gain = 5/7 · (20 − log(e^20 + V − 1) + log V) nats per token, exactly."""
    dm = LongDocuments(max_len=256, tokenizer=tokenizer, cache_dir=cache_dir, max_docs=12, val_fraction=0.2)
    evaluation = Copying(samples=8, batch_size=4, prose_sequences=2)
    V = len(tokenizer)
    expected = 5 / 7 * (20 - math.log(math.exp(20) + V - 1) + math.log(V))
    short = evaluation(Induction(V, window=64), tokenizer, tmp_path / "short", datamodule=dm, n=64, N=256)
    long, _ = evaluation.measure(Induction(V, window=256), tokenizer, dm, 64, 256)
    for m in (short, long):
        assert m["eval/copy/random/gain_within_n"] == pytest.approx(expected, rel=1e-4)
        assert m["eval/copy/random/acc_within_n"] == 0.0  # tokens 2 and 3 are not predicted
        assert m["eval/copy/facts/acc_within_n"] == 1.0 and m["eval/copy/facts/gain_within_n"] > 20
    assert long["eval/copy/random/gain_beyond_n"] == pytest.approx(expected, rel=1e-4)
    assert long["eval/copy/random/gain_128-192"] == pytest.approx(expected, rel=1e-4)
    assert short["eval/copy/random/gain_beyond_n"] == 0.0 and short["eval/copy/facts/gain_beyond_n"] == 0.0
    assert {"eval/copy/prose/gain_64-128", "eval/copy/facts/acc_192-256", "eval/copy/prose_ce_within_n"} <= set(long)
    assert (tmp_path / "short" / "copy.csv").exists() and (tmp_path / "short" / "copy.json").exists()


def test_prose_ce_is_the_mean_ce_of_the_targets_with_more_than_skip_tokens_before_them():
    from transformers import LlamaConfig, LlamaForCausalLM

    from lctw.eval.recall import prose_ce

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2)).eval()
    prose = [random.Random(0).randrange(1, 50) for _ in range(100)]
    windows = torch.tensor([[0] + prose[i : i + 31] for i in (0, 31, 62)])  # three windows of 32, BOS first
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=windows).logits.float(), -1)
    nll = -logp[:, :-1].gather(-1, windows[:, 1:, None])[..., 0]  # nll[:, t] predicts position t + 1
    assert prose_ce(model, prose, 0, 32, batch_size=2) == pytest.approx(float(nll.mean()), rel=1e-5)
    assert prose_ce(model, prose, 0, 32, skip=8, batch_size=2) == pytest.approx(float(nll[:, 8:].mean()), rel=1e-5)
    assert prose_ce(model, prose, 0, 32, sequences=1) == pytest.approx(float(nll[0].mean()), rel=1e-5)
