"""Does the global allocation's data-free cost rank blocks as real text does? Each block's MLP is
folded alone to --ratio; per block: validation perplexity of the whole model (the truth), and the
relative squared error at the block's output on random token ids (what `--layers global` uses)
and on calibration text. Prints both Spearman rank correlations with the truth.

    python bench/allocation_probe.py                        # ~5 min on 2 cores
    python bench/allocation_probe.py --model demo:gemma3    # ~12 min
"""

import argparse
import copy
import json
from pathlib import Path

import torch

import hf_compress as hfc
from hf_compress.evaluate import perplexity, versions
from hf_compress.layers import decoder_blocks
from hf_compress.shrink import FoldConfig
from hf_compress.shrink.allocate import PROBE_LENGTH, PROBE_WINDOWS, SiteCost, block_inputs, random_windows
from hf_compress.shrink.kmeans import KMeansFold
from hf_compress.shrink.rewrite import kept_units, shrink_site
from hf_compress.shrink.sites import mlp_site

HERE = Path(__file__).parent


def spearman(a: list[float], b: list[float]) -> float:
    ranks = [torch.tensor(x).argsort().argsort().float() for x in (a, b)]
    return float(torch.corrcoef(torch.stack(ranks))[0, 1])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="demo")
    parser.add_argument("--ratio", type=float, default=0.9)
    parser.add_argument("--windows", type=int, default=2, help="512-token validation windows (pydoc)")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args()

    model, tokenizer = hfc.load_model(args.model)
    validation = hfc.calibration_data(tokenizer, "builtin:pydoc", seq_len=512, split="validation")[-args.windows:]
    text = hfc.calibration_data(tokenizer, "builtin:pydoc", seq_len=PROBE_LENGTH)[:PROBE_WINDOWS]
    chosen = KMeansFold(FoldConfig())
    probes = {"random tokens": block_inputs(model, random_windows(model, tokenizer)),
              "calibration text": block_inputs(model, text)}
    dense = perplexity(model, validation)["perplexity"]
    _, blocks = decoder_blocks(model)
    rows = []
    for index, block in enumerate(blocks):
        site = mlp_site(block)
        k = kept_units(args.ratio, site.reads[0].units)
        row = {"block": index} | {name: SiteCost(block, index, site, inputs[index], chosen, 1)(k)
                                  for name, inputs in probes.items()}
        original = copy.deepcopy(block)
        with torch.no_grad():
            shrink_site(block, index, site, args.ratio, chosen)
        row["validation perplexity"] = perplexity(model, validation)["perplexity"]
        blocks[index] = original
        rows.append(row)
        print({key: round(value, 4) for key, value in row.items()}, flush=True)
    truth = [row["validation perplexity"] for row in rows]
    results = {"model": args.model, "ratio": args.ratio, "dense validation perplexity": dense,
               "versions": versions(), "blocks": rows,
               "spearman": {name: round(spearman([row[name] for row in rows], truth), 3) for name in probes}}
    args.out.mkdir(parents=True, exist_ok=True)
    suffix = "" if args.model == "demo" else "_" + args.model.split(":")[-1]
    (args.out / f"allocation_probe{suffix}.json").write_text(json.dumps(results, indent=2))
    print(f"dense {dense:.2f}; Spearman rank correlation with the one-block perplexity: {results['spearman']}")


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
