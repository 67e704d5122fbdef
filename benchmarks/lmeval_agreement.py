"""How many of a config's lm-eval generations equal a baseline's: ``--log_samples`` outputs, prompt by prompt.

    python benchmarks/lmeval_agreement.py runs/gsm8k/lmeval_fp16 runs/gsm8k/lmeval_3.25 runs/gsm8k/lmeval_4.0

The first folder is the baseline. Per config: prompts whose whole generation is the baseline's, and prompts whose
extracted answer (the ``flexible-extract`` filter) is.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def generations(folder: Path) -> dict[int, tuple[str, str]]:
    """doc_id -> (generation, flexible-extract answer) from the one samples file under ``folder``."""
    files = sorted(folder.rglob("samples_*.jsonl"))
    if len(files) != 1:
        raise SystemExit(f"{folder}: expected one samples_*.jsonl (lm-eval --log_samples), found {len(files)}")
    rows = {}
    for line in files[0].read_text().splitlines():
        sample = json.loads(line)
        if sample["filter"] == "flexible-extract":
            rows[sample["doc_id"]] = (sample["resps"][0][0], sample["filtered_resps"][-1])
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folders", nargs="+", type=Path, help="lm-eval --output_path folders; the first is the baseline")
    args = ap.parse_args()
    base = generations(args.folders[0])
    for folder in args.folders[1:]:
        got = generations(folder)
        if got.keys() != base.keys():
            raise SystemExit(f"{folder} scored other prompts than {args.folders[0]}")
        same = sum(got[i][0] == base[i][0] for i in base)
        answer = sum(got[i][1] == base[i][1] for i in base)
        print(f"{folder.name}: same generation {same}/{len(base)}, same flexible answer {answer}/{len(base)}")


if __name__ == "__main__":
    main()
