"""Fan-out to two sinks: every event goes both to an archive and to a summary.

A log of JSON events is parsed once; each parsed event is then written, in full,
to a compressed JSON-lines archive and, reduced to a few columns, to a CSV file
for a spreadsheet. Both branches see every item; the run ends when both are done.

    python examples/fan_out.py [events.jsonl] [--out DIR]

Without an input file it writes a sample one first.
"""

import argparse
import json
import random
import tempfile
from pathlib import Path

import nanostream as ns


@ns.transform
def summarise(event):
    return {"time": event["time"], "user": event["user"], "action": event["action"]}


def write_sample(path, events=2000, seed=0):
    rnd = random.Random(seed)
    with open(path, "w") as f:
        for i in range(events):
            event = {"time": 1_700_000_000 + i, "user": f"u{rnd.randrange(100)}",
                     "action": rnd.choice(["view", "click", "buy"]),
                     "payload": {"page": rnd.randrange(1000), "ms": rnd.randrange(5000)}}
            f.write(json.dumps(event) + "\n")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("events", nargs="?", help="input JSON-lines file of events")
    parser.add_argument("--out", help="output directory (default: a temporary one)")
    args = parser.parse_args(argv)

    out = Path(args.out or tempfile.mkdtemp(prefix="nanostream-example-"))
    out.mkdir(parents=True, exist_ok=True)
    source = args.events or out / "events.jsonl"
    if not args.events:
        write_sample(source)

    archive = ns.write_jsonl(str(out / "archive.jsonl.gz"))        # gzip, by file name
    summary = summarise | ns.write_csv(str(out / "summary.csv"))
    pipeline = ns.read_jsonl(str(source)) | ns.filter(lambda e: e["action"] != "view") \
        | (archive, summary)                                         # fan-out
    print(pipeline)
    report = pipeline.run()
    print(report)
    archived = sum(1 for _ in ns.read_jsonl(str(out / "archive.jsonl.gz")))
    summarised = sum(1 for _ in ns.read_csv(str(out / "summary.csv")))
    print(f"{archived} events archived, {summarised} rows in the summary, in {out}")


if __name__ == "__main__":
    main()
