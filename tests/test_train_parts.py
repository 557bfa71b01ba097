"""The trainer's plumbing without a model: config and CLI, schedule, task order, checkpoints, metrics."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from ppo.infra.checkpoint import latest_checkpoint, load_trainer_state, save_checkpoint
from ppo.infra.config import PRESETS, Config, config_table, field_help, parse_args
from ppo.infra.monitor import MetricsLogger, episode_metrics
from ppo.infra.setup import lr_factor
from ppo.rollout import Episode, pad_episodes
from ppo.trainer.state import TaskSampler


def test_every_field_has_help_and_presets_validate():
    helps = field_help()
    assert set(helps) == {f.name for f in dataclasses.fields(Config)}
    assert all(text.strip() for text in helps.values())
    for preset in PRESETS.values():
        preset.validate()
    assert "|learning_rate|" in config_table(PRESETS["tiny"])


def test_cli_overrides_the_preset():
    cfg = parse_args(["--preset", "qwen3-1.7b", "--iterations", "3", "--no-adaptive-kl", "--dual-clip", "3"])
    assert cfg.model == "Qwen/Qwen3-1.7B" and cfg.iterations == 3
    assert cfg.adaptive_kl is False and cfg.dual_clip == 3.0
    assert cfg.max_new_tokens == PRESETS["qwen3-1.7b"].max_new_tokens
    assert parse_args(["--mcp-server", "none"]).mcp_server is None


def test_the_4bit_base_computes_in_bf16_only_on_a_cpu_with_bf16_units():
    from models.loading import cpu_has_bf16
    from ppo.infra.setup import base_compute_dtype

    assert base_compute_dtype(Config(), "cpu") is None  # off by default
    assert parse_args(["--cpu-bf16-base"]).cpu_bf16_base is True
    on = Config(cpu_bf16_base=True)
    assert base_compute_dtype(on, "cpu") == (torch.bfloat16 if cpu_has_bf16() else None)
    assert base_compute_dtype(dataclasses.replace(on, quantization="none"), "cpu") is None
    assert base_compute_dtype(on, "cuda:0") is None  # the model is bf16 there already


def test_cli_rejects_inconsistent_settings():
    with pytest.raises(SystemExit, match="micro_batch_size"):
        parse_args(["--minibatch-size", "4", "--micro-batch-size", "8"])
    with pytest.raises(SystemExit, match="unknown preset"):
        parse_args(["--preset", "huge"])


def test_lr_schedule_by_hand():
    cfg = Config(iterations=12, warmup_iterations=2, lr_schedule="linear")
    # warmup: (it + 1) / (warmup + 1)
    assert lr_factor(cfg, 0) == pytest.approx(1 / 3)
    assert lr_factor(cfg, 1) == pytest.approx(2 / 3)
    # then 1 - 0.9 * (it - 2) / 10
    assert lr_factor(cfg, 2) == pytest.approx(1.0)
    assert lr_factor(cfg, 7) == pytest.approx(0.55)
    cos = dataclasses.replace(cfg, lr_schedule="cosine")
    assert lr_factor(cos, 7) == pytest.approx(0.55)  # the cosine midpoint is the linear midpoint
    assert lr_factor(cos, 12) == pytest.approx(0.1)


def test_task_sampler_covers_each_pass_and_resumes_exactly():
    ids = [f"t{i}" for i in range(10)]
    sampler = TaskSampler(ids, seed=3)
    first = sampler.sample(10)
    assert sorted(first) == sorted(ids)  # one full pass before any repeat
    sampler.sample(4)
    state = json.loads(json.dumps(sampler.state_dict()))  # survives serialisation
    expected = sampler.sample(17)
    restored = TaskSampler(ids, seed=999)
    restored.load_state_dict(state)
    assert restored.sample(17) == expected


class _FakePolicy:
    def __init__(self, fail: bool = False):
        self.fail = fail

    def save_pretrained(self, directory):
        from safetensors.torch import save_file

        save_file({"w": torch.zeros(2)}, str(directory / "adapter_model.safetensors"))
        if self.fail:
            raise RuntimeError("disk full")


def test_checkpoints_are_atomic_and_pruned(tmp_path):
    for it in (1, 2, 3, 4):
        save_checkpoint(tmp_path, it, _FakePolicy(), {"iteration": it}, keep=2)
    assert latest_checkpoint(tmp_path).name == "iter_000004"
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("iter_*")) == ["iter_000003", "iter_000004"]
    with pytest.raises(RuntimeError, match="disk full"):
        save_checkpoint(tmp_path, 5, _FakePolicy(fail=True), {"iteration": 5}, keep=2)
    # the failed write left nothing behind and the pointer still names the last good checkpoint
    assert latest_checkpoint(tmp_path).name == "iter_000004"
    assert not list((tmp_path / "checkpoints").glob(".tmp-*"))
    assert load_trainer_state(latest_checkpoint(tmp_path))["iteration"] == 4
    with pytest.raises(FileNotFoundError, match="does not exist"):
        latest_checkpoint(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        latest_checkpoint(tmp_path / "empty")


def _episode(statuses, rewards, success, category="math"):
    e = Episode("t", category, [1, 2, 3])
    e.statuses, e.rewards, e.success = list(statuses), list(rewards), success
    return e


def test_episode_metrics_by_hand():
    episodes = [
        _episode(["invalid_json", "success"], [-0.8, 10.0], True),
        _episode(["tool_error", "tool_execution", "structural_fail"], [-0.5, 0.0, -1.0], False),
    ]
    m = episode_metrics(episodes)
    assert m["charts/success_rate"] == 0.5
    assert m["charts/episodic_return"] == pytest.approx((9.2 - 1.5) / 2)
    assert m["charts/episode_turns"] == 2.5
    assert m["env/status/success"] == pytest.approx(1 / 5)
    assert m["env/status/structural_fail"] == pytest.approx(1 / 5)
    assert m["env/status/tool_execution"] == pytest.approx(1 / 5)


def test_pad_episodes_right_pads_and_keeps_masks():
    a = Episode("a", "m", [5, 6, 7])
    a.extend([8, 9], is_action=True)
    a.scores[-1] = 10.0
    b = Episode("b", "m", [5])
    t = pad_episodes([a, b], pad_id=0)
    assert t["input_ids"].tolist() == [[5, 6, 7, 8, 9], [5, 0, 0, 0, 0]]
    assert t["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 0, 0, 0, 0]]
    assert t["action_mask"].tolist() == [[0, 0, 0, 1, 1], [0, 0, 0, 0, 0]]
    assert t["scores"][0, 4] == 10.0 and t["scores"].sum() == 10.0


def test_metrics_log_drops_iterations_redone_after_resume(tmp_path):
    logger = MetricsLogger(tmp_path)
    for it in range(5):
        logger.log(it, {"charts/success_rate": it / 10, "losses/x": float("nan")})
    logger.close()
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [x["iteration"] for x in lines] == [0, 1, 2, 3, 4]
    assert lines[0]["losses/x"] is None  # non-finite values are written as null, never as invalid JSON
    MetricsLogger(tmp_path, start_iteration=3).close()
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [x["iteration"] for x in lines] == [0, 1, 2]


def test_cli_reports_bad_inputs_in_one_line(tmp_path):
    import subprocess
    import sys

    bad_tasks = tmp_path / "tasks.jsonl"
    bad_tasks.write_text('{"id": "a", "prompt": "x", "success": {"tool": "calculator"}}\nnot json\n')
    for flags, message in (
        (["--model", str(tmp_path / "no-such-model")], "no-such-model"),
        (["--model", str(tmp_path / "no-such-model"), "--tasks", str(bad_tasks)], "line 2"),
    ):
        cmd = [
            sys.executable,
            "-m",
            "ppo.train",
            *flags,
            "--output-dir",
            str(tmp_path / "out"),
            "--iterations",
            "1",
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 2
        assert "Traceback" not in proc.stderr
        last = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
        assert len(last) == 1 and message in last[0]


def test_cli_rejects_bad_group_and_discount_settings():
    with pytest.raises(SystemExit, match="episodes_per_task"):
        parse_args(["--num-episodes", "64", "--episodes-per-task", "5"])
    with pytest.raises(SystemExit, match="turn_gamma"):
        parse_args(["--turn-gamma", "1.5"])


def test_segmentation_noise_keeps_the_text_and_is_exact_at_rate_zero(small_tiny_dir):
    import random

    from transformers import AutoTokenizer

    from ppo.rollout import ChatFormat
    from ppo.tiny.warmstart import call_text, encode_with_cuts, prompt_ids_with_cuts

    chat = ChatFormat(AutoTokenizer.from_pretrained(small_tiny_dir))
    text = call_text("web_search", {"query": "Saltmere Theatre"})
    rng = random.Random(0)
    assert encode_with_cuts(chat, text, 0.0, rng) == chat.encode(text)
    noisy = encode_with_cuts(chat, text, 0.5, rng)
    assert chat.tokenizer.decode(noisy) == text and len(noisy) > len(chat.encode(text))
    assert noisy[0] == chat.encode("<tool_call>")[0]  # markup is never cut into
    messages = [
        {"role": "user", "content": "Use web_search to find the document about the Saltmere Theatre."}
    ]
    tools = [
        {"type": "function", "function": {"name": "web_search", "description": "Search.", "parameters": {}}}
    ]
    assert prompt_ids_with_cuts(chat, messages, tools, 0.0, rng) == chat.prompt_ids(messages, tools)
    cut = prompt_ids_with_cuts(chat, messages, tools, 0.5, rng)
    assert chat.tokenizer.decode(cut) == chat.render_prompt(messages, tools) and cut != chat.prompt_ids(
        messages, tools
    )


def test_only_local_rank_zero_builds_and_the_others_wait(monkeypatch):
    from ppo.infra.distributed import once_per_node

    built, answers = [], [None, None, "cache/model"]
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert once_per_node(lambda: built.append(1), lambda: answers.pop(0), poll_seconds=0) == "cache/model"
    assert built == [] and answers == []
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert once_per_node(lambda: "built", lambda: None) == "built"


def test_periodic_eval_is_off_for_own_tasks_without_eval_tasks(capsys):
    from ppo.trainer.loop import _eval_tasks

    assert _eval_tasks(Config(tasks="mine.jsonl", eval_every=5)) == []
    assert "--eval-tasks" in capsys.readouterr().out
    assert _eval_tasks(Config(eval_every=0)) == []
    assert len(_eval_tasks(Config(eval_every=5, eval_episodes=7))) == 7  # the mock's val split, first 7


def test_keep_existing_never_replaces_a_finished_folder(tmp_path):
    from ppo.infra.checkpoint import write_folder_atomically

    final = tmp_path / "model"
    write_folder_atomically(final, lambda f: (f / "config.json").write_text("first"))
    write_folder_atomically(final, lambda f: (f / "config.json").write_text("second"), keep_existing=True)
    assert (final / "config.json").read_text() == "first"
    assert [p.name for p in tmp_path.iterdir()] == ["model"]  # the discarded copy left nothing behind


def test_habits_are_one_mistake_spelled_the_same_way_and_give_ups_end_the_episode():
    import random

    import mcp_mock
    from env import MCPGymEnv
    from env.tasks import load_tasks
    from ppo.tiny.warmstart import broken_json, demonstration, tool_habits

    tools = ["calculator", "convert_units", "web_search", "query_database"]
    habits = tool_habits(tools, 0.5, seed=0)
    assert len(habits) == 2 and habits == tool_habits(tools, 0.5, seed=0) and tool_habits(tools, 0.0, 0) == {}
    tasks = [t for t in load_tasks(mcp_mock.load_tasks("train")) if t["oracle"][0]["name"] == "calculator"][
        :3
    ]
    env = MCPGymEnv(tasks=tasks, max_turns=6)
    try:
        for kind in ("invalid_json", "invented_tool"):
            openings, statuses = set(), []
            for k, task in enumerate(tasks):
                played, _ = demonstration(env, task, kind, random.Random(k), habit_rng=random.Random(7))
                statuses.append(len(played))
                first = played[0][0]
                if kind == "invented_tool":
                    openings.add(first.split('"name": ')[1].split(",")[0])
                else:  # which of the ways to break JSON
                    call = task["oracle"][0]
                    openings.add(broken_json(call["name"], call["arguments"]).index(first.split("\n")[1]))
                # the habit recovers: the right call follows the error and completes the task
                assert played[-1][0].startswith("<tool_call>") and len(played) == 2
                given_up, _ = demonstration(
                    env, task, kind, random.Random(k), give_up=True, habit_rng=random.Random(7)
                )
                assert len(given_up) == 2 and given_up[0][0] == first and not given_up[1][0].startswith("<")
            assert len(openings) == 1, openings  # the same invented name, the same broken ending
    finally:
        env.close()


def test_flawed_demonstrations_follow_their_shares(small_tiny_dir):
    from transformers import AutoTokenizer

    import mcp_mock
    from env.tasks import load_tasks
    from ppo.rollout import ChatFormat
    from ppo.tiny.warmstart import GIVE_UPS, build_demonstrations

    chat = ChatFormat(AutoTokenizer.from_pretrained(small_tiny_dir))
    tasks = load_tasks(mcp_mock.load_tasks("train"))[:8]

    def texts(**shares):
        demos = build_demonstrations(chat, tasks, seed=0, **shares)
        return [
            chat.tokenizer.decode([i for i, m in zip(ids, mask, strict=True) if m]) for ids, mask in demos
        ]

    clean = texts(error_fraction=0.0)
    assert len(clean) == 8 and not any(g in t for t in clean for g in GIVE_UPS)
    assert all(t.count("<tool_call>") == len(task["oracle"]) for t, task in zip(clean, tasks, strict=True))
    given_up = texts(error_fraction=0.0, habit_share=1.0, habit_rate=1.0, give_up_fraction=1.0)
    # every tool has a habit, every demonstration opens with it and then gives up: one call, one give-up
    assert given_up and all(t.count("<tool_call>") == 1 and any(g in t for g in GIVE_UPS) for t in given_up)
    recovered = texts(error_fraction=0.0, habit_share=1.0, habit_rate=1.0)
    assert all(
        t.count("<tool_call>") == len(task["oracle"]) + 1 for t, task in zip(recovered, tasks, strict=True)
    )


def test_bf16_warm_start_loss_is_the_fp32_loss_to_bf16_precision(small_tiny_dir):
    from transformers import AutoModelForCausalLM

    from ppo.tiny.warmstart import sft_loss

    model = AutoModelForCausalLM.from_pretrained(small_tiny_dir, dtype=torch.float32)
    ids = torch.randint(3, 200, (2, 40))
    attn = torch.ones_like(ids)
    labels = torch.where(torch.arange(40) > 30, ids, -100)
    fp32 = sft_loss(model, ids, attn, labels)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16 = sft_loss(model, ids, attn, labels)
    assert bf16.dtype == torch.float32 and abs(bf16.item() - fp32.item()) < 0.02 * fp32.item()
    assert bf16.item() != fp32.item()  # the matmuls did run in bf16


def test_the_warm_start_is_built_in_a_process_of_its_own_and_then_cached(tmp_path, monkeypatch):
    import subprocess

    import ppo.tiny
    from ppo.infra.config import parse_args

    monkeypatch.setenv("QWEN_TOOL_CACHE", str(tmp_path))
    cfg = parse_args(["--preset", "tiny", "--sft-epochs", "1", "--sft-tasks", "8"])
    calls = []
    run = subprocess.run
    monkeypatch.setattr(subprocess, "run", lambda cmd, **kw: calls.append(cmd) or run(cmd, **kw))
    folder = ppo.tiny.prepare(cfg)
    assert (folder / "config.json").is_file() and folder.name.startswith("tiny-") and "-warm-" in folder.name
    assert len(calls) == 1 and calls[0][1:3] == ["-m", "ppo.tiny.warmstart"]
    assert ppo.tiny.prepare(cfg) == folder and len(calls) == 1  # cached: no second process


def test_per_epoch_demonstrations_are_each_imitated_once(small_tiny_dir):
    from transformers import AutoModelForCausalLM

    from ppo.tiny.warmstart import supervised_finetune

    model = AutoModelForCausalLM.from_pretrained(small_tiny_dir, dtype=torch.float32)
    seen = []
    forward = model.get_decoder().forward
    model.get_decoder().forward = lambda input_ids, **kw: (
        seen.append(input_ids.shape[0]) or forward(input_ids=input_ids, **kw)
    )
    demos = [([k, 5, 6, 7, 8], [0, 0, 1, 1, 1]) for k in (1, 2, 3)]  # no shared prefix
    supervised_finetune(model, [demos, demos[:1]], 0, epochs=2, lr=1e-3, batch_size=2, seed=0, per_epoch=True)
    assert seen == [2, 1, 1]  # epoch 1: three rows in batches of two; epoch 2: its one row
    with pytest.raises(ValueError, match="2 lists of demonstrations for 3 epochs"):
        supervised_finetune(model, [demos, demos], 0, epochs=3, lr=1e-3, batch_size=2, seed=0, per_epoch=True)


def test_fresh_draws_and_invented_entities_have_a_warm_start_of_their_own(tmp_path):
    from ppo.infra.config import parse_args
    from ppo.tiny.warmstart import fresh_draws, warm_start_key

    base = parse_args(["--preset", "tiny", "--no-sft-invented-entities"])
    fresh = parse_args(["--preset", "tiny", "--no-sft-invented-entities", "--sft-fresh-tasks"])
    invented = parse_args(["--preset", "tiny"])  # the preset's default: fresh draws with invented entities
    keys = {warm_start_key(tmp_path, cfg) for cfg in (base, fresh, invented)}
    assert len(keys) == 3
    assert fresh_draws(fresh) and fresh_draws(invented) and not fresh_draws(base)
    own = tmp_path / "mine.jsonl"
    own.write_text("")
    mine = parse_args(["--preset", "tiny", "--sft-fresh-tasks", "--tasks", str(own)])
    assert not fresh_draws(mine)  # a user's task file has no generator: imitated as it is


def test_the_warm_start_loss_is_the_same_packed_or_padded(small_tiny_dir):
    from transformers import AutoModelForCausalLM

    from ppo.tiny.warmstart import sft_loss

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(small_tiny_dir, dtype=torch.float32)
    ids = torch.cat([torch.randint(3, 200, (1, 24)).expand(4, -1), torch.randint(3, 200, (4, 30))], dim=1)
    attn = torch.ones_like(ids)
    for row, n in enumerate([30, 4, 17, 9]):
        attn[row, 24 + n :] = 0
    labels = torch.where(attn.bool() & (torch.arange(54) % 3 == 0), ids, -100)
    labels[:, :25] = -100  # labels start after the prefix (and its first suffix token)
    losses = {}
    for pack in (True, False):
        model.zero_grad()
        losses[pack] = sft_loss(model, ids, attn, labels, pack=pack)
        losses[pack].backward()
        losses[pack] = (losses[pack].item(), [p.grad.clone() for p in model.parameters()])
    assert abs(losses[True][0] - losses[False][0]) < 1e-5
    for a, b in zip(losses[True][1], losses[False][1], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5)
