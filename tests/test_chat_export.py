"""After training: ``ppo.chat`` plays the trained policy on the server, ``ppo.export`` writes it as a plain model."""

from __future__ import annotations

import json

import pytest
import torch

from ppo import chat, export, train
from ppo.infra.config import Config

EXPRESSIONS = ["2 + 3", "7 * 6", "9 - 4", "8 / 2"]
ANSWERS = ["5", "42", "5", "4"]


def _tasks() -> list[dict]:
    return [
        {"id": f"calc-{k}", "category": "math", "prompt": f"Use the calculator to compute {expr}.",
         "success": {"tool": "calculator", "result_equals": ANSWERS[k]}, "max_turns": 2,
         "oracle": [{"name": "calculator", "arguments": {"expression": expr}}]}
        for k, expr in enumerate(EXPRESSIONS)
    ]  # fmt: skip


@pytest.fixture(scope="module")
def trained_run(small_tiny_dir, tmp_path_factory):
    """A run folder: the small model supervised on the oracle calls of four calculator tasks, then two PPO
    iterations (so the policy adapter is not zero)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from env import MCPGymEnv
    from env.parsing import call_text
    from ppo.rollout import ChatFormat
    from ppo.tiny.warmstart import supervised_finetune, tokenize_demo

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(small_tiny_dir)
    model = AutoModelForCausalLM.from_pretrained(small_tiny_dir, dtype=torch.float32)
    chat_format = ChatFormat(tokenizer)
    env = MCPGymEnv(tasks=_tasks(), max_turns=2)
    demos = []
    try:
        for task in _tasks():
            _obs, info = env.reset(options={"task_id": task["id"]})
            call = task["oracle"][0]
            demos += [
                tokenize_demo(chat_format, info, [(call_text(call["name"], call["arguments"]), [])])
            ] * 4
    finally:
        env.close()
    supervised_finetune(model, demos, chat_format.pad_id, epochs=120, lr=3e-3, batch_size=16, seed=0)
    root = tmp_path_factory.mktemp("trained")
    model.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    (root / "tasks.jsonl").write_text("".join(json.dumps(t) + "\n" for t in _tasks()))
    cfg = Config(
        model=str(root / "model"), warmstart=False, tasks=str(root / "tasks.jsonl"), max_turns=2, iterations=2,
        num_episodes=8, episodes_per_task=2, minibatch_size=8, micro_batch_size=8, max_new_tokens=32,
        max_context=1024, optimizer="adamw", critic_warmup_iterations=0, warmup_iterations=0,
        output_dir=str(root / "run"), log_samples_every=0, seed=0,
    )  # fmt: skip
    train.main(cfg)
    return root


def test_chat_plays_a_task_and_prints_its_calls(trained_run, capsys):
    code = chat.main(
        ["--checkpoint", str(trained_run / "run"), "--prompt", "Use the calculator to compute 7 * 6."]
    )
    out = capsys.readouterr().out
    assert code == 0
    assert 'call calculator {"expression": "7 * 6"}' in out
    assert "tool: 42" in out and "status: tool_execution" in out


def test_chat_plays_a_task_of_a_file_with_its_own_success(trained_run, capsys):
    code = chat.main(["--checkpoint", str(trained_run / "run"), "--task", "calc-0", "--tasks",
                      str(trained_run / "tasks.jsonl")])  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0, out
    assert "status: success" in out and "episode: solved after 1 turn(s), return +10.0" in out


def test_chat_reads_one_task_a_line(trained_run, capsys, monkeypatch):
    lines = iter(["Use the calculator to compute 2 + 3.", "Use the calculator to compute 9 - 4.", ""])
    monkeypatch.setattr("builtins.input", lambda _prompt: next(lines))
    assert chat.main(["--checkpoint", str(trained_run / "run")]) == 0
    out = capsys.readouterr().out
    assert out.count("user: ") == 2 and "tool: 5" in out


def test_chat_refuses_an_unknown_task(trained_run, capsys):
    code = chat.main(["--checkpoint", str(trained_run / "run"), "--task", "nope", "--tasks",
                      str(trained_run / "tasks.jsonl")])  # fmt: skip
    assert code == 2 and "no task 'nope'" in capsys.readouterr().err


def _policy_greedy(run, prompts):
    from ppo.infra.checkpoint import latest_checkpoint, run_config
    from ppo.infra.config import from_dict
    from ppo.infra.setup import load_policy

    checkpoint = latest_checkpoint(run)
    actor_critic = load_policy(from_dict(run_config(checkpoint)), adapters=checkpoint, device="cpu")
    with torch.no_grad(), actor_critic.policy():
        return [
            actor_critic.model.generate(**p, max_new_tokens=24, do_sample=False)[0].tolist() for p in prompts
        ]


def _prompts(tokenizer):
    from env import MCPGymEnv

    env = MCPGymEnv(tasks=_tasks())
    try:
        tools = env.tools
    finally:
        env.close()
    texts = [[{"role": "user", "content": t["prompt"]}] for t in _tasks()[:3]]
    texts.append([{"role": "user", "content": "Use the calculator to compute 6 * 8."}])
    return [
        tokenizer.apply_chat_template(m, tools=tools, add_generation_prompt=True, return_tensors="pt",
                                      return_dict=True)
        for m in texts
    ]  # fmt: skip


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_the_exported_model_is_the_policy(trained_run, tmp_path, dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / f"export-{dtype}"
    assert export.main(["--checkpoint", str(trained_run / "run"), "--out", str(out), "--dtype", dtype]) == 0
    model = AutoModelForCausalLM.from_pretrained(out)  # plain transformers, no code of ours
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert model.dtype == getattr(torch, dtype) and "quantization_config" not in json.loads(
        (out / "config.json").read_text()
    )
    prompts = _prompts(tokenizer)
    with torch.no_grad():
        exported = [model.generate(**p, max_new_tokens=24, do_sample=False)[0].tolist() for p in prompts]
    assert exported == _policy_greedy(trained_run / "run", prompts)
    card = (out / "README.md").read_text()
    assert "base_model:" in card and "success +10" in card and "structural_fail -1" in card


def test_adapter_only_export_loads_with_peft(trained_run, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = tmp_path / "adapter"
    assert export.main(["--checkpoint", str(trained_run / "run"), "--out", str(out), "--adapter-only"]) == 0
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(trained_run / "model")
    base = AutoModelForCausalLM.from_pretrained(trained_run / "model")
    model = PeftModel.from_pretrained(base, out)
    lora = [n for n, p in model.named_parameters() if "lora_B" in n and p.abs().sum() > 0]
    assert lora, "the exported adapter holds the trained (non-zero) LoRA weights"
    assert "library_name: peft" in (out / "README.md").read_text()


def test_export_refuses_a_folder_that_is_not_empty(trained_run, tmp_path):
    (tmp_path / "keep.txt").write_text("mine")
    with pytest.raises(SystemExit):
        export.main(["--checkpoint", str(trained_run / "run"), "--out", str(tmp_path)])
    assert (tmp_path / "keep.txt").read_text() == "mine"


def test_chat_refuses_what_it_cannot_play_before_loading_a_model(trained_run, capsys):
    with pytest.raises(SystemExit):
        chat.main(["--checkpoint", str(trained_run / "run"), "--prompt", "  "])
    assert "--prompt is empty" in capsys.readouterr().err
    code = chat.main(["--checkpoint", str(trained_run / "run"), "--prompt", "x", "--max-new-tokens", "5000"])
    assert code == 2 and "need 0 < max_new_tokens < max_context" in capsys.readouterr().err


def test_a_turn_shows_each_call_and_the_note_on_calls_not_run():
    import io

    out = io.StringIO()
    info = {
        "status": "structural_fail",
        "calls": [
            {"name": "calculator", "arguments": {"expression": "1"}, "error": None},
            {"name": None, "arguments": {}, "error": "not valid JSON"},
            {"name": "calculator", "arguments": {"expression": "3"}, "error": None},
        ],
        "tool_messages": [
            {"role": "tool", "name": "calculator", "content": "1"},
            {"role": "tool", "name": None, "content": "invalid tool call"},
            {
                "role": "tool",
                "name": None,
                "content": "1 tool call(s) not run: at most 2 calls are run per turn",
            },
        ],
    }
    chat.show_turn(out, 1, "<tool_call>...</tool_call>", info)
    lines = out.getvalue().splitlines()
    assert lines[2:] == [
        '  call calculator {"expression": "1"}',
        "  tool: 1",
        "  call (not valid JSON)",
        "  tool: invalid tool call",
        "  env: 1 tool call(s) not run: at most 2 calls are run per turn",
        "  status: structural_fail",
    ]


def test_export_refuses_an_eval_file_that_is_not_an_evaluation(trained_run, tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text("[1, 2]")
    with pytest.raises(SystemExit):
        export.main(
            ["--checkpoint", str(trained_run / "run"), "--out", str(tmp_path / "o"), "--eval", str(bad)]
        )
    assert "holds no success_rate" in capsys.readouterr().err


def test_evaluate_writes_every_episode_it_scored(trained_run, tmp_path):
    from ppo import evaluate

    path = tmp_path / "episodes.jsonl"
    result = evaluate.main(["--checkpoint", str(trained_run / "run"), "--tasks", str(trained_run / "tasks.jsonl"),
                            "--episodes", str(path)])  # fmt: skip
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["task_id"] for r in records] == [t["id"] for t in _tasks()]
    assert sum(r["success"] for r in records) / len(records) == result["success_rate"]
    for record in records:
        assert len(record["statuses"]) == len(record["rewards"]) >= 1
        turns = [m for m in record["messages"] if m["role"] == "assistant"]
        assert len(turns) == len(record["statuses"]) and "<tool_call>" in turns[0]["content"]
        assert record["messages"][0]["role"] in ("system", "user")


def test_adapters_trained_on_another_base_are_refused(trained_run):
    """A run config that leads to another base than the adapters' (a base-choosing setting missing from an
    older config) is refused before anything loads, instead of playing the adapters on the wrong base."""
    from ppo.infra.checkpoint import CheckpointError, latest_checkpoint
    from ppo.infra.setup import check_adapter_base, load_policy

    checkpoint = latest_checkpoint(trained_run / "run")
    derived = Config(warmstart=False)  # no --model: the base is the one the config builds
    check_adapter_base(derived, checkpoint, str(trained_run / "model"))  # its own base, by folder name
    with pytest.raises(CheckpointError, match=r"trained on the base .*model, but the run's config leads to"):
        load_policy(derived, adapters=checkpoint, device="cpu", model_path="/cache/tiny-v3-0ther")
    # a base named with --model is the user's call: not checked
    check_adapter_base(Config(model="/my/copy"), checkpoint, "/my/copy")
