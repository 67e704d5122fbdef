"""Several searches' Pareto fronts, effective bits (real bytes) vs held-out KL, in one plot.

    python benchmarks/compare_fronts.py "KIVI pairs=runs/old/search.json" "with KVQuant=runs/demo/search.json" \
        --out runs/fronts.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from kvtuner.search.plots import fronts_figure


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="LABEL=path/to/search.json")
    parser.add_argument("--out", type=Path, default=Path("runs/fronts.png"))
    args = parser.parse_args()
    runs = {}
    for item in args.runs:
        label, sep, path = item.partition("=")
        if not sep:
            parser.error(f"{item!r}: expected LABEL=path/to/search.json")
        try:
            runs[label] = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as e:
            parser.error(f"{path}: cannot read ({e})")
    for label, run in runs.items():
        print(f"{label}:")
        for p in sorted(run["front"], key=lambda p: p.get("effective_bits") or 0):
            print(f"  {p['name']:<14} nominal {p['avg_bits']:.3f}  effective {p.get('effective_bits') or float('nan'):.3f}  "
                  f"held-out KL {p.get('heldout') or float('nan'):.3e}")
    try:
        print(f"written: {fronts_figure(runs, args.out)}")
    except ValueError as e:
        parser.error(str(e))


if __name__ == "__main__":
    main()
