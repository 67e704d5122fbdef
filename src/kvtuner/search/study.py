"""The Optuna side: one persistent multi-objective study over the group choices.

Objectives (both minimised): the measured quality loss of the whole config (decode-faithful KL
on the calibration tokens, or GSM8K error) and its size (average bits or KV bytes). Hard
budgets are Optuna constraints set from inside the trial (``Trial.set_constraint``, Optuna 5);
a trial over budget is not measured: its loss is the additive prediction, it is marked
``measured=False`` and constrained-domination keeps it out of the front.

The study lives in an Optuna storage (SQLite under the run folder by default), so an
interrupted search loses no finished trial and several processes on one study share the work
(``MaxTrialsCallback`` stops them all at the requested count). A config already measured in
the study, by any process, is not measured again.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import optuna
import sqlalchemy.exc
from optuna.trial import TrialState
from tqdm.auto import tqdm

from kvtuner.config import KVConfig
from kvtuner.search.additive import predicted_loss
from kvtuner.search.space import SearchSpace

SPACE_ATTR = "kvtuner_space"
STORAGE_ATTEMPTS = 3


class SearchError(ValueError):
    """A search that cannot run as asked; the message says why and what to do."""


def param_name(group: int) -> str:
    return f"g{group}"


def make_sampler(name: str, seed: int, population: int) -> optuna.samplers.BaseSampler:
    if name == "nsga2":
        return optuna.samplers.NSGAIISampler(population_size=population, seed=seed)
    if name == "tpe":
        return optuna.samplers.TPESampler(seed=seed, multivariate=True)
    raise SearchError(f"unknown sampler {name!r}; use nsga2 or tpe")


def open_study(
    storage: str, name: str, sampler: optuna.samplers.BaseSampler, resume: bool, identity: dict[str, Any]
) -> optuna.Study:
    """Create the study, or with ``resume`` load it (creating it if absent); refuse a mismatched one.

    identity: what the study's trials depend on (space, data, model, objective); a resumed study
    must have been made with the same.
    """
    for attempt in range(STORAGE_ATTEMPTS):
        try:
            study = optuna.create_study(
                storage=storage, study_name=name, sampler=sampler, directions=["minimize", "minimize"],
                load_if_exists=resume,
            )
            break
        except optuna.exceptions.DuplicatedStudyError:
            raise SearchError(
                f"study {name!r} already exists in {storage}; pass --resume to continue it or give another --study-name"
            ) from None
        except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.OperationalError):
            # two processes creating one fresh database race on its schema; the loser retries
            if attempt == STORAGE_ATTEMPTS - 1:
                raise
            time.sleep(1.0 + attempt)
    stored = study.user_attrs.get(SPACE_ATTR)
    text = json.dumps(identity, sort_keys=True)
    if stored is None:
        study.set_user_attr(SPACE_ATTR, text)
    elif stored != text:
        raise SearchError(
            f"study {name!r} in {storage} was made for another search space, model or data; "
            "use a new --study-name (or the original settings) to resume"
        )
    return study


def seed_study(study: optuna.Study, seeds: Sequence[tuple[dict[str, str], str]]) -> int:
    """Enqueue the seed configs once per study (before any trial ran); returns how many were queued."""
    if study.get_trials(deepcopy=False):
        return 0
    seen = set()
    for params, source in seeds:
        key = tuple(sorted(params.items()))
        if key in seen:
            continue
        seen.add(key)
        study.enqueue_trial(params, user_attrs={"source": source})
    return len(seen)


@dataclass
class Objective:
    """The trial function: group choices -> config -> (loss, size), under optional hard limits.

    measure: the expensive quality measurement of a whole config.
    loss: ``[L, C]`` single-layer losses (for the additive prediction).
    bits / nbytes: ``[C]`` per-layer nominal bits and KV bytes of each candidate.
    """

    space: SearchSpace
    loss: np.ndarray
    bits: np.ndarray
    nbytes: np.ndarray
    measure: Callable[[KVConfig], float]
    size: str = "avg_bits"
    max_avg_bits: float | None = None
    max_kv_bytes: int | None = None

    def __post_init__(self) -> None:
        self._known: dict[tuple[int, ...], float] = {}

    def choice(self, trial: optuna.Trial) -> list[int]:
        labels = self.space.labels
        picks = [
            labels.index(trial.suggest_categorical(param_name(i), [labels[c] for c in g.options]))
            for i, g in enumerate(self.space.groups)
        ]
        return self.space.layer_choice(picks)

    def sizes(self, layer_choice: Sequence[int]) -> tuple[float, int]:
        return float(np.mean(self.bits[list(layer_choice)])), int(self.nbytes[list(layer_choice)].sum())

    def __call__(self, trial: optuna.Trial) -> tuple[float, float]:
        layer_choice = self.choice(trial)
        avg_bits, kv_bytes = self.sizes(layer_choice)
        predicted = predicted_loss(self.loss, layer_choice)
        size = avg_bits if self.size == "avg_bits" else float(kv_bytes)
        trial.set_user_attr("layer_choice", layer_choice)
        trial.set_user_attr("avg_bits", avg_bits)
        trial.set_user_attr("kv_bytes", kv_bytes)
        trial.set_user_attr("predicted", predicted)
        feasible = True
        if self.max_avg_bits is not None:
            trial.set_constraint("avg_bits", avg_bits - self.max_avg_bits)
            feasible &= avg_bits <= self.max_avg_bits
        if self.max_kv_bytes is not None:
            trial.set_constraint("kv_bytes", (kv_bytes - self.max_kv_bytes) / self.max_kv_bytes)
            feasible &= kv_bytes <= self.max_kv_bytes
        if not feasible:
            trial.set_user_attr("measured", False)
            return predicted, size
        trial.set_user_attr("measured", True)
        key = tuple(layer_choice)
        if key not in self._known:
            self._refresh(trial.study)
        if key in self._known:
            trial.set_user_attr("duplicate", True)
            return self._known[key], size
        value = self.measure(self.space.config(layer_choice))
        self._known[key] = value
        return value, size

    def _refresh(self, study: optuna.Study) -> None:
        """Learn configs other processes measured meanwhile."""
        for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
            if t.user_attrs.get("measured"):
                self._known[tuple(t.user_attrs["layer_choice"])] = t.values[0]


def optimize(study: optuna.Study, objective: Objective, trials: int, progress: bool = False) -> None:
    """Run trials until the study holds ``trials`` complete ones (counting other processes' too)."""
    done = len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))
    todo = max(0, trials - done)
    if todo == 0:
        return
    bar = tqdm(total=trials, initial=done, desc="search", unit="trial", disable=not progress)

    def tick(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        bar.n = len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))
        if trial.state == TrialState.COMPLETE:
            bar.set_postfix(loss=f"{trial.values[0]:.3g}", bits=f"{trial.user_attrs['avg_bits']:.2f}")
        bar.refresh()

    try:
        study.optimize(
            objective, n_trials=todo,
            callbacks=[optuna.study.MaxTrialsCallback(trials, states=(TrialState.COMPLETE,)), tick],
        )
    finally:
        bar.close()


def measured_trials(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    """Complete trials whose loss was measured (not over budget), one per distinct config."""
    seen, out = set(), []
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        key = tuple(t.user_attrs.get("layer_choice", ()))
        if t.user_attrs.get("measured") and key not in seen:
            seen.add(key)
            out.append(t)
    return out
