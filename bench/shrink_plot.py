"""One picture of the shrink benchmark: test perplexity against size for every method, one panel
per model (and with heads), from all the bench/shrink_demo.py results in a folder (a partial run
such as `--rows torque --tag torque` joins its full run's panel).

    python bench/shrink_plot.py            # reads and writes bench/results (shrink_demo.png)
"""

import argparse
import json
from pathlib import Path

HERE = Path(__file__).parent
SKIP = ("variance repair", "dropped misfits", "fold's widths")  # measured options, kept off the picture


def panels(folder: Path) -> dict[str, dict]:
    """Panel title -> {"dense": test perplexity, "runs": method -> {size: test perplexity}}."""
    merged: dict[str, dict] = {}
    for path in sorted(folder.glob("shrink_demo*.json")):
        results = json.loads(path.read_text())
        protocol = results["protocol"]
        title = protocol["model"] + (", MLP channels and head groups" if protocol["heads"] else ", MLP channels")
        panel = merged.setdefault(title, {"dense": results["dense"]["test"], "runs": {}})
        for name, cells in results["runs"].items():
            if not any(word in name for word in SKIP):
                panel["runs"].setdefault(name.removesuffix(" + heads"), {}).update(
                    {float(size): cell["test"] for size, cell in cells.items()})
    return merged


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--folder", type=Path, default=HERE / "results")
    args = parser.parse_args()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    found = panels(args.folder)
    names = sorted({name for panel in found.values() for name in panel["runs"]})
    colors = dict(zip(names, plt.get_cmap("tab20").colors))  # a method keeps its colour across panels
    fig, axes = plt.subplots(1, len(found), figsize=(6 * len(found), 4.8), squeeze=False)
    for ax, (title, panel) in zip(axes[0], found.items()):
        for name, points in sorted(panel["runs"].items()):
            sizes = sorted(points, reverse=True)
            ax.plot(sizes, [points[s] for s in sizes], marker="o", label=name, color=colors[name],
                    linestyle="--" if "ACIP" in name else "-")
        ax.axhline(panel["dense"], color="gray", linestyle=":", label="dense")
        ax.set(yscale="log", xlabel="size (fraction of the units kept)", ylabel="test perplexity (log scale)",
               title=title)
        ax.invert_xaxis()
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(args.folder / "shrink_demo.png", dpi=110)
    print(f"wrote {args.folder / 'shrink_demo.png'}")


if __name__ == "__main__":
    main()
