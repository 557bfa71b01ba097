"""Episode isolation on every transport: no write of one episode is visible to the next, or to one running beside it.

The bundled mock declares the ``io.github.qwen-tool/episodes`` extension, so each episode's calls carry their own
key and get their own database, whether the server runs in process, over stdio or over HTTP.
"""

from __future__ import annotations

import json
import sys
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

import mcp_mock.server
from env import MCPGymEnv, client

INSERT = "INSERT INTO customers (full_name, city) VALUES ('Zed Quill', 'Nowhere')"
LOOKUP = "SELECT city FROM customers WHERE full_name = 'Zed Quill'"
TASKS = [
    {
        "id": "add",
        "prompt": "Add Zed Quill, who lives in Nowhere.",
        "success": {
            "tool": "execute_write",
            "result_contains": "inserted 1 row",
            "probe": {"name": "query_database", "arguments": {"sql": LOOKUP}, "result_contains": "Nowhere"},
        },
        "max_turns": 3,
    },
    {
        "id": "free",
        "prompt": "Anything.",
        "success": {"tool": "calculator", "result_equals": "-1"},
        "max_turns": 3,
    },
]


def call(name: str, **arguments) -> str:
    return f"<tool_call>{json.dumps({'name': name, 'arguments': arguments})}</tool_call>"


def _server(kind: str, http_url_factory) -> object:
    if kind == "inprocess":
        return None
    if kind == "stdio":
        return [sys.executable, "-m", "mcp_mock"]
    return http_url_factory()


def _lookup(environment: MCPGymEnv) -> str:
    obs, _, _, _, info = environment.step(call("query_database", sql=LOOKUP))
    assert info["status"] == "tool_execution", obs
    return obs


def test_the_client_and_the_mock_name_the_same_extension():
    assert client.EPISODE_EXTENSION == mcp_mock.server.EPISODE_EXTENSION
    assert client.EPISODE_META_KEY == mcp_mock.server.EPISODE_META_KEY


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["inprocess", "stdio", "http"])
def test_a_write_is_invisible_to_the_next_episode(kind, request):
    server = _server(kind, lambda: request.getfixturevalue("http_url"))
    environment = MCPGymEnv(server, TASKS, call_timeout=20)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # an isolating server draws no warning
            environment.reset(options={"task_id": "add"})
        assert environment.isolation == "episode-key"
        _, reward, terminated, _, info = environment.step(call("execute_write", sql=INSERT))
        assert (info["status"], reward, terminated) == ("success", 10.0, True)
        environment.reset(options={"task_id": "free"})
        assert "(0 rows)" in _lookup(environment)
        # The next episode repeating the same insert with another city is not paid for the first one's row.
        environment.reset(options={"task_id": "add"})
        nowhere_else = INSERT.replace("Nowhere", "Ashby")
        _, reward, _, _, info = environment.step(call("execute_write", sql=nowhere_else))
        assert (info["status"], reward) == ("tool_execution", 0.0)
        # A price wiped in one episode is back in the next.
        environment.reset(options={"task_id": "free"})
        environment.step(call("execute_write", sql="UPDATE products SET price = 0"))
        environment.reset(options={"task_id": "free"})
        obs, _, _, _, _ = environment.step(call("query_database", sql="SELECT min(price) FROM products"))
        assert "\n0\n" not in obs and float(obs.splitlines()[1]) > 0, obs
    finally:
        environment.close()


@pytest.mark.slow
def test_concurrent_episodes_on_one_http_server_do_not_see_each_other(http_url):
    writer, reader = (MCPGymEnv(http_url, TASKS, call_timeout=20) for _ in range(2))
    try:
        writer.reset(options={"task_id": "free"})
        reader.reset(options={"task_id": "free"})
        assert writer.step(call("execute_write", sql=INSERT))[4]["status"] == "tool_execution"
        with ThreadPoolExecutor(2) as pool:  # both episodes are live at once
            mine, theirs = pool.map(_lookup, [writer, reader])
        assert "Nowhere" in mine and "(0 rows)" in theirs
    finally:
        writer.close()
        reader.close()


@pytest.mark.slow
def test_a_pool_shares_one_stdio_server_that_isolates_and_its_episodes_stay_apart():
    from env import EnvPool

    with EnvPool(4, [sys.executable, "-m", "mcp_mock"], TASKS, call_timeout=20) as pool:
        assert len({id(env.connection) for env in pool.envs}) == 1  # one process serves the four envs
        pool.reset(["free"] * 4)
        results = pool.step([call("execute_write", sql=INSERT), None, None, None])
        assert results[0][4]["status"] == "tool_execution"
        seen = pool.step([call("query_database", sql=LOOKUP)] * 4)  # four calls in flight on one session
        assert "Nowhere" in seen[0][0] and all("(0 rows)" in r[0] for r in seen[1:])


@pytest.mark.slow
def test_a_pool_gives_a_server_without_isolation_one_session_per_env():
    from env import EnvPool

    echo = str(Path(__file__).parent / "servers" / "echo_server.py")
    echo_tasks = [{"id": "echo", "prompt": "Echo hi.", "success": {"tool": "echo", "result_equals": "hi"}}]
    with EnvPool(2, [sys.executable, echo], echo_tasks) as pool:
        assert len({id(env.connection) for env in pool.envs}) == 2
