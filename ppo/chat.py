"""The policy as an agent on an MCP server: ``python -m ppo.chat [--checkpoint RUN] [--mcp-server CMD_OR_URL]``.

    python -m ppo.chat --checkpoint runs/tiny-... --prompt "Use the calculator to compute 56 * 77 + 437."
    python -m ppo.chat --checkpoint runs/tiny-... --task val-math-001 --split val
    python -m ppo.chat                      # the starting policy, interactive: one task per line you type

Each turn is played by the code training uses (chat template, sampling engine, ``MCPGymEnv``'s parsing, schema
checks and tool calls), and shown as it happens: the model's turn, each call with its arguments, the tool's
answer and the env's status. A ``--prompt`` (or a line typed at the prompt) has no success conditions: the
episode ends at the model's first turn without a call (its final answer) or at the turn limit. ``--task ID``
plays a task of a file or split with its own conditions, so the verdict is the one training would pay.
Without ``--checkpoint``, the preset's starting policy (for ``tiny``: the warm start), to compare against.
Decoding is greedy unless ``--temperature`` is above 0. One user message per episode: a conversation of
several user turns is not played (each line typed starts a new task).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import TextIO

# A free prompt has no success conditions; an empty ``answer_contains`` is met by any final answer, so the
# episode ends there, exactly as a task of the env ends at its final answer.
FREE_PROMPT_SUCCESS = {"answer_contains": ""}


def free_task(task_id: str, prompt: str, max_turns: int) -> dict:
    return {"id": task_id, "prompt": prompt, "success": dict(FREE_PROMPT_SUCCESS), "max_turns": max_turns}


def show_turn(out: TextIO, turn: int, text: str, info: dict, free: bool = False) -> None:
    """One turn as it happened: the text, every call and the tool's answer, the turn's status (for a free
    prompt, whose only condition is a final answer, ``success`` reads "final answer")."""
    out.write(f"assistant (turn {turn}):\n{_indent(text.strip() or '(empty turn)')}\n")
    calls = info.get("calls", [])
    for k, message in enumerate(info.get("tool_messages", [])):
        # Message k answers call k; a nameless message after the valid calls is the env's note on calls not run.
        if k >= len(calls) or (message.get("name") is None and calls[k].get("error") is None):
            out.write(f"  env: {message['content']}\n")
            continue
        call = calls[k]
        if call.get("error") is None:
            out.write(f"  call {call['name']} {json.dumps(call['arguments'], ensure_ascii=False)}\n")
        else:
            out.write("  call (not valid JSON)\n")
        out.write(f"  tool: {_indent(message['content'], 8).lstrip()}\n")
    status = "final answer" if free and info["status"] == "success" else info["status"]
    out.write(f"  status: {status}\n")
    for message in info.get("new_messages", []):
        if message.get("role") == "user":  # a conversation's next user turn
            out.write(f"user:\n{_indent(message['content'])}\n")
    out.flush()


def _indent(text: str, spaces: int = 4) -> str:
    return "\n".join(" " * spaces + line for line in text.splitlines()) or " " * spaces


def play(actor_critic, cfg, pool, task: dict, *, temperature: float, out: TextIO, free: bool):
    """Play one episode of ``task`` on ``pool`` (one env), printing each turn; returns the episode."""
    from ppo.rollout import ChatFormat, collect_rollouts

    out.write(f"user: {task['prompt']}\n")
    batch = collect_rollouts(
        actor_critic,
        ChatFormat(actor_critic.tokenizer),
        pool,
        [task["id"]],
        max_new_tokens=cfg.max_new_tokens,
        max_context=cfg.max_context,
        engine=cfg.engine,
        cuda_graphs=cfg.cuda_graphs,
        temperature=temperature,
        on_turn=lambda _row, episode, text, info: show_turn(out, len(episode.statuses), text, info, free),
    )
    episode = batch.episodes[0]
    turns = len(episode.statuses)
    if free:
        ended = "with a final answer" if episode.success else "at the turn limit, without a final answer"
        if episode.cut:
            ended = "cut: the context is full"
        out.write(f"episode: ended {ended} after {turns} turn(s)\n\n")
    elif episode.cut and not episode.statuses:
        out.write(
            "episode: cut before its first turn: the prompt and --max-new-tokens exceed the context\n\n"
        )
    else:
        verdict = "solved" if episode.success else f"not solved (last status {episode.statuses[-1]})"
        out.write(f"episode: {verdict} after {turns} turn(s), return {episode.episodic_return:+.1f}\n\n")
    out.flush()
    return episode


def main(argv: list[str] | None = None) -> int:
    from ppo.infra.setup import add_policy_arguments

    parser = argparse.ArgumentParser(prog="python -m ppo.chat", description=__doc__.splitlines()[0])
    add_policy_arguments(parser)
    what = parser.add_mutually_exclusive_group()
    what.add_argument("--prompt", help="one task text to play, then exit")
    what.add_argument(
        "--task", help="the id of a task (of --tasks, or of the mock's --split) to play, then exit"
    )
    parser.add_argument("--tasks", help="JSONL task file for --task")
    parser.add_argument(
        "--split", default="val", choices=["train", "val", "test"], help="mock split for --task"
    )
    parser.add_argument("--max-turns", type=int, default=0, help="turn limit (default: the config's)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    args = parser.parse_args(argv)
    if args.max_turns < 0:
        parser.error(f"--max-turns must be >= 0, not {args.max_turns}")
    if args.temperature < 0:
        parser.error(f"--temperature must be >= 0, not {args.temperature}")
    if args.tasks and not args.task:
        parser.error("--tasks goes with --task ID")
    if args.prompt is not None and not args.prompt.strip():
        parser.error("--prompt is empty; give the task's text")
    from ppo.infra.setup import input_errors

    try:
        return _chat(args)
    except input_errors() as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


def _chat(args) -> int:
    from env import EnvPool
    from ppo.infra.setup import load_policy, policy_config
    from ppo.tasks import resolve_tasks, task_server

    cfg = policy_config(args)
    max_turns = args.max_turns or cfg.max_turns
    tasks = []
    if args.task:
        chosen = [t for t in resolve_tasks(args.tasks, split=args.split) if t["id"] == args.task]
        if not chosen:
            from env import TaskError

            raise TaskError(f"no task {args.task!r} in {args.tasks or f'the mock split {args.split!r}'}")
        tasks = chosen
    elif args.prompt is not None:
        tasks = [free_task("prompt", args.prompt, max_turns)]
    # The server first: one that cannot start is reported before a model takes minutes to load.
    with EnvPool(
        1,
        server=task_server(args.tasks, cfg.mcp_server),
        tasks=tasks,
        max_turns=max_turns,
        call_timeout=cfg.call_timeout,
    ) as pool:
        actor_critic = load_policy(cfg, adapters=args.checkpoint)
        print(f"policy: {args.checkpoint or f'the {cfg.preset} preset starting policy'}", flush=True)
        if tasks:
            episode = play(
                actor_critic,
                cfg,
                pool,
                tasks[0],
                temperature=args.temperature,
                out=sys.stdout,
                free=not args.task,
            )
            return 0 if episode.success or not args.task else 1
        print("one task per line; an empty line or Ctrl-D ends", flush=True)
        for n in range(1, 1_000_000):
            try:
                line = input("> ").strip()
            except (EOFError, KeyboardInterrupt):
                print()
                break
            if not line:
                break
            task = free_task(f"prompt-{n}", line, max_turns)
            pool.add_tasks([task])
            play(actor_critic, cfg, pool, task, temperature=args.temperature, out=sys.stdout, free=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
