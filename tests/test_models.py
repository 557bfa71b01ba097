"""Tests of models/: tiny preset, tokenizer and template, NF4 + LoRA actor-critic, scoring contracts."""

from __future__ import annotations

import json
import random

import pytest
import torch
from torch.testing import assert_close

import models
from models import tiny
from models.scoring import position_ids_from_mask, scored_mask

SMALL = {
    "hidden_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "head_dim": 64,
    "intermediate_size": 256,
}
N_LINEAR = 7  # q, k, v, o, gate, up, down per decoder layer


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These tensors are tiny: with other jobs on the cores, a second torch thread mostly waits."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    from ppo.tiny.corpus import tokenizer_texts

    return tiny.build_tiny(
        tmp_path_factory.mktemp("tiny"), tokenizer_texts(), seed=0, vocab_size=1024, **SMALL
    )


def load(path, **kw):
    torch.manual_seed(0)
    return models.load_actor_critic(str(path), device="cpu", **kw)


@pytest.fixture(scope="module")
def ac(tiny_dir):
    """A read-only actor-critic shared by the tests that do not train it."""
    return load(tiny_dir).eval()


def batch(tokenizer, texts):
    enc = tokenizer(texts, return_tensors="pt", padding=True)
    return enc["input_ids"], enc["attention_mask"]


TEXTS = ["What is 17*23+5? Use the calculator.", "hi", "The weather in Paris is 18 degrees."]


def train_step(ac, params, ids, mask, loss_fn, steps=3, lr=0.05):
    opt = torch.optim.Adam(params, lr=lr)
    ac.train()
    for _ in range(steps):
        out = ac.forward_train(ids, mask)
        opt.zero_grad()
        loss_fn(out).backward()
        opt.step()
    ac.eval()


def naive_logprobs(model, ids, mask, temperature=1.0):
    """Full-vocabulary reference: logits of the whole sequence, then log_softmax, shifted by one."""
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask)).logits
    logp = torch.log_softmax(logits.float() / temperature, -1)[:, :-1].gather(-1, ids[:, 1:, None])[..., 0]
    keep = (mask[:, 1:] * mask[:, :-1]).bool()
    return torch.cat([torch.zeros_like(logp[:, :1]), torch.where(keep, logp, 0.0)], 1)


# ----- tokenizer and chat template ------------------------------------------------------------------


def test_chat_template_renders_qwen3_layout_exactly(ac):
    tools = [{"type": "function", "function": {"name": "calculator", "parameters": {"type": "object"}}}]
    call = '<tool_call>\n{"name": "calculator", "arguments": {"expression": "2+2"}}\n</tool_call>'
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Add 2+2 twice."},
        {"role": "assistant", "content": call + "\n" + call},
        {"role": "tool", "content": "4"},
        {"role": "tool", "content": "4.0"},
        {"role": "assistant", "content": "Both are 4."},
        {"role": "user", "content": "Thanks!"},
    ]
    text = ac.tokenizer.apply_chat_template(
        messages, tools=tools, add_generation_prompt=True, enable_thinking=False, tokenize=False
    )
    expected = (
        "<|im_start|>system\nBe brief.\n\n# Tools\nYou can call these functions:\n<tools>\n"
        + json.dumps(tools[0])
        + "\n</tools>\nTo call one, reply with:\n<tool_call>\n"
        '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call><|im_end|>\n'
        "<|im_start|>user\nAdd 2+2 twice.<|im_end|>\n"
        f"<|im_start|>assistant\n{call}\n{call}<|im_end|>\n"
        "<|im_start|>user\n<tool_response>\n4\n</tool_response>\n<tool_response>\n4.0\n</tool_response><|im_end|>\n"
        "<|im_start|>assistant\nBoth are 4.<|im_end|>\n"
        "<|im_start|>user\nThanks!<|im_end|>\n"
        "<|im_start|>assistant\n<think>\n\n</think>\n\n"
    )
    assert text == expected


def test_chat_template_without_tools_or_thinking_switch(ac):
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}]
    text = ac.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text == "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU<|im_end|>\n<|im_start|>assistant\n"


def test_tokenizer_round_trips_arbitrary_unicode(ac):
    tok = ac.tokenizer
    rng = random.Random(0)
    alphabet = 'aZ09 \n\t{}":,éßøñ漢字かなЖж😀🚀\u0301\u200d€∑'
    samples = ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 40))) for _ in range(50)]
    samples.append("".join(chr(rng.randint(0x20, 0x2FFF)) for _ in range(200)))
    for text in samples:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert tok.decode(ids) == text


def test_tokenizer_specials_and_digits(ac):
    tok = ac.tokenizer
    assert tok.pad_token == "<|endoftext|>" and tok.eos_token == "<|im_end|>"
    assert tok.pad_token_id != tok.eos_token_id
    for marker in ["<|im_start|>", "<tool_call>", "</tool_call>", "<tool_response>", "</think>"]:
        assert len(tok(marker, add_special_tokens=False)["input_ids"]) == 1
    assert tok.convert_ids_to_tokens(tok("12345", add_special_tokens=False)["input_ids"]) == list("12345")
    ids = tok("<|im_start|>assistant\n<tool_call>\n{}\n</tool_call><|im_end|>")["input_ids"]
    assert tok.decode(ids, skip_special_tokens=True) == "assistant\n<tool_call>\n{}\n</tool_call>"


def test_a_name_is_spelled_the_same_in_prose_and_in_a_call(ac):
    """A capitalised word is a pre-token without the space before it, so a held-out name is the same ids after a
    space in the prompt and after a quote in a call, where the copying circuit has to find it again (with the space
    attached, 'Penrith' was ' Pen' 'rith' in the prompt and 'P' 'en' 'rith' in the call: nothing to copy)."""
    tok = ac.tokenizer

    def ids(text):
        return tok(text, add_special_tokens=False)["input_ids"]

    def holds(text, part):
        whole, part = ids(text), ids(part)
        return any(whole[i : i + len(part)] == part for i in range(len(whole) - len(part) + 1))

    # val entities: a document, a product and a new customer that the tokenizer's text never holds, and a city of the
    # database every split shares (in train's text too)
    for name in ["Penrith Museum", "Amber Teapot", "Silverton", "Vik Holm"]:
        assert holds(f"Use web_search to find the document about the {name}.", name), name
        assert holds(f"a customer who lives in {name}.", name), name
        assert holds(f'{{"query": "{name}"}}', name), name
        assert holds(f"WHERE name = '{name}'", name), name
    space = ids(" ")  # the space between a name's words: one token, and copied
    assert len(space) == 1 and tiny.copy_tokens(tok)[space[0]]


# ----- structure: NF4, adapters, memory ---------------------------------------------------------------


def test_base_linears_are_nf4_and_lora_skips_lm_head(ac):
    import bitsandbytes as bnb
    from peft.tuners.lora import LoraLayer

    lora_layers = [m for m in ac.model.modules() if isinstance(m, LoraLayer)]
    assert len(lora_layers) == N_LINEAR * SMALL["num_hidden_layers"]
    for layer in lora_layers:
        assert isinstance(layer.base_layer, bnb.nn.Linear4bit)
        assert isinstance(layer.base_layer.weight, bnb.nn.Params4bit)
        assert layer.base_layer.weight.quant_state.quant_type == "nf4"
        assert set(layer.lora_A) == {"policy", "critic"}
    assert not isinstance(ac.model.get_base_model().lm_head, LoraLayer)
    assert ac.value_head.weight.dtype == torch.float32 and ac.value_head.out_features == 1


def trainable_flags(ac):
    return [p.requires_grad for p in ac.parameters()]


def test_parameter_groups_are_disjoint_and_stay_trainable_across_roles(ac):
    policy, critic = ac.policy_parameters(), ac.critic_parameters()
    n_lora = 2 * N_LINEAR * SMALL["num_hidden_layers"]  # lora_A and lora_B per wrapped linear
    assert len(policy) == n_lora and len(critic) == n_lora + 2  # + value head weight and bias
    assert not {id(p) for p in policy} & {id(p) for p in critic}
    trainable = {id(p) for p in ac.parameters() if p.requires_grad}
    assert trainable == {id(p) for p in policy + critic}
    before = trainable_flags(ac)
    for role in (ac.critic, ac.policy, ac.reference, ac.critic):
        with role():
            assert trainable_flags(ac) == before
        assert trainable_flags(ac) == before
    assert ac.model.active_adapter == "policy"


def storage_bytes(module):
    """Bytes of distinct storages behind the parameters and buffers of `module`."""
    seen = {}
    for t in [*module.parameters(), *module.buffers()]:
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(seen.values())


def test_base_weights_are_stored_once(ac, tiny_dir):
    from models.loading import _load_base

    plain = storage_bytes(_load_base(str(tiny_dir), "nf4", "cpu", torch.float32))
    extra = sum(p.numel() * p.element_size() for p in ac.policy_parameters() + ac.critic_parameters())
    total = storage_bytes(ac)
    # One base plus the two adapters and the head; a second base copy would add `plain` again.
    assert total == pytest.approx(plain + extra, rel=0.01)
    assert total < 1.15 * plain + extra


# ----- scoring contracts ----------------------------------------------------------------------------


def test_policy_equals_reference_equals_plain_base_at_init(ac, tiny_dir):
    from models.loading import _load_base

    ids, mask = batch(ac.tokenizer, TEXTS)
    policy = ac.score(ids, mask)["logprobs"]
    reference = ac.score(ids, mask, role="reference")["logprobs"]
    assert torch.equal(policy, reference)  # LoRA B is zero at init
    plain = _load_base(str(tiny_dir), "nf4", "cpu", torch.float32).eval()
    assert_close(reference, naive_logprobs(plain, ids, mask), atol=1e-5, rtol=1e-5)
    assert (reference[mask.bool()].sum() < 0) and torch.all(reference <= 0)


def test_score_alignment_and_chunking_match_full_logits(ac):
    ids, mask = batch(ac.tokenizer, TEXTS)
    with ac.policy():
        expected = naive_logprobs(ac.model, ids, mask, temperature=0.7)
    full = ac.score(ids, mask, temperature=0.7, with_entropy=True, chunk_size=10_000)
    chunked = ac.score(ids, mask, temperature=0.7, with_entropy=True, chunk_size=3)
    assert_close(full["logprobs"], expected, atol=1e-5, rtol=1e-5)
    assert_close(chunked["logprobs"], full["logprobs"], atol=1e-6, rtol=1e-6)
    assert_close(chunked["entropy"], full["entropy"], atol=1e-6, rtol=1e-6)
    assert torch.all(full["logprobs"][:, 0] == 0) and torch.all(full["entropy"][:, 0] == 0)
    # A near-uniform random model: entropy close to log V wherever a token is scored.
    scored = full["entropy"][full["logprobs"] != 0]
    assert torch.all(scored > 0.9 * torch.log(torch.tensor(float(len(ac.tokenizer)))))


def test_left_padding_gives_the_same_outputs_as_no_padding(ac):
    long_text, short_text = TEXTS[0] * 3, TEXTS[2]
    ids, mask = batch(ac.tokenizer, [long_text, short_text])
    alone_ids, alone_mask = batch(ac.tokenizer, [short_text])
    n = alone_ids.shape[1]
    assert mask[1, 0] == 0 and torch.equal(ids[1, -n:], alone_ids[0])
    padded = ac.score(ids, mask, with_entropy=True)
    alone = ac.score(alone_ids, alone_mask, with_entropy=True)
    for key in ("logprobs", "entropy"):
        assert_close(padded[key][1, -n:], alone[key][0], atol=1e-5, rtol=1e-5)
        assert torch.all(padded[key][1, :-n] == 0)
    assert_close(ac.values(ids, mask)[1, -n:], ac.values(alone_ids, alone_mask)[0], atol=1e-5, rtol=1e-5)


def test_score_matches_logprobs_of_generated_tokens(ac):
    ids, mask = batch(ac.tokenizer, TEXTS[:2])  # the second prompt is left-padded
    assert ac.model.get_base_model().is_gradient_checkpointing
    torch.manual_seed(1)
    with ac.policy(), torch.no_grad():
        gen = ac.model.generate(
            input_ids=ids,
            attention_mask=mask,
            do_sample=True,
            temperature=0.7,
            top_k=0,
            top_p=1.0,
            max_new_tokens=8,
            use_cache=True,
            output_scores=True,
            return_dict_in_generate=True,
        )
    seqs, P = gen.sequences, ids.shape[1]
    new = seqs[:, P:]
    gen_lp = torch.stack([torch.log_softmax(s.float(), -1) for s in gen.scores], 1)  # (B, N, V)
    gen_lp = gen_lp.gather(-1, new[..., None])[..., 0]
    # A row that emitted eos is padded afterwards; only tokens up to and including eos were sampled.
    stop = torch.isin(new, torch.tensor([ac.tokenizer.eos_token_id, ac.tokenizer.pad_token_id]))
    sampled = (stop.cumsum(1) - stop.long()) == 0
    full_mask = torch.cat([mask, sampled.long()], 1)
    scored = ac.score(seqs, full_mask, temperature=0.7)["logprobs"][:, P:]
    assert sampled.sum() >= 8
    assert_close(scored[sampled], gen_lp[sampled], atol=1e-4, rtol=1e-4)


# ----- training and persistence ---------------------------------------------------------------------


def test_training_the_critic_leaves_the_policy_unchanged(tiny_dir):
    ac = load(tiny_dir).eval()
    ids, mask = batch(ac.tokenizer, TEXTS)
    policy0, values0 = ac.score(ids, mask)["logprobs"], ac.values(ids, mask)
    scored = scored_mask(mask)

    def error(values):
        return ((values - 3.0)[scored] ** 2).mean()

    train_step(ac, ac.critic_parameters(), ids, mask, lambda out: error(out["values"]), steps=5, lr=0.01)
    assert error(ac.values(ids, mask)) < 0.5 * error(values0)
    assert any(p.abs().sum() > 0 for n, p in ac.model.named_parameters() if "lora_B.critic" in n)
    assert torch.equal(ac.score(ids, mask)["logprobs"], policy0)
    assert torch.equal(ac.score(ids, mask, role="reference")["logprobs"], policy0)


def test_training_the_policy_moves_it_away_from_the_reference(tiny_dir):
    ac = load(tiny_dir).eval()
    ids, mask = batch(ac.tokenizer, TEXTS)
    values0, ref0 = ac.values(ids, mask), ac.score(ids, mask, role="reference")["logprobs"]
    train_step(ac, ac.policy_parameters(), ids, mask, lambda out: -out["logprobs"].sum())
    assert ac.score(ids, mask)["logprobs"].sum() > ref0.sum()
    assert torch.equal(ac.score(ids, mask, role="reference")["logprobs"], ref0)
    assert torch.equal(ac.values(ids, mask), values0)


def grads_of(ac, ids, mask):
    ac.train()
    ac.zero_grad()
    out = ac.forward_train(ids, mask)
    (out["logprobs"].sum() + out["values"].sum()).backward()
    return [p.grad.clone() for p in ac.policy_parameters() + ac.critic_parameters()]


def test_eval_mode_scoring_does_not_break_gradients_through_4bit_layers(tiny_dir):
    ac = load(tiny_dir)
    ids, mask = batch(ac.tokenizer, TEXTS)
    before = grads_of(ac, ids, mask)
    assert all(torch.isfinite(g).all() for g in before)
    ac.eval()
    ac.score(ids, mask)  # bitsandbytes would repack the weights for CPU inference here
    after = grads_of(ac, ids, mask)
    for g0, g1 in zip(before, after, strict=True):
        assert_close(g1, g0, atol=1e-6, rtol=1e-5)


def _small_adapter_update(ac, scale: float) -> None:
    """Give every adapter (policy and critic) the same random A (at its init's scale) and small random B on every
    model. (peft rounds A's initial values to bf16 where the base computes in bf16, so the loads' A differ.)"""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in sorted(ac.model.named_parameters()):
            if "lora_A" in name:
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[1] ** 0.5)
            elif "lora_B" in name:
                p.copy_(scale * torch.randn(p.shape, generator=g))


@pytest.mark.skipif(not models.loading.cpu_has_bf16(), reason="this CPU has no bf16 units")
def test_bf16_base_matmuls_match_fp32(tiny_dir):
    """The 4-bit base layers computing in bf16 (``--cpu-bf16-base`` on a CPU with bf16 units) against fp32, with
    the adapters moved off zero: reference and policy log-probs, what the adapters change in them, values and
    gradients agree within bf16 rounding (measured: 0.0026, 0.8%, 0.001, 0.35%), and the training pass equals the
    scoring pass exactly, so the PPO ratio starts at 1."""
    from ppo.rollout.generation import merged_copy

    ids, mask = batch(load(tiny_dir).tokenizer, TEXTS)
    scored = scored_mask(mask)
    runs = {}
    for name, kw in (("fp32", {}), ("bf16", {"compute_dtype": torch.bfloat16})):
        ac = load(tiny_dir, **kw).eval()
        _small_adapter_update(ac, 1e-2)
        ref = ac.score(ids, mask, role="reference")["logprobs"]
        policy = ac.score(ids, mask)["logprobs"]
        grads = torch.cat([g.flatten() for g in grads_of(ac, ids, mask)])
        runs[name] = {"ref": ref, "policy": policy, "values": ac.values(ids, mask), "grad": grads,
                      "trained": ac.forward_train(ids, mask)["logprobs"],
                      "sampler": merged_copy(ac.model).state_dict()}  # fmt: skip
    fp32, bf16 = runs["fp32"], runs["bf16"]

    def rel(a, b):
        return float((a - b).norm() / b.norm())

    assert_close(bf16["ref"], fp32["ref"], atol=0.01, rtol=0)
    assert_close(bf16["policy"], fp32["policy"], atol=0.01, rtol=0)
    change = (fp32["policy"] - fp32["ref"])[scored]
    assert change.abs().mean() > 0.02  # the adapters move the policy well beyond bf16 rounding
    assert rel((bf16["policy"] - bf16["ref"])[scored], change) < 0.05
    assert_close(bf16["values"], fp32["values"], atol=0.005, rtol=0)
    assert rel(bf16["grad"], fp32["grad"]) < 0.02
    assert torch.equal(bf16["trained"], bf16["policy"])
    # The rollouts' sampling copy stays fp32 and the same: only scoring and the update change.
    assert bf16["sampler"].keys() == fp32["sampler"].keys()
    for key, weight in bf16["sampler"].items():
        assert weight.dtype == torch.float32 and torch.equal(weight, fp32["sampler"][key]), key


def test_save_then_load_restores_policy_critic_and_value_head(tiny_dir, tmp_path):
    from peft import PeftModel

    from models.loading import _load_base

    ac = load(tiny_dir).eval()
    ids, mask = batch(ac.tokenizer, TEXTS)
    train_step(
        ac,
        ac.policy_parameters() + ac.critic_parameters(),
        ids,
        mask,
        lambda out: -out["logprobs"].sum() + (out["values"] ** 2).sum(),
        steps=1,
    )
    policy, values = ac.score(ids, mask)["logprobs"], ac.values(ids, mask)
    out = ac.save_pretrained(tmp_path / "ckpt")
    for name in [
        "adapter_config.json",
        "adapter_model.safetensors",
        "critic/adapter_config.json",
        "value_head.safetensors",
        "qwen_tool_model.json",
    ]:
        assert (out / name).is_file(), name
    assert json.loads((out / "qwen_tool_model.json").read_text())["lora_r"] == 16

    restored = models.load_checkpoint(out, device="cpu").eval()
    assert restored.settings == ac.settings
    assert torch.equal(restored.score(ids, mask)["logprobs"], policy)
    assert torch.equal(restored.values(ids, mask), values)
    peft_policy = PeftModel.from_pretrained(_load_base(str(tiny_dir), "nf4", "cpu", torch.float32), str(out))
    assert_close(naive_logprobs(peft_policy.eval(), ids, mask), policy, atol=1e-5, rtol=1e-5)


def test_shared_critic_full_precision(tiny_dir):
    ac = load(tiny_dir, quantization="none", critic="shared")
    assert list(ac.model.peft_config) == ["policy"]
    assert [id(p) for p in ac.critic_parameters()] == [id(p) for p in ac.value_head.parameters()]
    ids, mask = batch(ac.tokenizer, TEXTS)
    grads = grads_of(ac, ids, mask)
    assert all(g.abs().sum() > 0 for g in grads[-2:])  # the value head learns
    with ac.critic():
        assert ac.model.active_adapter == "policy"


def test_missing_model_raises_model_load_error(tmp_path):
    with pytest.raises(models.ModelLoadError, match="No model folder at"):
        models.load_actor_critic(str(tmp_path / "nope"), device="cpu")
    with pytest.raises(models.ModelLoadError, match="Could not load the model in"):
        models.load_actor_critic(str(tmp_path), device="cpu")


def test_presets_resolve_above_models(monkeypatch, tmp_path):
    # models loads what it is given; the presets (and the tiny recipe) are ppo's.
    import ppo.tiny
    from ppo.infra.config import Config
    from ppo.infra.setup import prepare_model

    assert prepare_model(Config(preset="qwen3-1.7b")) == "Qwen/Qwen3-1.7B"
    assert prepare_model(Config(model="some/other")) == "some/other"
    monkeypatch.setattr(ppo.tiny, "prepare", lambda cfg: tmp_path)
    assert prepare_model(Config()) == str(tmp_path)


# ----- tiny cache ------------------------------------------------------------------------------------


def test_ensure_tiny_builds_once_and_atomically(tmp_path, monkeypatch):
    from ppo.tiny import build

    calls = []

    def fake_build(out_dir, texts, seed=0, copy_circuit=False):
        calls.append(out_dir)
        (out_dir / "config.json").write_text("{}")
        if len(calls) == 1:
            raise RuntimeError("crash mid-build")
        return out_dir

    monkeypatch.setattr(tiny, "build_tiny", fake_build)
    target = tmp_path / "cache" / "tiny-x"
    with pytest.raises(RuntimeError):
        build.ensure_tiny(target)
    assert not target.exists() and list(target.parent.iterdir()) == []
    assert build.ensure_tiny(target) == target and (target / "config.json").is_file()
    assert build.ensure_tiny(target) == target and len(calls) == 2
    monkeypatch.setenv("QWEN_TOOL_CACHE", str(tmp_path))
    assert build.default_cache_dir() == tmp_path / f"tiny-{build.TINY_VERSION}-{build.fingerprint()}"
    assert build.default_cache_dir(copy_circuit=True) != build.default_cache_dir()  # a base of its own


def test_position_ids_and_scored_positions_follow_left_padding():
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 0, 0, 1]])
    expected = torch.tensor([[0, 0, 0, 1, 2], [0, 1, 2, 3, 4], [0, 0, 0, 0, 0]])
    assert torch.equal(position_ids_from_mask(mask), expected)
    scored = torch.tensor([[0, 0, 0, 1, 1], [0, 1, 1, 1, 1], [0, 0, 0, 0, 0]], dtype=torch.bool)
    assert torch.equal(scored_mask(mask), scored)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_nf4_bf16_on_cuda(tiny_dir):
    import bitsandbytes as bnb

    ac = models.load_actor_critic(str(tiny_dir), device="cuda")
    layer = next(m for m in ac.modules() if isinstance(m, bnb.nn.Linear4bit))
    assert layer.weight.device.type == "cuda" and layer.compute_dtype == torch.bfloat16
    ids, mask = (t.cuda() for t in batch(ac.tokenizer, TEXTS))
    ac.eval()
    policy = ac.score(ids, mask, with_entropy=True)
    assert policy["logprobs"].dtype == torch.float32
    assert torch.equal(policy["logprobs"], ac.score(ids, mask, role="reference")["logprobs"])
    grads = grads_of(ac, ids, mask)
    assert all(torch.isfinite(g).all() for g in grads) and grads[-2].abs().sum() > 0
    ac.eval()
    with ac.policy(), torch.no_grad():
        seqs = ac.model.generate(input_ids=ids, attention_mask=mask, do_sample=True, max_new_tokens=4)
    assert seqs.shape[0] == ids.shape[0] and seqs.shape[1] > ids.shape[1]


@pytest.mark.parametrize(("temperature", "with_bias"), [(1.0, False), (0.7, True)])
def test_chunked_logprobs_and_entropy_match_autograd_through_full_logits(temperature, with_bias):
    """The closed-form backward of the chunked scorer gives what autograd gives through the full (B, T, V) logits:
    the same log-probs, entropies and gradients for hidden states, head weight and bias, chunks of any size."""
    from models.scoring import token_logprobs

    torch.manual_seed(0)
    B, T, H, V = 3, 11, 16, 37
    head = torch.nn.Linear(H, V, bias=with_bias)
    ids = torch.randint(V, (B, T))
    attn = torch.ones(B, T, dtype=torch.long)
    attn[0, :3] = 0  # left padding
    hidden = torch.randn(B, T, H, requires_grad=True)
    g_lp, g_ent = torch.randn(B, T), torch.randn(B, T)  # (the scorer works in fp32)

    def reference():
        logp = torch.log_softmax(head(hidden[:, :-1]) / temperature, dim=-1)
        lp = logp.gather(-1, ids[:, 1:, None]).squeeze(-1)
        ent = -(logp.exp() * logp).sum(-1)
        keep = attn[:, 1:].bool() & attn[:, :-1].bool()
        return torch.where(keep, lp, 0.0), torch.where(keep, ent, 0.0)

    want_lp, want_ent = reference()
    want = torch.autograd.grad(
        (want_lp * g_lp[:, 1:]).sum() + (want_ent * g_ent[:, 1:]).sum(), [hidden, *head.parameters()]
    )
    for chunk in (4, 512):
        out = token_logprobs(
            hidden, ids, attn, head, temperature=temperature, with_entropy=True, chunk_size=chunk
        )
        torch.testing.assert_close(out["logprobs"][:, 1:], want_lp, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out["entropy"][:, 1:], want_ent, atol=1e-5, rtol=1e-5)
        got = torch.autograd.grad(
            (out["logprobs"] * g_lp).sum() + (out["entropy"] * g_ent).sum(), [hidden, *head.parameters()]
        )
        for a, b in zip(got, want, strict=True):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def _repeat_accuracy(
    model, ids_to_draw: list[int], length: int, separator: int | None = None
) -> tuple[float, float]:
    """Argmax accuracy on rows of ``length`` distinct tokens (of ``ids_to_draw``) repeated once: on the repeat
    (copyable) and on the first copy (nothing to copy from). With ``separator``, the row is a list, that token
    before every element, and only the elements are scored."""
    generator = torch.Generator().manual_seed(1)
    rows = [torch.randperm(len(ids_to_draw), generator=generator)[:length] for _ in range(4)]
    x = torch.tensor(ids_to_draw)[torch.stack(rows)]
    if separator is not None:
        x = torch.stack([torch.full_like(x, separator), x], dim=2).flatten(1)  # sep a1 sep a2 ...
    ids = torch.cat([x, x], dim=1)
    with torch.no_grad():
        hits = model(ids).logits.argmax(-1)[:, :-1] == ids[:, 1:]
    scored = ids[:, 1:] != separator if separator is not None else torch.ones_like(hits)
    n = x.shape[1]
    return (
        hits[:, n:][scored[:, n:]].float().mean().item(),
        hits[:, : n - 1][scored[:, : n - 1]].float().mean().item(),
    )


def test_the_tiny_model_is_built_wired_to_copy_names_and_numbers(tmp_path):
    """`wire_copying`: before any training, the saved tiny model predicts a repeated row of word pieces and digits
    from its first copy (a piece seen before is followed by what followed it then), and not a row of punctuation
    and markup (left to training); a randomly initialised one copies neither. In a list, where the same separator
    precedes every element, it copies the element after the separator that followed the last one (a match on the
    three tokens before), which a one-token match could not tell apart."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    texts = [
        "The Assistant calls Tools and reads 0 1 2 3 4 5 6 7 8 9, {}: [] () Silver Stapler, Amber Teapot"
    ] * 4
    wired = tiny.build_tiny(tmp_path / "wired", texts, vocab_size=300, copy_circuit=True)
    plain = tiny.build_tiny(tmp_path / "plain", texts, vocab_size=300)
    tokenizer = AutoTokenizer.from_pretrained(wired)
    copied = tiny.copy_tokens(tokenizer)
    special = 3  # pad, bos/eos: never in a row
    copy_ids = [i for i, c in enumerate(copied) if c and i >= special]
    other_ids = [i for i, c in enumerate(copied) if not c and i >= special]
    assert len(copy_ids) > 50 and len(other_ids) > 50
    assert all(copied[i] for i in tokenizer.encode("0 1 2 3 4 5 6 7 8 9 Silver", add_special_tokens=False)
               if tokenizer.decode([i]).strip())  # fmt: skip
    separator = tokenizer.encode(", ", add_special_tokens=False)
    assert len(separator) == 1 and not copied[separator[0]]
    # 0.65: the flag where a name begins (`name_starts`, read by the random layers) costs the untrained copy here
    # (0.74 with the flag at 0, 0.69 with it); after training it gains (README, "Copying names and numbers").
    for folder, least in ((wired, 0.65), (plain, 0.0)):
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        repeat, first = _repeat_accuracy(model, copy_ids, 40)
        assert least <= repeat and (least > 0 or repeat < 0.05), (folder.name, repeat)
        assert first < 0.05  # nothing to copy from: no better than chance
        assert _repeat_accuracy(model, other_ids, 40)[0] < 0.05  # punctuation and markup are not copied
        listed = _repeat_accuracy(model, copy_ids, 20, separator=separator[0])[0]
        assert least <= listed and (least > 0 or listed < 0.05), (folder.name, listed)
    with pytest.raises(ValueError, match="the copying circuit needs hidden_size >= 3 \\* head_dim \\+ 51"):
        tiny.build_tiny(tmp_path / "narrow", texts, vocab_size=300, hidden_size=128, copy_circuit=True)


def test_the_copying_circuit_matches_a_newline_and_its_json_escape(tmp_path):
    """A prompt cuts a CSV's rows with newlines; the call that copies them into a JSON string writes each as the
    escape backslash-n, another token. The wired base matches the two as one token (`escape_pairs`), so after an
    escape it writes the name that began the next row in the prompt; wired without the pair (the previous circuit)
    it copies far fewer of them. The two tokens keep distinct embeddings, so the rest of the model tells them
    apart."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    names = ["Dee", "Ida", "Bo", "Liv", "Cy", "Ann", "Eli", "Kai", "Gus", "Mo", "Flo", "Jo"]
    texts = ["name,score\n" + "\n".join(f"{n},{i}" for i, n in enumerate(names)), '{"text": "a\\nb\\nc"}'] * 8
    folder = tiny.build_tiny(tmp_path / "wired", texts, vocab_size=400, copy_circuit=True)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    pairs = tiny.escape_pairs(tokenizer)
    assert len(pairs) == 1
    newline, escape = pairs[0]
    assert tokenizer.decode([newline]) == "\n" and tokenizer.decode([escape]) == "\\n"
    one_token = [tokenizer.encode(n, add_special_tokens=False) for n in names]
    name_ids = [ids[0] for ids in one_token if len(ids) == 1]
    digits = [tokenizer.encode(str(d), add_special_tokens=False)[0] for d in range(10)]
    comma = tokenizer.encode(",", add_special_tokens=False)
    assert len(name_ids) >= 8 and len(comma) == 1

    generator = random.Random(0)
    sequences, targets = [], []
    # A CSV in the prompt, then the same rows in a call: name , digit digit, rows cut apart.
    for _ in range(8):
        rows = [
            [n, comma[0], generator.choice(digits), generator.choice(digits)]
            for n in generator.sample(name_ids, 6)
        ]
        prompt = [t for row in rows for t in [*row, newline]]
        call = [t for row in rows for t in [*row, escape]][:-1]
        sequences.append(prompt + call)
        targets.append([len(prompt) + 5 * r - 1 for r in range(1, 6)])  # each escape: a name follows

    def accuracy(model) -> float:
        with torch.no_grad():
            pred = model(torch.tensor(sequences)).logits.argmax(-1)
        hits = [pred[b, t].item() == sequences[b][t + 1] for b, ts in enumerate(targets) for t in ts]
        return sum(hits) / len(hits)

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    emb = model.get_input_embeddings().weight
    assert not torch.equal(emb[newline], emb[escape])
    wired = accuracy(model)
    # The same circuit, the same codes and name flags, no pair.
    tiny.wire_copying(model, 0, tiny.copy_tokens(tokenizer), starts=tiny.name_starts(tokenizer))
    without = accuracy(model)
    assert wired >= 0.8 and without <= wired - 0.3, (wired, without)


def test_the_wired_base_flags_where_a_name_begins(tmp_path):
    """`name_starts`: the first piece of each capitalised word, and nothing else (not its later pieces, lowercase
    words, digits or punctuation), has the embedding's dim d - 3 at ``start_flag``; every other id has it at 0."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    texts = ["Ask the Penrith Museum about Silverton, 42 items; Amberly Teapots and rivers"] * 4
    folder = tiny.build_tiny(tmp_path / "wired", texts, vocab_size=300, copy_circuit=True)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    starts = tiny.name_starts(tokenizer)
    for word in ("Penrith", "Museum", "Silverton", "Amberly", "Teapots"):
        pieces = [
            i for i in tokenizer.encode(" " + word, add_special_tokens=False) if tokenizer.decode([i]).strip()
        ]
        assert starts[pieces[0]] and not any(starts[i] for i in pieces[1:]), (word, pieces)
    for text in (" the about items and rivers", " 42", ",;"):
        assert not any(starts[i] for i in tokenizer.encode(text, add_special_tokens=False)), text
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    flag = model.get_input_embeddings().weight[:, model.config.hidden_size - 3]
    assert torch.equal(flag, tiny.COPY_CIRCUIT["start_flag"] * torch.tensor(starts, dtype=flag.dtype))
    assert sum(starts) >= 5


def test_the_copy_probe_counts_the_copyable_tokens_of_a_call(tmp_path):
    """`ppo.tiny.probe.copy_accuracy` scores exactly the call's tokens that the circuit could copy: in
    ``{"numbers": [52, 7]}`` for a prompt that lists them, the digits 5, 2 and 7, of which 5 and 7 open a span (after
    ``[`` and ``, ``). The wired base copies most of them; the plain random base almost none."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ppo.tiny.corpus import mock_tools, tokenizer_texts
    from ppo.tiny.probe import copy_accuracy

    shape = {"hidden_size": 160, "head_dim": 32, "num_hidden_layers": 2, "intermediate_size": 64}
    texts, tools = tokenizer_texts(), mock_tools()
    one = {"id": "t", "category": "data", "prompt": "Use compute_statistics to find the mean of [52, 7].",
           "oracle": [{"name": "compute_statistics", "arguments": {"numbers": [52, 7]}}]}  # fmt: skip
    lists = [
        {"id": f"l{i}", "category": "data", "prompt": f"Use compute_statistics to find the mean of {xs}.",
         "oracle": [{"name": "compute_statistics", "arguments": {"numbers": xs}}]}
        for i, xs in enumerate([[31, 8, 64, 25, 47], [90, 12, 3, 58], [7, 76, 41, 19, 83, 5]])
    ]  # fmt: skip
    rates = {}
    for wired in (True, False):
        folder = tiny.build_tiny(tmp_path / str(wired), texts, copy_circuit=wired, **shape)
        tokenizer = AutoTokenizer.from_pretrained(folder)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        single = copy_accuracy(model, tokenizer, [one], tools)["data"]
        assert single[0] == 3 and single[2] == 2, single
        row = copy_accuracy(model, tokenizer, lists, tools)["data"]
        assert row[0] == sum(len("".join(map(str, t["oracle"][0]["arguments"]["numbers"]))) for t in lists)
        rates[wired] = row[1] / row[0]
    assert rates[True] >= 0.6 and rates[False] <= 0.1, rates
