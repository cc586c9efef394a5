"""Invariances of the streaming moments: any split, any merge order, permutation, scale."""

import itertools
import random

import torch
from hypothesis import given
from hypothesis import strategies as st

from gradstats.moments import RunningMoments
from gradstats.testing import reference_moments

values = st.floats(min_value=-1e3, max_value=1e3, allow_nan=False, allow_infinity=False)
weights = st.floats(min_value=0.01, max_value=10.0)


def _close(actual, expected, scale):
    torch.testing.assert_close(actual, expected, rtol=1e-12, atol=1e-12 * scale)


def _summaries(x, w, cuts):
    """RunningMoments per contiguous piece of the rows of x, cut at ``cuts``."""
    bounds = [0, *sorted(set(cuts)), len(x)]
    pieces = []
    for lo, hi in itertools.pairwise(bounds):
        rm = RunningMoments(weights="reliability")
        pieces.append(rm.update(x[lo:hi], None if w is None else w[lo:hi]))
    return pieces


@st.composite
def samples(draw, weighted):
    n = draw(st.integers(min_value=2, max_value=40))
    x = torch.tensor(draw(st.lists(values, min_size=n, max_size=n)))
    w = torch.tensor(draw(st.lists(weights, min_size=n, max_size=n))) if weighted else None
    cuts = draw(st.lists(st.integers(min_value=0, max_value=n), max_size=6))
    return x, w, cuts


def _assert_matches_one_pass(rm, x, w):
    ref = reference_moments(x, w, weights="reliability")
    scale = float(x.abs().max()) ** 2 + 1.0
    _close(rm.mean, ref["mean"], scale**0.5)
    _close(
        rm.m2,
        ref["population_variance"] * w.sum()
        if w is not None
        else ref["population_variance"] * len(x),
        scale * len(x),
    )
    _close(rm.variance(), ref["unbiased_variance"], scale)


@given(samples(weighted=False))
def test_any_split_into_updates_equals_one_pass(sample):
    x, w, cuts = sample
    rm = RunningMoments(weights="reliability")
    for piece in _summaries(x, w, cuts):
        rm.merge(piece)
    _assert_matches_one_pass(rm, x, w)
    sequential = RunningMoments(weights="reliability")
    bounds = [0, *sorted(set(cuts)), len(x)]
    for lo, hi in itertools.pairwise(bounds):
        sequential.update(x[lo:hi])
    _assert_matches_one_pass(sequential, x, w)


@given(samples(weighted=True), st.randoms(use_true_random=False))
def test_any_merge_order_and_tree_equals_one_pass(sample, rng: random.Random):
    x, w, cuts = sample
    pieces = _summaries(x, w, cuts)
    while len(pieces) > 1:  # merge random pairs: every binary tree and order is reachable
        i, j = rng.sample(range(len(pieces)), 2)
        pieces[i].merge(pieces[j])
        pieces.pop(j)
    _assert_matches_one_pass(pieces[0], x, w)


@given(samples(weighted=True), st.randoms(use_true_random=False))
def test_row_permutation_does_not_matter(sample, rng: random.Random):
    x, w, _ = sample
    order = list(range(len(x)))
    rng.shuffle(order)
    rm = RunningMoments(weights="reliability").update(x[order], w[order])
    _assert_matches_one_pass(rm, x, w)


@given(
    samples(weighted=False), st.floats(min_value=-50, max_value=50).filter(lambda c: abs(c) > 1e-3)
)
def test_scaling_the_data_scales_the_moments(sample, c):
    x, _, cuts = sample
    plain, scaled = RunningMoments(), RunningMoments()
    bounds = [0, *sorted(set(cuts)), len(x)]
    for lo, hi in itertools.pairwise(bounds):
        plain.update(x[lo:hi])
        scaled.update(c * x[lo:hi])
    scale = (float(x.abs().max()) + 1.0) ** 2 * c * c
    _close(scaled.mean, c * plain.mean, scale**0.5)
    _close(scaled.variance(), c * c * plain.variance(), scale)
