"""Warm start of the tiny preset: supervised imitation of the train tasks' oracle solutions, made imperfect.

A randomly initialised model cannot explore its way to a tool call, so PPO starts from a policy that has seen
demonstrations. The tiny model stands in for a pretrained base model that calls tools sloppily, so the
demonstrations are deliberately flawed, in the ways reward is meant to fix:

- **Habits.** A set share of the tools (``--sft-habit-share``, drawn by the warm-start seed) each have one habitual
  mistake, a tool name it invents or one way of breaking the JSON, spelled the same way every time. It opens
  ``--sft-habit-rate`` (60%) of that tool's demonstrations. Above half, greedy decoding makes it: a systematic error
  of the starting policy, not noise around a correct mode.
- **Random mistakes.** The other tools' demonstrations open with a random mistake (a ``<tool_call>`` that is not
  valid JSON, a tool that does not exist, or an argument of the wrong type) at ``--sft-error-fraction``.
- **Giving up.** After the mistake's real error, a demonstration recovers (the correct call follows) or, at
  ``--sft-give-up-fraction``, gives up with a final answer that fails the task. A policy that mostly stops at errors
  has to learn from reward that recovering pays.

So the warm-started policy makes exactly the mistakes PPO is meant to remove, has seen that errors can be
recovered from, and leaves reward something to fix on every task of the habit tools.

Every demonstration is played through ``MCPGymEnv`` on the mock server, so tool outputs and error messages are the
real ones, and tokenized exactly as ``ppo.rollout`` lays out an episode (prompt, sampled turns, suffix ids).
Loss is on the assistant turns only.

Segmentation noise: a set share of the demonstrations spell the task text and the assistant's calls with extra
cuts, at random characters, between BPE tokens (the text is unchanged; only where the tokens split). This is
BPE-dropout (Provilkov et al. 2020, "BPE-Dropout: Simple and Effective Subword Regularization") done by cutting
the string rather than skipping merges. Without it, a short piece such as ``al`` or ``t`` that always sits inside
a longer token in the train text is never trained, and a held-out name that the tokenizer splits into such
pieces cannot be copied into a call.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import random
import re
import time
from pathlib import Path

import torch

from env.parsing import call_text

MISTAKES = ("invalid_json", "invented_tool", "wrong_type")
WARMSTART_VERSION = "w5"


def broken_json(name: str, args: dict) -> list[str]:
    """The ways an ``invalid_json`` mistake spells a call: a lost brace, single quotes, a trailing comma, no colon."""
    good = json.dumps({"name": name, "arguments": args})
    return [good[:-1], good.replace('"', "'", 2), good[:-2] + ",}}", good.replace(":", "", 1)]


def mistaken_call(call: dict, kind: str, tools: dict[str, dict], rng: random.Random) -> str | None:
    """A flawed version of ``call`` of the given kind, or None when this call cannot carry that mistake."""
    name, args = call["name"], call.get("arguments", {})
    if kind == "invalid_json":
        return f"<tool_call>\n{rng.choice(broken_json(name, args))}\n</tool_call>"
    if kind == "invented_tool":
        fakes = [name.split("_")[0], name + "_tool", "run_" + name, name.replace("_", "")]
        return call_text(rng.choice([f for f in fakes if f not in tools and f != name]), args)
    props = tools.get(name, {}).get("parameters", {}).get("properties", {})
    for key, value in args.items():
        kind_of = props.get(key, {}).get("type")
        if kind_of in ("number", "integer") and isinstance(value, (int, float)):
            return call_text(
                name, {**args, key: rng.choice(["ten", f"{value} units", "about " + str(value)])}
            )
        if kind_of == "string" and isinstance(value, str):
            return call_text(name, {**args, key: [value]})
    return None


GIVE_UPS = (
    "The tool call failed, so I cannot complete this task.",
    "I could not complete the task: the tool returned an error.",
)


def demonstration(
    env, task: dict, mistake: str | None, rng: random.Random, *, give_up: bool = False, habit_rng=None
) -> list[tuple[str, list[dict]]] | None:
    """Play a task's oracle (after an optional mistake) through the env.

    With ``give_up`` the demonstration stops after the mistake's error with a final answer that gives up (a failed
    episode, imitated on purpose: see ``build_demonstrations``). ``habit_rng`` draws the mistake's variant instead
    of ``rng``, so a habit is spelled the same way every time.

    Returns [(assistant_text, messages_after_it), ...] (the env's ``new_messages``) and the first observation's
    info, or None when the oracle does not reach success (a broken task is skipped, not imitated) or no such
    mistake fits the call.
    """
    from env.check import play_turns

    turns = [call_text(c["name"], c.get("arguments", {})) for c in task.get("oracle", [])]
    if not turns:
        return None
    if mistake is not None:
        bad = mistaken_call(
            task["oracle"][0],
            mistake,
            {t["function"]["name"]: t["function"] for t in env.tools},
            habit_rng or rng,
        )
        if give_up:
            if bad is None:
                return None
            turns = [bad, rng.choice(GIVE_UPS)]
        elif bad is not None:
            turns.insert(0, bad)
    played, info = play_turns(env, task["id"], turns)
    if give_up:
        if (
            len(played) != 2
            or played[0][1]["status"] == "success"
            or played[1][1]["status"] != "structural_fail"
        ):
            return None
    elif not played or played[-1][1]["status"] != "success":
        return None
    return [(text, step["new_messages"]) for text, step in played], info


def tool_habits(tools: list[str], share: float, seed: int) -> dict[str, tuple[str, int]]:
    """The habitual mistake of ``share`` of the tools: {tool: (mistake kind, seed of its spelling)}.

    A habit is one mistake made the same way every time (the same broken JSON, the same invented name), so that
    where a tool's demonstrations mostly carry it, greedy decoding reproduces it: a systematic error of the warm
    start that reward has to remove. Mixed mistakes at a minority share never show under greedy decoding.
    """
    rng = random.Random(f"habits-{seed}")
    chosen = sorted(rng.sample(sorted(tools), round(share * len(tools))))
    return {tool: (rng.choice(("invalid_json", "invented_tool")), rng.randrange(2**31)) for tool in chosen}


def encode_with_cuts(chat, text: str, cut_rate: float, rng: random.Random) -> list[int]:
    """Ids that decode to ``text``, with a BPE boundary forced before each character with probability ``cut_rate``.

    Added tokens (``<tool_call>`` and the other markup) are never cut into. ``cut_rate=0`` is ``chat.encode``.
    """
    if cut_rate <= 0 or not text:
        return chat.encode(text)
    markup = sorted(chat.tokenizer.get_added_vocab(), key=len, reverse=True)
    ids: list[int] = []
    for k, part in enumerate(re.split("(" + "|".join(map(re.escape, markup)) + ")", text)):
        if k % 2 == 1:  # an added token, kept whole
            ids += chat.encode(part)
            continue
        cuts = [0, *(i for i in range(1, len(part)) if rng.random() < cut_rate), len(part)]
        for a, b in itertools.pairwise(cuts):
            if b > a:
                ids += chat.encode(part[a:b])
    return ids


def prompt_ids_with_cuts(chat, messages: list[dict], tools, cut_rate: float, rng: random.Random) -> list[int]:
    """``chat.prompt_ids`` with the last user message spelled by ``encode_with_cuts`` (the tool block untouched).

    Exact when ``cut_rate`` is 0: the template writes the user's text between a newline and the end-of-turn
    token, both of which already end BPE pieces, so encoding it apart from its frame changes no id.
    """
    content = messages[-1]["content"]
    if cut_rate <= 0 or not content:
        return chat.prompt_ids(messages, tools)
    text = chat.render_prompt(messages, tools)
    at = text.rfind(content)
    if at < 0:
        return chat.encode(text)
    head, tail = text[:at], text[at + len(content) :]
    return chat.encode(head) + encode_with_cuts(chat, content, cut_rate, rng) + chat.encode(tail)


def tokenize_demo(
    chat, info: dict, played, cut_rate: float = 0.0, rng: random.Random | None = None
) -> tuple[list[int], list[int]]:
    """Token ids and action mask of a demonstration, laid out exactly as a rollout lays out an episode.

    ``cut_rate`` > 0 spells the task text and the assistant turns with random extra BPE cuts (see the module).
    """
    from ppo.rollout import Episode

    rng = rng or random.Random(0)
    episode = Episode("", "", prompt_ids_with_cuts(chat, info["messages"], info["tools"], cut_rate, rng))
    for k, (text, following) in enumerate(played):
        turn = [*encode_with_cuts(chat, text, cut_rate, rng), chat.end_of_turn_id]
        episode.add_turn(chat, turn, following if k + 1 < len(played) else None)
    return episode.ids, episode.action_mask


def build_demonstrations(
    chat,
    tasks: list[dict],
    error_fraction: float,
    seed: int,
    max_turns: int = 6,
    cut_fraction: float = 0.0,
    cut_rate: float = 0.1,
    habit_share: float = 0.0,
    habit_rate: float = 0.6,
    give_up_fraction: float = 0.0,
    draw: int | None = None,
):
    """(ids, action_mask) of one demonstration per task that its oracle solves.

    ``seed`` fixes which tools have habits and how they are spelled; ``draw`` (one per fresh draw of tasks) gives
    the random flaws and cuts a stream of their own, so every draw has the same habits.

    Flaws: the demonstrations of ``habit_share`` of the tools open with that tool's habitual mistake at
    ``habit_rate`` (see ``tool_habits``); the others open with a random mistake at ``error_fraction``. A flawed
    demonstration recovers (the error, then the right call) or, at ``give_up_fraction``, gives up after the
    error: a policy that stops at errors, which reward can teach to recover.
    ``cut_fraction`` of them are spelled with segmentation noise at ``cut_rate`` (see ``encode_with_cuts``).
    """
    from env import MCPGymEnv

    rng = random.Random(seed if draw is None else f"{seed}-{draw}")
    demos, skipped = [], 0
    env = MCPGymEnv(tasks=tasks, max_turns=max_turns)
    try:
        habits = tool_habits([t["function"]["name"] for t in env.tools], habit_share, seed)
        for task in tasks:
            habit = habits.get(task["oracle"][0]["name"]) if task.get("oracle") else None
            if habit is not None:
                mistake = habit[0] if rng.random() < habit_rate else None
            else:
                mistake = rng.choice(MISTAKES) if rng.random() < error_fraction else None
            give_up = give_up_fraction > 0 and mistake is not None and rng.random() < give_up_fraction
            habit_rng = random.Random(habit[1]) if habit is not None else None
            result = demonstration(
                env, {**task, "max_turns": max_turns}, mistake, rng, give_up=give_up, habit_rng=habit_rng
            )
            if result is None:
                skipped += 1
                continue
            played, info = result
            rate = cut_rate if rng.random() < cut_fraction else 0.0
            demos.append(tokenize_demo(chat, info, played, rate, rng))
    finally:
        env.close()
    if skipped:
        print(f"warm start: {skipped} task(s) skipped (their oracle did not reach success)")
    return demos


def _one_cycle(optimizer, lr: float, steps: int):
    """One-cycle schedule (10% warm-up); a handful of steps (tests) run at a constant rate instead."""
    if steps >= 10:
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.1)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _step: 1.0)


def sft_loss(
    model, ids: torch.Tensor, attn: torch.Tensor, labels: torch.Tensor, *, pack: bool = True
) -> torch.Tensor:
    """Mean cross-entropy of the labelled tokens (B, T), the prefix all rows share computed once (and with ``pack``
    the rows' suffixes packed instead of padded: ``models.prefix``)."""
    from models.prefix import MIN_SHARED_PREFIX, hidden_with_shared_prefix, shared_prefix_length

    decoder = model.get_decoder()
    prefix = shared_prefix_length(ids, attn)
    if prefix >= MIN_SHARED_PREFIX:
        hidden = hidden_with_shared_prefix(decoder, ids, attn, prefix, pack=pack)
    else:
        hidden = decoder(input_ids=ids, attention_mask=attn).last_hidden_state
    # Only the labelled positions go through the vocabulary projection: the loss covers ~10% of tokens.
    targets = labels[:, 1:]  # token t is predicted from the hidden state at t - 1
    keep = targets != -100
    logits = model.get_output_embeddings()(hidden[:, :-1][keep])  # (N, V)
    return torch.nn.functional.cross_entropy(logits.float(), targets[keep])


def uses_bf16(cfg) -> bool:
    """Whether this warm start runs under bf16 autocast: ``--sft-bf16`` and a CPU with bf16 units (without them
    bf16 is emulated and slower). The cache key and the build both ask here, so they never disagree."""
    from models.loading import cpu_has_bf16

    return cfg.sft_bf16 and cpu_has_bf16()


def supervised_finetune(
    model,
    demos,
    pad_id: int,
    *,
    epochs: int,
    lr: float,
    batch_size: int,
    seed: int,
    bf16: bool = False,
    per_epoch: bool = False,
) -> None:
    """Full fine-tuning with AdamW on the assistant tokens of the demonstrations.

    ``demos`` are imitated ``epochs`` times; with ``per_epoch``, ``demos`` holds one list of demonstrations per
    epoch instead (fresh draws, ``--sft-fresh-tasks``). ``bf16``: forward and backward under CPU bf16 autocast
    (matmuls in bf16; weights, loss and AdamW in fp32).
    """
    epoch_demos = list(demos) if per_epoch else [demos] * epochs
    if len(epoch_demos) != epochs:
        raise ValueError(f"per_epoch: {len(epoch_demos)} lists of demonstrations for {epochs} epochs")
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    steps = sum(-(-len(d) // batch_size) for d in epoch_demos)
    schedule = _one_cycle(optimizer, lr, steps)
    model.train()
    step, started = 0, time.perf_counter()
    for epoch, demos in enumerate(epoch_demos):
        for rows in torch.randperm(len(demos), generator=generator).split(batch_size):
            batch = [demos[i] for i in rows.tolist()]
            width = max(len(ids) for ids, _ in batch)
            ids = torch.full((len(batch), width), pad_id)
            labels = torch.full((len(batch), width), -100)
            attn = torch.zeros((len(batch), width), dtype=torch.long)
            for r, (seq, mask) in enumerate(batch):
                ids[r, : len(seq)] = torch.tensor(seq)
                attn[r, : len(seq)] = 1
                labels[r, : len(seq)] = torch.where(torch.tensor(mask) == 1, torch.tensor(seq), -100)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                loss = sft_loss(model, ids, attn, labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            step += 1
            if step % 50 == 0 or step == steps:
                print(
                    f"warm start: epoch {epoch + 1}/{epochs} step {step}/{steps} loss {loss.item():.3f} "
                    f"({time.perf_counter() - started:.0f}s)",
                    flush=True,
                )


def imitated_tasks(cfg) -> str | None:
    """The task file the warm start imitates: ``--tasks``, or the mock's train split (None) by default and for
    BFCL tasks, whose prompts (about 6,000 tiny-tokenizer tokens) would make imitation take hours on a CPU; the
    warm start stands in for a pretrained model that has learned to call tools elsewhere."""
    from ppo.tasks import BFCL_PREFIX

    return None if not cfg.tasks or cfg.tasks.startswith(BFCL_PREFIX) else cfg.tasks


def fresh_draws(cfg) -> bool:
    """Whether each epoch imitates a fresh draw of train tasks (``--sft-fresh-tasks``): only the mock's tasks have
    a generator; a task file of the user's is imitated as it is."""
    return (cfg.sft_fresh_tasks or cfg.sft_invented_entities) and imitated_tasks(cfg) is None


def warm_start_key(base: Path, cfg) -> str:
    parts = [
        WARMSTART_VERSION,
        str(base),
        cfg.sft_epochs,
        cfg.sft_error_fraction,
        cfg.sft_cut_fraction,
        *([cfg.sft_habit_share, cfg.sft_habit_rate] if cfg.sft_habit_share else []),
        *([cfg.sft_give_up_fraction] if cfg.sft_give_up_fraction else []),
        *(["bf16"] if uses_bf16(cfg) else []),
        cfg.sft_tasks,
        *(["fresh"] if fresh_draws(cfg) else []),
        *(["invented"] if fresh_draws(cfg) and cfg.sft_invented_entities else []),
        cfg.warmstart_seed,
        imitated_tasks(cfg) or "mock",
    ]
    return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()[:10]


def warm_start_dir(base: str | Path, cfg) -> Path:
    """Where the warm-started copy of ``base`` for this config is cached."""
    base = Path(base)
    return base.parent / f"{base.name}-warm-{warm_start_key(base, cfg)}"


def ensure_warm_start(base: str | Path, cfg, tasks: list[dict]) -> Path:
    """The warm-started copy of ``base`` for this config, built (atomically) from ``tasks`` (the train tasks)
    when it is not cached yet."""
    base = Path(base)
    out = warm_start_dir(base, cfg)
    if (out / "config.json").exists():
        return out
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ppo.infra.checkpoint import write_folder_atomically
    from ppo.rollout import ChatFormat

    print(
        f"warm start: building {out} (supervised imitation of oracle solutions, flawed: a habitual mistake in "
        f"{cfg.sft_habit_rate:.0%} of the demonstrations of {cfg.sft_habit_share:.0%} of the tools, a random one "
        f"in {cfg.sft_error_fraction:.0%} of the others', {cfg.sft_give_up_fraction:.0%} of them given up)",
        flush=True,
    )
    seed = cfg.warmstart_seed
    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    chat = ChatFormat(tokenizer)
    started = time.perf_counter()
    tasks = tasks[: cfg.sft_tasks] if cfg.sft_tasks else tasks

    def demos_of(draw_tasks: list[dict], draw: int | None = None) -> list:
        return build_demonstrations(
            chat,
            draw_tasks,
            cfg.sft_error_fraction,
            seed,
            cut_fraction=cfg.sft_cut_fraction,
            habit_share=cfg.sft_habit_share,
            habit_rate=cfg.sft_habit_rate,
            give_up_fraction=cfg.sft_give_up_fraction,
            draw=draw,
        )

    if fresh_draws(cfg):
        from mcp_mock.make_tasks import draw_train_tasks

        epoch_demos = [
            demos_of(draw_train_tasks(len(tasks), f"warm-{seed}-{k}", invented=cfg.sft_invented_entities), k)
            for k in range(cfg.sft_epochs)
        ]
        played = (
            f"{sum(map(len, epoch_demos))} demonstrations, of a fresh draw of {len(tasks)} train tasks for each of "
            f"the {cfg.sft_epochs} epochs,"
        )
    else:
        epoch_demos = [demos_of(tasks)] * cfg.sft_epochs
        played = f"{len(epoch_demos[0])} demonstrations"
    print(f"warm start: {played} played and tokenized ({time.perf_counter() - started:.0f}s)")
    supervised_finetune(
        model,
        epoch_demos,
        chat.pad_id,
        epochs=cfg.sft_epochs,
        lr=2e-3,
        batch_size=16,
        seed=seed,
        bf16=uses_bf16(cfg),
        per_epoch=True,
    )

    def write(folder: Path) -> None:
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)

    return write_folder_atomically(out, write, keep_existing=True)


def _main(argv: list[str]) -> None:
    """``python -m ppo.tiny.warmstart CONFIG_JSON``: build the warm start of that config (``ppo.tiny`` runs this in a
    process of its own)."""
    from ppo.infra.config import from_dict
    from ppo.tasks import resolve_tasks
    from ppo.tiny.build import ensure_tiny

    cfg = from_dict(json.loads(argv[0]))
    ensure_warm_start(
        ensure_tiny(copy_circuit=cfg.tiny_copy_circuit), cfg, resolve_tasks(imitated_tasks(cfg), "train")
    )


if __name__ == "__main__":
    import sys

    _main(sys.argv[1:])
