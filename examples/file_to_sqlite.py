"""File -> transform -> SQLite: load a CSV file of orders into a database.

Each CSV row (a dict of strings) is cleaned and typed, rows that cannot be parsed
are skipped and counted, and the rest go into SQLite 500 rows per transaction.

    python examples/file_to_sqlite.py [orders.csv] [--db orders.db]

Without a CSV file it writes a sample one (with a few broken rows) first.
"""

import argparse
import csv
import random
import sqlite3
import tempfile
from pathlib import Path

import nanostream as ns


@ns.transform(on_error="skip")            # a row that fails to parse is skipped, counted
def clean(row):
    """CSV gives strings: convert the types and tidy the text."""
    return {
        "id": int(row["id"]),
        "customer": row["customer"].strip().title(),
        "amount": round(float(row["amount"]), 2),
        "country": row["country"].strip().upper() or None,
    }


def write_sample(path, rows=5000, seed=0):
    rnd = random.Random(seed)
    with open(path, "w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["id", "customer", "amount", "country"])
        for i in range(rows):
            amount = f"{rnd.uniform(1, 500):.2f}" if i % 1000 != 999 else "n/a"  # broken rows
            out.writerow([i, f"  customer {rnd.randrange(50)} ", amount,
                          rnd.choice(["fr", "de", "us", ""])])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("csv", nargs="?", help="input CSV with id,customer,amount,country")
    parser.add_argument("--db", help="SQLite file to write (default: a temporary one)")
    args = parser.parse_args(argv)

    workdir = Path(tempfile.mkdtemp(prefix="nanostream-example-"))
    source = args.csv or workdir / "orders.csv"
    if not args.csv:
        write_sample(source)
    db = args.db or str(workdir / "orders.db")

    with sqlite3.connect(db) as con:
        con.execute("CREATE TABLE IF NOT EXISTS orders (id INTEGER PRIMARY KEY, customer TEXT, "
                    "amount REAL, country TEXT)")

    pipeline = ns.read_csv(str(source)) | clean | ns.sql_sink(db, "orders", batch_size=500)
    print(pipeline)
    report = pipeline.run()
    print(report)

    with sqlite3.connect(db) as con:
        count, total = con.execute("SELECT count(*), sum(amount) FROM orders").fetchone()
    print(f"{count} orders loaded into {db} (total amount {total:,.2f}); "
          f"{report['clean'].errors} broken rows skipped")


if __name__ == "__main__":
    main()
