"""Task templates: each draws values from a Pool and returns (prompt, success, oracle).

Expected answers are computed here from first principles (Python arithmetic, the seed database read
with plain SQL, the corpus text), not by calling the tools, so replaying an oracle checks the tools.
"""

from __future__ import annotations

import json
import random
import re
import statistics
from dataclasses import dataclass, field

from .fmt import fmt_number

Task = tuple[str, dict, list[dict]]
NAMES = ["Ann", "Bo", "Cy", "Dee", "Eli", "Flo", "Gus", "Ida", "Jo", "Kai", "Liv", "Mo"]
TEAMS = ["red", "blue", "green"]


@dataclass
class Pool:
    """The entities one split may use (test entities never appear in train prompts)."""

    products: list[tuple] = field(default_factory=list)  # (id, name, price, stock)
    customers: list[tuple] = field(default_factory=list)  # (id, full_name, city, email)
    docs: list[dict] = field(default_factory=list)
    cities: list[str] = field(default_factory=list)
    city_counts: dict[str, int] = field(default_factory=dict)
    order_counts: dict[int, int] = field(default_factory=dict)
    new_names: list[str] = field(default_factory=list)


def call(name: str, **arguments: object) -> dict:
    """One oracle call."""
    return {"name": name, "arguments": arguments}


def cell_regex(value: str) -> str:
    """A regex that matches value as a whole cell of a query_database result."""
    return rf"(?m)(^|\| ){re.escape(value)}( \||$)"


def _records(rng: random.Random, n: int) -> list[dict]:
    names = rng.sample(NAMES, n)
    return [{"name": x, "team": rng.choice(TEAMS), "score": rng.randint(1, 99)} for x in names]


# ---- easy: one call, values copied from the prompt --------------------------------------------


def arith(rng: random.Random, pool: Pool) -> Task:
    a, b, c = rng.randint(2, 99), rng.randint(2, 99), rng.randint(1, 999)
    expr = f"{a} * {b} + {c}"
    return (f"Use the calculator to compute {expr}.", {"tool": "calculator", "result_equals": str(a * b + c)},
            [call("calculator", expression=expr)])  # fmt: skip


def convert(rng: random.Random, pool: Pool) -> Task:
    unit_from, unit_to, factor = rng.choice(
        [
            ("km", "m", 1000),
            ("m", "cm", 100),
            ("kg", "g", 1000),
            ("h", "min", 60),
            ("l", "ml", 1000),
            ("mi", "km", 1.609344),
        ]
    )
    value = rng.randint(2, 500)
    result = fmt_number(value * factor)
    return (f"Use convert_units to convert {value} {unit_from} to {unit_to}.",
            {"tool": "convert_units", "result_contains": f"= {result} {unit_to}"},
            [call("convert_units", value=value, from_unit=unit_from, to_unit=unit_to)])  # fmt: skip


def find_doc(rng: random.Random, pool: Pool) -> Task:
    doc = rng.choice(pool.docs)
    return (f"Use web_search to find the document about the {doc['title']}.",
            {"tool": "web_search", "result_contains": doc["id"]}, [call("web_search", query=doc["title"])])  # fmt: skip


def open_doc(rng: random.Random, pool: Pool) -> Task:
    doc = rng.choice(pool.docs)
    return (f"Use open_document to read document {doc['id']}.",
            {"tool": "open_document", "result_contains": doc["title"]}, [call("open_document", doc_id=doc["id"])])  # fmt: skip


def _product_cell(rng: random.Random, pool: Pool, column: str, prompt: str) -> Task:
    """A query_database task reading one column of a random product; prompt has a {name} slot."""
    product = dict(zip(("id", "name", "price", "stock"), rng.choice(pool.products), strict=True))
    sql = f"SELECT {column} FROM products WHERE name = '{product['name']}'"
    return (prompt.format(name=product["name"]),
            {"tool": "query_database", "result_regex": cell_regex(fmt_number(product[column]))},
            [call("query_database", sql=sql)])  # fmt: skip


def price(rng: random.Random, pool: Pool) -> Task:
    return _product_cell(
        rng, pool, "price", "Use query_database to get the price of the product named '{name}'."
    )


def mean(rng: random.Random, pool: Pool) -> Task:
    numbers = [rng.randint(1, 60) for _ in range(rng.randint(4, 7))]
    return (f"Use compute_statistics to find the mean of {numbers}.",
            {"tool": "compute_statistics", "result_contains": f"mean: {fmt_number(statistics.fmean(numbers))}"},
            [call("compute_statistics", numbers=numbers)])  # fmt: skip


def csv_rows(rng: random.Random, pool: Pool) -> Task:
    records = _records(rng, rng.randint(2, 4))
    text = "name,score\n" + "\n".join(f"{r['name']},{r['score']}" for r in records)
    return (f"Use parse_csv to parse this CSV:\n{text}",
            {"tool": "parse_csv", "result_contains": f"{len(records)} rows, columns: name, score"},
            [call("parse_csv", text=text)])  # fmt: skip


# ---- medium: one call that needs a composed expression, SQL or record list --------------------


def expression(rng: random.Random, pool: Pool) -> Task:
    root, a, b, d = rng.randint(2, 40), rng.randint(2, 30), rng.randint(2, 30), rng.randint(2, 9)
    expr = f"(sqrt({root * root}) + {a} * {b}) / {d}"
    return (f"Use the calculator to compute {expr}.",
            {"tool": "calculator", "result_number": (root + a * b) / d, "tolerance": 1e-6},
            [call("calculator", expression=expr)])  # fmt: skip


def temperature(rng: random.Random, pool: Pool) -> Task:
    value = rng.randint(-20, 220)
    return (f"Use convert_units to convert {value} F to C.",
            {"tool": "convert_units", "result_number": (value - 32) * 5 / 9, "tolerance": 1e-6},
            [call("convert_units", value=value, from_unit="F", to_unit="C")])  # fmt: skip


def city_count(rng: random.Random, pool: Pool) -> Task:
    city = rng.choice(pool.cities)
    sql = f"SELECT COUNT(*) FROM customers WHERE city = '{city}'"
    return (f"Use query_database to count the customers who live in {city}.",
            {"tool": "query_database", "result_regex": f"(?m)^{pool.city_counts[city]}$"}, [call("query_database", sql=sql)])  # fmt: skip


def order_count(rng: random.Random, pool: Pool) -> Task:
    cid = rng.choice(pool.customers)[0]
    sql = f"SELECT COUNT(*) FROM orders WHERE customer_id = {cid}"
    return (f"Use query_database to count the orders of the customer with id {cid}.",
            {"tool": "query_database", "result_regex": f"(?m)^{pool.order_counts[cid]}$"}, [call("query_database", sql=sql)])  # fmt: skip


def insert(rng: random.Random, pool: Pool) -> Task:
    name, city = rng.choice(pool.new_names), rng.choice(pool.cities)
    sql = f"INSERT INTO customers (full_name, city) VALUES ('{name}', '{city}')"
    probe = call("query_database", sql=f"SELECT city FROM customers WHERE full_name = '{name}'")
    return (f"Use execute_write to add a customer named '{name}' who lives in {city}.",
            {"tool": "execute_write", "result_contains": "inserted 1 row", "probe": {**probe, "result_contains": city}},
            [call("execute_write", sql=sql)])  # fmt: skip


def update(rng: random.Random, pool: Pool) -> Task:
    _, name, _, stock = rng.choice(pool.products)
    new = rng.choice([n for n in range(0, 200) if n != stock])
    sql = f"UPDATE products SET stock = {new} WHERE name = '{name}'"
    probe = call("query_database", sql=f"SELECT 'stock=' || stock || ';' FROM products WHERE name = '{name}'")
    return (f"Use execute_write to set the stock of the product '{name}' to {new}.",
            {"tool": "execute_write", "result_contains": "updated 1 row", "probe": {**probe, "result_contains": f"stock={new};"}},
            [call("execute_write", sql=sql)])  # fmt: skip


def sort(rng: random.Random, pool: Pool) -> Task:
    records = _records(rng, rng.randint(3, 5))
    top = max(records, key=lambda r: r["score"])
    return (f"Use sort_records to sort these records by score, highest first: {json.dumps(records)}",
            {"tool": "sort_records", "result_regex": rf'^\[\{{"name": "{top["name"]}"'},
            [call("sort_records", records=records, key="score", descending=True)])  # fmt: skip


def filter_(rng: random.Random, pool: Pool) -> Task:
    records, limit = _records(rng, rng.randint(3, 6)), rng.randint(20, 80)
    kept = sum(r["score"] > limit for r in records)
    return (f"Use filter_records to keep the records with score > {limit}: {json.dumps(records)}",
            {"tool": "filter_records", "result_contains": f"{kept} of {len(records)} records match"},
            [call("filter_records", records=records, field="score", op=">", value=limit)])  # fmt: skip


def group(rng: random.Random, pool: Pool) -> Task:
    records = _records(rng, rng.randint(3, 6))
    totals: dict[str, int] = {}
    for r in records:
        totals[r["team"]] = totals.get(r["team"], 0) + r["score"]
    expected = "\n".join(f"{team}: {total}" for team, total in sorted(totals.items()))
    return (f"Use group_records to sum score by team: {json.dumps(records)}",
            {"tool": "group_records", "result_equals": expected},
            [call("group_records", records=records, by="team", field="score", agg="sum")])  # fmt: skip


# ---- multi-step: two calls, the second uses what the first returned ---------------------------


def price_total(rng: random.Random, pool: Pool) -> Task:
    _, name, value, _ = rng.choice(pool.products)
    qty = rng.randint(2, 12)
    sql = f"SELECT price FROM products WHERE name = '{name}'"
    return (f"Look up the price of '{name}' with query_database, then use the calculator to compute the cost of {qty} of them.",
            {"tool": "calculator", "result_number": value * qty, "tolerance": 1e-6},
            [call("query_database", sql=sql), call("calculator", expression=f"{fmt_number(value)} * {qty}")])  # fmt: skip


def search_open(rng: random.Random, pool: Pool) -> Task:
    doc = rng.choice(pool.docs)
    return (f"Search the web for the {doc['title']}, then open the top result with open_document.",
            {"tool": "open_document", "result_contains": f"{doc['id']}: {doc['title']}"},
            [call("web_search", query=doc["title"]), call("open_document", doc_id=doc["id"])])  # fmt: skip


def csv_stats(rng: random.Random, pool: Pool) -> Task:
    records = _records(rng, rng.randint(3, 5))
    text = "name,score\n" + "\n".join(f"{r['name']},{r['score']}" for r in records)
    scores = [r["score"] for r in records]
    return (f"Parse this CSV with parse_csv, then use compute_statistics on the score column:\n{text}",
            {"tool": "compute_statistics", "result_contains": f"mean: {fmt_number(statistics.fmean(scores))}"},
            [call("parse_csv", text=text), call("compute_statistics", numbers=scores)])  # fmt: skip


def convert_scale(rng: random.Random, pool: Pool) -> Task:
    miles, times = rng.randint(2, 300), rng.randint(2, 9)
    km = fmt_number(miles * 1.609344)
    return (f"Convert {miles} mi to km with convert_units, then use the calculator to multiply the result by {times}.",
            {"tool": "calculator", "result_number": miles * 1.609344 * times, "tolerance": 1e-3},
            [call("convert_units", value=miles, from_unit="mi", to_unit="km"),
             call("calculator", expression=f"{km} * {times}")])  # fmt: skip


# ---- recovery: the natural first call fails and its error names the fix -----------------------


def wrong_column(rng: random.Random, pool: Pool) -> Task:
    _, full_name, city, _ = rng.choice(pool.customers)
    sql = f"SELECT city FROM customers WHERE full_name = '{full_name}'"
    return (f"Use query_database to get the city of the customer whose name is '{full_name}' in the customers table.",
            {"tool": "query_database", "result_regex": cell_regex(city)}, [call("query_database", sql=sql)])  # fmt: skip


def wrong_table(rng: random.Random, pool: Pool) -> Task:
    return _product_cell(
        rng, pool, "stock", "Use query_database to get the stock of '{name}' from the product table."
    )


def wrong_unit(rng: random.Random, pool: Pool) -> Task:
    alias, unit_from, unit_to, factor = rng.choice(
        [("kms", "km", "m", 1000), ("miles", "mi", "km", 1.609344), ("lbs", "lb", "kg", 0.45359237),
         ("hours", "h", "min", 60), ("kilograms", "kg", "g", 1000), ("feet", "ft", "m", 0.3048)]
    )  # fmt: skip
    value = rng.randint(2, 400)
    return (f"Use convert_units to convert {value} {alias} to {unit_to}.",
            {"tool": "convert_units", "result_number": value * factor, "tolerance": 1e-6},
            [call("convert_units", value=value, from_unit=unit_from, to_unit=unit_to)])  # fmt: skip


def caret_power(rng: random.Random, pool: Pool) -> Task:
    base, exponent = rng.randint(2, 15), rng.randint(2, 9)
    return (f"Use the calculator to compute {base}^{exponent}.",
            {"tool": "calculator", "result_equals": str(base**exponent)},
            [call("calculator", expression=f"{base}**{exponent}")])  # fmt: skip


def bare_doc_number(rng: random.Random, pool: Pool) -> Task:
    doc = rng.choice(pool.docs)
    number = int(doc["id"].split("-")[1])
    return (f"Use open_document to read document number {number}.",
            {"tool": "open_document", "result_contains": doc["title"]}, [call("open_document", doc_id=doc["id"])])  # fmt: skip


TIERS = {
    "easy": [arith, convert, find_doc, open_doc, price, mean, csv_rows],
    "medium": [expression, temperature, city_count, order_count, insert, update, sort, filter_, group],
    "multi": [price_total, search_open, csv_stats, convert_scale],
    "recovery": [wrong_column, wrong_table, wrong_unit, caret_power, bare_doc_number],
}
CATEGORY = {
    arith: "math", convert: "math", expression: "math", temperature: "math",
    find_doc: "search", open_doc: "search",
    price: "database", city_count: "database", order_count: "database", insert: "database", update: "database",
    mean: "data", csv_rows: "data", sort: "data", filter_: "data", group: "data",
}  # fmt: skip
