"""Start-up time of the command line: `hf-compress --help` and every `hf-compress COMMAND --help`,
each the median of --runs fresh processes (after one warm-up), and whether torch was imported.

    python bench/startup.py                 # about 30 s
"""

import argparse
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from common import save_and_print

HERE = Path(__file__).parent
COMMANDS = ("", "compress", "plan", "materialize", "quantize", "fold", "prune", "info", "eval", "push")


def seconds(args: list[str], runs: int) -> float:
    times = []
    for run in range(runs + 1):
        start = time.perf_counter()
        subprocess.run(args, check=True, capture_output=True)
        if run:  # the first run warms the file cache
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args()
    exe = shutil.which("hf-compress") or str(Path(sys.executable).with_name("hf-compress"))
    results = {"command": "python bench/startup.py " + " ".join(sys.argv[1:]), "runs": args.runs,
               "help_seconds": {}}
    for command in COMMANDS:
        results["help_seconds"][command or "(none)"] = round(seconds([exe, *filter(None, [command]), "--help"],
                                                                     args.runs), 3)
    probe = "import sys, hf_compress.cli; print('torch' in sys.modules)"
    results["imports_torch"] = subprocess.run([sys.executable, "-c", probe], capture_output=True,
                                              text=True, check=True).stdout.strip() == "True"
    save_and_print(args.out, "startup", results, ["median s"],
                   {f"hf-compress {'' if c == '(none)' else c + ' '}--help": [f"{s:.2f}"]
                    for c, s in results["help_seconds"].items()})


if __name__ == "__main__":
    main()
