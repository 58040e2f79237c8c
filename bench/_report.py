"""Shared by the benchmark scripts: save the results JSON and print the Markdown table."""

import json
from pathlib import Path


def save_and_print(out: Path, name: str, results: dict, columns: list[str], rows: dict[str, list[str]]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))
    print("\n| method | " + " | ".join(columns) + " |")
    print("|---" * (len(columns) + 1) + "|")
    for method, cells in rows.items():
        print(f"| {method} | " + " | ".join(cells) + " |")
