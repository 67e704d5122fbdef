"""The profiling stage shared out: one queued trial per profile unit, in the study ``NAME.profile``.

A unit (:class:`~kvtuner.profile.Unit`) is a candidate alone at a layer, or a layer's own
statistics. Units are independent. The coordinator queues every unit once, any process pops
them (see :mod:`kvtuner.search.storage`), and each result is kept in the storage as the trial's
``result`` user attribute, where every process can see it. A rerun measures only the units
that are missing. The trial's value is the unit's single-layer KL (0 for a statistics unit),
so optuna-dashboard shows the stage's progress.
"""

from __future__ import annotations

from typing import Any

import optuna
from optuna.trial import TrialState
from tqdm.auto import tqdm

from kvtuner.profile import BlockwiseEvaluator, Profile, ProfileSettings, Unit, assemble_profile, measure_unit
from kvtuner.search.storage import Liveness, idle, pieces, queued_only, requeue_orphans, run_queued

UNIT_ATTR = "unit"


def profile_study_name(name: str) -> str:
    return f"{name}.profile"


def queue_units(storage: optuna.storages.BaseStorage, name: str, units: list[Unit], liveness: Liveness) -> optuna.Study:
    """Create the profile study if needed and queue each unit that has no trial queued, running or complete.

    Only the coordinator calls this, once, before it starts any worker, so no other process
    is queueing at the same moment.
    """
    study = optuna.create_study(storage=storage, study_name=profile_study_name(name), load_if_exists=True)
    requeue_orphans(study, pieces(study, UNIT_ATTR), "profile unit", 0.0, liveness)  # after a Ctrl-C
    present = {t.user_attrs.get(UNIT_ATTR) for t in study.get_trials(deepcopy=False)}
    for unit in units:
        if unit.key not in present:
            study.enqueue_trial({}, user_attrs={UNIT_ATTR: unit.key})
    return study


class UnitObjective:
    """Measures the unit a popped trial names. The evaluator (one full forward pass with capture) is
    built at the first unit, so a process that finds the profile already done never builds it."""

    def __init__(self, model, input_ids, settings: ProfileSettings, calibration=None):
        self.model, self.input_ids, self.settings, self.calibration = model, input_ids, settings, calibration
        self.evaluator: BlockwiseEvaluator | None = None
        self.done = 0

    def __call__(self, trial: optuna.Trial) -> float:
        if self.evaluator is None:
            self.evaluator = BlockwiseEvaluator(self.model, self.input_ids, capture=True, calibration=self.calibration)
        result = measure_unit(self.evaluator, self.settings, Unit.from_key(trial.user_attrs[UNIT_ATTR]))
        trial.set_user_attr("result", result)
        self.done += 1
        return float(result.get("loss", 0.0))

    def queued(self):
        return queued_only(self, UNIT_ATTR)


def finished_units(study: optuna.Study) -> dict[Unit, dict[str, Any]]:
    """The result of each complete unit. If a unit ever completes twice, the first result is kept."""
    results: dict[Unit, dict[str, Any]] = {}
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        unit = Unit.from_key(t.user_attrs[UNIT_ATTR])
        results.setdefault(unit, t.user_attrs["result"])
    return results


def collect_profile(study: optuna.Study, settings: ProfileSettings, num_layers: int, tokens: int) -> Profile:
    """The profile from a study whose units are all complete. Its ``seconds`` is the wall time from the
    first unit's start to the last unit's end, over all workers."""
    trials = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    seconds = (max(t.datetime_complete for t in trials) - min(t.datetime_start for t in trials)).total_seconds()
    return assemble_profile(settings, num_layers, tokens, finished_units(study), seconds)


def share_profile(study: optuna.Study, settings: ProfileSettings, units: list[Unit], objective: UnitObjective | None,
                  liveness: Liveness, num_layers: int, tokens: int, progress: bool = False) -> Profile:
    """Wait until every unit of ``study`` is complete, measuring queued ones here when given an ``objective``
    (None: only ``kvtuner worker`` processes measure); then the profile."""
    bar = tqdm(total=len(units), desc="profile", unit="unit", disable=not progress)
    try:
        while (done := len(finished_units(study))) < len(units):
            bar.n = done
            bar.refresh()
            if objective is None or not run_queued(study, objective.queued()):
                complete = {u.key for u in finished_units(study)}
                missing = {k: t for k, t in pieces(study, UNIT_ATTR).items() if k not in complete}
                requeue_orphans(study, missing, "profile unit", liveness.grace_s, liveness)
                idle(study, liveness)
    finally:
        bar.close()
    return collect_profile(study, settings, num_layers, tokens)
