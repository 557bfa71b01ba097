"""generate_turn / sample_turn against slow references: full-recompute greedy decoding, the policy's own
log-probs (ActorCritic.score), and the policy's first-token distribution. Letters: B rows, V vocabulary."""

from __future__ import annotations

import pytest
import torch

from models.actor_critic import ActorCritic
from ppo.rollout.generation import generate_turn, left_pad, merged_copy, sample_turn

VOCAB = 64
PAD = 0
CONTEXTS = [
    [5, 6, 7, 8, 9, 10, 11],
    [3, 4],
    [12, 13, 14, 15, 16],
    [20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30],
]


def _base_model(kind: str = "qwen3"):
    """A small random causal LM of the given family (qwen3, qwen2 or llama), 4 query heads on 2 key/value heads."""
    from transformers import (
        LlamaConfig,
        LlamaForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
        Qwen3Config,
        Qwen3ForCausalLM,
    )

    classes = {
        "qwen3": (Qwen3Config, Qwen3ForCausalLM),
        "qwen2": (Qwen2Config, Qwen2ForCausalLM),
        "llama": (LlamaConfig, LlamaForCausalLM),
    }
    config_class, model_class = classes[kind]
    config = config_class(
        vocab_size=VOCAB,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        intermediate_size=128,
        tie_word_embeddings=kind != "llama",
        pad_token_id=PAD,
    )
    torch.manual_seed(0)
    return model_class(config).eval()


@pytest.fixture(scope="module")
def actor_critic() -> ActorCritic:
    """A full-precision base with a *nonzero* policy adapter, so the policy differs from the base."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(1)
    config = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
    peft_model = get_peft_model(_base_model(), config, adapter_name="policy")
    return ActorCritic(peft_model, tokenizer=None, critic="shared", settings={}).eval()


@pytest.fixture(scope="module")
def nf4_actor_critic(tmp_path_factory) -> ActorCritic:
    """The production layout: a saved model loaded as an NF4 base with LoRA adapters (B made nonzero)."""
    from models import load_actor_critic
    from models.tiny import build_tiny

    folder = build_tiny(
        tmp_path_factory.mktemp("tiny"),
        texts=["the assistant calls a tool and reads 0 1 2 3 4 5 6 7 8 9"] * 8,
        hidden_size=64,
        num_hidden_layers=2,
        intermediate_size=128,
    )
    ac = load_actor_critic(str(folder), quantization="nf4", device="cpu", critic="shared")
    with torch.no_grad():
        for p in ac.policy_parameters():
            p.normal_(0.0, 0.05)
    return ac.eval()


def _reference_greedy(model, context: list[int], steps: int) -> list[int]:
    """Slow greedy decoding: the whole unpadded sequence goes through the model at every step, no cache."""
    ids = list(context)
    for _ in range(steps):
        logits = model(input_ids=torch.tensor([ids])).logits[0, -1]
        ids.append(int(logits.argmax()))
    return ids[len(context) :]


def _stopping_token(runs: list[list[int]]) -> int:
    """A token at whose first occurrence the rows stop at as many different steps as possible."""

    def spread(token: int) -> int:
        return len({run.index(token) if token in run else None for run in runs})

    return max(sorted({t for run in runs for t in run}), key=spread)


def _cut(run: list[int], eot: int) -> list[int]:
    return run[: run.index(eot) + 1] if eot in run else run


@pytest.mark.parametrize("merge", [False, True])
@torch.no_grad()
def test_greedy_equals_full_recompute_reference(actor_critic, merge):
    model, steps = actor_critic.model, 10
    with actor_critic.policy():
        runs = [_reference_greedy(model, c, steps) for c in CONTEXTS]
        eot = _stopping_token(runs)
        expected = [_cut(run, eot) for run in runs]
        got = generate_turn(
            model,
            CONTEXTS,
            max_new_tokens=steps,
            temperature=0,
            end_of_turn_id=eot,
            pad_id=PAD,
            merge_lora=merge,
        )
    # The case must exercise early stops: rows end at (at least) two different steps, one before the last.
    assert len({len(e) for e in expected}) >= 2 and min(len(e) for e in expected) < steps
    assert got == expected


@torch.no_grad()
def test_sampling_returns_valid_ids_and_stops_at_end_of_turn(actor_critic):
    eot, steps = 7, 40
    contexts = [CONTEXTS[i % len(CONTEXTS)] for i in range(16)]
    kw = {"max_new_tokens": steps, "temperature": 1.0, "end_of_turn_id": eot, "pad_id": PAD}
    with actor_critic.policy():
        first = sample_turn(actor_critic.model, contexts, generator=torch.Generator().manual_seed(3), **kw)
        again = sample_turn(actor_critic.model, contexts, generator=torch.Generator().manual_seed(3), **kw)
    assert first == again  # the generator alone fixes the draws
    ended = 0
    for turn, logprobs in zip(first.tokens, first.logprobs, strict=True):
        assert turn and all(0 <= t < VOCAB for t in turn)
        assert eot not in turn[:-1]  # nothing is written after the end of the turn
        assert turn[-1] == eot or len(turn) == steps
        assert len(logprobs) == len(turn) and all(lp <= 0.0 for lp in logprobs)
        ended += turn[-1] == eot
    assert 0 < ended < len(contexts)  # some rows stopped early, some ran to the limit


def _score_turns(actor_critic, contexts, turns, temperature) -> list[list[float]]:
    """Log-probs of each turn's tokens recomputed by ActorCritic.score on the left-padded full sequences."""
    rows = [c + t for c, t in zip(contexts, turns, strict=True)]
    ids, mask = left_pad(rows, PAD)
    logprobs = actor_critic.score(ids, mask, temperature=temperature)["logprobs"]  # (B, T)
    return [logprobs[i, ids.shape[1] - len(t) :].tolist() for i, t in enumerate(turns)]


@pytest.mark.parametrize("fixture", ["actor_critic", "nf4_actor_critic"])
@pytest.mark.parametrize("merge", [False, True])
def test_sampler_logprobs_equal_score_at_same_temperature(fixture, merge, request):
    actor_critic = request.getfixturevalue(fixture)
    vocab = actor_critic.config.vocab_size
    contexts = [[(7 * i + 3 * j) % (vocab - 2) + 2 for j in range(3 + 2 * i)] for i in range(5)]
    with actor_critic.policy():
        sample = sample_turn(
            actor_critic.model,
            contexts,
            max_new_tokens=12,
            temperature=0.7,
            end_of_turn_id=1,
            pad_id=PAD,
            merge_lora=merge,
            generator=torch.Generator().manual_seed(0),
        )
    scored = _score_turns(actor_critic, contexts, sample.tokens, temperature=0.7)
    for got, want in zip(sample.logprobs, scored, strict=True):
        torch.testing.assert_close(torch.tensor(got), torch.tensor(want), atol=2e-4, rtol=0)


@torch.no_grad()
def test_first_token_frequencies_follow_the_policy_distribution(actor_critic):
    rows, temperature, context = 4000, 1.5, CONTEXTS[0]
    with actor_critic.policy():
        logits = actor_critic.model(input_ids=torch.tensor([context])).logits[0, -1]
        probs = torch.softmax(logits / temperature, dim=-1)  # (V,)
        sample = sample_turn(
            actor_critic.model,
            [context] * rows,
            max_new_tokens=1,
            temperature=temperature,
            end_of_turn_id=1,
            pad_id=PAD,
            generator=torch.Generator().manual_seed(0),
        )
    counts = torch.bincount(torch.tensor([t[0] for t in sample.tokens]), minlength=VOCAB).float()
    sigma = (probs * (1 - probs) / rows).sqrt()
    # Every token within 5 standard errors of its probability: a top-k/top-p or wrong temperature breaks this.
    assert ((counts / rows - probs).abs() <= 5 * sigma + 1e-3).all()


@pytest.mark.parametrize("fixture", ["actor_critic", "nf4_actor_critic"])
@torch.no_grad()
def test_merged_copy_computes_the_active_role(fixture, request):
    actor_critic = request.getfixturevalue(fixture)
    ids = torch.tensor([[2, 3, 4, 5, 6, 7]])
    with actor_critic.policy():
        policy = actor_critic.model(input_ids=ids).logits
        merged = merged_copy(actor_critic.model)(input_ids=ids).logits
    with actor_critic.reference():
        reference = actor_critic.model(input_ids=ids).logits
        bare = merged_copy(actor_critic.model)(input_ids=ids).logits
    torch.testing.assert_close(merged, policy, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(bare, reference, atol=1e-4, rtol=1e-4)
    assert (policy - reference).abs().max() > 1e-2  # the adapter matters, so the test can tell them apart


def test_bad_arguments_are_rejected(actor_critic):
    kw = {"max_new_tokens": 2, "end_of_turn_id": 1, "pad_id": PAD}
    with pytest.raises(ValueError, match="temperature"):
        generate_turn(actor_critic.model, CONTEXTS, temperature=-1.0, **kw)
    with pytest.raises(ValueError, match="at least one token"):
        generate_turn(actor_critic.model, [[1, 2], []], temperature=1.0, **kw)


@pytest.mark.parametrize("merge", [False, True])
def test_merged_copy_never_holds_the_policys_parameter_objects(actor_critic, merge):
    """Shared storage is fine (no copy of unchanged weights), shared Parameter objects are not: converting the
    copy (``.double()``) must leave the policy's dtypes alone."""
    with actor_critic.policy():
        copy = merged_copy(actor_critic.model, merge_adapters=merge)
    originals = {id(p) for p in actor_critic.model.parameters()}
    assert not any(id(p) in originals for p in copy.parameters())
    copy.double()
    assert {p.dtype for p in actor_critic.model.parameters()} == {torch.float32}
