"""Pure PPO math: masked statistics, GAE, the clipped losses, KL penalties and KL controllers.

Tensors in, tensors or ``(loss, stats)`` out; no models, no configs, no environments. Only torch is imported.

Letters used in shapes:

- ``B``: episodes (rows of the batch).
- ``T``: token positions of a row (prompt, generated turns, tool outputs and padding, left to right).
- ``V``: vocabulary size.

Every per-token tensor is ``(B, T)`` unless said otherwise. ``action_mask`` is ``(B, T)``, bool or float, 1 on
tokens the policy sampled and 0 on prompt, tool-output and padding tokens; any nonzero value counts as 1. Values
at masked positions are never read: every function first replaces them with 0 (``torch.where``), so garbage,
``inf`` or ``nan`` there changes no output and no gradient reaches them.

Stats dictionaries hold python floats, ready for logging.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

KL_KINDS = ("k1", "k2", "k3", "abs")


# --- checks and masking -----------------------------------------------------------------------------------


def _check_shapes(fn: str, ndim: int | None = None, **tensors: Tensor) -> None:
    """Raise a ValueError unless all ``tensors`` share one shape (and have ``ndim`` dimensions when given)."""
    names = list(tensors)
    first = tensors[names[0]]
    if ndim is not None and first.dim() != ndim:
        raise ValueError(
            f"{fn}: {names[0]} must have {ndim} dimensions (B, T), got shape {tuple(first.shape)}."
        )
    for name in names[1:]:
        if tensors[name].shape != first.shape:
            raise ValueError(
                f"{fn}: {name} has shape {tuple(tensors[name].shape)} but {names[0]} has "
                f"{tuple(first.shape)}; they must match."
            )


def _as_bool(action_mask: Tensor) -> Tensor:
    """The mask as a bool tensor (float and integer masks: nonzero means action token)."""
    return action_mask if action_mask.dtype == torch.bool else action_mask != 0


def _zero_masked(x: Tensor, mask: Tensor) -> Tensor:
    """``x`` with masked entries replaced by 0, so that nan/inf there cannot leak into sums or gradients."""
    return torch.where(mask, x, torch.zeros((), dtype=x.dtype, device=x.device))


# --- masked statistics ------------------------------------------------------------------------------------


def masked_sum(x: Tensor, mask: Tensor, dim: int | tuple[int, ...] | None = None) -> Tensor:
    """Sum of ``x`` over the entries where ``mask`` is set; ``x`` and ``mask`` share a shape.

    ``dim=None`` sums everything (0-dim result); otherwise the sum runs over ``dim`` as in ``Tensor.sum``.
    """
    _check_shapes("masked_sum", x=x, mask=mask)
    m = _as_bool(mask)
    return _zero_masked(x, m).sum() if dim is None else _zero_masked(x, m).sum(dim=dim)


def masked_mean(x: Tensor, mask: Tensor, dim: int | tuple[int, ...] | None = None) -> Tensor:
    """Mean of ``x`` over the entries where ``mask`` is set; 0 where nothing is set (an empty mean adds no loss).

    ``dim=None`` averages everything (the token-mean used by the losses); otherwise it runs over ``dim``, e.g.
    ``dim=1`` gives the ``(B,)`` per-row means.
    """
    m = _as_bool(mask)
    count = m.sum() if dim is None else m.sum(dim=dim)
    return masked_sum(x, m, dim) / count.clamp(min=1)


def masked_var(x: Tensor, mask: Tensor, unbiased: bool = True) -> Tensor:
    """Variance (0-dim) of the entries of ``x`` where ``mask`` is set.

    ``unbiased`` applies Bessel's correction n / (n - 1) when there are at least two entries; a single entry has
    variance 0. An empty mask raises a ValueError because the variance is then undefined.
    """
    _check_shapes("masked_var", x=x, mask=mask)
    m = _as_bool(mask)
    count = int(m.sum())
    if count == 0:
        raise ValueError("masked_var: the mask selects no entries, so the variance is undefined.")
    mean = masked_mean(x, m)
    var = masked_mean((x - mean) ** 2, m)
    if unbiased and count > 1:
        var = var * (count / (count - 1))
    return var


def masked_whiten(
    x: Tensor,
    mask: Tensor,
    shift_mean: bool = True,
    eps: float = 1e-8,
    reduce: Callable[[list[float]], list[float]] | None = None,
) -> Tensor:
    """Normalise ``x`` to mean 0 and variance 1 over the entries where ``mask`` is set; masked entries are 0.

    With ``shift_mean=False`` the mean is added back (only the scale changes), as for advantages in some
    implementations that keep their sign. The variance is the unbiased one. ``reduce`` sums a list of floats
    over every process (``ppo.infra.distributed.all_sum``): the mean and variance are then those of all processes'
    entries together, computed in two passes as in one process.
    """
    m = _as_bool(mask)
    if reduce is None:
        mean, var = masked_mean(x, m), masked_var(x, m)
    else:
        count, total = reduce([float(m.sum()), float(masked_sum(x, m))])
        mean = torch.tensor(total / max(count, 1.0), dtype=x.dtype, device=x.device)
        (squares,) = reduce([float(masked_sum((x - mean) ** 2, m))])
        var = torch.tensor(squares / max(count - 1.0, 1.0), dtype=x.dtype, device=x.device)
    whitened = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return _zero_masked(whitened, m)


def explained_variance(
    y_pred: Tensor,
    y_true: Tensor,
    action_mask: Tensor,
    reduce: Callable[[list[float]], list[float]] | None = None,
) -> float:
    """``1 - Var(y_true - y_pred) / Var(y_true)`` over the action tokens.

    1 is a perfect value function, 0 one that does no better than a constant, negative one that does worse.
    When ``Var(y_true)`` is 0 (e.g. every return equal) the ratio is undefined; this returns 0.0 then so that
    logs stay finite (Stable-Baselines3 returns nan). "0" is up to float32 rounding: a variance below
    ``eps * mean(y_true ** 2)`` is what equal returns leave after the subtraction of their mean (every return
    -1.0 gave 1e-15, and a ratio of -3e13). ``reduce`` sums a list of floats over every process
    (``ppo.infra.distributed.all_sum``): the variances are then those of all processes' tokens together.
    Population variances from float64 sums of the values and their squares.
    """
    _check_shapes("explained_variance", y_pred=y_pred, y_true=y_true, action_mask=action_mask)
    m = _as_bool(action_mask)
    y = y_true.detach()[m].double()
    err = y - y_pred.detach()[m].double()
    sums = [
        float(m.sum()),
        float(y.sum()),
        float(y.square().sum()),
        float(err.sum()),
        float(err.square().sum()),
    ]
    n, sum_y, sum_y2, sum_e, sum_e2 = reduce(sums) if reduce is not None else sums
    if n == 0:
        return 0.0
    var_y = max(sum_y2 / n - (sum_y / n) ** 2, 0.0)
    if var_y <= torch.finfo(torch.float32).eps * sum_y2 / n:
        return 0.0
    return 1.0 - max(sum_e2 / n - (sum_e / n) ** 2, 0.0) / var_y


# --- advantages -------------------------------------------------------------------------------------------


@torch.no_grad()
def compute_gae(
    rewards: Tensor, values: Tensor, action_mask: Tensor, gamma: float | Tensor, lam: float
) -> tuple[Tensor, Tensor]:
    """Generalized Advantage Estimation (Schulman et al. 2016, arXiv:1506.02438) over each row's action tokens.

    Args:
        rewards: (B, T) per-token rewards (env rewards on each turn's last action token, minus KL).
        values: (B, T) value estimates V(s_t) of the policy state before sampling token t.
        action_mask: (B, T) 1 on action tokens.
        gamma: discount per action token, in [0, 1]; or a (B, T) tensor whose entry at action token t is the
            discount of the step from t to the row's next action token (see ``turn_discounts``).
        lam: GAE lambda, in [0, 1].

    Returns:
        ``(advantages, returns)``, both (B, T) float32 and 0 at masked positions; ``returns = advantages +
        values`` on action tokens.

    The action tokens of a row form one chain, read in order: masked positions are skipped as if absent, so a
    tool output between two turns neither discounts nor breaks it (the first token of the next turn is the
    next step). The value after a row's last action token is 0: the episode is treated as ended. To bootstrap
    a truncated episode, add ``gamma * V(s_end)`` to the reward of its last action token before calling this.
    """
    _check_shapes("compute_gae", ndim=2, rewards=rewards, values=values, action_mask=action_mask)
    m = _as_bool(action_mask)
    if isinstance(gamma, Tensor):
        _check_shapes("compute_gae", rewards=rewards, gamma=gamma)
        g = torch.where(m, gamma.float(), 1.0)  # (B, T); masked entries are never read
        gamma_ok = bool(((g >= 0) & (g <= 1)).all())
    else:
        g = torch.full(rewards.shape, float(gamma), device=rewards.device)  # (B, T)
        gamma_ok = 0.0 <= gamma <= 1.0
    if not (gamma_ok and 0.0 <= lam <= 1.0):
        raise ValueError(f"compute_gae: gamma and lam must lie in [0, 1], got gamma={gamma}, lam={lam}.")
    r = _zero_masked(rewards.float(), m)  # (B, T)
    v = _zero_masked(values.float(), m)  # (B, T)
    advantages = torch.zeros_like(r)
    # Carried per row from the right: V and A of the next action token (0 past the last one).
    next_value = r.new_zeros(r.shape[0])  # (B,)
    next_adv = r.new_zeros(r.shape[0])  # (B,)
    for t in reversed(range(r.shape[1])):
        delta = r[:, t] + g[:, t] * next_value - v[:, t]
        adv_t = delta + g[:, t] * lam * next_adv
        # Only action positions write an advantage or move the carry; gaps leave it untouched.
        advantages[:, t] = torch.where(m[:, t], adv_t, 0.0)
        next_value = torch.where(m[:, t], v[:, t], next_value)
        next_adv = torch.where(m[:, t], adv_t, next_adv)
    returns = _zero_masked(advantages + v, m)
    return advantages, returns


def turn_discounts(action_mask: Tensor, token_gamma: float, turn_gamma: float) -> Tensor:
    """(B, T) discounts for ``compute_gae``: ``token_gamma`` on every action token, times ``turn_gamma`` on the
    last action token of each turn (an action token followed by a masked one), i.e. on the step into the next turn.

    A per-turn discount prices the number of turns, not of tokens: an episode that succeeds after a failed call is
    worth ``turn_gamma`` times one that succeeds at once, so the mistake turn is not credited with the success.
    """
    _check_shapes("turn_discounts", ndim=2, action_mask=action_mask)
    if not (0.0 <= token_gamma <= 1.0 and 0.0 <= turn_gamma <= 1.0):
        raise ValueError(
            f"turn_discounts: discounts must lie in [0, 1], got token_gamma={token_gamma}, turn_gamma={turn_gamma}."
        )
    m = _as_bool(action_mask)
    next_masked = torch.ones_like(m)
    next_masked[:, :-1] = ~m[:, 1:]
    turn_end = m & next_masked  # (B, T)
    gamma = torch.full(m.shape, float(token_gamma), device=m.device)
    return torch.where(turn_end, gamma * turn_gamma, gamma)


def center_per_group(advantages: Tensor, action_mask: Tensor, groups: Tensor) -> Tensor:
    """Subtract from each row's advantages the mean, over the rows of its group, of each row's mean advantage.

    Args:
        advantages: (B, T) advantages (e.g. from ``compute_gae``).
        action_mask: (B, T) 1 on action tokens.
        groups: (B,) integer group of each row (the rows of one task played several times share one).

    Returns:
        (B, T) advantages, 0 at masked positions. Row ``i`` of group ``g`` loses ``mean_{j in g} mean_t A[j, t]``,
        the mean over the group's rows (that have action tokens) of their token-mean advantage.

    Why: episodes of one task start from one prompt, so their first-turn advantages under GAE with lambda 1 are
    ``G_i - V(prompt)`` with a shared ``V(prompt)``. Centering them within the group turns that into ``G_i -
    mean_j G_j`` (the group baseline of GRPO, Shao et al. 2024, arXiv:2402.03300), whatever the critic's error
    on the task; the critic still sets the credit between tokens and turns inside an episode.
    """
    _check_shapes("center_per_group", ndim=2, advantages=advantages, action_mask=action_mask)
    if groups.shape != advantages.shape[:1]:
        raise ValueError(
            f"center_per_group: groups must have shape ({advantages.shape[0]},), got {tuple(groups.shape)}."
        )
    m = _as_bool(action_mask)
    a = _zero_masked(advantages.float(), m)
    counts = m.sum(dim=1)  # (B,)
    has_actions = counts > 0
    row_mean = a.sum(dim=1) / counts.clamp(min=1)  # (B,)
    _, group = torch.unique(groups, return_inverse=True)  # (B,) in 0..G-1
    n_groups = int(group.max()) + 1 if group.numel() else 0
    sums = torch.zeros(n_groups, device=a.device).index_add_(
        0, group, torch.where(has_actions, row_mean, 0.0)
    )
    sizes = torch.zeros(n_groups, device=a.device).index_add_(0, group, has_actions.float())
    offset = (sums / sizes.clamp(min=1))[group]  # (B,)
    return _zero_masked(a - offset[:, None], m)


# --- losses -----------------------------------------------------------------------------------------------


def policy_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    action_mask: Tensor,
    clip_eps: float = 0.2,
    dual_clip: float | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """PPO clipped surrogate (Schulman et al. 2017, arXiv:1707.06347), token-mean over the batch's action tokens.

    Args:
        logprobs: (B, T) log-probs of the sampled tokens under the current policy (carries the gradient).
        old_logprobs: (B, T) log-probs under the policy that sampled them.
        advantages: (B, T) advantage estimates.
        action_mask: (B, T) 1 on action tokens.
        clip_eps: the ratio is clipped to [1 - clip_eps, 1 + clip_eps].
        dual_clip: optional c > 1 of dual-clip PPO (Ye et al. 2020, arXiv:1912.09729): where the advantage is
            negative the per-token loss is capped at ``-c * A``, so a huge ratio cannot blow it up.

    Returns:
        ``(loss, stats)``: a 0-dim loss to minimise and the floats ``policy_loss``, ``clipfrac`` (fraction of
        action tokens where the clipped term was the active one), ``dual_clipfrac``, ``approx_kl`` (k3 estimate
        of KL(old || new)), ``ratio_mean`` and ``ratio_max``.
    """
    _check_shapes(
        "policy_loss",
        logprobs=logprobs,
        old_logprobs=old_logprobs,
        advantages=advantages,
        action_mask=action_mask,
    )
    if clip_eps <= 0:
        raise ValueError(f"policy_loss: clip_eps must be positive, got {clip_eps}.")
    if dual_clip is not None and dual_clip <= 1.0:
        raise ValueError(f"policy_loss: dual_clip must be greater than 1, got {dual_clip}.")
    m = _as_bool(action_mask)
    log_ratio = _zero_masked(logprobs, m) - _zero_masked(old_logprobs, m)  # (B, T), 0 off actions
    adv = _zero_masked(advantages, m)
    ratio = torch.exp(log_ratio)
    unclipped = -adv * ratio
    clipped = -adv * torch.clamp(ratio, 1.0 - clip_eps, 1.0 + clip_eps)
    per_token = torch.maximum(unclipped, clipped)
    dual_active = torch.zeros_like(m)
    if dual_clip is not None:
        cap = -adv * dual_clip
        dual_active = (adv < 0) & (per_token > cap)
        per_token = torch.where(adv < 0, torch.minimum(per_token, cap), per_token)
    loss = masked_mean(per_token, m)
    with torch.no_grad():
        # k3 = (r - 1) - log r with r = new/old and tokens sampled from old estimates KL(old || new) without
        # bias and is never negative (Schulman, "Approximating KL Divergence", 2020).
        lr = log_ratio.detach()
        stats = {
            "policy_loss": float(loss.detach()),
            "clipfrac": float(masked_mean((clipped > unclipped).float(), m)),
            "dual_clipfrac": float(masked_mean(dual_active.float(), m)),
            "approx_kl": float(masked_mean(torch.expm1(lr) - lr, m)),
            "ratio_mean": float(masked_mean(ratio.detach(), m)),
            # Ratios are positive, so the zeros put at masked positions cannot win the max.
            "ratio_max": float(_zero_masked(ratio.detach(), m).max()) if m.numel() else 0.0,
        }
    return loss, stats


def value_loss(
    values: Tensor, old_values: Tensor, returns: Tensor, action_mask: Tensor, clip_eps: float = 0.2
) -> tuple[Tensor, dict[str, float]]:
    """Clipped value loss ``0.5 * token-mean(max((V - R)^2, (V_old + clip(V - V_old, -eps, eps) - R)^2))``.

    Args:
        values: (B, T) current value predictions (carries the gradient).
        old_values: (B, T) value predictions made during the rollout.
        returns: (B, T) GAE returns (targets).
        action_mask: (B, T) 1 on action tokens.
        clip_eps: how far the clipped prediction may move from ``old_values``.

    Returns:
        ``(loss, stats)`` with floats ``value_loss`` and ``value_clipfrac`` (fraction of action tokens where the
        clipped error was the larger one). The explained variance is the batch's (``explained_variance``): over a
        micro-batch of episodes with nearly equal returns it says nothing.
    """
    _check_shapes(
        "value_loss", values=values, old_values=old_values, returns=returns, action_mask=action_mask
    )
    if clip_eps <= 0:
        raise ValueError(f"value_loss: clip_eps must be positive, got {clip_eps}.")
    m = _as_bool(action_mask)
    v, v_old, ret = _zero_masked(values, m), _zero_masked(old_values, m), _zero_masked(returns, m)
    v_clipped = v_old + torch.clamp(v - v_old, -clip_eps, clip_eps)
    err_unclipped = (v - ret) ** 2
    err_clipped = (v_clipped - ret) ** 2
    loss = 0.5 * masked_mean(torch.maximum(err_unclipped, err_clipped), m)
    with torch.no_grad():
        stats = {
            "value_loss": float(loss.detach()),
            "value_clipfrac": float(masked_mean((err_clipped > err_unclipped).float(), m)),
        }
    return loss, stats


# --- KL -----------------------------------------------------------------------------------------------------


def kl_penalty(logprobs: Tensor, ref_logprobs: Tensor, kind: str = "k1") -> Tensor:
    """Per-token estimate of KL(policy || reference) from tokens sampled by the policy; same shape as inputs.

    With ``d = logprobs - ref_logprobs`` (Schulman, "Approximating KL Divergence", 2020): ``k1 = d`` (unbiased,
    can be negative), ``k2 = d^2 / 2`` (biased, low variance), ``k3 = exp(-d) - 1 + d`` (unbiased, never
    negative), ``abs = |d|``.
    """
    _check_shapes("kl_penalty", logprobs=logprobs, ref_logprobs=ref_logprobs)
    d = logprobs - ref_logprobs
    if kind == "k1":
        return d
    if kind == "k2":
        return 0.5 * d**2
    if kind == "k3":
        return torch.expm1(-d) + d
    if kind == "abs":
        return d.abs()
    raise ValueError(f"kl_penalty: unknown kind {kind!r}; choose one of {', '.join(KL_KINDS)}.")


@torch.no_grad()
def rewards_with_kl(
    scores: Tensor,
    logprobs: Tensor,
    ref_logprobs: Tensor,
    action_mask: Tensor,
    kl_coef: float,
    kind: str = "k1",
) -> tuple[Tensor, Tensor]:
    """Per-token rewards for GAE: the env scores minus ``kl_coef`` times the KL penalty on action tokens.

    Args:
        scores: (B, T) each turn's env reward on that turn's last action token, 0 elsewhere.
        logprobs: (B, T) log-probs of the sampled tokens under the policy.
        ref_logprobs: (B, T) the same under the reference model.
        action_mask: (B, T) 1 on action tokens.
        kl_coef: weight of the KL penalty.
        kind: KL estimator, see ``kl_penalty``.

    Returns:
        ``(rewards, kl)``, both (B, T) float32 and 0 at masked positions.

    A nonzero score on a masked token is an error, not garbage: GAE would drop it silently.
    """
    _check_shapes(
        "rewards_with_kl",
        ndim=2,
        scores=scores,
        logprobs=logprobs,
        ref_logprobs=ref_logprobs,
        action_mask=action_mask,
    )
    m = _as_bool(action_mask)
    if bool(((scores != 0) & ~m).any()):
        raise ValueError(
            "rewards_with_kl: scores has nonzero entries outside action_mask; "
            "put each turn's reward on its last action token."
        )
    kl = _zero_masked(
        kl_penalty(_zero_masked(logprobs.float(), m), _zero_masked(ref_logprobs.float(), m), kind), m
    )
    return scores.float() - kl_coef * kl, kl


class AdaptiveKLController:
    """Adaptive KL coefficient, the proportional controller of Ziegler et al. 2019 (arXiv:1909.08593).

    After each iteration, ``update(current_kl, n_steps)`` moves the coefficient towards the value that keeps
    the measured KL at ``target``: ``err = clip(current_kl / target - 1, -0.2, 0.2)`` and
    ``value *= 1 + err * n_steps / horizon``.
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: float) -> None:
        if init_kl_coef < 0 or target <= 0 or horizon <= 0:
            raise ValueError(
                "AdaptiveKLController: init_kl_coef must be >= 0 and target and horizon positive, got "
                f"init_kl_coef={init_kl_coef}, target={target}, horizon={horizon}."
            )
        self.value = float(init_kl_coef)
        self.target = float(target)
        self.horizon = float(horizon)

    def update(self, current_kl: float, n_steps: int) -> None:
        """Scale the coefficient by the clipped proportional error of ``current_kl`` over ``n_steps`` samples."""
        err = min(max(float(current_kl) / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + err * n_steps / self.horizon

    def state_dict(self) -> dict[str, float]:
        """The coefficient and settings, to save with a checkpoint."""
        return {"value": self.value, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: dict[str, float]) -> None:
        """Restore what ``state_dict`` returned."""
        self.value, self.target, self.horizon = (float(state[k]) for k in ("value", "target", "horizon"))


class FixedKLController:
    """A constant KL coefficient with the interface of ``AdaptiveKLController``."""

    def __init__(self, kl_coef: float) -> None:
        if kl_coef < 0 or not math.isfinite(kl_coef):
            raise ValueError(f"FixedKLController: kl_coef must be a finite number >= 0, got {kl_coef}.")
        self.value = float(kl_coef)

    def update(self, current_kl: float, n_steps: int) -> None:
        """Do nothing: the coefficient is fixed."""

    def state_dict(self) -> dict[str, float]:
        """The coefficient, to save with a checkpoint."""
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        """Restore what ``state_dict`` returned."""
        self.value = float(state["value"])


# --- entropy --------------------------------------------------------------------------------------------------


def entropy_from_logits(logits: Tensor) -> Tensor:
    """Entropy of the softmax of ``logits`` (..., V), shape ``logits.shape[:-1]``, computed in float32.

    ``log_softmax`` subtracts the logsumexp, so large logits do not overflow; ``-inf`` logits (banned tokens)
    have probability 0 and add nothing. bf16/fp16 inputs are upcast first, which allocates a float32 copy of
    ``logits``: chunk over rows for a large vocabulary.
    """
    if logits.dim() < 1 or logits.shape[-1] == 0:
        raise ValueError(
            f"entropy_from_logits: logits must end in a vocabulary axis, got {tuple(logits.shape)}."
        )
    logp = torch.log_softmax(logits.float(), dim=-1)
    p = logp.exp()
    # 0 * log 0 is 0 for entropy; the where keeps -inf log-probs out of both the product and its gradient.
    return -(p * torch.where(p > 0, logp, 0.0)).sum(dim=-1)
