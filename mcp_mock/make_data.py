"""Write the bundled data: a search corpus (data/corpus.jsonl) and a shop database (data/seed.sql).

Everything is invented for this project and drawn from a fixed seed, so `python -m mcp_mock.make_data`
always writes the same bytes.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

DATA_DIR = Path(__file__).parent / "data"
SEED = 20240611

NAME_WORDS = [
    "Korvel", "Amberly", "Thistlewick", "Marrow", "Quillon", "Brisket", "Halden", "Ostrava", "Penrith",
    "Saltmere", "Vey", "Wrenfold", "Yarrow", "Zelkova", "Dunmore", "Elsby", "Fenwick", "Garrow", "Ilmar",
    "Juniper",
]  # fmt: skip
KINDS = {
    "Lighthouse": "a lighthouse on the {region} coast",
    "Bridge": "a stone bridge over the river in {region}",
    "Festival": "a yearly music festival held in {region}",
    "Museum": "a museum of local history in {region}",
    "Comet": "a comet first recorded by observers in {region}",
    "Alloy": "a metal alloy developed in the workshops of {region}",
    "Orchard": "an apple orchard in the hills of {region}",
    "Library": "a public library in the old town of {region}",
    "Canal": "a shipping canal that crosses {region}",
    "Observatory": "a mountain observatory above {region}",
    "Railway": "a narrow-gauge railway in {region}",
    "Glacier": "a slow glacier in the north of {region}",
    "Theatre": "a wooden theatre in {region}",
    "Market": "a covered market in the centre of {region}",
    "Dam": "a concrete dam in the valley of {region}",
}
REGIONS = ["Lowmere", "Eastfield", "Brackwater", "Northdown", "Silverton", "Redhollow", "Greyport", "Ashby"]
FACTS = [
    "It was founded in {year} and is {size} metres long.",
    "It opened in {year}; its main hall measures {size} metres.",
    "Records date it to {year}, and it stands {size} metres high.",
]
SECRETS = [
    "Its caretakers keep a {colour} ledger with {count} signatures.",
    "A {colour} plaque at the entrance lists {count} founders.",
    "Visitors count {count} {colour} lanterns along the path.",
]
COLOURS = ["red", "blue", "green", "amber", "violet", "silver", "black", "white"]

FIRST = [
    "Ann",
    "Bo",
    "Cara",
    "Dev",
    "Eli",
    "Fay",
    "Gus",
    "Hana",
    "Ivo",
    "Jun",
    "Kit",
    "Lea",
    "Max",
    "Nia",
    "Omar",
]
LAST = ["Lee", "Park", "Moss", "Reed", "Shaw", "Vance", "Wolfe", "Young", "Ng", "Cole", "Diaz", "Hart"]
COLOR_ADJ = ["Blue", "Red", "Green", "Black", "White", "Amber", "Silver", "Copper"]
ITEMS = {
    "kitchen": ["Kettle", "Teapot", "Skillet", "Whisk", "Colander"],
    "garden": ["Trowel", "Watering Can", "Planter"],
    "office": ["Stapler", "Notebook", "Desk Lamp", "Pen Set"],
}
N_CUSTOMERS, N_PRODUCTS, N_ORDERS = 60, 48, 200


def make_corpus(rng: random.Random) -> list[dict]:
    """One document per (name word, kind) pair, with a public fact and a detail only the full text has."""
    docs = []
    pairs = [(word, kind) for kind in KINDS for word in NAME_WORDS]
    for number, (word, kind) in enumerate(pairs, start=1):
        region = rng.choice(REGIONS)
        title = f"{word} {kind}"
        lead = f"The {title} is {KINDS[kind].format(region=region)}."
        fact = rng.choice(FACTS).format(year=rng.randint(1700, 1990), size=rng.randint(12, 900))
        secret = rng.choice(SECRETS).format(colour=rng.choice(COLOURS), count=rng.randint(3, 99))
        docs.append({"id": f"doc-{number:03d}", "title": title, "text": f"{lead} {fact} {secret}"})
    return docs


def _sql(value: object) -> str:
    return "'" + str(value).replace("'", "''") + "'" if isinstance(value, str) else str(value)


def _inserts(table: str, rows: list[tuple]) -> list[str]:
    return [f"INSERT INTO {table} VALUES ({', '.join(_sql(v) for v in row)});" for row in rows]


def make_shop(rng: random.Random) -> str:
    """The seed script: schema plus rows for customers, products and orders."""
    names = rng.sample([f"{f} {s}" for f in FIRST for s in LAST], N_CUSTOMERS)
    customers = [
        (i, name, rng.choice(REGIONS), f"{name.lower().replace(' ', '.')}@example.com")
        for i, name in enumerate(names, start=1)
    ]
    kinds = [(adj, item, cat) for cat, items in ITEMS.items() for item in items for adj in COLOR_ADJ]
    chosen = rng.sample(kinds, N_PRODUCTS)
    products = [
        (i, f"{adj} {item}", cat, rng.randint(150, 9000) / 100 if rng.random() < 0.7 else rng.randint(2, 90),
         rng.randint(0, 120))
        for i, (adj, item, cat) in enumerate(chosen, start=1)
    ]  # fmt: skip
    orders = [
        (i, rng.randint(1, N_CUSTOMERS), rng.randint(1, N_PRODUCTS), rng.randint(1, 9),
         f"2024-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}")
        for i in range(1, N_ORDERS + 1)
    ]  # fmt: skip
    schema = [
        "CREATE TABLE customers (id INTEGER PRIMARY KEY, full_name TEXT NOT NULL, city TEXT NOT NULL, email TEXT);",
        "CREATE TABLE products (id INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE, category TEXT NOT NULL, "
        "price REAL NOT NULL, stock INTEGER NOT NULL);",
        "CREATE TABLE orders (id INTEGER PRIMARY KEY, customer_id INTEGER NOT NULL REFERENCES customers(id), "
        "product_id INTEGER NOT NULL REFERENCES products(id), quantity INTEGER NOT NULL, order_date TEXT NOT NULL);",
    ]
    rows = _inserts("customers", customers) + _inserts("products", products) + _inserts("orders", orders)
    return "\n".join(["BEGIN;", *schema, *rows, "COMMIT;"]) + "\n"


def generate() -> dict[str, str]:
    """The text of each data file by name, from the fixed seed."""
    rng = random.Random(SEED)
    corpus = "".join(json.dumps(doc, sort_keys=True) + "\n" for doc in make_corpus(rng))
    return {"corpus.jsonl": corpus, "seed.sql": make_shop(rng)}


def main() -> None:
    """Regenerate both data files."""
    DATA_DIR.mkdir(exist_ok=True)
    for name, text in generate().items():
        (DATA_DIR / name).write_text(text, encoding="utf-8")
        print(f"wrote {DATA_DIR / name}")


if __name__ == "__main__":
    main()
