"""Review fixes (issue 16, item 4): the Optuna pin, over-limit trials, the resume identity, incremental reads."""

import tomllib
from collections import Counter
from pathlib import Path

import numpy as np
import optuna
import pytest
from optuna.trial import TrialState
from packaging.requirements import Requirement
from packaging.version import Version

from kvtuner.search import SearchError, SearchSettings, run_search
from kvtuner.search.space import build_space
from kvtuner.search.batches import Coordinator
from kvtuner.search.storage import Liveness
from kvtuner.search.study import Objective, measured_trials

# Trial.set_constraint / FrozenTrial.constraints, which Objective sets hard limits with, arrived in Optuna 5.0.0
# ("New Core APIs for Constrained Optimization"; 5.0 deprecates the samplers' constraints_func for them)
FIRST_OPTUNA_WITH_SET_CONSTRAINT = Version("5.0.0")


def settings(**kw) -> SearchSettings:
    base = dict(trials=16, groups=2, population=4, budgets=(3.0, 4.0, 6.0), seed_step=1.0)
    return SearchSettings(**{**base, **kw})


def test_optuna_pin_admits_only_versions_with_set_constraint():
    pyproject = tomllib.loads((Path(__file__).parents[2] / "pyproject.toml").read_text())
    (req,) = [Requirement(r) for r in pyproject["project"]["dependencies"] if Requirement(r).name == "optuna"]
    lower = [Version(s.version) for s in req.specifier if s.operator in (">=", "==", "~=")]
    assert lower and min(lower) >= FIRST_OPTUNA_WITH_SET_CONSTRAINT, f"optuna pin {req.specifier} admits < 5.0"
    assert not req.specifier.contains("4.5.0") and not req.specifier.contains("4.99")
    assert req.specifier.contains(optuna.__version__)  # the installed one satisfies the pin ...
    assert hasattr(optuna.trial.Trial, "set_constraint")  # ... and has the API


def _feasible_measured(study):
    return [t for t in study.get_trials(states=(TrialState.COMPLETE,))
            if t.user_attrs.get("measured") and all(v <= 0 for v in t.constraints.values())]


def test_over_limit_trials_neither_count_nor_reach_the_front(tiny_llama, tiny_profile, tiny_ids, tmp_path):
    result = run_search(tiny_llama, tiny_profile, tiny_ids[0], None,
                        settings(trials=12, max_avg_bits=4.0, budgets=(4.0,)), tmp_path)
    study = optuna.load_study(study_name="kvtuner", storage=result.study["storage"])
    infeasible = [t for t in study.get_trials(states=(TrialState.COMPLETE,)) if t.constraints["avg_bits"] > 0]
    assert infeasible  # the uniform KV8 seed at least: the limit did bind
    assert len(_feasible_measured(study)) == 12
    assert all(t.user_attrs["avg_bits"] <= 4.0 for t in measured_trials(study))
    assert all(p.avg_bits <= 4.0 for p in [*result.points, *result.front] if p.source == "trial")


def test_all_infeasible_stops_with_a_clear_error(tiny_llama, tiny_profile, tiny_ids, tmp_path):
    with pytest.raises(SearchError, match="--max-kv-bytes"):
        run_search(tiny_llama, tiny_profile, tiny_ids[0], None,
                   settings(trials=3, max_kv_bytes=1, budgets=(8.0,)), tmp_path)


@pytest.mark.parametrize("change,what", [
    (dict(seed=1), "seed"),
    (dict(sampler="tpe"), "sampler"),
    (dict(population=8), "population"),
])
def test_resume_refuses_another_sampler(tiny_llama, tiny_profile, tiny_ids, tmp_path, change, what):
    run_search(tiny_llama, tiny_profile, tiny_ids[0], None, settings(trials=2), tmp_path)
    with pytest.raises(SearchError, match=f"another search space.*{what}"):
        run_search(tiny_llama, tiny_profile, tiny_ids[0], None, settings(trials=3, resume=True, **change), tmp_path)


def test_resume_refuses_other_measure_settings(tiny_llama, tiny_profile, tiny_ids, tmp_path):
    """What a caller's measure depends on (the CLI: GSM8K problems, max new tokens) is part of the identity."""
    def error(config):
        return sum(s.avg_bits for s in config.layers) / 100  # an error rate stand-in

    gsm8k = {"objective": "gsm8k", "gsm8k": {"problems": 16, "max_new_tokens": 256}}
    run_search(tiny_llama, tiny_profile, tiny_ids[0], None, settings(trials=2, objective="gsm8k"), tmp_path,
               measure=error, meta=gsm8k)
    other = {"objective": "gsm8k", "gsm8k": {"problems": 32, "max_new_tokens": 256}}
    with pytest.raises(SearchError, match="another search space.*gsm8k"):
        run_search(tiny_llama, tiny_profile, tiny_ids[0], None, settings(trials=3, objective="gsm8k", resume=True),
                   tmp_path, measure=error, meta=other)
    run_search(tiny_llama, tiny_profile, tiny_ids[0], None, settings(trials=3, objective="gsm8k", resume=True),
               tmp_path, measure=error, meta=gsm8k)


class _Counted:
    """A FrozenTrial from one ``get_trials`` answer; counts it as read when the results of a finished trial are
    first looked at."""

    def __init__(self, trial, reads):
        self._trial, self._reads, self._read = trial, reads, False

    def __getattr__(self, name):
        if name in ("user_attrs", "values", "constraints", "params") and not self._read and self._trial.state.is_finished():
            self._read = True
            self._reads[self._trial.number] += 1
        return getattr(self._trial, name)


def test_each_finished_trial_is_read_once(tiny_profile, monkeypatch):
    """The coordinator and the objective learn finished trials incrementally: per trial, work does not grow with N.
    (Each of the two decodes a finished trial once; the old objective re-read every trial for each new config.)"""
    bits = np.array([s.avg_bits for s in tiny_profile.candidates])
    nbytes = (bits * 100).astype(np.int64)
    space, _ = build_space(tiny_profile.candidates, tiny_profile.loss, np.stack([bits, nbytes.astype(float)]), 2)
    objective = Objective(space, tiny_profile.loss, bits, nbytes,
                          lambda config: sum(s.avg_bits for s in config.layers) / 100)
    study = optuna.create_study(directions=["minimize", "minimize"])
    reads = Counter()
    get_trials = optuna.Study.get_trials
    monkeypatch.setattr(optuna.Study, "get_trials",
                        lambda self, deepcopy=True, states=None:
                        [_Counted(t, reads) for t in get_trials(self, deepcopy=deepcopy, states=states)])
    trials = 60
    Coordinator(study, objective, [], "nsga2", 0, 4, trials, Liveness(poll_s=0.01)).run()
    monkeypatch.undo()
    assert len(study.get_trials(states=(TrialState.COMPLETE,))) == trials
    assert max(reads.values()) <= 2, reads.most_common(3)  # each finished trial decoded once per reader, whatever N
