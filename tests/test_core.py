"""Tests of ppo.algo.core: hand-computed values, a slow reference for GAE, masking invariances and gradients."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch
from torch.testing import assert_close

from ppo.algo.core import (
    AdaptiveKLController,
    FixedKLController,
    center_per_group,
    compute_gae,
    entropy_from_logits,
    explained_variance,
    kl_penalty,
    masked_mean,
    masked_sum,
    masked_var,
    masked_whiten,
    policy_loss,
    rewards_with_kl,
    turn_discounts,
    value_loss,
)

# One row: prompt, two action tokens (turn 1), a tool-output token, one action token (turn 2), padding.
HAND_MASK = torch.tensor([[0.0, 1.0, 1.0, 0.0, 1.0, 0.0]])


def with_garbage(x: torch.Tensor, mask: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """``x`` with masked positions overwritten by large random numbers, inf and nan."""
    g = torch.Generator().manual_seed(seed)
    junk = torch.randn(x.shape, generator=g, dtype=torch.float64).to(x.dtype) * 1e4
    junk.view(-1)[::3] = float("nan")
    junk.view(-1)[1::5] = float("inf")
    return torch.where(mask.bool(), x, junk)


def random_mask(batch: int, length: int, gen: torch.Generator) -> torch.Tensor:
    """(B, T) action masks shaped like multi-turn rollouts: left pad, prompt, turns with tool gaps, right pad.

    Row 0 always has no action token; row 1 has one turn that fills the row to its last position.
    """
    mask = torch.zeros(batch, length)
    for b in range(batch):
        if b == 0:
            continue
        t = int(torch.randint(0, 4, (), generator=gen)) + int(torch.randint(1, 4, (), generator=gen))
        if b == 1:
            mask[b, t:] = 1.0
            continue
        while t < length:
            turn = int(torch.randint(1, 5, (), generator=gen))
            mask[b, t : t + turn] = 1.0
            t += turn + int(torch.randint(0, 4, (), generator=gen))
        if torch.rand((), generator=gen) < 0.5:
            mask[b, -int(torch.randint(1, 4, (), generator=gen)) :] = 0.0
    return mask


def gae_reference(rewards, values, mask, gamma, lam):
    """GAE by its definition, row by row in float64: A_i = sum_k (gamma*lam)^k delta_{i+k} over action tokens."""
    adv = torch.zeros(rewards.shape, dtype=torch.float64)
    for b in range(rewards.shape[0]):
        idx = [t for t in range(rewards.shape[1]) if mask[b, t]]
        r = [float(rewards[b, t]) for t in idx]
        v = [float(values[b, t]) for t in idx] + [0.0]  # value after the last action token is 0
        deltas = [r[i] + gamma * v[i + 1] - v[i] for i in range(len(idx))]
        for i, t in enumerate(idx):
            adv[b, t] = sum((gamma * lam) ** k * deltas[i + k] for k in range(len(idx) - i))
    ret = torch.where(mask.bool(), adv + values.double(), 0.0)
    return adv, ret


# --- masked statistics ------------------------------------------------------------------------------------


def test_masked_mean_and_sum_match_torch_on_the_unmasked_slice():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(5, 9, generator=gen)
    mask = random_mask(5, 9, gen)
    m = mask.bool()
    xg = with_garbage(x, mask)
    assert_close(masked_sum(xg, mask), x[m].sum())
    assert_close(masked_mean(xg, mask), x[m].mean())
    per_row = masked_mean(xg, mask, dim=1)
    for b in range(5):
        expected = x[b][m[b]].mean() if m[b].any() else torch.tensor(0.0)  # empty rows give 0
        assert_close(per_row[b], expected)
    assert_close(masked_var(xg, mask), x[m].var())
    assert_close(masked_var(xg, mask, unbiased=False), x[m].var(unbiased=False))


def test_masked_var_edge_cases():
    x = torch.tensor([[3.0, 7.0]])
    assert masked_var(x, torch.tensor([[1.0, 0.0]])).item() == 0.0  # one entry: variance 0
    with pytest.raises(ValueError, match="no entries"):
        masked_var(x, torch.zeros(1, 2))


def test_masked_whiten_gives_mean_zero_variance_one_and_zero_off_mask():
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(4, 10, generator=gen) * 3 + 5
    mask = random_mask(4, 10, gen)
    m = mask.bool()
    w = masked_whiten(with_garbage(x, mask), mask)
    assert_close(w[m].mean(), torch.tensor(0.0), atol=1e-6, rtol=0)
    assert_close(w[m].var(), torch.tensor(1.0))
    assert torch.all(w[~m] == 0)
    kept = masked_whiten(x, mask, shift_mean=False)
    assert_close(kept[m].mean(), x[m].mean())
    assert_close(kept[m].std(), torch.tensor(1.0))


def test_masked_whiten_over_processes_matches_one_process_and_ignores_masked_garbage():
    # Two "processes" holding half the rows each: ``reduce`` adds the other half's sums, as all_sum would.
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(6, 9, generator=gen) * 2 - 1
    mask = random_mask(6, 9, gen)
    halves = [(x[:3], mask[:3]), (x[3:], mask[3:])]
    expected = masked_whiten(x, mask)
    for k, (xk, mk) in enumerate(halves):
        other_x, other_m = halves[1 - k]
        calls = []

        def reduce(values, other_x=other_x, other_m=other_m, calls=calls):
            m = other_m.bool()
            if not calls:  # count and sum
                mine = [float(m.sum()), float(other_x[m].sum())]
            else:  # squared deviations from the mean the first call gave
                count, total = calls[0]
                mine = [float(((other_x[m] - total / count) ** 2).sum())]
            out = [a + b for a, b in zip(values, mine, strict=True)]
            calls.append(out)
            return out

        got = masked_whiten(with_garbage(xk, mk), mk, reduce=reduce)
        assert_close(got, expected[3 * k : 3 * k + 3], atol=1e-5, rtol=1e-5)
        assert torch.all(got[~mk.bool()] == 0)


def test_shape_mismatch_raises():
    with pytest.raises(ValueError, match="shape"):
        masked_mean(torch.zeros(2, 3), torch.ones(2, 4))
    with pytest.raises(ValueError, match="2 dimensions"):
        compute_gae(torch.zeros(6), torch.zeros(6), torch.ones(6), 1.0, 1.0)
    with pytest.raises(ValueError, match="values"):
        compute_gae(torch.zeros(2, 6), torch.zeros(2, 5), torch.ones(2, 6), 1.0, 1.0)
    with pytest.raises(ValueError, match="old_logprobs"):
        policy_loss(torch.zeros(2, 3), torch.zeros(3, 2), torch.zeros(2, 3), torch.ones(2, 3))


# --- GAE --------------------------------------------------------------------------------------------------


def test_gae_by_hand_across_a_tool_output_gap():
    # Action tokens at t=1, 2, 4 with r = 0, 1, 2 and V = 0.5, 1.0, 0.25; gamma 0.9, lam 0.8 (gamma*lam 0.72).
    # t=4: delta = 2 + 0.9*0 - 0.25 = 1.75;        A = 1.75
    # t=2: delta = 1 + 0.9*0.25 - 1.0 = 0.225;     A = 0.225 + 0.72*1.75 = 1.485   (the gap at t=3 is skipped)
    # t=1: delta = 0 + 0.9*1.0 - 0.5 = 0.4;        A = 0.4 + 0.72*1.485 = 1.4692
    rewards = torch.tensor([[9.0, 0.0, 1.0, -7.0, 2.0, 5.0]])
    values = torch.tensor([[3.0, 0.5, 1.0, 8.0, 0.25, -4.0]])
    adv, ret = compute_gae(rewards, values, HAND_MASK, gamma=0.9, lam=0.8)
    assert_close(adv, torch.tensor([[0.0, 1.4692, 1.485, 0.0, 1.75, 0.0]]))
    assert_close(ret, torch.tensor([[0.0, 1.9692, 2.485, 0.0, 2.0, 0.0]]))


@pytest.mark.parametrize(("gamma", "lam"), [(1.0, 1.0), (0.99, 0.95), (0.9, 0.0), (0.5, 0.7), (0.0, 0.5)])
def test_gae_matches_the_definition_on_random_masks(gamma, lam):
    gen = torch.Generator().manual_seed(int(gamma * 100 + lam * 10))
    rewards = torch.randn(8, 24, generator=gen)
    values = torch.randn(8, 24, generator=gen)
    mask = random_mask(8, 24, gen)
    adv, ret = compute_gae(rewards, values, mask, gamma, lam)
    ref_adv, ref_ret = gae_reference(rewards, values, mask, gamma, lam)
    assert_close(adv, ref_adv.float(), atol=1e-5, rtol=1e-5)
    assert_close(ret, ref_ret.float(), atol=1e-5, rtol=1e-5)
    assert torch.all(adv[0] == 0) and torch.all(ret[0] == 0)  # the row without action tokens


def test_gae_special_cases_lam_zero_and_monte_carlo():
    # lam = 0: A_t = r_t + gamma * V_next - V_t (one-step TD); gamma = lam = 1: A_t = sum of rewards to go - V_t.
    rewards = torch.tensor([[1.0, 2.0, 3.0]])
    values = torch.tensor([[0.5, 1.5, 2.5]])
    mask = torch.ones(1, 3)
    td, _ = compute_gae(rewards, values, mask, gamma=0.5, lam=0.0)
    assert_close(td, torch.tensor([[1 + 0.5 * 1.5 - 0.5, 2 + 0.5 * 2.5 - 1.5, 3 + 0 - 2.5]]))
    mc, ret = compute_gae(rewards, values, mask, gamma=1.0, lam=1.0)
    assert_close(mc, torch.tensor([[6 - 0.5, 5 - 1.5, 3 - 2.5]]))
    assert_close(ret, torch.tensor([[6.0, 5.0, 3.0]]))


def test_gae_ignores_gaps_and_garbage():
    gen = torch.Generator().manual_seed(3)
    rewards, values = torch.randn(6, 20, generator=gen), torch.randn(6, 20, generator=gen)
    mask = random_mask(6, 20, gen)
    adv, ret = compute_gae(rewards, values, mask, 0.95, 0.9)
    adv_g, ret_g = compute_gae(
        with_garbage(rewards, mask), with_garbage(values, mask, seed=1), mask, 0.95, 0.9
    )
    assert_close(adv_g, adv)
    assert_close(ret_g, ret)
    # Removing every masked column from a row (packing its action tokens) gives the same advantages.
    for b in range(6):
        m = mask[b].bool()
        packed, _ = compute_gae(
            rewards[b][m][None], values[b][m][None], torch.ones(1, int(m.sum())), 0.95, 0.9
        )
        assert_close(packed[0], adv[b][m])


def gae_reference_per_step(rewards, values, mask, gammas, lam):
    """GAE with a discount per step, row by row in float64: gamma_i discounts the step from action i to i + 1."""
    adv = torch.zeros(rewards.shape, dtype=torch.float64)
    for b in range(rewards.shape[0]):
        idx = [t for t in range(rewards.shape[1]) if mask[b, t]]
        r = [float(rewards[b, t]) for t in idx]
        g = [float(gammas[b, t]) for t in idx]
        v = [float(values[b, t]) for t in idx] + [0.0]
        running = 0.0
        for i in reversed(range(len(idx))):
            running = r[i] + g[i] * v[i + 1] - v[i] + g[i] * lam * running
            adv[b, idx[i]] = running
    return adv


def test_turn_discounts_by_hand():
    # HAND_MASK: turn 1 is t=1..2, turn 2 is t=4. Turn ends at t=2 and t=4 carry turn_gamma.
    gammas = turn_discounts(HAND_MASK, token_gamma=0.99, turn_gamma=0.5)
    assert_close(gammas[0, [1, 2, 4]], torch.tensor([0.99, 0.495, 0.495]))


def test_gae_with_per_step_discounts_matches_the_definition():
    gen = torch.Generator().manual_seed(11)
    rewards, values = torch.randn(8, 24, generator=gen), torch.randn(8, 24, generator=gen)
    mask = random_mask(8, 24, gen)
    gammas = turn_discounts(mask, 0.97, 0.6)
    adv, ret = compute_gae(rewards, values, mask, gammas, 0.9)
    ref = gae_reference_per_step(rewards, values, mask, gammas, 0.9)
    assert_close(adv, ref.float(), atol=1e-5, rtol=1e-5)
    assert_close(ret, torch.where(mask.bool(), ref.float() + values, 0.0), atol=1e-5, rtol=1e-5)
    # A constant tensor is the scalar; garbage at masked positions of the discounts changes nothing.
    assert_close(compute_gae(rewards, values, mask, torch.full_like(mask, 0.95), 0.9)[0],
                 compute_gae(rewards, values, mask, 0.95, 0.9)[0])  # fmt: skip
    junk = torch.where(mask.bool(), gammas, torch.full_like(gammas, 7.0))
    assert_close(compute_gae(rewards, values, mask, junk, 0.9)[0], adv)


def test_a_recovered_success_is_worth_turn_gamma_less():
    # Two rows, each ending in success (+1): one in one turn, one after a failed turn (-0.05). V = 0, lam = 1.
    mask = torch.tensor([[1.0, 1.0, 0.0, 0.0, 0.0], [1.0, 1.0, 0.0, 1.0, 1.0]])
    scores = torch.tensor([[0.0, 1.0, 0.0, 0.0, 0.0], [0.0, -0.05, 0.0, 0.0, 1.0]])
    adv, _ = compute_gae(scores, torch.zeros(2, 5), mask, turn_discounts(mask, 1.0, 0.9), 1.0)
    assert_close(adv[:, 0], torch.tensor([1.0, -0.05 + 0.9]))


def test_gae_rejects_bad_gamma():
    with pytest.raises(ValueError, match="gamma"):
        compute_gae(torch.zeros(1, 2), torch.zeros(1, 2), torch.ones(1, 2), 1.5, 0.9)


def test_center_per_group_by_hand():
    # Group 7: row means 1.5 and 3, offset 2.25. Group 2: row 2 has mean 4; row 3 has no action token and
    # neither counts in its group's mean nor receives anything.
    adv = torch.tensor([[1.0, 2.0, 9.0], [3.0, 3.0, 3.0], [0.0, 4.0, 0.0], [5.0, 5.0, 5.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1], [0, 1, 0], [0, 0, 0]])
    out = center_per_group(adv, mask, torch.tensor([7, 7, 2, 2]))
    assert_close(
        out, torch.tensor([[-1.25, -0.25, 0.0], [0.75, 0.75, 0.75], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    )


def test_center_per_group_matches_a_loop_and_ignores_garbage():
    g = torch.Generator().manual_seed(3)
    adv = torch.randn(12, 9, generator=g)
    mask = (torch.rand(12, 9, generator=g) < 0.6).float()
    groups = torch.arange(12) // 4
    out = center_per_group(with_garbage(adv, mask), mask, groups)
    expected = torch.zeros_like(adv)
    for k in range(3):
        rows = range(4 * k, 4 * k + 4)
        means = [float(adv[i][mask[i] > 0].mean()) for i in rows if mask[i].sum() > 0]
        for i in rows:
            expected[i] = (adv[i] - sum(means) / len(means)) * mask[i]
    assert_close(out, expected)
    # With lambda 1 the rows of one prompt share V(prompt): centred, their first-token advantages are G_i - mean G.
    returns = torch.tensor([1.0, 0.0, 0.0, 0.5])
    first = center_per_group((returns - 0.3)[:, None].expand(4, 2), torch.ones(4, 2), torch.zeros(4))[:, 0]
    assert_close(first, returns - returns.mean())


# --- policy loss ------------------------------------------------------------------------------------------


def test_policy_loss_by_hand():
    # eps 0.2; per token -A*r against -A*clip(r, 0.8, 1.2), the larger wins:
    # A=+1 r=1.5: max(-1.5, -1.2) = -1.2 (clipped)   A=+1 r=0.5: max(-0.5, -0.8) = -0.5
    # A=-1 r=1.5: max( 1.5,  1.2) =  1.5             A=-1 r=0.5: max( 0.5,  0.8) =  0.8 (clipped)
    # loss = (-1.2 - 0.5 + 1.5 + 0.8) / 4 = 0.15, clipfrac 2/4.
    # k3 = r - 1 - ln r: 0.5 - ln 1.5 = 0.0945349, -0.5 - ln 0.5 = 0.1931472; mean 0.1438410.
    ratios = torch.tensor([[1.5, 0.5, 1.5, 0.5, 1.0]])
    old = torch.tensor([[-1.0, -2.0, -0.5, -3.0, -1.0]])
    mask = torch.tensor([[1, 1, 1, 1, 0]], dtype=torch.bool)
    adv = torch.tensor([[1.0, 1.0, -1.0, -1.0, 50.0]])
    logprobs = with_garbage(old + ratios.log(), mask)
    loss, stats = policy_loss(logprobs, old, adv, mask, clip_eps=0.2)
    assert_close(loss, torch.tensor(0.15))
    assert stats["policy_loss"] == pytest.approx(0.15)
    assert stats["clipfrac"] == pytest.approx(0.5)
    assert stats["dual_clipfrac"] == 0.0
    assert stats["ratio_mean"] == pytest.approx(1.0)
    assert stats["ratio_max"] == pytest.approx(1.5)
    assert stats["approx_kl"] == pytest.approx(0.1438410, abs=1e-6)


def test_policy_loss_dual_clip_by_hand():
    # c = 3: where A < 0 the per-token loss is capped at -c*A = 3.
    # A=-1 r=5: max(5, 1.2) = 5 -> capped to 3 (dual clip active)
    # A=-1 r=2: max(2, 1.2) = 2 < 3, unchanged
    # A=+1 r=5: max(-5, -1.2) = -1.2 (clipped; dual clip does not apply to A > 0)
    # loss = (3 + 2 - 1.2) / 3 = 3.8 / 3
    old = torch.zeros(1, 3)
    logprobs = torch.tensor([[5.0, 2.0, 5.0]]).log().requires_grad_()
    adv = torch.tensor([[-1.0, -1.0, 1.0]])
    loss, stats = policy_loss(logprobs, old, adv, torch.ones(1, 3), clip_eps=0.2, dual_clip=3.0)
    assert_close(loss, torch.tensor(3.8 / 3))
    assert stats["dual_clipfrac"] == pytest.approx(1 / 3)
    assert stats["clipfrac"] == pytest.approx(1 / 3)
    loss.backward()
    # Capped and clipped tokens are constant in the ratio; d/dlogp of -A*r/3 at r=2 is 2/3.
    assert_close(logprobs.grad, torch.tensor([[0.0, 2.0 / 3, 0.0]]))
    with pytest.raises(ValueError, match="greater than 1"):
        policy_loss(logprobs, old, adv, torch.ones(1, 3), dual_clip=0.5)


def test_policy_loss_at_ratio_one_is_minus_mean_advantage():
    gen = torch.Generator().manual_seed(4)
    logprobs = -torch.rand(4, 12, generator=gen)
    adv = torch.randn(4, 12, generator=gen)
    mask = random_mask(4, 12, gen)
    loss, stats = policy_loss(logprobs, logprobs.clone(), adv, mask)
    assert_close(loss, -adv[mask.bool()].mean())
    assert stats["clipfrac"] == 0.0
    assert stats["approx_kl"] == 0.0
    assert stats["ratio_mean"] == pytest.approx(1.0)


def test_losses_ignore_garbage_and_send_no_gradient_to_masked_tokens():
    gen = torch.Generator().manual_seed(5)
    mask = random_mask(6, 16, gen)
    m = mask.bool()
    old_lp = -torch.rand(6, 16, generator=gen) * 3
    lp = old_lp + 0.3 * torch.randn(6, 16, generator=gen)
    adv, ret = torch.randn(6, 16, generator=gen), torch.randn(6, 16, generator=gen)
    old_v = torch.randn(6, 16, generator=gen)
    v = old_v + 0.3 * torch.randn(6, 16, generator=gen)

    def losses(lp_in, old_lp_in, adv_in, v_in, old_v_in, ret_in):
        lp_in, v_in = lp_in.clone().requires_grad_(), v_in.clone().requires_grad_()
        pl, ps = policy_loss(lp_in, old_lp_in, adv_in, mask, dual_clip=2.0)
        vl, vs = value_loss(v_in, old_v_in, ret_in, mask)
        (pl + vl).backward()
        return pl, ps, vl, vs, lp_in.grad, v_in.grad

    clean = losses(lp, old_lp, adv, v, old_v, ret)
    dirty = losses(*(with_garbage(x, mask, seed=i) for i, x in enumerate((lp, old_lp, adv, v, old_v, ret))))
    for a, b in zip(clean, dirty, strict=True):
        if isinstance(a, dict):
            assert a == pytest.approx(b)
        else:
            assert_close(b, a)
    for grad in dirty[4:]:
        assert torch.all(grad[~m] == 0)
        assert torch.isfinite(grad).all() and grad[m].abs().sum() > 0


# --- value loss -------------------------------------------------------------------------------------------


def test_value_loss_by_hand():
    # eps 0.2, V_clip = V_old + clip(V - V_old, -0.2, 0.2):
    # V=1.0 V_old=0.5 R=1: V_clip 0.7, max(0.00, 0.09) = 0.09 (clipped larger)
    # V=0.6 V_old=0.5 R=1: V_clip 0.6, max(0.16, 0.16) = 0.16 (a tie is not counted as clipped)
    # V=0.0 V_old=0.5 R=1: V_clip 0.3, max(1.00, 0.49) = 1.00
    # V=2.0 V_old=0.5 R=0: V_clip 0.7, max(4.00, 0.49) = 4.00
    # loss = 0.5 * (0.09 + 0.16 + 1 + 4) / 4 = 0.65625; clipfrac 1/4.
    # Explained variance: R = [1,1,1,0] has variance 0.1875; R - V = [0, 0.4, 1, -2] has variance 1.2675;
    # 1 - 1.2675 / 0.1875 = -5.76.
    values = torch.tensor([[1.0, 0.6, 0.0, 2.0, 7.0]], requires_grad=True)
    old = torch.tensor([[0.5, 0.5, 0.5, 0.5, -7.0]])
    returns = torch.tensor([[1.0, 1.0, 1.0, 0.0, 3.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 1.0, 0.0]])
    loss, stats = value_loss(values, old, returns, mask, clip_eps=0.2)
    assert_close(loss, torch.tensor(0.65625))
    assert stats["value_clipfrac"] == pytest.approx(0.25)
    assert explained_variance(values, returns, mask) == pytest.approx(-5.76, abs=1e-5)
    loss.backward()
    # d/dV of 0.5*(V-R)^2/4 = (V-R)/4 on unclipped tokens; the clipped token's term is constant in V.
    assert_close(values.grad, torch.tensor([[0.0, -0.1, -0.25, 0.5, 0.0]]))


def test_explained_variance_cases():
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    y = torch.tensor([[1.0, 2.0, 3.0, 100.0]])
    assert explained_variance(y, y, mask) == pytest.approx(1.0)
    assert explained_variance(torch.full_like(y, 2.0), y, mask) == pytest.approx(0.0)
    constant = torch.tensor([[4.0, 4.0, 4.0, 0.0]])
    assert explained_variance(y, constant, mask) == 0.0  # Var(R) = 0: defined as 0, never nan
    # Equal returns that are not exactly representable leave a rounding-sized variance, still "0", not -1e13.
    returns = torch.full((3, 50), -1.0)
    returns[0, :7] = torch.nextafter(torch.tensor(-1.0), torch.tensor(0.0))  # one float32 step off
    values = torch.linspace(-2.0, 0.0, 150).view(3, 50)
    assert explained_variance(values, returns, torch.ones_like(returns)) == 0.0


def test_explained_variance_over_processes_is_that_of_all_their_tokens():
    g = torch.Generator().manual_seed(0)
    values, returns = torch.randn(4, 6, generator=g), torch.randn(4, 6, generator=g)
    mask = (torch.rand(4, 6, generator=g) > 0.3).float()
    whole = explained_variance(values, returns, mask)
    m = mask.bool()
    expected = 1 - float((returns - values)[m].var(unbiased=False)) / float(returns[m].var(unbiased=False))
    assert whole == pytest.approx(expected, rel=1e-6)
    # Two "ranks" of two rows each: rank 0's reduce adds the sums rank 1 holds.
    held = []
    explained_variance(values[2:], returns[2:], mask[2:], reduce=lambda sums: held.extend(sums) or sums)
    together = explained_variance(
        values[:2],
        returns[:2],
        mask[:2],
        reduce=lambda sums: [a + b for a, b in zip(sums, held, strict=True)],
    )
    assert together == pytest.approx(whole, rel=1e-9)
    assert explained_variance(values[:2], returns[:2], mask[:2]) != pytest.approx(whole, rel=1e-3)


# --- KL ---------------------------------------------------------------------------------------------------


def test_kl_penalty_by_hand():
    # d = lp - ref = [0.5, -1.0]
    lp, ref = torch.tensor([-1.0, -2.0]), torch.tensor([-1.5, -1.0])
    assert_close(kl_penalty(lp, ref, "k1"), torch.tensor([0.5, -1.0]))
    assert_close(kl_penalty(lp, ref, "k2"), torch.tensor([0.125, 0.5]))
    # exp(-0.5) - 1 + 0.5 = 0.1065307; exp(1) - 1 - 1 = 0.7182818
    assert_close(kl_penalty(lp, ref, "k3"), torch.tensor([0.1065307, 0.7182818]))
    assert_close(kl_penalty(lp, ref, "abs"), torch.tensor([0.5, 1.0]))
    d = torch.linspace(-5, 5, 101)
    assert torch.all(kl_penalty(d, torch.zeros(101), "k3") >= 0)
    with pytest.raises(ValueError, match="k1, k2, k3, abs"):
        kl_penalty(lp, ref, "k4")


def test_rewards_with_kl():
    # Action tokens at t=1, 2, 4; turn rewards 1.0 (t=2) and 2.0 (t=4); k1 with d = 0.5, -0.2, 1.0; coef 0.1.
    scores = torch.tensor([[0.0, 0.0, 1.0, 0.0, 2.0, 0.0]])
    ref = torch.tensor([[0.0, -1.0, -1.0, 0.0, -2.0, 0.0]])
    lp = with_garbage(ref + torch.tensor([[0.0, 0.5, -0.2, 0.0, 1.0, 0.0]]), HAND_MASK)
    rewards, kl = rewards_with_kl(scores, lp, with_garbage(ref, HAND_MASK, seed=1), HAND_MASK, kl_coef=0.1)
    assert_close(kl, torch.tensor([[0.0, 0.5, -0.2, 0.0, 1.0, 0.0]]))
    assert_close(rewards, torch.tensor([[0.0, -0.05, 1.02, 0.0, 1.9, 0.0]]))
    with pytest.raises(ValueError, match="outside action_mask"):
        rewards_with_kl(scores.roll(1, dims=1), lp, ref, HAND_MASK, kl_coef=0.1)


def test_adaptive_kl_controller_by_hand():
    ctl = AdaptiveKLController(init_kl_coef=0.1, target=6.0, horizon=10000)
    ctl.update(9.0, n_steps=1000)  # err = 9/6 - 1 = 0.5 -> clipped to 0.2; 0.1 * (1 + 0.2*0.1) = 0.102
    assert ctl.value == pytest.approx(0.102)
    ctl.update(5.4, n_steps=1000)  # err = -0.1; 0.102 * (1 - 0.01) = 0.10098
    assert ctl.value == pytest.approx(0.10098)
    ctl.update(0.0, n_steps=500)  # err = -1 -> clipped to -0.2; 0.10098 * (1 - 0.01) = 0.0999702
    assert ctl.value == pytest.approx(0.0999702)
    ctl.update(6.0, n_steps=500)  # on target: unchanged
    assert ctl.value == pytest.approx(0.0999702)
    restored = AdaptiveKLController(1.0, 1.0, 1.0)
    restored.load_state_dict(ctl.state_dict())
    assert restored.state_dict() == ctl.state_dict()
    with pytest.raises(ValueError, match="target"):
        AdaptiveKLController(0.1, target=0.0, horizon=10)


def test_fixed_kl_controller():
    ctl = FixedKLController(0.05)
    ctl.update(100.0, n_steps=1000)
    assert ctl.value == 0.05
    other = FixedKLController(0.0)
    other.load_state_dict(ctl.state_dict())
    assert other.value == 0.05


# --- entropy ----------------------------------------------------------------------------------------------


def test_entropy_uniform_and_against_categorical():
    assert_close(entropy_from_logits(torch.full((2, 3, 7), 4.0)), torch.full((2, 3), math.log(7)))
    gen = torch.Generator().manual_seed(6)
    logits = torch.randn(3, 5, 11, generator=gen) * 4
    expected = torch.distributions.Categorical(logits=logits).entropy()
    assert_close(entropy_from_logits(logits), expected)
    bf16 = entropy_from_logits(logits.bfloat16())
    assert bf16.dtype == torch.float32
    assert_close(bf16, torch.distributions.Categorical(logits=logits.bfloat16().float()).entropy())


def test_entropy_is_stable_for_huge_and_banned_logits():
    big = torch.tensor([[1e4, 1e4, -1e4]])
    assert_close(entropy_from_logits(big), torch.tensor([math.log(2)]))
    banned = torch.tensor([[0.0, 0.0, float("-inf")]], requires_grad=True)
    h = entropy_from_logits(banned)
    assert_close(h, torch.tensor([math.log(2)]), check_dtype=False)
    h.sum().backward()
    assert torch.isfinite(banned.grad).all()


def test_core_imports_torch_only():
    # ppo.algo.core is the pure math layer: loading it must not pull in models, envs or heavy libraries.
    heavy = ("transformers", "peft", "mcp", "gymnasium", "bitsandbytes", "ppo.infra.config", "env", "models")
    code = f"import sys, ppo.algo.core; print(sorted(m for m in {heavy!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
