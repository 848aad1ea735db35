"""Every weighting of the spec's table against hand-worked numbers."""

import math

import pytest
import torch

from lctw.method.weighting import NPMI, PPMI, Dense, LongCE, Sparse, Uniform

# One sequence of 4 valid targets: long log-probs 0, short log-probs 0, -1, -1, -2 -> s = 0, 1, 1, 2.
LONG = torch.zeros(1, 4)
SHORT = torch.tensor([[0.0, -1.0, -1.0, -2.0]])
ALL = torch.ones(1, 4, dtype=torch.bool)


def test_uniform_is_one_on_valid_targets_and_zero_elsewhere():
    mask = torch.tensor([[True, True, False, True]])
    assert Uniform()(LONG, None, mask).tolist() == [[1.0, 1.0, 0.0, 1.0]]


def test_dense_matches_hand_worked_numbers():
    # M = 4, Σs = 4 -> ŵ = s = 0, 1, 1, 2; lam = 0.5 -> 0.5 + 0.5 ŵ
    assert Dense(0.5)(LONG, SHORT, ALL).tolist() == [[0.5, 1.0, 1.0, 1.5]]
    assert Dense(1.0)(LONG, SHORT, ALL).tolist() == [[1.0] * 4]  # lam = 1 is uniform
    assert Dense(0.0)(LONG, SHORT, ALL).tolist() == [[0.0, 1.0, 1.0, 2.0]]


def test_dense_normalizes_per_sequence_over_valid_targets_only():
    long = torch.zeros(2, 3)
    short = torch.tensor([[-1.0, -3.0, -100.0], [-2.0, -2.0, -2.0]])
    mask = torch.tensor([[True, True, False], [True, True, True]])
    w = Dense(0.0)(long, short, mask)
    # row 0: M = 2, s = 1, 3 -> 2·s/4 = 0.5, 1.5 ; the masked target gets 0 and does not enter Σs
    torch.testing.assert_close(w, torch.tensor([[0.5, 1.5, 0.0], [1.0, 1.0, 1.0]]))


def test_dense_all_zero_scores_gives_uniform():
    assert Dense(0.25)(LONG, LONG, ALL).tolist() == [[1.0] * 4]


def test_sparse_keeps_top_kappa_with_mass_m():
    # kappa = 0.5 -> k = 2 of M = 4: the score-2 target and one of the two tied score-1 targets, each M/k = 2
    w = Sparse(0.5, seed=0)(LONG, SHORT, ALL)
    assert w[0, 3] == 2.0 and w[0, 0] == 0.0
    assert sorted(w[0, 1:3].tolist()) == [0.0, 2.0]
    assert w.sum() == 4.0


def test_sparse_k_is_at_least_one_and_kappa_one_is_uniform():
    assert Sparse(0.01)(LONG, SHORT, ALL).tolist() == [[0.0, 0.0, 0.0, 4.0]]
    assert Sparse(1.0)(LONG, SHORT, ALL).tolist() == [[1.0] * 4]


def test_sparse_floor_is_exact_despite_float_round_off():
    # 0.29 * 100 = 28.999999999999996 in floating point; the spec's ⌊κM⌋ is 29.
    long, short = torch.zeros(1, 100), -torch.arange(100.0)[None]
    w = Sparse(0.29)(long, short, torch.ones(1, 100, dtype=torch.bool))
    assert int((w > 0).sum()) == 29
    torch.testing.assert_close(w.sum(), torch.tensor(100.0))


def test_sparse_ties_are_random_but_seeded():
    long, short, mask = torch.zeros(4, 64), torch.zeros(4, 64), torch.ones(4, 64, dtype=torch.bool)
    a1, a2 = Sparse(0.25, seed=1), Sparse(0.25, seed=1)
    first = a1(long, short, mask)
    assert torch.equal(first, a2(long, short, mask))  # same seed, same weights
    assert not torch.equal(first, Sparse(0.25, seed=2)(long, short, mask))  # another seed, other ties
    assert not torch.equal(first[0], first[1])  # ties are not broken by position
    assert (first > 0).sum(-1).tolist() == [16] * 4


def test_sparse_ignores_masked_targets():
    mask = torch.tensor([[True, True, True, False]])
    w = Sparse(0.5)(LONG, SHORT, mask)  # M = 3 -> k = 1: the best valid target (score 1) gets 3
    assert w[0, 3] == 0 and w.sum() == 3.0 and int((w > 0).sum()) == 1


def test_longce_is_clipped_likelihood_ratio():
    w = LongCE(gamma=5.0)(LONG, SHORT, ALL)
    torch.testing.assert_close(w, torch.tensor([[1.0, math.e, math.e, 5.0]]))  # e^2 = 7.39 -> clipped at 5


def test_ppmi_and_npmi_select_by_signed_shifted_pmi():
    long = torch.tensor([[0.0, -2.0, -0.5, -3.0]])
    short = torch.tensor([[-1.0, -1.0, -2.5, -0.5]])
    # long - short = 1, -1, 2, -2.5; shift c = e -> PPMI scores max(x - 1, 0) = 0, 0, 1, 0
    w = PPMI(kappa=0.25, shift=math.e)(long, short, ALL)
    assert w.tolist() == [[0.0, 0.0, 4.0, 0.0]]
    # NPMI scores max(short - long - 1, 0) = 0, 0, 0, 1.5 -> the last target
    w = NPMI(kappa=0.25, shift=math.e)(long, short, ALL)
    assert w.tolist() == [[0.0, 0.0, 0.0, 4.0]]


def test_weights_are_detached():
    long = torch.zeros(1, 4, requires_grad=True)
    short = SHORT.clone().requires_grad_(True)
    for weighting in (Dense(0.5), Sparse(0.5), LongCE(), PPMI(), NPMI()):
        assert not weighting(long, short, ALL).requires_grad


@pytest.mark.parametrize(
    "make, key",
    [(lambda: Dense(1.5), "lam=1.5"), (lambda: Dense(-0.1), "lam=-0.1"),
     (lambda: Sparse(0.0), "kappa=0.0"), (lambda: Sparse(1.2), "kappa=1.2"),
     (lambda: LongCE(0.0), "gamma=0.0"), (lambda: PPMI(shift=0.0), "shift=0.0")],
)
def test_out_of_range_parameters_name_the_argument_and_range(make, key):
    """Plain errors about the weighting's own arguments; the config layer adds ``weighting.`` (test_config)."""
    with pytest.raises(ValueError, match="^" + key.replace(".", r"\.") + ".*allowed"):
        make()


def test_non_uniform_weighting_without_scores_is_an_error():
    with pytest.raises(ValueError, match="scorer"):
        Dense(0.5)(LONG, None, ALL)


def test_sparse_interpolates_with_uniform_like_dense():
    # the general form's interpolation step: lam + (1 - lam)·w_sparse; kappa = 0.25 keeps the score-2 target
    assert Sparse(0.25, lam=0.5)(LONG, SHORT, ALL).tolist() == [[0.5, 0.5, 0.5, 2.5]]
    assert PPMI(0.25, lam=1.0)(LONG, SHORT, ALL).tolist() == [[1.0] * 4]
    with pytest.raises(ValueError, match=r"^lam=2 is out of range"):
        Sparse(0.25, lam=2)
