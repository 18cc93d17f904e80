"""Build the text-to-SQL example: an SQLite analytics database and question -> SQL pairs.

Deterministic (fixed seeds): running it again rewrites byte-identical files.
Every reference query is executed against the database while generating and must
return at least one row. The split measures the *skill*, not memory:

- each intent has fourteen phrasings; two per intent, drawn by a seeded random choice
  (`held_out_phrasings`), are held out of training and used only for validation and test;
- each (intent, values) combination lands in exactly one split, so no test question
  asks for a value combination that training saw — except for intents with so few
  combinations (one of five years, one of three top-n's left to training) that training
  would see a handful of rows of them: those are topped up to an even share of training
  from all their values, in training phrasings only, so their held-out questions differ
  from training by phrasing alone (`skilltune data audit` flags the handful as
  `rare_shapes`).

A month filter is a range whose upper bound SQLite computes, `d < date('Y-MM-01', '+1 month')`, rather than a
literal next month: with the literal, the tuned Gemma 3 270M got every December question of validation wrong in all
four runs of bench/NOTES.md session 17 (the year does not carry). Each query returns the same rows either way.

Usage: python examples/sql/generate.py [--out examples/sql/data]
"""

from __future__ import annotations

import argparse
import functools
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


# Each intent: value slots, phrasings (two of them, drawn by `held_out_phrasings`, are kept out of training) and the
# reference SQL. Fourteen phrasings each: the first eight are the original set; the last six per intent were added
# later, to one recipe for every intent ("Could you ...?", "Get ...", "{slot}: ...?", a How/Which question,
# "I need ...", the slot first).
INTENTS = [
    {"slots": {"r": list(REGIONS)},
     "ask": ["How many users are in {R}?",
             "Count the users from {R}.",
             "What is the number of users based in {R}?",
             "Give me the user count for {R}.",
             "How many accounts are registered in {R}?",
             "Tell me how many users {R} has.",
             "How many customers do we have in {R}?",
             "Number of {R} users?",
             "Could you tell me the number of users in {R}?",
             "Get the total user count in {R}.",
             "{R}: how many users?",
             "How large is our user base in {R}?",
             "I need the count of users located in {R}.",
             "In {R}, how many users are there?"],
     "sql": "SELECT COUNT(*) FROM users WHERE region = '{r}';"},
    {"slots": {"r": list(REGIONS), "y": YEARS},
     "ask": ["List the names of users in {R} who signed up in {y}.",
             "Which {R} users joined in {y}?",
             "Show users from {R} with a {y} signup date.",
             "Names of users who registered in {y} in {R}.",
             "Names of {R} users whose signup year is {y}.",
             "Which users in {R} registered during {y}?",
             "Who signed up from {R} during {y}?",
             "Find the {y} signups located in {R}.",
             "Could you list the {R} users who signed up in {y}?",
             "Get the names of everyone in {R} who joined in {y}.",
             "{y} signups from {R}: names, please.",
             "Who are the users from {R} that registered in {y}?",
             "I need the names of {R} users who joined during {y}.",
             "In {y}, which users from {R} signed up?"],
     "sql": "SELECT name FROM users WHERE region = '{r}' AND strftime('%Y', signup_date) = '{y}';"},
    {"slots": {"y": YEARS, "m": list(MONTHS)},
     "ask": ["How many signups did each region get in {M} {y}?",
             "Signups by region for {M} {y}.",
             "Break down {M} {y} signups per region.",
             "Count new users per region in {M} {y}.",
             "For {M} {y}, how many users joined in each region?",
             "Show new signups per region during {M} {y}.",
             "What were the {M} {y} registrations by region?",
             "Per-region signup counts, {M} {y}.",
             "Could you count the signups in each region for {M} {y}?",
             "Get the number of new users by region for {M} {y}.",
             "{M} {y}: signups per region?",
             "How did {M} {y} signups split across regions?",
             "I need new-user counts for each region in {M} {y}.",
             "In {M} {y}, how many people registered per region?"],
     "sql": "SELECT region, COUNT(*) FROM users WHERE signup_date >= '{y}-{m}-01' "
            "AND signup_date < date('{y}-{m}-01', '+1 month') GROUP BY region;"},
    {"slots": {"y": YEARS},
     "ask": ["What was the total revenue in {y}?",
             "Sum of all order amounts in {y}.",
             "Total sales for {y}?",
             "How much revenue did we make in {y}?",
             "Total order amount for the year {y}.",
             "What did all {y} orders add up to?",
             "Give me {y} revenue.",
             "Overall order value in {y}?",
             "Could you give me the total revenue for {y}?",
             "Calculate the {y} revenue total.",
             "{y}: total revenue?",
             "How much money did orders bring in during {y}?",
             "I need the sum of order amounts for {y}.",
             "In {y}, what was our total revenue?"],
     "sql": "SELECT SUM(amount) FROM orders WHERE strftime('%Y', order_date) = '{y}';"},
    {"slots": {"n": ["3", "5", "10"]},
     "ask": ["What are the top {n} products by revenue?",
             "List the {n} best-selling products by sales amount.",
             "Show the {n} products that earned the most.",
             "Top {n} products ranked by total revenue.",
             "Rank products by revenue and show the top {n}.",
             "Which are the {n} top-earning products?",
             "Which {n} products brought in the most money?",
             "Highest-revenue products, top {n}.",
             "Could you show the top {n} products by revenue?",
             "Get the {n} products with the highest total sales.",
             "Top {n} by revenue: which products?",
             "Which {n} products generated the most revenue?",
             "I need the {n} highest-grossing products.",
             "By total revenue, what are the top {n} products?"],
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
             "{y} orders grouped by status?",
             "Could you count the orders in each status for {y}?",
             "Get the number of {y} orders per status.",
             "{y}: orders by status?",
             "How were the {y} orders spread across statuses?",
             "I need order counts by status for {y}.",
             "In {y}, how many orders were in each status?"],
     "sql": "SELECT status, COUNT(*) FROM orders WHERE strftime('%Y', order_date) = '{y}' GROUP BY status;"},
    {"slots": {"c": CATEGORIES, "p": ["50", "100", "200", "300"]},
     "ask": ["Which {c} products cost less than {p} dollars?",
             "List {c} items under ${p}.",
             "Show {c} products priced below {p}.",
             "Find cheap {c} products, under {p}.",
             "Show me {c} products that are cheaper than {p}.",
             "{c} items costing under {p}?",
             "What {c} products can I buy for less than {p}?",
             "{c} products with a price below {p}, please.",
             "Could you list {c} products under {p} dollars?",
             "Get the {c} products with a price under {p}.",
             "{c} under {p}: which products?",
             "Which {c} products are priced lower than {p}?",
             "I need {c} items that cost less than {p}.",
             "Under {p} dollars, what {c} products are there?"],
     "sql": "SELECT name, price FROM products WHERE category = '{c}' AND price < {p} ORDER BY price;"},
    {"slots": {"y": YEARS},
     "ask": ["What is the average order amount per region in {y}?",
             "Average order value by region for {y}.",
             "Mean order amount in each region during {y}.",
             "Per-region average order size in {y}.",
             "For each region, what was the mean order amount in {y}?",
             "Average {y} order amount grouped by region.",
             "How big is the average {y} order in each region?",
             "Region-wise average order amount, {y}.",
             "Could you show the average order amount by region for {y}?",
             "Get the mean {y} order value for each region.",
             "{y}: average order amount per region?",
             "On average, how much did a {y} order come to in each region?",
             "I need the average order size per region in {y}.",
             "In {y}, what was the average order amount in each region?"],
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
             "Category revenue totals, {y}.",
             "Could you break down {y} sales by category?",
             "Get the revenue of each product category in {y}.",
             "{y}: revenue per category?",
             "How did {y} revenue split across product categories?",
             "I need category-level revenue for {y}.",
             "In {y}, how much revenue did each category make?"],
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
             "{pl} subscribers located in {R}: how many?",
             "Could you count the {pl} users in {R}?",
             "Get the number of {R} users on the {pl} plan.",
             "{R}, {pl} plan: how many users?",
             "How many {R} accounts are on the {pl} plan?",
             "I need the count of {pl}-plan users in {R}.",
             "In {R}, how many users are subscribed to {pl}?"],
     "sql": "SELECT COUNT(*) FROM users WHERE plan = '{pl}' AND region = '{r}';"},
    {"slots": {"n": ["3", "5", "10"], "r": list(REGIONS)},
     "ask": ["Who are the top {n} customers by spend in {R}?",
             "List the {n} biggest spenders from {R}.",
             "Top {n} {R} customers ranked by total order amount.",
             "Which {n} users in {R} spent the most?",
             "Rank {R} customers by total spend and show the top {n}.",
             "Who spent the most in {R}? Top {n}.",
             "Show the {n} highest-spending customers in {R}.",
             "Best {n} customers in {R} by revenue.",
             "Could you list the top {n} spenders in {R}?",
             "Get the {n} {R} customers with the highest total spend.",
             "{R}: top {n} customers by spend?",
             "Which {n} customers from {R} have spent the most money?",
             "I need the {n} biggest customers in {R} by order amount.",
             "In {R}, who are the {n} customers with the largest total spend?"],
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
             "{s} order count for {M} {y}?",
             "Could you count the {s} orders placed in {M} {y}?",
             "Get the number of {s} orders for {M} {y}.",
             "{M} {y}: how many orders are {s}?",
             "How many orders from {M} {y} have status {s}?",
             "I need the count of {M} {y} orders with status {s}.",
             "In {M} {y}, what number of orders were {s}?"],
     "sql": "SELECT COUNT(*) FROM orders WHERE status = '{s}' AND order_date >= '{y}-{m}-01' "
            "AND order_date < date('{y}-{m}-01', '+1 month');"},
    {"slots": {"n": ["3", "5", "10"], "c": CATEGORIES},
     "ask": ["What are the {n} most expensive {c} products?",
             "List the {n} priciest {c} items.",
             "Show the top {n} {c} products by price.",
             "Which {n} {c} products cost the most?",
             "Top {n} {c} products ordered by price, highest first.",
             "Show the {n} most costly {c} items.",
             "Give me the {n} highest-priced products in {c}.",
             "Most expensive {c} products, top {n}.",
             "Could you show the {n} most expensive {c} products?",
             "Get the {n} {c} items with the highest price.",
             "{c}: top {n} by price?",
             "Which {n} {c} items have the highest prices?",
             "I need the {n} priciest products in {c}.",
             "By price, what are the top {n} {c} products?"],
     "sql": "SELECT name, price FROM products WHERE category = '{c}' ORDER BY price DESC LIMIT {n};"},
    {"slots": {"y": YEARS},
     "ask": ["Show the monthly revenue for {y}.",
             "Revenue per month in {y}.",
             "Month-by-month sales for {y}.",
             "What was the revenue in each month of {y}?",
             "For each month of {y}, what was the revenue?",
             "Monthly {y} revenue, please.",
             "Give me {y} revenue broken down by month.",
             "{y} sales totals per month?",
             "Could you show revenue for each month of {y}?",
             "Get the {y} revenue per month.",
             "{y}: revenue by month?",
             "How did revenue change month to month in {y}?",
             "I need monthly revenue totals for {y}.",
             "In {y}, what was the revenue month by month?"],
     "sql": "SELECT strftime('%m', order_date) AS month, SUM(amount) FROM orders "
            "WHERE strftime('%Y', order_date) = '{y}' GROUP BY month ORDER BY month;"},
]
HELD_OUT_PHRASINGS = 2


@functools.cache
def held_out_phrasings(i: int) -> list[str]:
    """The phrasings of intent `i` kept for validation and test: a seeded random draw, so nobody picks which
    phrasings the benchmark holds out (its own random stream per intent)."""
    return random.Random(f"held-out:{i}").sample(INTENTS[i]["ask"], HELD_OUT_PHRASINGS)


@functools.cache
def training_phrasings(i: int) -> list[str]:
    held_out = held_out_phrasings(i)
    return [phrasing for phrasing in INTENTS[i]["ask"] if phrasing not in held_out]


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
                 for values in _combos(intent["slots"]) for phrasing in training_phrasings(i)
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

    def make(pool, phrasings, n, seen):
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
            phrasing = rng.choice(phrasings(i))
            question = _fill(phrasing, values)
            if question in seen:
                continue
            seen.add(question)
            rows.append({"prompt": question, "completion": _fill(INTENTS[i]["sql"], values), "intent": i})
        rng.shuffle(rows)
        return rows

    seen: set[str] = set()
    train = make(pools["train"], training_phrasings, n_train, seen)
    train = top_up(train, -(-n_train // len(INTENTS)), seen)
    rng.shuffle(pools["heldout"])
    half = len(pools["heldout"]) // 2
    val = make(pools["heldout"][:half], held_out_phrasings, n_val, seen)
    test = make(pools["heldout"][half:], held_out_phrasings, n_test, seen)
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
