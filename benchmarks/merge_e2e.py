"""Merge the rows of a GPU run's ``e2e_MODEL.json`` into ``benchmarks/results/e2e_MODEL.json``.

A row replaces the committed row of the same recipe and seq. ``&report=PATH`` (a run's own output path) is dropped
from recipe names, each merged row gets ``measured`` (its run's date), and ``--note SUFFIX@SEQ TEXT`` attaches a
note to the rows whose recipe ends with SUFFIX (``@SEQ`` optional). ``--skip SUFFIX`` leaves a recipe's new rows
out (e.g. a rival measured on a slower host than the committed row). The run's command and date are appended to
the results' meta. ``--into offload.json`` merges into another results file of the same layout.

    python benchmarks/merge_e2e.py /work/.device/2/a/e2e_llama3-8b.json \\
        --note "offload-layers&cudagraphs=true@2048" "one H100, ..." --skip bnb/unsloth
"""
from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def clean_recipe(recipe: str) -> str:
    return re.sub(r"&report=[^,&]*", "", recipe)


def parse_note(key: str, text: str) -> tuple[str, int | None, str]:
    suffix, _, seq = key.partition("@")
    if seq and not seq.isdigit():
        raise SystemExit(f"--note wants SUFFIX[@SEQ] TEXT with SEQ a number, got {key!r}")
    return suffix, int(seq) if seq else None, text


def merge(target: dict, run: dict, notes: list[tuple[str, int | None, str]], skip: list[str]) -> list[str]:
    """Merge ``run``'s rows into ``target`` in place; returns what was merged, one line a row."""
    merged = []
    for row in run["rows"]:
        row = dict(row, recipe=clean_recipe(row["recipe"]), measured=run["meta"]["date"])
        if any(row["recipe"].endswith(suffix) for suffix in skip):
            continue
        for suffix, seq, text in notes:
            if row["recipe"].endswith(suffix) and seq in (None, row["seq"]):
                row["note"] = text
        target["rows"] = [r for r in target["rows"] if (r["recipe"], r["seq"]) != (row["recipe"], row["seq"])]
        target["rows"].append(row)
        merged.append(f"{row['seq']} {row['recipe']}: {row.get('peak_gib')} GiB, {row.get('tok_s')} tok/s"
                      + (" (noted)" if row.get("note") else ""))
    meta = target["meta"]
    for key, value in (("date", run["meta"]["date"]), ("command", clean_recipe(run["meta"]["command"]))):
        listed = meta[key] if isinstance(meta.get(key), list) else [meta[key]] if key in meta else []
        if merged and value not in listed:  # a run merged twice (other rows, another file) is listed once
            meta[key] = listed + [value]
    return merged


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", help="a GPU run's e2e_MODEL.json")
    parser.add_argument("--note", action="append", nargs=2, default=[], metavar=("SUFFIX[@SEQ]", "TEXT"))
    parser.add_argument("--into", default=None, help="results file to merge into (default: the run's file name)")
    parser.add_argument("--skip", action="append", default=[], help="leave out recipes ending with this")
    args = parser.parse_args()
    run = json.loads(Path(args.run).read_text())
    path = RESULTS / (args.into or Path(args.run).name)
    target = json.loads(path.read_text())
    for line in merge(target, run, [parse_note(*n) for n in args.note], args.skip):
        print(line)
    path.write_text(json.dumps(target, indent=2) + "\n")


if __name__ == "__main__":
    main()
