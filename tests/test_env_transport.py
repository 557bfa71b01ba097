"""stdio and streamable-HTTP transports, a server killed mid-episode, and servers that never start."""

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from env import MCPGymEnv, ServerStartError
from tests.conftest import free_port

SERVER_SCRIPT = str(Path(__file__).parent / "servers" / "echo_server.py")
TASKS = [{"id": "echo", "prompt": "Echo hi.", "success": {"tool": "echo", "result_equals": "hi"}}]

pytestmark = pytest.mark.slow


def call(name, **arguments):
    return f"<tool_call>{json.dumps({'name': name, 'arguments': arguments})}</tool_call>"


def server_pid(environment):
    obs, _, _, _, info = environment.step(call("pid"))
    assert info["status"] == "tool_execution", obs
    return int(obs)


def test_stdio_session_survives_a_killed_server():
    environment = MCPGymEnv([sys.executable, SERVER_SCRIPT], TASKS, max_turns=10)
    try:
        # The echo server declares no episode isolation: the same process serves every episode, and the env
        # says once that state is shared.
        assert environment.isolation == "none"
        with pytest.warns(RuntimeWarning, match="does not declare episode isolation"):
            environment.reset()
        first = server_pid(environment)
        environment.reset()
        assert server_pid(environment) == first  # the same process serves the next episode
        os.kill(first, signal.SIGKILL)
        obs, reward, _, _, info = environment.step(call("echo", text="x"))
        assert (info["status"], reward) == ("tool_error", -0.5)
        assert "connection to the MCP server was lost" in obs
        _, reward, terminated, _, info = environment.step(call("echo", text="hi"))  # restarted
        assert (info["status"], reward, terminated) == ("success", 10.0, True)
        environment.reset()
        assert server_pid(environment) != first
    finally:
        environment.close()


def test_stdio_fresh_session_per_episode_starts_a_new_process():
    environment = MCPGymEnv(f"{sys.executable} {SERVER_SCRIPT}", TASKS, fresh_session_per_episode=True)
    try:
        environment.reset()
        first = server_pid(environment)
        environment.reset()
        assert server_pid(environment) != first
    finally:
        environment.close()


def _start_http(port):
    process = subprocess.Popen(
        [sys.executable, SERVER_SCRIPT, "--http", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    for _ in range(200):  # wait for the port, polling; the server takes about a second to come up
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return process
        time.sleep(0.05)
    process.kill()
    raise RuntimeError("the test HTTP server did not start")


def test_http_transport_and_a_server_dying_mid_call():
    port = free_port()
    process = _start_http(port)
    environment = None
    try:
        environment = MCPGymEnv(f"http://127.0.0.1:{port}/mcp", TASKS, max_turns=10, call_timeout=20)
        assert environment.isolation == "none"  # the echo server declares no episode isolation
        with pytest.warns(RuntimeWarning, match="does not declare episode isolation"):
            environment.reset()
        _, reward, terminated, _, info = environment.step(call("echo", text="hi"))
        assert (info["status"], reward, terminated) == ("success", 10.0, True)
        environment.reset()
        threading.Timer(0.5, process.kill).start()  # dies while the next call sleeps
        obs, reward, _, _, info = environment.step(call("slow", seconds=10))
        assert (info["status"], reward) == ("tool_error", -0.5), obs
        process.wait()
        process = _start_http(port)
        _, reward, terminated, _, info = environment.step(call("echo", text="hi"))
        assert (info["status"], terminated) == ("success", True)
    finally:
        if environment is not None:
            environment.close()
        process.kill()
        process.wait()


def test_call_timeout_is_a_tool_error_and_the_session_stays_usable():
    sys.path.insert(0, str(Path(SERVER_SCRIPT).parent))
    from echo_server import build_server

    environment = MCPGymEnv(build_server(), TASKS, call_timeout=0.2)
    try:
        environment.reset()
        obs, reward, _, _, info = environment.step(call("slow", seconds=5))
        assert (obs, info["status"], reward) == ("tool 'slow' timed out after 0.2 s", "tool_error", -0.5)
        assert environment.step(call("echo", text="hi"))[4]["status"] == "success"
    finally:
        environment.close()


@pytest.mark.parametrize(
    ("server", "reason"),
    [
        (
            "/no/such/mcp-server --flag",
            "could not start MCP server '/no/such/mcp-server --flag': FileNotFoundError",
        ),
        ([sys.executable, "-c", "pass"], "could not start MCP server"),
        ("http://127.0.0.1:9/mcp", "could not start MCP server 'http://127.0.0.1:9/mcp'"),
    ],
)
def test_a_server_that_cannot_start_gives_one_clear_error(server, reason):
    with pytest.raises(ServerStartError) as caught:
        MCPGymEnv(server, TASKS, start_timeout=10)
    assert str(caught.value).startswith(reason)


def test_a_server_that_never_answers_times_out():
    hang = [sys.executable, "-c", "import time; time.sleep(60)"]
    with pytest.raises(ServerStartError, match="no answer within 1 s"):
        MCPGymEnv(hang, TASKS, start_timeout=1)


def test_a_forgotten_close_does_not_hang_interpreter_exit():
    script = (
        "import sys; from env import MCPGymEnv; "
        f"e = MCPGymEnv([sys.executable, {SERVER_SCRIPT!r}], {TASKS!r}); e.reset(); print('ok')"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert (done.returncode, done.stdout.strip()) == (0, "ok"), done.stderr[-2000:]
