"""Check a task suite against an MCP server before training on it: ``python -m ppo.tasks check TASKS``.

    python -m ppo.tasks check my_tasks.jsonl --mcp-server "python my_server.py"
    python -m ppo.tasks check mcp_mock/tasks/train.jsonl          # the bundled server

Every task is checked against the server's tool list and schemas (unknown tools, arguments a schema refuses,
success conditions naming a tool the server lacks), then its oracle is replayed through ``MCPGymEnv``, the env
training uses. Printed: a table per category (solved, failed, broken, unchecked; see ``env.check``) and one
line per task that is not solved, with the reason. Exit status 1 when any task is broken or failed, 0 otherwise
(unchecked tasks, those without an oracle, do not fail the check). ``--json PATH`` writes every report.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from tqdm import tqdm

BFCL_PREFIX = "bfcl:"


def resolve_tasks(path: str | None, split: str) -> list[dict]:
    """Tasks from a JSONL file (line-numbered errors), a BFCL category (``bfcl:multi_turn_base``), or the bundled
    mock server's split."""
    from env.tasks import load_tasks

    if path and path.startswith(BFCL_PREFIX):
        from mcp_mock import bfcl

        return load_tasks(bfcl.category_tasks(path.removeprefix(BFCL_PREFIX)))
    if path:
        return load_tasks(path)
    import mcp_mock

    return load_tasks(mcp_mock.load_tasks(split))


def task_server(tasks: str | None, mcp_server: str | None):
    """What the env connects to for a task source: ``--mcp-server`` when given, else BFCL's server (in process)
    for ``bfcl:`` tasks, else None (the bundled mock)."""
    if mcp_server or not (tasks and tasks.startswith(BFCL_PREFIX)):
        return mcp_server
    from mcp_mock import bfcl

    category = tasks.removeprefix(BFCL_PREFIX)
    return bfcl.create_server(category if category in bfcl.AST_CATEGORIES else None)


def run_check(tasks: str, server: str | None, *, max_turns: int, call_timeout: float, quiet: bool = False):
    """Check ``tasks`` (a JSONL path or ``bfcl:<category>``) on ``server``; returns the reports (a progress bar on
    stderr unless quiet)."""
    from env.check import check_tasks

    source = resolve_tasks(tasks, "train") if tasks.startswith(BFCL_PREFIX) else tasks
    server = task_server(tasks, server)
    bar = tqdm(desc="checking tasks", unit="task", disable=quiet, file=sys.stderr, dynamic_ncols=True)

    def progress(done: int, total: int) -> None:
        bar.total = total
        bar.update(done - bar.n)

    try:
        return check_tasks(source, server, max_turns=max_turns, call_timeout=call_timeout, progress=progress)
    finally:
        bar.close()


def failures(reports) -> list:
    """The reports that fail a check: broken tasks and oracles that did not reach success."""
    return [r for r in reports if r.verdict in ("broken", "failed")]


def describe(report) -> str:
    name = f" {report.task_id}" if report.task_id else ""
    return f"{report.verdict}: {report.place}{name}: " + "; ".join(report.problems)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ppo.tasks", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    check = commands.add_parser("check", help="validate a task file against a server and replay every oracle")
    check.add_argument("tasks", help="JSONL task file, or bfcl:<category> (README, 'BFCL')")
    check.add_argument(
        "--mcp-server", dest="mcp_server", help="MCP server command line or http(s) URL (default: the mock)"
    )
    check.add_argument(
        "--max-turns", type=int, default=4, help="turn limit of tasks without their own (as train)"
    )
    check.add_argument("--call-timeout", type=float, default=10.0, help="seconds a tool call may take")
    check.add_argument("--json", help="write every task's report as JSON to this path")
    check.add_argument(
        "--quiet", action="store_true", help="no progress bar; only the table and the problems"
    )
    args = parser.parse_args(argv)
    if args.max_turns < 1:
        parser.error(f"--max-turns must be >= 1, not {args.max_turns}")
    if args.call_timeout <= 0:
        parser.error(f"--call-timeout must be > 0 seconds, not {args.call_timeout}")
    if args.json and Path(args.json).is_dir():
        parser.error(f"--json {args.json} is a folder; give a file path")
    from env import ServerStartError, TaskError
    from env.check import summary_table

    try:
        reports = run_check(
            args.tasks,
            args.mcp_server,
            max_turns=args.max_turns,
            call_timeout=args.call_timeout,
            quiet=args.quiet,
        )
    except (ServerStartError, TaskError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(summary_table(reports))
    for report in reports:
        if report.verdict != "solved":
            print(describe(report))
    bad = failures(reports)
    print(
        f"{len(reports) - len(bad)} of {len(reports)} tasks pass"
        + (f"; {len(bad)} fail the check" if bad else "")
    )
    if args.json:
        try:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps([r.as_dict() for r in reports], indent=1))
        except OSError as err:
            print(f"error: cannot write --json {args.json}: {err.strerror or err}", file=sys.stderr)
            return 2
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
