"""Which builtin calibration set serves a user whose text we do not know: the default pass (and
its whitening) calibrated on each builtin corpus, measured on every domain.

Every pass has the same budget; only its calibration windows differ. Perplexity windows of 512
tokens: the validation split of each domain decides (mean log perplexity over domains and
sizes: every domain counts the same, whatever its dense perplexity), the test split is reported.
`news` is in no calibration set: the domain nobody calibrated on. Writes OUT/calibration_demo.json
and prints the Markdown.

    python bench/calibration_demo.py                          # ~25 min on 2 cores
    python bench/calibration_demo.py --model demo:gemma3 --out bench/results/gemma3
"""

import argparse
import math
import statistics
from pathlib import Path

import torch

import hf_compress as hfc
from hf_compress.evaluate import perplexity, versions

from common import run_pass, save_and_print

HERE = Path(__file__).parent


def domain_splits(tokenizer, domains: list[str], windows: int) -> dict:
    """'domain/split' -> windows: the first of each test split, the last of each validation split."""
    splits = {}
    for domain in domains:
        source = f"builtin:{domain}"
        splits[f"{domain}/test"] = hfc.calibration_data(tokenizer, source, seq_len=512, split="test")[:windows]
        splits[f"{domain}/validation"] = hfc.calibration_data(tokenizer, source, seq_len=512,
                                                              split="validation")[-windows:]
    return splits


def choice_score(sizes: dict, domains: list[str]) -> float:
    """Mean log validation perplexity over every domain and size."""
    return statistics.mean(math.log(cells[f"{d}/validation"]) for cells in sizes.values() for d in domains)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="demo")
    parser.add_argument("--calibrations", default="builtin:pydoc,builtin:wiki,builtin:mix")
    parser.add_argument("--domains", default="pydoc,wiki,news")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--ratios", default="0.9,0.8,0.6")
    parser.add_argument("--windows", type=int, default=4, help="512-token windows per domain and split")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args()
    ratios = [float(r) for r in args.ratios.split(",")]
    domains = args.domains.split(",")

    model, tokenizer = hfc.load_model(args.model)
    splits = domain_splits(tokenizer, domains, args.windows)
    results = {"protocol": {"model": args.model, "steps": args.steps, "seq_len": args.seq_len, "batch_size": 4,
                            "windows_of_512": args.windows}, "versions": versions(),
               "dense": {name: round(perplexity(model, w)["perplexity"], 3) for name, w in splits.items()},
               "runs": {}}
    del model
    for source in args.calibrations.split(","):
        data = hfc.calibration_data(tokenizer, source, seq_len=args.seq_len)
        record, _ = run_pass(args.model, data, ratios, splits, max_steps=args.steps, seed=0)
        results["runs"][source] = record | {"validation_score": round(choice_score(record["sizes"], domains), 4)}
    results["choice"] = min(results["runs"], key=lambda s: results["runs"][s]["validation_score"])

    columns = [f"{r} {d}" for r in ratios for d in domains] + ["validation score"]
    rows = {"dense": [f"{results['dense'][f'{d}/test']:.1f}" for _ in ratios for d in domains] + ["-"]}
    for source, record in results["runs"].items():
        rows[f"calibrated on {source}"] = [f"{record['sizes'][str(r)][f'{d}/test']:.1f}" for r in ratios
                                           for d in domains] + [f"{record['validation_score']:.3f}"]
    save_and_print(args.out, "calibration_demo", results, columns, rows)
    print(f"\nbest on validation (mean log perplexity over {', '.join(domains)} and sizes): {results['choice']}")


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
