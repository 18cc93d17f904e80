"""Build the text-to-SQL example: an SQLite analytics database and question -> SQL pairs.

Deterministic (fixed seeds): running it again rewrites byte-identical files.
Every reference query is executed against the database while generating and must
return at least one row. The split measures the *skill*, not memory:

- each intent has several phrasings; two per intent are held out of training and
  used only for validation and test;
- each (intent, values) combination lands in exactly one split, so no test question
  asks for a value combination that training saw — except for intents with so few
  combinations (one of five years, one of three top-n's left to training) that training
  would see a handful of rows of them: those are topped up to an even share of training
  from all their values, in training phrasings only, so their held-out questions differ
  from training by phrasing alone (`skilltune data audit` flags the handful as
  `rare_shapes`).

Usage: python examples/sql/generate.py [--out examples/sql/data]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import sqlite3
from datetime import date, timedelta
from pathlib import Path

REGIONS = {"EU": "Europe", "NA": "North America", "APAC": "Asia-Pacific", "LATAM": "Latin America",
           "MEA": "the Middle East and Africa"}
PLANS = ["free", "pro", "enterprise"]
CATEGORIES = ["electronics", "books", "clothing", "home", "toys", "sports"]
STATUSES = ["pending", "shipped", "delivered", "cancelled", "returned"]
YEARS = ["2021", "2022", "2023", "2024", "2025"]
MONTHS = {"01": "January", "02": "February", "03": "March", "04": "April", "05": "May", "06": "June",
          "07": "July", "08": "August", "09": "September", "10": "October", "11": "November", "12": "December"}
FIRST = ["Ana", "Ben", "Chen", "Dara", "Eli", "Fay", "Gus", "Hana", "Ivo", "Jun", "Kai", "Lea", "Max", "Nia",
         "Omar", "Pia", "Raj", "Sol", "Tom", "Uma", "Vik", "Wen", "Yara", "Zed"]
LAST = ["Smith", "Garcia", "Kim", "Muller", "Rossi", "Silva", "Tanaka", "Novak", "Okafor", "Larsen"]
PRODUCT_WORDS = {"electronics": ["Phone", "Laptop", "Headset", "Camera", "Tablet", "Speaker", "Monitor", "Charger",
                                 "Router", "Watch"],
                 "books": ["Novel", "Cookbook", "Atlas", "Biography", "Textbook", "Poetry", "Comic", "Guide",
                           "Dictionary", "Memoir"],
                 "clothing": ["Jacket", "Shirt", "Scarf", "Boots", "Hat", "Sweater", "Jeans", "Dress", "Socks",
                              "Gloves"],
                 "home": ["Lamp", "Chair", "Rug", "Kettle", "Pillow", "Clock", "Vase", "Mirror", "Shelf", "Blanket"],
                 "toys": ["Puzzle", "Robot", "Kite", "Blocks", "Doll", "Train", "Yo-yo", "Drone", "Marbles", "Ball"],
                 "sports": ["Racket", "Helmet", "Bike", "Skates", "Mat", "Bottle", "Gloves", "Shoes", "Net",
                            "Weights"]}

SYSTEM = ("Write one SQLite query that answers the question. Tables: users(id, name, region, plan, signup_date), "
          "products(id, name, category, price), orders(id, user_id, product_id, quantity, amount, status, "
          "order_date). Regions: EU, NA, APAC, LATAM, MEA.")


def build_database(path: Path) -> None:
    rng = random.Random(7)
    if path.exists():
        path.unlink()
    con = sqlite3.connect(path)
    con.executescript("""
        CREATE TABLE users (id INTEGER PRIMARY KEY, name TEXT NOT NULL, region TEXT NOT NULL,
                            plan TEXT NOT NULL, signup_date TEXT NOT NULL);
        CREATE TABLE products (id INTEGER PRIMARY KEY, name TEXT NOT NULL, category TEXT NOT NULL,
                               price REAL NOT NULL);
        CREATE TABLE orders (id INTEGER PRIMARY KEY, user_id INTEGER NOT NULL REFERENCES users(id),
                             product_id INTEGER NOT NULL REFERENCES products(id), quantity INTEGER NOT NULL,
                             amount REAL NOT NULL, status TEXT NOT NULL, order_date TEXT NOT NULL);
    """)
    start = date(2021, 1, 1)
    users = []
    for uid in range(1, 1001):
        name = f"{rng.choice(FIRST)} {rng.choice(LAST)} {uid}"
        users.append((uid, name, rng.choice(list(REGIONS)), rng.choices(PLANS, [6, 3, 1])[0],
                      (start + timedelta(days=rng.randrange(5 * 365))).isoformat()))
    con.executemany("INSERT INTO users VALUES (?, ?, ?, ?, ?)", users)
    products = []
    pid = 0
    for cat, words in PRODUCT_WORDS.items():
        for w in words:
            pid += 1
            products.append((pid, f"{w} {rng.choice(['Pro', 'Lite', 'Max', 'One', 'Plus', 'Mini'])}", cat,
                             round(rng.uniform(5, 400), 2)))
    con.executemany("INSERT INTO products VALUES (?, ?, ?, ?)", products)
    orders = []
    for oid in range(1, 8001):
        p = rng.choice(products)
        q = rng.choices([1, 2, 3, 4], [6, 3, 2, 1])[0]
        orders.append((oid, rng.randrange(1, 1001), p[0], q, round(p[3] * q, 2),
                       rng.choices(STATUSES, [1, 2, 6, 1, 1])[0],
                       (start + timedelta(days=rng.randrange(5 * 365))).isoformat()))
    con.executemany("INSERT INTO orders VALUES (?, ?, ?, ?, ?, ?, ?)", orders)
    con.commit()
    con.close()


def _next_month(y: str, m: str) -> str:
    return f"{int(y) + 1}-01-01" if m == "12" else f"{y}-{int(m) + 1:02d}-01"


# Each intent: value slots, phrasings (the last two are held out of training) and the reference SQL.
INTENTS = [
    {"slots": {"r": list(REGIONS)},
     "ask": ["How many users are in {R}?",
             "Count the users from {R}.",
             "What is the number of users based in {R}?",
             "Give me the user count for {R}.",
             "How many accounts are registered in {R}?",
             "Tell me how many users {R} has.",
             "How many customers do we have in {R}?",
             "Number of {R} users?"],
     "sql": "SELECT COUNT(*) FROM users WHERE region = '{r}';"},
    {"slots": {"r": list(REGIONS), "y": YEARS},
     "ask": ["List the names of users in {R} who signed up in {y}.",
             "Which {R} users joined in {y}?",
             "Show users from {R} with a {y} signup date.",
             "Names of users who registered in {y} in {R}.",
             "Names of {R} users whose signup year is {y}.",
             "Which users in {R} registered during {y}?",
             "Who signed up from {R} during {y}?",
             "Find the {y} signups located in {R}."],
     "sql": "SELECT name FROM users WHERE region = '{r}' AND strftime('%Y', signup_date) = '{y}';"},
    {"slots": {"y": YEARS, "m": list(MONTHS)},
     "ask": ["How many signups did each region get in {M} {y}?",
             "Signups by region for {M} {y}.",
             "Break down {M} {y} signups per region.",
             "Count new users per region in {M} {y}.",
             "For {M} {y}, how many users joined in each region?",
             "Show new signups per region during {M} {y}.",
             "What were the {M} {y} registrations by region?",
             "Per-region signup counts, {M} {y}."],
     "sql": "SELECT region, COUNT(*) FROM users WHERE signup_date >= '{y}-{m}-01' AND signup_date < '{next}' "
            "GROUP BY region;"},
    {"slots": {"y": YEARS},
     "ask": ["What was the total revenue in {y}?",
             "Sum of all order amounts in {y}.",
             "Total sales for {y}?",
             "How much revenue did we make in {y}?",
             "Total order amount for the year {y}.",
             "What did all {y} orders add up to?",
             "Give me {y} revenue.",
             "Overall order value in {y}?"],
     "sql": "SELECT SUM(amount) FROM orders WHERE strftime('%Y', order_date) = '{y}';"},
    {"slots": {"n": ["3", "5", "10"]},
     "ask": ["What are the top {n} products by revenue?",
             "List the {n} best-selling products by sales amount.",
             "Show the {n} products that earned the most.",
             "Top {n} products ranked by total revenue.",
             "Rank products by revenue and show the top {n}.",
             "Which are the {n} top-earning products?",
             "Which {n} products brought in the most money?",
             "Highest-revenue products, top {n}."],
     "sql": "SELECT p.name, SUM(o.amount) AS revenue FROM orders o JOIN products p ON p.id = o.product_id "
            "GROUP BY p.name ORDER BY revenue DESC LIMIT {n};"},
    {"slots": {"y": YEARS},
     "ask": ["How many orders are in each status for {y}?",
             "Count {y} orders by status.",
             "Order status breakdown for {y}.",
             "Number of orders per status in {y}.",
             "For {y}, show how many orders have each status.",
             "Tally the {y} orders by their status.",
             "What is the status distribution of orders placed in {y}?",
             "{y} orders grouped by status?"],
     "sql": "SELECT status, COUNT(*) FROM orders WHERE strftime('%Y', order_date) = '{y}' GROUP BY status;"},
    {"slots": {"c": CATEGORIES, "p": ["50", "100", "200", "300"]},
     "ask": ["Which {c} products cost less than {p} dollars?",
             "List {c} items under ${p}.",
             "Show {c} products priced below {p}.",
             "Find cheap {c} products, under {p}.",
             "Show me {c} products that are cheaper than {p}.",
             "{c} items costing under {p}?",
             "What {c} products can I buy for less than {p}?",
             "{c} products with a price below {p}, please."],
     "sql": "SELECT name, price FROM products WHERE category = '{c}' AND price < {p} ORDER BY price;"},
    {"slots": {"y": YEARS},
     "ask": ["What is the average order amount per region in {y}?",
             "Average order value by region for {y}.",
             "Mean order amount in each region during {y}.",
             "Per-region average order size in {y}.",
             "For each region, what was the mean order amount in {y}?",
             "Average {y} order amount grouped by region.",
             "How big is the average {y} order in each region?",
             "Region-wise average order amount, {y}."],
     "sql": "SELECT u.region, AVG(o.amount) FROM orders o JOIN users u ON u.id = o.user_id "
            "WHERE strftime('%Y', o.order_date) = '{y}' GROUP BY u.region;"},
    {"slots": {"y": YEARS},
     "ask": ["What was the revenue per product category in {y}?",
             "Sales by category for {y}.",
             "Total {y} revenue for each category.",
             "Break down {y} revenue by product category.",
             "Show {y} sales per category.",
             "What revenue did each product category bring in {y}?",
             "How much did each category sell in {y}?",
             "Category revenue totals, {y}."],
     "sql": "SELECT p.category, SUM(o.amount) FROM orders o JOIN products p ON p.id = o.product_id "
            "WHERE strftime('%Y', o.order_date) = '{y}' GROUP BY p.category;"},
    {"slots": {"pl": PLANS, "r": list(REGIONS)},
     "ask": ["How many {pl} plan users are in {R}?",
             "Count users on the {pl} plan in {R}.",
             "Number of {R} customers on {pl}.",
             "How many people in {R} have the {pl} plan?",
             "Count {R} users whose plan is {pl}.",
             "How many users in {R} are on {pl}?",
             "What is the {pl}-plan user count for {R}?",
             "{pl} subscribers located in {R}: how many?"],
     "sql": "SELECT COUNT(*) FROM users WHERE plan = '{pl}' AND region = '{r}';"},
    {"slots": {"n": ["3", "5", "10"], "r": list(REGIONS)},
     "ask": ["Who are the top {n} customers by spend in {R}?",
             "List the {n} biggest spenders from {R}.",
             "Top {n} {R} customers ranked by total order amount.",
             "Which {n} users in {R} spent the most?",
             "Rank {R} customers by total spend and show the top {n}.",
             "Who spent the most in {R}? Top {n}.",
             "Show the {n} highest-spending customers in {R}.",
             "Best {n} customers in {R} by revenue."],
     "sql": "SELECT u.name, SUM(o.amount) AS total FROM orders o JOIN users u ON u.id = o.user_id "
            "WHERE u.region = '{r}' GROUP BY u.name ORDER BY total DESC LIMIT {n};"},
    {"slots": {"s": STATUSES, "y": YEARS, "m": list(MONTHS)},
     "ask": ["How many {s} orders were placed in {M} {y}?",
             "Count the {s} orders from {M} {y}.",
             "Number of orders with status {s} in {M} {y}.",
             "How many orders in {M} {y} are {s}?",
             "Count orders placed in {M} {y} with status {s}.",
             "How many {M} {y} orders have the status {s}?",
             "In {M} {y}, how many orders ended up {s}?",
             "{s} order count for {M} {y}?"],
     "sql": "SELECT COUNT(*) FROM orders WHERE status = '{s}' AND order_date >= '{y}-{m}-01' "
            "AND order_date < '{next}';"},
    {"slots": {"n": ["3", "5", "10"], "c": CATEGORIES},
     "ask": ["What are the {n} most expensive {c} products?",
             "List the {n} priciest {c} items.",
             "Show the top {n} {c} products by price.",
             "Which {n} {c} products cost the most?",
             "Top {n} {c} products ordered by price, highest first.",
             "Show the {n} most costly {c} items.",
             "Give me the {n} highest-priced products in {c}.",
             "Most expensive {c} products, top {n}."],
     "sql": "SELECT name, price FROM products WHERE category = '{c}' ORDER BY price DESC LIMIT {n};"},
    {"slots": {"y": YEARS},
     "ask": ["Show the monthly revenue for {y}.",
             "Revenue per month in {y}.",
             "Month-by-month sales for {y}.",
             "What was the revenue in each month of {y}?",
             "For each month of {y}, what was the revenue?",
             "Monthly {y} revenue, please.",
             "Give me {y} revenue broken down by month.",
             "{y} sales totals per month?"],
     "sql": "SELECT strftime('%m', order_date) AS month, SUM(amount) FROM orders "
            "WHERE strftime('%Y', order_date) = '{y}' GROUP BY month ORDER BY month;"},
]
HELD_OUT_PHRASINGS = 2


def _combos(slots: dict) -> list[dict]:
    combos = [{}]
    for name, values in slots.items():
        combos = [{**c, name: v} for c in combos for v in values]
    return combos


def _fill(text: str, values: dict) -> str:
    extra = {}
    if "r" in values:
        extra["R"] = REGIONS[values["r"]]
    if "m" in values:
        extra["M"] = MONTHS[values["m"]]
        extra["next"] = _next_month(values["y"], values["m"])
    return text.format(**values, **extra)


def _bucket(key: str) -> int:
    return int(hashlib.sha256(key.encode()).hexdigest(), 16) % 100


def top_up(train: list[dict], share: int, seen: set[str]) -> list[dict]:
    """Training with the intents that hold-out values starved topped up to `share` rows each (any value, training
    phrasings only), shuffled again.

    Its own random stream, so validation and test are drawn exactly as before it existed."""
    rng = random.Random(13)
    rows = list(train)
    for i, intent in enumerate(INTENTS):
        missing = share - sum(1 for row in train if row["intent"] == i)
        if missing <= 0:
            continue
        fresh = [{"prompt": question, "completion": _fill(intent["sql"], values), "intent": i}
                 for values in _combos(intent["slots"]) for phrasing in intent["ask"][:-HELD_OUT_PHRASINGS]
                 if (question := _fill(phrasing, values)) not in seen]
        rng.shuffle(fresh)
        rows += fresh[:missing]
        seen.update(row["prompt"] for row in fresh[:missing])
    rng.shuffle(rows)
    return rows


def build_examples(db: Path, n_train: int = 600, n_val: int = 100, n_test: int = 100) -> dict[str, list[dict]]:
    rng = random.Random(11)
    con = sqlite3.connect(db)
    pools: dict[str, list[tuple[int, dict]]] = {"train": [], "heldout": []}
    for i, intent in enumerate(INTENTS):
        for values in _combos(intent["slots"]):
            sql = _fill(intent["sql"], values)
            if not con.execute(sql).fetchall():
                continue  # every reference must return rows
            key = f"{i}:{json.dumps(values, sort_keys=True)}"
            # ~35% of the value combinations are reserved for val/test (at least 2 per intent)
            pools["heldout" if _bucket(key) < 35 else "train"].append((i, values))
    for i in range(len(INTENTS)):  # make sure every intent has held-out combinations
        if sum(1 for j, _ in pools["heldout"] if j == i) < 2:
            moved = [c for c in pools["train"] if c[0] == i][:2]
            pools["train"] = [c for c in pools["train"] if c not in moved]
            pools["heldout"] += moved
    con.close()

    def make(pool, phrasing_range, n, seen):
        """n examples, intents taken in turn (balanced), a random value combination of each."""
        by_intent: dict[int, list[dict]] = {}
        for i, values in pool:
            by_intent.setdefault(i, []).append(values)
        intents = sorted(by_intent)
        rows = []
        attempts = 0
        while len(rows) < n and attempts < n * 50:
            i = intents[attempts % len(intents)]
            attempts += 1
            values = rng.choice(by_intent[i])
            phrasing = rng.choice(INTENTS[i]["ask"][phrasing_range])
            question = _fill(phrasing, values)
            if question in seen:
                continue
            seen.add(question)
            rows.append({"prompt": question, "completion": _fill(INTENTS[i]["sql"], values), "intent": i})
        rng.shuffle(rows)
        return rows

    seen: set[str] = set()
    train = make(pools["train"], slice(0, -HELD_OUT_PHRASINGS), n_train, seen)
    train = top_up(train, -(-n_train // len(INTENTS)), seen)
    rng.shuffle(pools["heldout"])
    half = len(pools["heldout"]) // 2
    val = make(pools["heldout"][:half], slice(-HELD_OUT_PHRASINGS, None), n_val, seen)
    test = make(pools["heldout"][half:], slice(-HELD_OUT_PHRASINGS, None), n_test, seen)
    return {"train": train, "val": val, "test": test}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "data")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    build_database(args.out / "analytics.db")
    splits = build_examples(args.out / "analytics.db")
    for name, rows in splits.items():
        with open(args.out / f"{name}.jsonl", "w", encoding="utf-8") as fh:
            for row in rows:
                fh.write(json.dumps({"prompt": row["prompt"], "completion": row["completion"]}) + "\n")
        print(f"{name}: {len(rows)} examples")


if __name__ == "__main__":
    main()
