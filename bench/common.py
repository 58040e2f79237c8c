"""What the benchmark scripts share: held-out windows, perplexity at several sizes, one pass run and
measured, and the results JSON with its Markdown table. No benchmark script imports another."""

import json
import time
from pathlib import Path

import hf_compress as hfc
from hf_compress.evaluate import perplexity


def save_and_print(out: Path, name: str, results: dict, columns: list[str], rows: dict[str, list[str]]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))
    print("\n| method | " + " | ".join(columns) + " |")
    print("|---" * (len(columns) + 1) + "|")
    for method, cells in rows.items():
        print(f"| {method} | " + " | ".join(cells) + " |")


def perplexity_splits(tokenizer, test: int, validation: int, out_of_domain: int) -> dict:
    """512-token windows: test = the first `test` of the pydoc test split, validation = the
    last `validation` of its validation split, out-of-domain = the first `out_of_domain` of the
    news corpus' test split (news is in no builtin calibration set). Pydoc, not `builtin`, so
    that figures stay comparable across changes of the default corpus."""
    return {"test": hfc.calibration_data(tokenizer, "builtin:pydoc", seq_len=512, split="test")[:test],
            "validation": hfc.calibration_data(tokenizer, "builtin:pydoc", seq_len=512,
                                               split="validation")[-validation:],
            "out-of-domain": hfc.calibration_data(tokenizer, "builtin:news", seq_len=512, split="test",
                                                  max_windows=out_of_domain)}


def measure(build, ratios, splits) -> dict:
    """Perplexity of build(ratio) on every split, at every ratio."""
    return {str(r): {name: round(perplexity(build(r), windows)["perplexity"], 3) for name, windows in splits.items()}
            for r in ratios}


def run_pass(source, data, ratios, splits, **settings) -> tuple[dict, hfc.CompressibleModel]:
    model, _ = hfc.load_model(source)
    start = time.perf_counter()
    cm = hfc.acip(model, data, stop_ratio=0.4, batch_size=4, show_progress=False, **settings)
    record = {"pass_seconds": round(time.perf_counter() - start, 1), "steps": cm.summary["steps"],
              "final_ratio": round(cm.summary["final_ratio"], 4), "sizes": measure(cm.materialize, ratios, splits)}
    print(settings, record, flush=True)
    return record, cm
