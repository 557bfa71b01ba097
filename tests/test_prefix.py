"""Shared-prefix passes give what the plain batched pass gives: outputs and gradients."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from models import load_actor_critic
from models.prefix import shared_prefix_length


def test_shared_prefix_length_by_hand():
    ids = torch.tensor([[5, 6, 7, 8], [5, 6, 9, 0], [5, 6, 7, 1]])
    mask = torch.ones_like(ids)
    assert shared_prefix_length(ids, mask) == 2
    assert shared_prefix_length(ids[[0, 2]], mask[[0, 2]]) == 3
    left_padded = torch.tensor([[0, 5, 6], [5, 6, 7]])
    assert shared_prefix_length(left_padded, torch.tensor([[0, 1, 1], [1, 1, 1]])) == 0
    same = torch.tensor([[1, 2, 3], [1, 2, 3]])
    assert shared_prefix_length(same, torch.ones_like(same)) == 2  # at most T - 1: one token left to run


@pytest.mark.parametrize("critic", ["separate", "shared"])
def test_shared_prefix_matches_the_plain_pass(small_tiny_dir, critic):
    torch.manual_seed(0)
    ac = load_actor_critic(str(small_tiny_dir), device="cpu", gradient_checkpointing=False, critic=critic)
    prefix = torch.randint(10, 500, (40,))
    ids = torch.cat([prefix.expand(3, 40), torch.randint(10, 500, (3, 9))], dim=1)  # (B, T) = (3, 49)
    mask = torch.ones_like(ids)
    ids[1, -3:], mask[1, -3:] = 0, 0  # right padding on one row
    params = ac.policy_parameters() + ac.critic_parameters()
    with torch.no_grad():  # move LoRA B off zero so the adapters matter
        for p in params:
            p.add_(0.02 * torch.randn_like(p))
    ac.share_prefix = True
    assert ac._prefix_to_share(ids, mask) == 40  # the shared path is really taken below
    results = {}
    for share in (True, False):
        ac.share_prefix = share
        ac.zero_grad()
        out = ac.train().forward_train(ids, mask, temperature=0.7)
        ((out["logprobs"] * mask).sum() + (out["values"] * mask).sum() + out["entropy"].sum()).backward()
        scored = ac.score(ids, mask, temperature=0.7, role="reference")["logprobs"]
        results[share] = (out, [p.grad.clone() for p in params], scored, ac.values(ids, mask))
    (a, ga, sa, va), (b, gb, sb, vb) = results[True], results[False]
    for key in ("logprobs", "values", "entropy"):
        assert_close(a[key], b[key], rtol=1e-5, atol=1e-5)
    assert_close(sa, sb, rtol=1e-5, atol=1e-5)
    assert_close(va, vb, rtol=1e-5, atol=1e-5)
    for x, y in zip(ga, gb, strict=True):
        assert_close(x, y, rtol=1e-4, atol=1e-5)


def test_pack_rows_by_hand():
    from models.prefix import pack_rows

    # capacity 5 (the longest): 5 alone, 4 alone (the 3 does not fit beside it), then 3 and 2 together
    assert pack_rows([5, 3, 2, 4, 0]) == [[0], [3], [1, 2]]
    assert pack_rows([2, 2, 2, 2]) == [[0], [1], [2], [3]]  # nothing fits beside the longest
    assert pack_rows([4, 1, 1, 1, 1]) == [[0], [1, 2, 3, 4]]
    assert pack_rows([]) == [] and pack_rows([0, 0]) == []


def test_packed_suffixes_give_the_padded_pass(small_tiny_dir):
    """Packing the rows' suffixes changes no hidden state and no gradient, whatever sits on padding."""
    from transformers import AutoModelForCausalLM

    from models.prefix import hidden_with_shared_prefix

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(small_tiny_dir, dtype=torch.float32)
    decoder = model.get_decoder()
    prefix_len, lengths = 20, [12, 3, 7, 9, 0, 5]  # packs [0], [3, 1], [2, 5]; the empty suffix is skipped
    ids = torch.cat(
        [torch.randint(10, 500, (1, prefix_len)).expand(6, -1), torch.randint(10, 500, (6, 12))], 1
    )
    mask = torch.ones_like(ids)
    for row, n in enumerate(lengths):
        mask[row, prefix_len + n :] = 0
    real = mask.bool()

    def run(pack: bool, junk: int):
        decoder.zero_grad()
        noisy = torch.where(real, ids, junk)  # what sits on padding must not matter
        hidden = hidden_with_shared_prefix(decoder, noisy, mask, prefix_len, pack=pack)
        (hidden[real] * torch.linspace(-1, 1, hidden.shape[-1])).sum().backward()
        return hidden[real], [p.grad.clone() for p in decoder.parameters()]

    (packed, packed_grads), (padded, padded_grads) = run(True, 7), run(False, 0)
    assert_close(packed, padded, rtol=1e-5, atol=1e-5)
    for x, y in zip(packed_grads, padded_grads, strict=True):
        assert_close(x, y, rtol=1e-3, atol=1e-4)  # sums over 48 tokens in another order: fp32 noise
    assert_close(run(True, 499)[0], packed)
    with torch.no_grad():
        assert hidden_with_shared_prefix(decoder, ids, mask, prefix_len)[~real].abs().max() == 0
        left = torch.ones_like(mask)
        left[1, prefix_len] = 0  # a hole after the prefix: not right padding
        with pytest.raises(ValueError, match="right padded"):
            hidden_with_shared_prefix(decoder, ids, left, prefix_len)
