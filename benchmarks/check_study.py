"""Check a shared study after a distributed search: every profile unit and every trial slot complete exactly once.

    python benchmarks/check_study.py STORAGE_URL STUDY [--front-of OTHER_STUDY]

Prints the counts, each failed trial with the trial that retried it, and (with --front-of) whether the
measured configs and losses of the two studies' fronts agree. Exits 1 when a unit or slot is missing or
complete twice.
"""

import argparse
import sys
from collections import Counter

import optuna
from optuna.trial import TrialState


def complete_once(trials, key):
    counts = Counter(t.user_attrs[key] for t in trials if t.state == TrialState.COMPLETE and key in t.user_attrs)
    queued = {t.user_attrs[key] for t in trials if key in t.user_attrs}
    return counts, queued


def front(study):
    from kvtuner.search.study import measured_trials

    points = sorted((t.user_attrs["avg_bits"], t.values[0], tuple(t.user_attrs["layer_choice"])) for t in measured_trials(study))
    out, best = [], float("inf")
    for bits, loss, choice in points:
        if loss < best:
            out.append((bits, loss, choice))
            best = loss
    return out


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("storage")
    parser.add_argument("study")
    parser.add_argument("--front-of")
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    ok = True
    for name, key in ((f"{args.study}.profile", "unit"), (args.study, "slot")):
        study = optuna.load_study(study_name=name, storage=args.storage)
        trials = study.get_trials(deepcopy=False)
        counts, queued = complete_once(trials, key)
        twice = [k for k, n in counts.items() if n > 1]
        missing = sorted(queued - set(counts), key=str)
        states = Counter(t.state.name for t in trials)
        workers = Counter(t.user_attrs.get("worker") for t in trials if t.state == TrialState.COMPLETE)
        print(f"{name}: {len(queued)} {key}s queued, {len(counts)} complete, {len(twice)} complete twice, "
              f"{len(missing)} missing; trial states {dict(states)}; complete per worker {dict(workers)}")
        for t in trials:
            if t.state == TrialState.FAIL:
                retries = [r.number for r in trials if r.system_attrs.get("failed_trial") == t.number]
                print(f"  trial {t.number} ({key} {t.user_attrs.get(key)}) FAILED, retried by {retries}")
        ok &= not twice and not missing
        if key == "slot":
            feasible = sum(1 for t in trials if t.state == TrialState.COMPLETE and t.user_attrs.get("measured"))
            print(f"  {feasible} complete trials within the limits")
    if args.front_of:
        a = front(optuna.load_study(study_name=args.study, storage=args.storage))
        b = front(optuna.load_study(study_name=args.front_of, storage=args.storage))
        print(f"front of {args.study}: {len(a)} points; of {args.front_of}: {len(b)} points; "
              f"{'identical' if a == b else 'DIFFERENT'}")
        ok &= a == b
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
