"""Greedy evaluation of a policy on a task split: ``python -m ppo.evaluate``.

Every task of the split is played once with greedy decoding. Reported: the success rate, the share of each env
status among all turns, and both per task category, as a table and (``--json``) as JSON::

    {"success_rate": 0.9, "status": {"success": ..., ...}, "per_category": {"math": {...}, ...}, ...}

``--episodes PATH`` writes every episode as one JSON line (task, category, success, each turn's status and
reward, the conversation as the env kept it), to read what the policy did on the tasks it failed.

Without ``--checkpoint`` the starting policy is evaluated (for the tiny preset: the warm-started model).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from ppo.infra.config import Config
from ppo.infra.monitor import STATUSES, episode_metrics, per_category
from ppo.rollout import ChatFormat, collect_rollouts


def play_greedy(
    actor_critic, cfg: Config, tasks: list[dict], batch_size: int = 64, source: str | None = None
) -> list:
    """Every task of ``tasks`` played once with greedy decoding; the episodes, in task order. ``source``: where
    the tasks came from (``--tasks``; ``ppo.infra.setup.make_env_pool``)."""
    from ppo.infra.setup import make_env_pool

    chat = ChatFormat(actor_critic.tokenizer)
    episodes = []
    ids = [t["id"] for t in tasks]
    with make_env_pool(cfg, tasks, size=min(batch_size, len(ids)), source=source) as pool:
        for start in range(0, len(ids), batch_size):
            chunk = ids[start : start + batch_size]
            batch = collect_rollouts(
                actor_critic,
                chat,
                pool,
                chunk,
                max_new_tokens=cfg.max_new_tokens,
                max_context=cfg.max_context,
                engine=cfg.engine,
                cuda_graphs=cfg.cuda_graphs,
                temperature=0.0,
            )
            episodes += batch.episodes
    return episodes


def summarize(episodes: list) -> dict:
    """Success rate and status shares, overall and per category, of greedy episodes."""
    m = episode_metrics(episodes)
    return {
        "success_rate": m["charts/success_rate"],
        "status": {s: m[f"env/status/{s}"] for s in STATUSES},
        "per_category": per_category(episodes),
        "episodes": len(episodes),
        "mean_turns": m["charts/episode_turns"],
        "cut_episodes": int(m["charts/cut_episodes"]),
    }


def episode_record(episode) -> dict:
    """One episode as plain JSON: what ``--episodes`` writes, a line per task."""
    return {
        "task_id": episode.task_id,
        "category": episode.category,
        "success": episode.success,
        "statuses": episode.statuses,
        "rewards": episode.rewards,
        "cut": episode.cut,
        "messages": episode.messages,
    }


def evaluate(
    actor_critic,
    cfg: Config,
    tasks: list[dict],
    batch_size: int = 64,
    source: str | None = None,
    episodes_path: str | Path | None = None,
) -> dict:
    """Greedy success rate and status shares, overall and per category, over ``tasks``; with ``episodes_path``,
    every episode is also written there as a JSON line (``episode_record``)."""
    started = time.perf_counter()
    episodes = play_greedy(actor_critic, cfg, tasks, batch_size, source)
    result = summarize(episodes)
    result["seconds"] = time.perf_counter() - started
    if episodes_path:
        lines = (json.dumps(episode_record(e), ensure_ascii=False) + "\n" for e in episodes)
        Path(episodes_path).parent.mkdir(parents=True, exist_ok=True)
        Path(episodes_path).write_text("".join(lines), encoding="utf-8")
    return result


def format_table(result: dict) -> str:
    """The evaluation as a Markdown table: one row per category and one for all tasks."""
    head = "| category | episodes | success rate | " + " | ".join(STATUSES) + " |"
    rule = "|" + "---|" * (3 + len(STATUSES))
    rows = [head, rule]
    for name, c in result["per_category"].items():
        shares = " | ".join(f"{c['status'][s]:.2f}" for s in STATUSES)
        rows.append(f"| {name} | {c['episodes']} | {c['success_rate']:.2f} | {shares} |")
    shares = " | ".join(f"{result['status'][s]:.2f}" for s in STATUSES)
    rows.append(f"| **all** | {result['episodes']} | {result['success_rate']:.2f} | {shares} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> dict:
    from ppo.infra.setup import add_policy_arguments

    parser = argparse.ArgumentParser(prog="python -m ppo.evaluate", description=__doc__.splitlines()[0])
    add_policy_arguments(parser)
    parser.add_argument(
        "--split", default="test", choices=["train", "val", "test"], help="mock server task split"
    )
    parser.add_argument(
        "--tasks",
        help="JSONL task file, or bfcl:<category> (README, 'BFCL'), to evaluate on instead of a mock split",
    )
    parser.add_argument("--json", help="write the result as JSON to this path")
    parser.add_argument(
        "--episodes",
        help="write every episode (statuses, rewards, conversation) to this path, a JSON line each",
    )
    parser.add_argument("--limit", type=int, default=0, help="evaluate only the first N tasks (0: all)")
    parser.add_argument("--batch-size", type=int, default=64, help="episodes played at once")
    args = parser.parse_args(argv)
    # Checked before anything loads, so a typo costs a second, not an evaluation.
    if args.batch_size < 1:
        parser.error(f"--batch-size must be >= 1, not {args.batch_size}")
    if args.limit < 0:
        parser.error(f"--limit must be >= 0 (0: all tasks), not {args.limit}")
    for flag, path in (("--json", args.json), ("--episodes", args.episodes)):
        if path and Path(path).is_dir():
            parser.error(f"{flag} {path} is a folder; give a file path")
    from ppo.infra.setup import input_errors

    try:
        return _evaluate_cli(args)
    except input_errors() as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


def _evaluate_cli(args) -> dict:
    from ppo.infra.setup import load_policy, policy_config
    from ppo.tasks import resolve_tasks

    cfg = policy_config(args)

    tasks = resolve_tasks(args.tasks, split=args.split)
    if args.limit:
        tasks = tasks[: args.limit]
    actor_critic = load_policy(cfg, adapters=args.checkpoint)
    result = evaluate(
        actor_critic,
        cfg,
        tasks,
        batch_size=args.batch_size,
        source=args.tasks or "",
        episodes_path=args.episodes,
    )
    result["checkpoint"] = args.checkpoint
    result["split"] = args.tasks or args.split
    print(format_table(result))
    print(
        f"success rate {result['success_rate']:.3f} on {result['episodes']} tasks ({result['seconds']:.0f}s)"
    )
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
