"""Hostile tool calls, one table: each is a clear message the model can act on, nothing reaches the trainer's
console, and the session goes on serving (in process, over stdio and over HTTP)."""

from __future__ import annotations

import json
import sys
import time

import mcp.client.stdio  # noqa: F401  (imported outside any capture: its default errlog is the stderr of import time)
import pytest

from env import MCPGymEnv

TASKS = [
    {
        "id": "t",
        "prompt": "Anything.",
        "success": {"tool": "calculator", "result_equals": "-1"},
        "max_turns": 50,
    }
]

HOSTILE = [
    # (tool, arguments, status, words the model reads)
    ("calculator", {"expression": "0.5**-2000"}, "tool_error", "result too large"),
    ("calculator", {"expression": "(1/3)**-1000"}, "tool_error", "result too large"),
    ("calculator", {"expression": "2**-400"}, "tool_execution", "e-121"),
    ("compute_statistics", {"numbers": [1e308, 1e308]}, "tool_error", "too large to add up"),
    (
        "group_records",
        {"records": [{"g": "a", "v": 1e308}, {"g": "a", "v": 1e308}], "by": "g", "field": "v", "agg": "mean"},
        "tool_error",
        "too large to add up",
    ),
    ("query_database", {"sql": "SELECT value FROM json_each('[1, 2]')"}, "tool_execution", "(2 rows)"),
    ("query_database", {"sql": "SELECT name FROM pragma_table_info('products')"}, "tool_execution", "price"),
    (
        "query_database",
        {"sql": "SELECT printf('%.*c', 1000000000, 'x'), printf('%.*c', 1000000000, 'x')"},
        "tool_error",
        "the function printf()",
    ),
    ("calculator", {"expression": "\ud800"}, "invalid_json", "lone surrogate"),
    # Writes stopped by the page limit or the time limit are undone, and the rollback itself does not fail.
    (
        "execute_write",
        {
            "sql": "INSERT INTO customers (full_name, city) WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL "
            "SELECT x + 1 FROM c) SELECT 'x' || x, 'y' FROM c"
        },
        "tool_error",
        "the statement was undone",
    ),
    (
        "execute_write",
        {
            "sql": "UPDATE products SET name = name WHERE id IN (WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL "
            "SELECT x + 1 FROM c) SELECT x FROM c)"
        },
        "tool_error",
        "was stopped",
    ),
    ("query_database", {"sql": "SELECT count(*) FROM customers"}, "tool_execution", "\n60\n"),
]


def _call(name: str, arguments: dict) -> str:
    # ensure_ascii keeps a lone surrogate as the escape \ud800, as a model would write it
    return "<tool_call>" + json.dumps({"name": name, "arguments": arguments}) + "</tool_call>"


@pytest.mark.slow
@pytest.mark.parametrize("transport", ["stdio", "http", "inprocess"])
def test_hostile_calls_are_clear_messages_and_the_session_survives(transport, request):
    server = {"inprocess": None, "stdio": [sys.executable, "-m", "mcp_mock"]}.get(transport)
    if transport == "http":
        server = request.getfixturevalue("http_url")
    # In process the server logs on the trainer's console, which is checked; a stdio server's stderr is its own
    # (and the stdio client needs a real stderr to hand it, which capturing would take away).
    capfd = request.getfixturevalue("capfd") if transport == "inprocess" else None
    environment = MCPGymEnv(server, TASKS, call_timeout=20)
    try:
        environment.reset()
        environment.step(_call("execute_write", {"sql": "UPDATE products SET stock = 7 WHERE id = 1"}))
        if capfd:
            capfd.readouterr()
        for name, arguments, status, words in HOSTILE:
            started = time.perf_counter()
            obs, _, _, _, info = environment.step(_call(name, arguments))
            assert (info["status"], words in obs) == (status, True), (name, arguments, obs)
            assert time.perf_counter() - started < 5, (name, arguments)  # printf padding took 8 s a call
        if capfd:
            out, err = capfd.readouterr()
            assert "Traceback" not in out + err and "Error executing tool" not in out + err
        # The same session, with this episode's write still in place: nothing was dropped or restarted.
        obs, _, _, _, info = environment.step(
            _call("query_database", {"sql": "SELECT stock FROM products WHERE id = 1"})
        )
        assert info["status"] == "tool_execution" and obs.splitlines()[1] == "7", obs
    finally:
        environment.close()
