"""Monotonic alignment search, length regulator and alignment losses."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from bittts.model.alignment import (
    AlignmentModule,
    average_by_duration,
    beta_binomial_log_prior,
    binarization_loss,
    durations_to_attention,
    forward_sum_loss,
    length_regulate,
    maximum_path,
)
from hypothesis import given, settings
from hypothesis import strategies as st

pytestmark = pytest.mark.usefixtures("one_thread")


def brute_force_best(log_p: np.ndarray) -> float:
    """Best monotonic path score by enumerating every split of T_mel frames into T_text non-empty runs."""
    t_mel, t_text = log_p.shape
    best = -np.inf
    for cuts in itertools.combinations(range(1, t_mel), t_text - 1):
        bounds = (0, *cuts, t_mel)
        score = sum(log_p[bounds[j]:bounds[j + 1], j].sum() for j in range(t_text))
        best = max(best, score)
    return best


def path_score(log_p: np.ndarray, durations: np.ndarray) -> float:
    token = np.repeat(np.arange(len(durations)), durations)
    return float(log_p[np.arange(len(token)), token].sum())


@st.composite
def alignment_problems(draw):
    b = draw(st.integers(1, 3))
    t_text = draw(st.integers(1, 5))
    t_mel = draw(st.integers(t_text, 9))
    text_lengths = [draw(st.integers(1, t_text)) for _ in range(b)]
    mel_lengths = [draw(st.integers(tl, t_mel)) for tl in text_lengths]
    seed = draw(st.integers(0, 2**31 - 1))
    log_p = np.random.default_rng(seed).normal(size=(b, t_mel, t_text)) * 3
    return log_p, np.array(text_lengths), np.array(mel_lengths)


@settings(deadline=None, max_examples=60)
@given(alignment_problems())
def test_mas_matches_brute_force_dynamic_program(problem):
    log_p, tl, ml = problem
    durations = maximum_path(torch.from_numpy(log_p), torch.from_numpy(tl), torch.from_numpy(ml)).numpy()
    for i in range(len(tl)):
        d = durations[i]
        assert (d[: tl[i]] >= 1).all() and (d[tl[i]:] == 0).all()
        assert d.sum() == ml[i]
        sub = log_p[i, : ml[i], : tl[i]]
        assert path_score(sub, d[: tl[i]]) == pytest.approx(brute_force_best(sub), rel=1e-9, abs=1e-9)


def test_mas_forced_path_and_degenerate_inputs():
    # one token per frame is the only valid path when T_mel == T_text, whatever the scores say
    log_p = np.full((1, 4, 4), -np.inf)
    log_p[0, :, 0] = 0.0
    assert maximum_path(log_p, [4], [4]).tolist() == [[1, 1, 1, 1]]
    # NaN scores still give a valid path
    d = maximum_path(np.full((1, 6, 3), np.nan), [3], [6])
    assert d.sum() == 6 and (d >= 1).all()


def test_mas_rejects_impossible_lengths():
    with pytest.raises(ValueError, match="item 0 has 2 mel frames for 3 text tokens"):
        maximum_path(np.zeros((1, 4, 3)), [3], [2])
    with pytest.raises(ValueError, match="batch, mel frames, text"):
        maximum_path(np.zeros((4, 3)), [3], [4])


def test_mas_is_fast_enough_for_real_batches():
    import time

    log_p = torch.randn(16, 500, 100).log_softmax(-1)
    t = time.perf_counter()
    d = maximum_path(log_p, torch.full((16,), 100), torch.full((16,), 500))
    assert time.perf_counter() - t < 2.0
    assert (d.sum(1) == 500).all()


@settings(deadline=None, max_examples=50)
@given(st.lists(st.lists(st.integers(0, 4), min_size=1, max_size=6), min_size=1, max_size=3),
       st.integers(1, 4), st.integers(0, 2**31 - 1))
def test_length_regulator_matches_repeat_interleave(durs, channels, seed):
    t_text = max(len(d) for d in durs)
    durations = torch.tensor([d + [0] * (t_text - len(d)) for d in durs])
    x = torch.randn(len(durs), channels, t_text, generator=torch.Generator().manual_seed(seed))
    y, lengths = length_regulate(x, durations)
    assert lengths.tolist() == durations.sum(1).tolist()
    assert y.shape == (len(durs), channels, int(durations.sum(1).max()))
    for b in range(len(durs)):
        expected = torch.repeat_interleave(x[b], durations[b], dim=1)
        torch.testing.assert_close(y[b, :, : lengths[b]], expected)
        assert (y[b, :, lengths[b]:] == 0).all()
    # the hard attention matrix is the same expansion
    attn = durations_to_attention(durations)
    torch.testing.assert_close(torch.bmm(x, attn.transpose(1, 2)), y)


def test_length_regulator_max_frames_and_gradient():
    x = torch.randn(1, 2, 3, requires_grad=True)
    y, lengths = length_regulate(x, torch.tensor([[2, 3, 1]]), max_frames=4)
    assert y.shape == (1, 2, 4) and lengths.tolist() == [4]
    y.sum().backward()
    assert x.grad[0, 0].tolist() == [2.0, 2.0, 0.0]
    with pytest.raises(ValueError, match="durations"):
        length_regulate(x, torch.tensor([[1, 2]]))


def test_length_regulator_exports_with_torch_export():
    """Its input check branches on data only in eager mode: torch.export records the regulator (a fixed frame
    count), and the program repeats as the eager call does."""

    class Regulate(torch.nn.Module):
        def forward(self, x, durations):
            return length_regulate(x, durations, max_frames=12)

    x, durations = torch.randn(1, 3, 4), torch.tensor([[2, 0, 3, 1]])
    program = torch.export.export(Regulate(), (x, durations))
    other = torch.tensor([[1, 4, 2, 2]])
    for got, expected in zip(program.module()(x, other), length_regulate(x, other, max_frames=12)):
        assert torch.equal(got, expected)
    with pytest.raises(ValueError, match="durations must be >= 0"):
        length_regulate(x, -durations)


def test_average_by_duration():
    values = torch.tensor([[1.0, 3.0, 5.0, 7.0, 0.0]])
    out = average_by_duration(values, torch.tensor([[2, 0, 2]]))
    torch.testing.assert_close(out, torch.tensor([[2.0, 0.0, 6.0]]))


def test_alignment_losses_prefer_the_true_alignment():
    """The forward-sum loss is lower for a soft alignment concentrated on a monotonic path than for a
    uniform one, and gradients stay finite with padded text and frames."""
    durations = torch.tensor([[2, 3, 1, 0], [1, 1, 2, 2]])
    tl, ml = torch.tensor([3, 4]), torch.tensor([6, 6])
    hard = durations_to_attention(durations, 6)
    mask = torch.arange(4).unsqueeze(0) < tl.unsqueeze(1)
    peaked = (hard * 8.0).masked_fill(~mask.unsqueeze(1), float("-inf")).log_softmax(-1).requires_grad_()
    uniform = torch.zeros(2, 6, 4).masked_fill(~mask.unsqueeze(1), float("-inf")).log_softmax(-1)
    fs_peaked = forward_sum_loss(peaked, tl, ml)
    assert fs_peaked < forward_sum_loss(uniform, tl, ml)
    assert binarization_loss(peaked, durations, ml) < binarization_loss(uniform, durations, ml)
    (fs_peaked + binarization_loss(peaked, durations, ml)).backward()
    assert torch.isfinite(peaked.grad).all()
    # MAS recovers the path the soft alignment concentrates on
    assert maximum_path(peaked, tl, ml).tolist() == durations.tolist()


def test_alignment_module_masks_padding():
    module = AlignmentModule(8, 80, 16)
    mask = torch.tensor([[True, True, False]])
    log_p = module(torch.randn(1, 8, 3), torch.randn(1, 80, 5), mask)
    assert log_p.shape == (1, 5, 3)
    assert torch.isneginf(log_p[..., 2]).all()
    torch.testing.assert_close(log_p[..., :2].exp().sum(-1), torch.ones(1, 5))


def test_beta_binomial_prior_is_a_diagonal_distribution():
    prior = beta_binomial_log_prior(torch.tensor([5, 3]), torch.tensor([12, 7]), 5, 12)
    assert prior.shape == (2, 12, 5)
    for b, (n, m) in enumerate([(5, 12), (3, 7)]):
        p = prior[b, :m, :n].exp()
        torch.testing.assert_close(p.sum(-1), torch.ones(m))
        peak = p.argmax(-1)
        assert peak[0] == 0 and peak[-1] == n - 1 and (peak.diff() >= 0).all()
        assert (prior[b, m:] == 0).all() and (prior[b, :, n:] == 0).all()
    # with a prior the module's output is still normalized over the valid text positions
    module = AlignmentModule(4, 80, 8)
    log_p = module(torch.randn(2, 4, 5), torch.randn(2, 80, 12), torch.arange(5) < torch.tensor([[5], [3]]), prior)
    torch.testing.assert_close(log_p.exp().sum(-1), torch.ones(2, 12))
