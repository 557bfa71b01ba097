"""Unit tests for env's pure parts: tool-call parsing, argument messages, verifiers, task loading."""

import json

import pytest

from env.client import truncate_middle
from env.parsing import parse_turn, strip_reasoning
from env.rewards import STATUSES, RewardConfig, worst_status
from env.schema import argument_error, make_validator
from env.tasks import TaskError, load_tasks
from env.verify import answer_matches, call_matches, numbers_in

CALL = '<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>'


def test_single_call_and_free_text():
    turn = parse_turn(f"Let me add.\n{CALL}\n")
    assert [(c.name, c.arguments, c.error) for c in turn.calls] == [("add", {"a": 1, "b": 2}, None)]
    assert turn.content == "Let me add."


def test_several_calls_in_order():
    second = '<tool_call>{"name": "echo", "arguments": {"text": "hi"}}</tool_call>'
    turn = parse_turn(CALL + " and " + second)
    assert [c.name for c in turn.calls] == ["add", "echo"]
    assert turn.content == "and"


def test_think_content_is_ignored():
    turn = parse_turn(f"<think>maybe {CALL}</think>no call here")
    assert turn.calls == [] and turn.content == "no call here"


def test_unclosed_think_hides_the_rest():
    assert parse_turn(f"answer <think>thinking {CALL}").calls == []
    assert strip_reasoning("answer <think>thinking") == "answer "


def test_orphan_close_think_drops_reasoning_before_it():
    # Qwen3's generation prompt can hold the opening tag, so the turn starts inside reasoning.
    assert strip_reasoning("reasoning</think>final") == "final"
    assert [c.name for c in parse_turn(f"{CALL}</think>done").calls] == []


def test_unterminated_last_call_is_parsed_like_vllm():
    turn = parse_turn('<tool_call>\n{"name": "echo", "arguments": {"text": "x"}}')
    assert [(c.name, c.arguments, c.error) for c in turn.calls] == [("echo", {"text": "x"}, None)]


def test_bad_json_names_the_position_and_the_format():
    (call,) = parse_turn('<tool_call>{"name": "add" "arguments": {}}</tool_call>').calls
    assert call.error == (
        'invalid tool call: Expecting \',\' delimiter at char 15; write {"name": ..., "arguments": {...}}'
    )


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        ('["add", {}]', "expected a JSON object, got an array"),
        ('{"arguments": {}}', "'name' must be a non-empty string"),
        ('{"name": 3, "arguments": {}}', "'name' must be a non-empty string"),
        ('{"name": "add"}', "missing 'arguments'"),
        ('{"name": "add", "arguments": "{\\"a\\": 1}"}', "'arguments' must be an object, got a string"),
        ('{"name": "add", "arguments": null}', "'arguments' must be an object, got null"),
        ("", "Expecting value at char 0"),
        ("[" * 100000, "nested too deeply"),
        ('{"name": "add", "arguments": {"a": ' + "9" * 5000 + "}}", "invalid tool call"),
    ],
)
def test_invalid_calls_are_reported_not_raised(body, fragment):
    (call,) = parse_turn(f"<tool_call>{body}</tool_call>").calls
    assert call.error is not None and fragment in call.error


def test_argument_messages_speak_to_the_model():
    schema = {
        "type": "object",
        "properties": {"value": {"type": "number"}, "unit": {"enum": ["m", "s"]}},
        "required": ["value"],
        "additionalProperties": False,
    }
    check = make_validator(schema)
    assert argument_error(check, {"value": 1.5}) is None
    assert argument_error(check, {"value": "ten"}) == "argument 'value' must be a number, got 'ten'"
    assert argument_error(check, {}) == "missing required argument 'value'"
    assert argument_error(check, {"value": 1, "x": 2}) == "unexpected argument(s) 'x'; allowed: unit, value"
    assert (
        argument_error(check, {"value": 1, "unit": "kg"})
        == "argument 'unit' must be one of 'm', 's', got 'kg'"
    )


def test_extra_arguments_pass_when_the_schema_allows_them():
    check = make_validator({"type": "object", "properties": {"a": {"type": "integer"}}})
    assert argument_error(check, {"a": 1, "extra": True}) is None


def test_a_broken_server_schema_is_not_the_models_fault():
    assert make_validator({"type": "no-such-type"}) is None
    assert argument_error(None, {"anything": 1}) is None


def test_truncate_middle_keeps_both_ends_and_counts_the_cut():
    text = "H" * 10 + "m" * 1234 + "T" * 10
    cut = truncate_middle(text, 20)
    assert cut == "H" * 10 + "\n... [1234 characters cut] ...\n" + "T" * 10
    assert truncate_middle("short", 20) == "short"


def test_reward_matrix_defaults_and_severity():
    config = RewardConfig()
    assert [config.reward(s) for s in STATUSES] == [10.0, 0.0, -0.5, -0.8, -1.0]
    assert worst_status(["tool_execution", "tool_error", "invalid_json"]) == "invalid_json"
    assert worst_status(["tool_error", "structural_fail", "invalid_json"]) == "structural_fail"
    assert worst_status([]) == "tool_execution"
    with pytest.raises(ValueError, match="unknown status 'great'"):
        config.reward("great")


def test_call_conditions():
    success = {"tool": "calc", "result_contains": "396", "result_regex": r"^\d+$"}
    assert call_matches(success, "calc", "396")
    assert not call_matches(success, "other", "396")
    assert not call_matches(success, "calc", "= 396")  # the regex must hold too
    assert call_matches({"result_equals": "ok"}, "x", "  ok\n")
    assert not call_matches({"result_equals": "ok"}, "x", "ok!")


def test_number_condition_with_tolerance():
    assert numbers_in("total: 1,234.5 and -3e2, .5") == [1234.5, -300.0, 0.5]
    assert call_matches({"result_number": 3.14159}, "x", "pi is about 3.1415901")
    assert not call_matches({"result_number": 3.14}, "x", "pi is about 3.1415")
    assert call_matches({"result_number": 3.14, "tolerance": 0.01}, "x", "pi is about 3.1415")


def test_answer_condition_is_case_insensitive():
    assert answer_matches({"answer_contains": "Paris"}, "It is PARIS.")
    assert not answer_matches({"answer_contains": ["paris", "france"]}, "It is Paris.")
    assert answer_matches({"tool": "x"}, "anything")


def _write(tmp_path, lines):
    path = tmp_path / "tasks.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


GOOD = json.dumps({"id": "a", "prompt": "p", "success": {"tool": "echo"}})


def test_task_file_loads(tmp_path):
    tasks = load_tasks(
        _write(
            tmp_path,
            [
                GOOD,
                "",
                json.dumps(
                    {
                        "id": "b",
                        "prompt": "q",
                        "success": {
                            "probe": {"name": "read_note", "arguments": {"key": "k"}, "result_contains": "v"}
                        },
                    }
                ),
            ],
        )
    )
    assert [t["id"] for t in tasks] == ["a", "b"]


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ('{"id": "b", "prompt": ', "tasks.jsonl line 3: not valid JSON: "),
        ('{"id": "b", "success": {"tool": "x"}}', "tasks.jsonl line 3: missing key 'prompt'"),
        ('{"id": "b", "prompt": "p"}', "tasks.jsonl line 3: missing key 'success'"),
        (
            '{"id": "b", "prompt": "p", "success": {"result_contain": "x"}}',
            "line 3: unknown success key(s) ['result_contain']",
        ),
        ('{"id": "b", "prompt": "p", "success": {}}', "line 3: 'success' needs at least one condition"),
        (
            '{"id": "b", "prompt": "p", "success": {"result_regex": "("}}',
            "line 3: success 'result_regex' is not a valid regex",
        ),
        (
            '{"id": "b", "prompt": "p", "success": {"tolerance": 1}}',
            "line 3: 'success' needs at least one condition",
        ),
        (
            '{"id": "b", "prompt": "p", "success": {"tool": "x"}, "max_turns": 0}',
            "line 3: 'max_turns' must be a positive",
        ),
        (
            '{"id": "a", "prompt": "p", "success": {"tool": "x"}}',
            "line 3: duplicate task id 'a' (first at tasks.jsonl line 1)",
        ),
        (
            '{"id": "b", "prompt": "p", "success": {"tool": "x"}, "oracle": [{"name": "x"}]}',
            "line 3: 'oracle' must be a list",
        ),
    ],
)
def test_task_file_errors_name_the_line(tmp_path, bad, message):
    with pytest.raises(TaskError) as caught:
        load_tasks(_write(tmp_path, [GOOD, "", bad]))
    assert message in str(caught.value)


def test_missing_task_file_and_task_lists(tmp_path):
    with pytest.raises(TaskError, match="cannot read task file"):
        load_tasks(tmp_path / "nope.jsonl")
    with pytest.raises(TaskError, match="task 1: missing key 'id'"):
        load_tasks([json.loads(GOOD), {"prompt": "p", "success": {"tool": "x"}}])


def test_stripping_reasoning_stays_linear_in_hostile_text():
    # 42,000 unclosed <think> tags took a lazy regex a minute. Timed side by side: ten times the text may cost
    # about ten times as much (a quadratic scan would cost a hundred times); min of 3 damps scheduler noise.
    import time

    def cost(n: int) -> float:
        text = "<think>" * n + "</tool_call>" * n
        best = float("inf")
        for _ in range(3):
            started = time.perf_counter()
            parse_turn(text)
            best = min(best, time.perf_counter() - started)
        return best

    small, large = cost(4_000), cost(40_000)
    assert large < 40 * max(small, 1e-4), (small, large)
    assert strip_reasoning("<think>" * 1000 + "x") == ""
    assert strip_reasoning("a<think>b</think>c<think>d") == "ac"
