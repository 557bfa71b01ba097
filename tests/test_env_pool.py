"""EnvPool: envs on one event-loop thread whose tool calls overlap instead of queueing."""

import json
import sys
import threading
import time
from pathlib import Path

import pytest

from env import EnvPool

sys.path.insert(0, str(Path(__file__).parent / "servers"))
from echo_server import build_server

TASKS = [
    {"id": "add", "prompt": "Add 2 and 3.", "success": {"tool": "add", "result_number": 5}},
    {"id": "greet", "prompt": "Say hello.", "success": {"answer_contains": "hello"}},
]


def slow_call(seconds):
    return f"<tool_call>{json.dumps({'name': 'slow', 'arguments': {'seconds': seconds}})}</tool_call>"


def test_pool_steps_overlap_across_envs():
    server = build_server()  # one server object shared by every env, so it sees all calls at once
    with EnvPool(32, server, TASKS) as pool:
        pool.reset()
        results = pool.step([slow_call(0.5)] * 32)
    assert all(r is not None and r[4]["status"] == "tool_execution" for r in results)
    # Queued calls would never overlap (1 in flight); overlapping ones are nearly all in flight together.
    assert server.in_flight["max"] >= 16


def test_pool_reset_step_and_idle_envs():
    with EnvPool(3, build_server(), TASKS, max_turns=2) as pool:
        assert len(pool) == 3 and [t["id"] for t in pool.tasks] == ["add", "greet"]
        observations = pool.reset(task_ids=["add", "greet", "add"])
        assert [obs for obs, _ in observations] == ["Add 2 and 3.", "Say hello.", "Add 2 and 3."]
        add = '<tool_call>{"name": "add", "arguments": {"a": 2, "b": 3}}</tool_call>'
        results = pool.step([add, "hello!", None])
        assert [r[4]["status"] for r in results[:2]] == ["success", "success"] and results[2] is None
        assert [r[1] for r in results[:2]] == [10.0, 10.0]
        with pytest.raises(RuntimeError, match="after the episode ended"):
            pool.step([add, None, None])
        with pytest.raises(ValueError, match="got 4 texts for 3 envs"):
            pool.step([None, None, None, None])
        # a smaller last batch: only the first envs are reset and stepped, the rest stay idle
        partial = pool.reset(task_ids=["greet"])
        assert [obs for obs, _ in partial] == ["Say hello."]
        (result,) = pool.step(["hello!"])
        assert result[4]["status"] == "success"
        with pytest.raises(ValueError, match="got 4 task ids for 3 envs"):
            pool.reset(task_ids=["add"] * 4)
        seeded = [info["task_id"] for _, info in pool.reset(seed=5)]
        assert seeded == [info["task_id"] for _, info in pool.reset(seed=5)]


def benchmark_pool(num_envs=32, latency=0.05, turns=5):
    """Seconds per pool.step with every env calling a tool of ``latency`` seconds (printed, not asserted)."""
    with EnvPool(num_envs, build_server(), TASKS, max_turns=turns + 1) as pool:
        pool.reset()
        start = time.perf_counter()
        for _ in range(turns):
            pool.step([slow_call(latency)] * num_envs)
        per_step = (time.perf_counter() - start) / turns
    print(
        f"{num_envs} envs, {latency * 1000:.0f} ms tool: {per_step * 1000:.1f} ms per pool.step "
        f"= {per_step / latency:.1f} latencies"
    )
    return per_step


if __name__ == "__main__":
    benchmark_pool()


def test_submitted_steps_run_in_the_background_and_equal_step():
    server = build_server()
    with EnvPool(2, server, TASKS) as pool:
        pool.reset(task_ids=["add", "add"])
        add = '<tool_call>{"name": "add", "arguments": {"a": 2, "b": 3}}</tool_call>'
        slow = pool.submit(0, slow_call(0.3))
        quick = pool.submit(1, add)
        assert not slow.done()  # submit returned before the call finished
        slow_result, quick_result = EnvPool.results([slow, quick])
        assert slow_result[4]["status"] == "tool_execution"
        assert quick_result[4]["status"] == "success" and quick_result[1] == 10.0
        with pytest.raises(RuntimeError, match="after the episode ended"):
            pool.submit(1, add)  # misuse is refused at once, as by step


def test_results_wait_for_every_step_then_raise_the_first_error():
    from concurrent.futures import Future

    failed, late = Future(), Future()
    failed.set_exception(ValueError("the server went away"))
    timer = threading.Timer(0.2, lambda: late.set_result("ok"))  # still running when results() is called
    timer.start()
    with pytest.raises(ValueError, match="went away"):
        EnvPool.results([failed, late])
    assert late.done()  # the error was raised only once every step had finished
    timer.join()
