"""mcp_mock: every tool through a real MCP client, abuse, session isolation, transports, task suites."""

from __future__ import annotations

import json
import queue
import random
import re
import subprocess
import sys
import threading
import urllib.request
from pathlib import Path

import anyio
import pytest
from mcp import Client, StdioServerParameters

from mcp_mock import TASKS_DIR, create_server, load_tasks, make_data, make_tasks

ROOT = Path(__file__).resolve().parents[1]
PRISTINE_TABLES = "customers (60 rows)\norders (200 rows)\nproducts (48 rows)"


def run_calls(calls: list[tuple[str, dict]], server=None) -> list[tuple[bool, str]]:
    """(is_error, text) of each call, made in order in one client session."""

    async def main():
        async with Client(server if server is not None else create_server()) as client:
            results = [await client.call_tool(name, args) for name, args in calls]
        return [(r.is_error, r.content[0].text) for r in results]

    return anyio.run(main)


def ok(name: str, args: dict) -> str:
    """The text of a call that must succeed."""
    [(is_error, text)] = run_calls([(name, args)])
    assert not is_error, text
    return text


def err(name: str, args: dict) -> str:
    """The text of a call that must fail with a tool error."""
    [(is_error, text)] = run_calls([(name, args)])
    assert is_error, text
    return text


def test_tool_list_is_small_and_described():
    async def main():
        async with Client(create_server()) as client:
            return (await client.list_tools()).tools

    tools = anyio.run(main)
    assert {t.name for t in tools} == {
        "calculator", "convert_units", "web_search", "open_document", "list_tables", "describe_table",
        "query_database", "execute_write", "compute_statistics", "sort_records", "filter_records",
        "group_records", "parse_csv",
    }  # fmt: skip
    for tool in tools:
        assert (
            tool.description.count(".") >= 1 and "\n" not in tool.description and len(tool.description) < 100
        )
        for prop in tool.input_schema["properties"].values():
            assert prop["description"] and len(prop["description"]) < 50, tool.name


@pytest.mark.parametrize(
    ("expression", "expected"),
    [("17 * 23 + 5", "396"), ("2**10", "1024"), ("10 / 4", "2.5"), ("2 / 3", "0.6666666667"),
     ("sqrt(1764) + 3 * 7", "63"), ("max(3, 9, 4) - min(2, 8)", "7"), ("round(pi, 3)", "3.142"),
     ("-(3 - 5) % 3", "2"), ("7 // 2", "3"), ("factorial(5)", "120"), ("log(8, 2)", "3"), ("-0.0", "0"),
     ("1e3 + 0.5", "1000.5"), ("abs(-2.25)", "2.25")],
)  # fmt: skip
def test_calculator_values(expression, expected):
    assert ok("calculator", {"expression": expression}) == expected


@pytest.mark.parametrize(
    ("expression", "message"),
    [("__import__('os')", "unknown function '__import__'"),
     ("__import__('os').system('echo hi')", "only plain function calls"), ("(1).real", "'Attribute'"),
     ("(lambda: 1)()", "only plain function calls"), ("lambda: 1", "'Lambda'"), ("9**9**9", "result too large"),
     ("10**400", "result too large"), ("'a' * 3", "only numbers are allowed"), ("[1] * 3", "'List'"),
     ("1" * 100_000, "the limit is 300"), ("1/0", "division by zero"), ("2^10", "write powers with **"),
     ("factorial(1000)", "factorial needs a whole number"), ("x + 1", "unknown name 'x'"),
     ("().__class__.__bases__[0]", "'Subscript'"), ("1 +", "could not parse"), ("sqrt(-1)", "sqrt() failed")],
)  # fmt: skip
def test_calculator_refuses(expression, message):
    assert message in err("calculator", {"expression": expression})


def test_convert_units():
    assert ok("convert_units", {"value": 5, "from_unit": "km", "to_unit": "m"}) == "5 km = 5000 m"
    assert ok("convert_units", {"value": 100, "from_unit": "C", "to_unit": "F"}) == "100 C = 212 F"
    assert ok("convert_units", {"value": 1, "from_unit": "mi", "to_unit": "ft"}) == "1 mi = 5280 ft"
    assert ok("convert_units", {"value": 2.5, "from_unit": "h", "to_unit": "min"}) == "2.5 h = 150 min"
    assert err("convert_units", {"value": "ten", "from_unit": "km", "to_unit": "m"}).endswith(
        "expected a number for 'value', got 'ten'"
    )
    assert err("convert_units", {"value": 5, "from_unit": "kms", "to_unit": "m"}).endswith(
        "unknown unit 'kms' (did you mean 'km'?); known length units: m, km, cm, mm, mi, ft, in, yd"
    )
    assert "cannot convert length unit 'km' to mass unit 'kg'" in err(
        "convert_units", {"value": 5, "from_unit": "km", "to_unit": "kg"}
    )


def test_web_search_and_open_document():
    text = ok("web_search", {"query": "Korvel Lighthouse"})
    lines = text.splitlines()
    assert len(lines) == 3
    assert (
        lines[0]
        == "1. doc-001 | Korvel Lighthouse | The Korvel Lighthouse is a lighthouse on the Redhollow coast."
    )
    assert [line.split(" | ")[1].split()[0] for line in lines[1:]] == ["Korvel", "Korvel"]
    assert ok("web_search", {"query": "Juniper Dam", "k": 1}).startswith("1. doc-300 | Juniper Dam |")
    assert ok("web_search", {"query": "zzzz"}) == "no results for 'zzzz'"
    assert "k must be from 1 to 10" in err("web_search", {"query": "dam", "k": 0})
    assert "query is empty" in err("web_search", {"query": "  "})
    assert "the limit is 200" in err("web_search", {"query": "a" * 5000})
    assert ok("open_document", {"doc_id": "doc-002"}) == (
        "doc-002: Amberly Lighthouse\nThe Amberly Lighthouse is a lighthouse on the Lowmere coast. It was "
        "founded in 1855 and is 620 metres long. Its caretakers keep a red ledger with 55 signatures."
    )
    assert err("open_document", {"doc_id": "d99"}).endswith(
        "document id 'd99' not found; ids look like 'doc-012'"
    )


def test_database_reads():
    assert ok("list_tables", {}) == PRISTINE_TABLES
    assert ok("describe_table", {"table": "products"}) == (
        "table products (48 rows): id INTEGER, name TEXT, category TEXT, price REAL, stock INTEGER"
    )
    assert ok("query_database", {"sql": "SELECT id, full_name, city FROM customers WHERE id <= 2"}) == (
        "id | full_name | city\n1 | Lea Cole | Eastfield\n2 | Cara Vance | Brackwater\n(2 rows)"
    )
    assert ok("query_database", {"sql": "SELECT COUNT(*) AS n FROM orders"}) == "n\n200\n(1 row)"
    many = ok("query_database", {"sql": "SELECT id FROM orders"}).splitlines()
    assert len(many) == 52 and many[-1].startswith("(showing the first 50 rows")
    assert err("query_database", {"sql": "SELECT nme FROM customers"}).endswith(
        "unknown column 'nme' in table customers; the columns are id, full_name, city, email"
    )
    assert err("query_database", {"sql": "SELECT * FROM customer"}).endswith(
        "unknown table 'customer'; the tables are customers, orders, products"
    )
    assert "unknown table 'nope'" in err("describe_table", {"table": "nope"})


def test_database_writes_stay_in_the_session():
    server = create_server()
    insert = "INSERT INTO customers (full_name, city) VALUES ('Zoe Park', 'Ashby')"
    first = run_calls(
        [("execute_write", {"sql": insert}),
         ("execute_write", {"sql": "UPDATE products SET stock = 7 WHERE id = 1"}),
         ("query_database", {"sql": "SELECT city FROM customers WHERE full_name = 'Zoe Park'"}),
         ("query_database", {"sql": "SELECT stock FROM products WHERE id = 1"})],
        server,
    )  # fmt: skip
    assert first == [(False, "inserted 1 row"), (False, "updated 1 row"), (False, "city\nAshby\n(1 row)"),
                     (False, "stock\n7\n(1 row)")]  # fmt: skip
    # A second session on the same server object, and another server, both see the seed.
    for target in (server, create_server()):
        again = run_calls(
            [("list_tables", {}), ("query_database", {"sql": "SELECT stock FROM products WHERE id = 1"})],
            target,
        )
        assert again[0] == (False, PRISTINE_TABLES)
        assert again[1] != (False, "stock\n7\n(1 row)")


READ_ABUSE = [
    ("DROP TABLE orders", "read-only SELECT"),
    ("ATTACH DATABASE '{tmp}' AS x", "read-only SELECT"),
    ("PRAGMA writable_schema = 1", "read-only SELECT"),
    ("SELECT 1; DELETE FROM orders", "only one SQL statement"),
    ("SELECT load_extension('{tmp}')", "not allowed: the function load_extension()"),
    ("WITH x AS (SELECT 1) DELETE FROM orders", "not allowed: DELETE"),
    ("WITH x AS (SELECT 1) UPDATE orders SET quantity = 0", "not allowed: UPDATE"),
    # Reads may let table-valued functions register themselves in sqlite_master; a statement cannot write it.
    ("WITH x AS (SELECT 1) UPDATE sqlite_master SET sql = 'x'", "may not be modified"),
    ("SELECT * FROM pragma_writable_schema", "not allowed"),
    ("INSERT INTO orders VALUES (999, 1, 1, 1, '2024-01-01')", "use execute_write"),
    ("WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) SELECT count(*) FROM c", "was stopped"),
    ("SELECT randomblob(1000000)", "SQL error"),
    ("SELECT 1 " + "-- pad\n" * 1000, "the limit is 2000"),
]
WRITE_ABUSE = [
    ("DELETE FROM orders", "INSERT or UPDATE statements only"),
    ("DROP TABLE orders", "INSERT or UPDATE statements only"),
    ("ATTACH DATABASE '{tmp}' AS x", "INSERT or UPDATE statements only"),
    ("PRAGMA writable_schema = 1", "INSERT or UPDATE statements only"),
    ("UPDATE orders SET quantity = 0", "would change 200 rows"),
    ("UPDATE products SET stock = 1 WHERE id = 1; DELETE FROM orders", "only one SQL statement"),
    ("INSERT INTO customers (full_name, city) VALUES ('a', 'b'); DROP TABLE orders", "only one SQL statement"),
    ("UPDATE products SET stock = (SELECT load_extension('{tmp}'))", "the function load_extension()"),
    ("INSERT INTO customers SELECT * FROM customers", "UNIQUE constraint failed"),
    ("UPDATE sqlite_master SET sql = ''", "may not be modified"),
    ("INSERT INTO customers (full_name, city) WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) "
     "SELECT 'n', 'c' FROM c", "database is full"),
    ("INSERT INTO customers (full_name, city) VALUES (zeroblob(10000000), 'c')", "SQL error"),
]  # fmt: skip


def test_sql_abuse_fails_and_changes_nothing(tmp_path):
    target = tmp_path / "escape.db"
    calls = [("query_database", {"sql": sql.format(tmp=target)}) for sql, _ in READ_ABUSE]
    calls += [("execute_write", {"sql": sql.format(tmp=target)}) for sql, _ in WRITE_ABUSE]
    checks = [
        ("list_tables", {}),
        ("query_database", {"sql": "SELECT SUM(quantity), SUM(stock > 0) FROM orders JOIN products ON products.id = product_id"}),
    ]  # fmt: skip
    server = create_server()
    before = run_calls(checks, server)
    results = run_calls(calls + checks, server)
    for (is_error, text), (sql, message) in zip(results, READ_ABUSE + WRITE_ABUSE, strict=False):
        assert is_error and message in text, (sql[:60], text)
    assert results[-2:] == before and before[0] == (False, PRISTINE_TABLES)
    assert not target.exists()


def test_data_tools():
    stats = ok("compute_statistics", {"numbers": [4, 8, 15, 16, 23, 42]})
    assert stats == "count: 6\nsum: 108\nmean: 18\nmedian: 15.5\nmin: 4\nmax: 42\nstdev: 13.49073756"
    assert err("compute_statistics", {"numbers": [1, "x"]}).endswith(
        "expected a number for 'numbers[1]', got 'x'"
    )
    assert "numbers is empty" in err("compute_statistics", {"numbers": []})
    assert "the limit is 1000" in err("compute_statistics", {"numbers": list(range(5000))})
    records = [{"name": "Ann", "team": "red", "score": 31}, {"name": "Bo", "team": "blue", "score": 25},
               {"name": "Cy", "team": "red", "score": 40}]  # fmt: skip
    assert json.loads(ok("sort_records", {"records": records, "key": "score", "descending": True})) == [
        records[2],
        records[0],
        records[1],
    ]
    assert json.loads(ok("sort_records", {"records": records, "key": "name"})) == records
    assert err("sort_records", {"records": records, "key": "age"}).endswith(
        "record 0 has no field 'age'; its fields are name, team, score"
    )
    assert "mixes numbers and text" in err("sort_records", {"records": [{"a": 1}, {"a": "x"}], "key": "a"})
    kept = ok("filter_records", {"records": records, "field": "score", "op": ">", "value": 30})
    assert kept == "2 of 3 records match\n" + json.dumps([records[0], records[2]])
    assert ok(
        "filter_records", {"records": records, "field": "team", "op": "==", "value": "blue"}
    ).startswith("1 of 3")
    assert ok("filter_records", {"records": records, "field": "score", "op": "<=", "value": "25"}).startswith(
        "1 of 3"
    )
    assert "unknown op '=~'" in err(
        "filter_records", {"records": records, "field": "a", "op": "=~", "value": 1}
    )
    assert ok("group_records", {"records": records, "by": "team", "field": "score"}) == "blue: 25\nred: 71"
    assert ok("group_records", {"records": records, "by": "team", "agg": "count"}) == "blue: 1\nred: 2"
    assert (
        ok("group_records", {"records": records, "by": "team", "field": "score", "agg": "mean"})
        == "blue: 25\nred: 35.5"
    )
    assert "unknown agg 'median'" in err("group_records", {"records": records, "by": "team", "agg": "median"})
    assert "record 1 is not an object" in err("sort_records", {"records": [{"a": 1}, 5], "key": "a"})
    assert ok("parse_csv", {"text": "name,score\nAnn,3.5\nBo,4\n"}) == (
        '2 rows, columns: name, score\n[{"name": "Ann", "score": 3.5}, {"name": "Bo", "score": 4}]'
    )
    assert "line 3 has 1 cells but the header has 2" in err("parse_csv", {"text": "a,b\n1,2\n3"})
    assert "the limit is 20000" in err("parse_csv", {"text": "a\n" + "1\n" * 20_000})


# ---- task suites ---------------------------------------------------------------------------------

CONDITION_KEYS = {"tool", "result_contains", "result_equals", "result_regex", "result_number", "tolerance",
                  "answer_contains", "probe"}  # fmt: skip
NUMBER = re.compile(r"-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?")


def result_holds(cond: dict, text: str) -> bool:
    """The result conditions of the task format (env.tasks), checked on one call's text."""
    checks = [
        "result_contains" not in cond or cond["result_contains"] in text,
        "result_equals" not in cond or text.strip() == cond["result_equals"],
        "result_regex" not in cond or re.search(cond["result_regex"], text) is not None,
        "result_number" not in cond
        or any(
            abs(float(n) - cond["result_number"]) <= cond.get("tolerance", 1e-6) for n in NUMBER.findall(text)
        ),
    ]
    return all(checks)


def test_result_checker_knows_right_from_wrong():
    text = "5 km = 5000 m"
    assert result_holds({"result_contains": "= 5000 m", "result_regex": "^5 km"}, text)
    assert result_holds({"result_number": 4999.9999999}, text)
    assert not result_holds({"result_number": 4999.9}, text)
    assert result_holds({"result_number": 4999.9, "tolerance": 0.2}, text)
    assert not result_holds({"result_equals": "5000"}, text)
    assert not result_holds({"result_contains": "= 500 m;"}, text)
    assert not result_holds({"result_regex": "(?m)^7$"}, "n\n17\n(1 row)")


def test_task_files_are_valid_and_splits_disjoint():
    train, val, test = load_tasks("train"), load_tasks("val"), load_tasks("test")
    assert len(train) >= 2000 and len(val) >= 100 and len(test) >= 100
    ids = [t["id"] for t in train + val + test]
    assert len(ids) == len(set(ids))
    prompts = [{t["prompt"] for t in split} for split in (train, val, test)]
    assert not prompts[0] & prompts[1] and not prompts[0] & prompts[2] and not prompts[1] & prompts[2]
    tools = {"calculator", "convert_units", "web_search", "open_document", "list_tables", "describe_table",
             "query_database", "execute_write", "compute_statistics", "sort_records", "filter_records",
             "group_records", "parse_csv"}  # fmt: skip
    for task in train + val + test:
        assert set(task) == {"id", "category", "prompt", "success", "max_turns", "oracle"}, task["id"]
        assert task["category"] in {"math", "search", "database", "data", "multi_step", "recovery"}
        assert set(task["success"]) <= CONDITION_KEYS and task["success"], task["id"]
        assert task["max_turns"] == (4 if task["category"] in ("multi_step", "recovery") else 3)
        assert task["oracle"] and all(c["name"] in tools for c in task["oracle"])
        assert task["success"]["tool"] in {c["name"] for c in task["oracle"]}
        if task["category"] == "multi_step":
            assert len(task["oracle"]) >= 2
    for tasks in (train, val, test):
        share = {c: sum(t["category"] == c for t in tasks) / len(tasks) for c in ("multi_step", "recovery")}
        assert 0.13 <= share["multi_step"] <= 0.17 and 0.13 <= share["recovery"] <= 0.17, share
        assert {t["category"] for t in tasks} == {
            "math",
            "search",
            "database",
            "data",
            "multi_step",
            "recovery",
        }
    with pytest.raises(ValueError, match="unknown task split 'dev'"):
        load_tasks("dev")


def test_fresh_draws_use_train_entities_only():
    """A warm start's fresh draw of train tasks: its own values, the train split's entities and mix, and never a
    prompt or entity of val or test."""
    draw = make_tasks.draw_train_tasks(400, "draw-a")
    assert len(draw) == 400 and len({t["id"] for t in draw}) == 400
    assert draw == make_tasks.draw_train_tasks(400, "draw-a")
    other = make_tasks.draw_train_tasks(400, "draw-b")
    assert len({t["prompt"] for t in draw} & {t["prompt"] for t in other}) < 100
    held_out = load_tasks("val") + load_tasks("test")
    assert not {t["prompt"] for t in draw} & {t["prompt"] for t in held_out}
    pools = make_tasks.make_pools((make_data.DATA_DIR / "seed.sql").read_text(encoding="utf-8"))
    held_names = [p[1] for split in ("val", "test") for p in pools[split].products]
    held_names += [c[1] for split in ("val", "test") for c in pools[split].customers]
    held_names += [d["title"] for split in ("val", "test") for d in pools[split].docs]
    for task in draw:
        assert not [n for n in held_names if n in task["prompt"]], task["prompt"]
    counts = {c: sum(t["category"] == c for t in draw) for c in ("multi_step", "recovery")}
    assert counts == {"multi_step": 60, "recovery": 60}
    assert {t["id"].split("-")[0] for t in draw} == {"draw"}


def test_invented_entities_belong_to_no_split_and_their_tasks_are_solved(tmp_path):
    """A fresh draw with invented entities (``--sft-invented-entities``): its invented products, customers and
    cities are no entity of any split, its prompts hold no val or test entity, and every task that names one
    creates it in its setup, so that its oracle solves it on the real server."""
    from env.check import check_tasks

    draw = make_tasks.draw_train_tasks(300, "inv-a", invented=True)
    assert draw == make_tasks.draw_train_tasks(300, "inv-a", invented=True)
    seeded = (make_data.DATA_DIR / "seed.sql").read_text(encoding="utf-8")
    for seed in range(
        40
    ):  # a city that no invented customer drew still has a count (0), so counting it works
        pool = make_tasks.invented_pool(seeded, random.Random(seed))
        assert set(pool.cities) <= set(pool.city_counts)
    pools = make_tasks.make_pools(seeded)
    held = [p[1] for split in ("val", "test") for p in pools[split].products]
    held += [c[1] for split in ("val", "test") for c in pools[split].customers]
    held += [d["title"] for split in ("val", "test") for d in pools[split].docs]
    held += [n for split in ("val", "test") for n in pools[split].cities + pools[split].new_names]
    for task in draw:
        assert not [n for n in held if n in task["prompt"]], task["prompt"]
    invented = [t for t in draw if "setup" in t]
    assert len(invented) >= 30 and {t["category"] for t in invented} >= {"database", "recovery", "multi_step"}
    for task in invented:
        for call in task["setup"]:
            name = re.search(r"VALUES \(\d+, '([^']+)'", call["arguments"]["sql"]).group(1)
            assert f"'{name}'" not in seeded, name  # not an entity of the seeded database
    path = tmp_path / "invented.jsonl"
    path.write_text(make_tasks.render(invented), encoding="utf-8")
    reports = check_tasks(path)
    assert [r.verdict for r in reports] == ["solved"] * len(invented), [
        r for r in reports if r.verdict != "solved"
    ]
    bare = [{k: v for k, v in t.items() if k != "setup"} for t in invented if t["category"] == "database"]
    path.write_text(make_tasks.render(bare), encoding="utf-8")
    assert any(
        r.verdict != "solved" for r in check_tasks(path)
    )  # without its setup, an invented entity is missing


def test_bundled_files_equal_their_generators():
    for name, text in make_data.generate().items():
        assert (make_data.DATA_DIR / name).read_text(encoding="utf-8") == text, name
    for split, text in make_tasks.generate().items():
        assert (TASKS_DIR / f"{split}.jsonl").read_text(encoding="utf-8") == text, split
    assert sum(p.stat().st_size for p in make_data.DATA_DIR.iterdir()) < 1_000_000


def test_every_oracle_solves_its_task():
    """Replay each oracle in a fresh session (pristine database) and check the success conditions."""
    server = create_server()

    async def replay(client, task) -> list[str]:
        problems, checked = [], False
        for oracle_call in task["oracle"]:
            result = await client.call_tool(oracle_call["name"], oracle_call["arguments"])
            text = result.content[0].text
            if result.is_error:
                problems.append(f"{oracle_call['name']} failed: {text}")
            if oracle_call["name"] == task["success"]["tool"] and result_holds(task["success"], text):
                checked = True
        probe = task["success"].get("probe")
        if probe:
            result = await client.call_tool(probe["name"], probe["arguments"])
            if result.is_error or probe["result_contains"] not in result.content[0].text:
                problems.append(f"probe saw {result.content[0].text!r}")
        return problems if checked else [*problems, "no call met the result conditions"]

    async def main():
        failures = {}
        for task in load_tasks("train") + load_tasks("val") + load_tasks("test"):
            async with Client(server) as client:
                problems = await replay(client, task)
            if problems:
                failures[task["id"]] = problems
        return failures

    assert anyio.run(main) == {}


def test_recovery_prompts_lead_to_an_error_that_names_the_fix():
    """The natural first call of each recovery family fails, and its error holds the corrected token."""
    calls = [
        ("query_database", {"sql": "SELECT city FROM customers WHERE name = 'Lea Cole'"}, "full_name"),
        ("query_database", {"sql": "SELECT stock FROM product WHERE name = 'Blue Kettle'"}, "products"),
        ("convert_units", {"value": 3, "from_unit": "miles", "to_unit": "km"}, "'mi'"),
        ("calculator", {"expression": "3^4"}, "**"),
        ("open_document", {"doc_id": "17"}, "doc-012"),
    ]
    results = run_calls([(name, args) for name, args, _ in calls])
    for (is_error, text), (_, _, fix) in zip(results, calls, strict=True):
        assert is_error and fix in text, text


# ---- transports ----------------------------------------------------------------------------------


def test_stdio_with_the_sdk_client():
    params = StdioServerParameters(command=sys.executable, args=["-m", "mcp_mock"], cwd=str(ROOT))

    async def main():
        async with Client(params) as client:
            names = {t.name for t in (await client.list_tools()).tools}
            result = await client.call_tool("calculator", {"expression": "6 * 7"})
        return names, result.content[0].text

    names, text = anyio.run(main)
    assert "query_database" in names and len(names) == 13 and text == "42"


def _send(proc: subprocess.Popen, message: dict) -> None:
    proc.stdin.write((json.dumps(message) + "\n").encode())
    proc.stdin.flush()


def _reply(lines: queue.Queue, want_id: int) -> dict:
    """The response with id want_id; notifications in between are skipped."""
    while True:
        message = json.loads(lines.get(timeout=30))
        if message.get("id") == want_id:
            return message


def test_stdio_speaks_raw_json_rpc():
    """A hand-written client: newline-delimited JSON-RPC 2.0 over pipes, as the MCP stdio transport specifies."""
    proc = subprocess.Popen([sys.executable, "-m", "mcp_mock"], cwd=ROOT, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)  # fmt: skip
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True).start()
    try:
        _send(proc, {"jsonrpc": "2.0", "id": 1, "method": "initialize",
                     "params": {"protocolVersion": "2025-06-18", "capabilities": {},
                                "clientInfo": {"name": "raw-test", "version": "0"}}})  # fmt: skip
        init = _reply(lines, 1)
        assert init["jsonrpc"] == "2.0" and init["result"]["protocolVersion"] == "2025-06-18"
        assert (
            init["result"]["serverInfo"]["name"] == "mcp-mock" and "tools" in init["result"]["capabilities"]
        )
        _send(proc, {"jsonrpc": "2.0", "method": "notifications/initialized"})
        _send(proc, {"jsonrpc": "2.0", "id": 2, "method": "tools/list"})
        tools = _reply(lines, 2)["result"]["tools"]
        schema = next(t for t in tools if t["name"] == "convert_units")["inputSchema"]
        assert (
            schema["required"] == ["value", "from_unit", "to_unit"]
            and schema["properties"]["value"]["type"] == "number"
        )
        _send(proc, {"jsonrpc": "2.0", "id": 3, "method": "tools/call",
                     "params": {"name": "calculator", "arguments": {"expression": "2**"}}})  # fmt: skip
        failed = _reply(lines, 3)["result"]
        assert failed["isError"] is True and "could not parse" in failed["content"][0]["text"]
        _send(proc, {"jsonrpc": "2.0", "id": 4, "method": "tools/call",
                     "params": {"name": "list_tables", "arguments": {}}})  # fmt: skip
        assert _reply(lines, 4)["result"]["content"] == [{"type": "text", "text": PRISTINE_TABLES}]
    finally:
        proc.stdin.close()
        proc.wait(timeout=10)


def test_http_with_the_sdk_client(http_url):
    async def main():
        async with Client(http_url) as client:
            names = {t.name for t in (await client.list_tools()).tools}
            result = await client.call_tool("convert_units", {"value": 2, "from_unit": "kg", "to_unit": "g"})
        return names, result.content[0].text

    names, text = anyio.run(main)
    assert len(names) == 13 and text == "2 kg = 2000 g"


def test_http_sessions_are_isolated(http_url):
    """With the session handshake (mode='legacy') each HTTP client gets its own database copy."""
    insert = {"sql": "INSERT INTO customers (full_name, city) VALUES ('Wes Holm', 'Ashby')"}

    async def main():
        async with Client(http_url, mode="legacy") as writer:
            wrote = await writer.call_tool("execute_write", insert)
            seen = await writer.call_tool("list_tables", {})
            async with Client(http_url, mode="legacy") as other:
                fresh = await other.call_tool("list_tables", {})
        return wrote.content[0].text, seen.content[0].text, fresh.content[0].text

    wrote, seen, fresh = anyio.run(main)
    assert wrote == "inserted 1 row" and seen.startswith("customers (61 rows)") and fresh == PRISTINE_TABLES


HTTP_HEADERS = {"Content-Type": "application/json", "Accept": "application/json, text/event-stream",
                "MCP-Protocol-Version": "2025-06-18"}  # fmt: skip


def _post(url: str, message: dict, session: str | None = None) -> tuple[dict, str | None]:
    """One JSON-RPC request over streamable HTTP; the reply may be JSON or a server-sent event stream."""
    headers = dict(HTTP_HEADERS)
    if session:
        headers["Mcp-Session-Id"] = session
    request = urllib.request.Request(url, data=json.dumps(message).encode(), headers=headers, method="POST")
    with urllib.request.urlopen(request, timeout=30) as response:
        body, sid = response.read().decode(), response.headers.get("Mcp-Session-Id")
        if response.headers.get("Content-Type", "").startswith("text/event-stream"):
            body = next(line[5:] for line in body.splitlines() if line.startswith("data:"))
    return json.loads(body), sid


def test_http_speaks_raw_json_rpc(http_url):
    init, session = _post(http_url, {"jsonrpc": "2.0", "id": 1, "method": "initialize",
                                     "params": {"protocolVersion": "2025-06-18", "capabilities": {},
                                                "clientInfo": {"name": "raw-test", "version": "0"}}})  # fmt: skip
    assert init["result"]["serverInfo"]["name"] == "mcp-mock" and session
    headers = {**HTTP_HEADERS, "Mcp-Session-Id": session}
    note = json.dumps({"jsonrpc": "2.0", "method": "notifications/initialized"}).encode()
    with urllib.request.urlopen(
        urllib.request.Request(http_url, data=note, headers=headers), timeout=30
    ) as reply:
        assert reply.status == 202  # the spec's answer to a notification: Accepted, no body
    listed, _ = _post(http_url, {"jsonrpc": "2.0", "id": 2, "method": "tools/list"}, session)
    assert len(listed["result"]["tools"]) == 13
    called, _ = _post(http_url, {"jsonrpc": "2.0", "id": 3, "method": "tools/call",
                                 "params": {"name": "calculator", "arguments": {"expression": "6 * 7"}}}, session)  # fmt: skip
    assert called["result"]["content"][0]["text"] == "42" and called["result"]["isError"] is False
