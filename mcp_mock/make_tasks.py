"""Write the task suites: `python -m mcp_mock.make_tasks` regenerates tasks/{train,val,test}.jsonl.

Each split mixes about 35% easy single calls, 35% medium single calls, 15% multi-step and 15%
recovery tasks. Entities (products, customers, documents, cities, new customer names) are
partitioned between the splits and numeric values are drawn again until a prompt is new, so no
prompt is in two splits.

- test: every fifth entity (the held-out split; report on it, never decide on it);
- val: every tenth entity of the rest, carved from what train would otherwise use, so that a
  validation score measures what the test split does (values *and* entities never trained on)
  and every decision about training can be taken on it;
- train: the rest, drawn many times over with fresh values (2,000 tasks), so that imitation has to
  learn to copy values from the prompt rather than memorize 440 answers.

Each split has its own random stream, so resizing one leaves the others as they are.
"""

from __future__ import annotations

import json
import random
import sqlite3
from collections import Counter
from pathlib import Path

from . import templates
from .search import load_corpus
from .tasks import TASKS_DIR

SEED = 1234
SIZES = {"test": 110, "val": 110, "train": 2000}  # test first: its prompts are never drawn again
MIX = {"easy": 0.35, "medium": 0.35, "multi": 0.15, "recovery": 0.15}
NEW_FIRST = ["Zoe", "Yara", "Xan", "Wes", "Vik", "Uma", "Tess", "Rafe", "Quinn", "Pia"]
NEW_LAST = ["Ortega", "Nakamura", "Mbeki", "Laine", "Kowal", "Jensen", "Ibarra", "Holm"]


def _split_of(number: int) -> str:
    """The split an entity belongs to, from its number (the test rule predates the val split; keep it)."""
    if number % 5 == 0:
        return "test"
    return "val" if number % 10 == 9 else "train"


def make_pools(seed_sql: str) -> dict[str, templates.Pool]:
    """Split the seeded entities between train, val and test."""
    conn = sqlite3.connect(":memory:")
    conn.executescript(seed_sql)
    products = conn.execute("SELECT id, name, price, stock FROM products ORDER BY id").fetchall()
    customers = conn.execute("SELECT id, full_name, city, email FROM customers ORDER BY id").fetchall()
    city_counts = Counter(city for _, _, city, _ in customers)
    order_counts = Counter(cid for (cid,) in conn.execute("SELECT customer_id FROM orders"))
    cities = sorted(city_counts)
    new_names = [f"{f} {s}" for f in NEW_FIRST for s in NEW_LAST]
    docs = list(load_corpus().docs.values())
    pools = {}
    for split in SIZES:
        pools[split] = templates.Pool(
            products=[p for p in products if _split_of(p[0]) == split],
            customers=[c for c in customers if _split_of(c[0]) == split],
            docs=[d for d in docs if _split_of(int(d["id"].split("-")[1])) == split],
            cities=[c for i, c in enumerate(cities) if _split_of(i + 2) == split],
            city_counts=dict(city_counts),
            order_counts={c[0]: order_counts[c[0]] for c in customers},
            new_names=[n for i, n in enumerate(new_names) if _split_of(i) == split],
        )
    return pools


def _category(template, tier: str) -> str:
    return {"multi": "multi_step", "recovery": "recovery"}.get(tier) or templates.CATEGORY[template]


def make_split(
    split: str,
    pool: templates.Pool,
    rng: random.Random,
    taken: set[str],
    size: int | None = None,
    distinct: bool = True,
    prefix: str | None = None,
) -> list[dict]:
    """`size` tasks (default: the split's) from one split's pool; prompts already in `taken` are drawn again.

    `distinct`: new prompts are added to `taken`, so none repeats (the bundled splits). Without it a prompt may
    come back, which a template with few values (a document, a city) needs in a large draw. Ids are
    ``<prefix>-<category>-<n>`` (`prefix` defaults to the split)."""
    size = SIZES[split] if size is None else size
    tasks: list[dict] = []
    per_category: Counter[str] = Counter()
    quotas = {tier: round(size * share) for tier, share in MIX.items()}
    quotas["recovery"] = size - sum(q for tier, q in quotas.items() if tier != "recovery")
    for tier, quota in quotas.items():
        options = templates.TIERS[tier]
        made, attempt = 0, 0
        while made < quota:
            template = options[attempt % len(options)]
            attempt += 1
            prompt, success, oracle = template(rng, pool)
            if prompt in taken:
                if attempt > quota * 50:
                    raise RuntimeError(f"cannot draw {quota} distinct {tier} prompts for {split}")
                continue
            if distinct:
                taken.add(prompt)
            category = _category(template, tier)
            per_category[category] += 1
            task_id = f"{prefix or split}-{category}-{per_category[category]:03d}"
            max_turns = 4 if tier in ("multi", "recovery") else 3
            tasks.append({"id": task_id, "category": category, "prompt": prompt, "success": success,
                          "max_turns": max_turns, "oracle": oracle})  # fmt: skip
            made += 1
    return tasks


def _seed_sql() -> str:
    return (Path(__file__).parent / "data" / "seed.sql").read_text(encoding="utf-8")


# Pieces of invented entity names: syllables of new words, and place-name endings (most of them the seeded cities').
SYLLABLES = ["bar", "cel", "dor", "fen", "gal", "hol", "kir", "lam", "mor", "nel", "pim", "quor", "ras", "sol",
             "tam", "vel", "wen", "yar", "zol", "bri", "cra", "dro", "fli", "gro", "pla", "stu", "tre", "vin"]  # fmt: skip
CITY_ENDINGS = [
    "by",
    "water",
    "field",
    "port",
    "mere",
    "down",
    "hollow",
    "ton",
    "ford",
    "wick",
    "stead",
    "holm",
]


def invented_word(rng: random.Random) -> str:
    """A capitalised word of two or three syllables, such as 'Velmor' or 'Crastudor'."""
    return "".join(rng.choice(SYLLABLES) for _ in range(rng.randint(2, 3))).capitalize()


def invented_pool(seed_sql: str, rng: random.Random, size: int = 60) -> templates.Pool:
    """The train pool plus ``size`` invented products, customers and new customer names and ``size // 6``
    invented cities, none of them an entity of any split (so no val or test entity either), each written into the
    database by the setup of a task that names it (``with_setup``).

    Products pair a first word of a seeded name (a colour or material, or a customer's first name) or an invented
    word with a seeded item or an invented word ('Copper Velmor', 'Gralam Kettle'); cities join the start of an
    invented word to a place-name ending ('Tamford'); customers pair a seeded or invented first name with an
    invented last name."""
    conn = sqlite3.connect(":memory:")
    conn.executescript(seed_sql)
    taken = {name for (name,) in conn.execute("SELECT name FROM products")}
    taken |= {name for (name,) in conn.execute("SELECT full_name FROM customers")}
    taken |= {city for (city,) in conn.execute("SELECT city FROM customers")}
    taken |= {f"{f} {s}" for f in NEW_FIRST for s in NEW_LAST}
    words = sorted({name.split(" ", 1)[0] for name in taken if " " in name})
    items = sorted({name.split(" ", 1)[1] for (name,) in conn.execute("SELECT name FROM products")})
    pool = make_pools(seed_sql)["train"]

    def fresh(make) -> str:
        while (name := make()) in taken:
            pass
        taken.add(name)
        return name

    def product_name() -> str:
        first = rng.choice(words) if rng.random() < 0.5 else invented_word(rng)
        return f"{first} {rng.choice(items) if rng.random() < 0.5 else invented_word(rng)}"

    def person() -> str:
        first = rng.choice(words) if rng.random() < 0.5 else invented_word(rng)
        return f"{first} {invented_word(rng)}"

    cities = [fresh(lambda: invented_word(rng)[: rng.randint(3, 6)] + rng.choice(CITY_ENDINGS))
              for _ in range(size // 6)]  # fmt: skip
    for k in range(size):
        pool.products.append(
            (10_000 + k, fresh(product_name), round(rng.uniform(2, 99), 2), rng.randint(0, 199))
        )
        pool.customers.append((10_000 + k, fresh(person), rng.choice(cities), None))
        pool.new_names.append(fresh(person))
    pool.cities += cities
    pool.city_counts.update(dict.fromkeys(cities, 0))  # a city no invented customer drew counts 0
    for _, _, city, _ in pool.customers[-size:]:
        pool.city_counts[city] = pool.city_counts.get(city, 0) + 1
    pool.order_counts.update({c[0]: 0 for c in pool.customers[-size:]})
    return pool


def with_setup(task: dict, pool: templates.Pool) -> dict:
    """``task`` with the setup calls (``execute_write``) that create the invented entities its prompt names: a
    product, a customer, or every customer of a city (so that counting them gives the pool's count)."""
    text = task["prompt"]
    rows = [f"INSERT INTO products (id, name, category, price, stock) VALUES ({pid}, '{name}', 'invented', {price}, "
            f"{stock})" for pid, name, price, stock in pool.products if pid >= 10_000 and f"'{name}'" in text]  # fmt: skip
    rows += [
        f"INSERT INTO customers (id, full_name, city, email) VALUES ({cid}, '{name}', '{city}', NULL)"
        for cid, name, city, _ in pool.customers
        if cid >= 10_000 and (f"'{name}'" in text or f"who live in {city}." in text or f"id {cid}." in text)
    ]
    if not rows:
        return task
    return {**task, "setup": [{"name": "execute_write", "arguments": {"sql": sql}} for sql in rows]}


def draw_train_tasks(count: int, seed: str, prefix: str = "draw", invented: bool = False) -> list[dict]:
    """`count` tasks drawn afresh from the train entities, in the train split's mix, with values of their own.

    For imitation that must learn to copy values rather than memorize a fixed set of answers: each draw (a
    `seed`) gives new numbers, records and pairings of train entities. No prompt of the val or test split is
    ever drawn (a template without entities, such as arithmetic, could otherwise hit one); prompts may repeat
    within a draw and may be those of the train split. ``invented``: the pool also holds invented products,
    customers and cities (``invented_pool``), which no memory of the train split can name, and each task that
    names one creates it in its setup."""
    from .tasks import load_tasks

    held_out = {t["prompt"] for split in ("val", "test") for t in load_tasks(split)}
    rng = random.Random(seed)
    pool = invented_pool(_seed_sql(), rng) if invented else make_pools(_seed_sql())["train"]
    tasks = make_split("train", pool, rng, held_out, size=count, distinct=False, prefix=prefix)
    return [with_setup(task, pool) for task in tasks] if invented else tasks


def render(tasks: list[dict]) -> str:
    """JSONL text, one task a line."""
    return "".join(json.dumps(task) + "\n" for task in tasks)


def generate() -> dict[str, str]:
    """The file contents of every split, from the fixed seed."""
    pools, taken = make_pools(_seed_sql()), set()
    return {
        split: render(make_split(split, pools[split], random.Random(f"{SEED}-{split}"), taken))
        for split in SIZES
    }


def main() -> None:
    """Regenerate tasks/train.jsonl and tasks/test.jsonl."""
    TASKS_DIR.mkdir(exist_ok=True)
    for split, text in generate().items():
        (TASKS_DIR / f"{split}.jsonl").write_text(text, encoding="utf-8")
        print(f"wrote {text.count(chr(10))} {split} tasks to {TASKS_DIR / (split + '.jsonl')}")


if __name__ == "__main__":
    main()
