"""The Optuna side: one persistent multi-objective study over the group choices.

Objectives (both minimised): the measured quality loss of the whole config (decode-faithful KL
on the calibration tokens, or GSM8K error) and its size (average bits or KV bytes). Hard
limits are Optuna constraints set from inside the trial (``Trial.set_constraint``, new in
Optuna 5.0); a trial over a limit is not measured and does not count toward ``--trials`` (see
:class:`Objective` for why it is kept as a constrained trial rather than pruned).

The study lives in an Optuna storage (SQLite under the run folder by default), so an
interrupted search loses no finished trial and several processes on one study share the work
(each stops once the study holds the requested number of feasible trials). A config already
measured in the study, by any process, is not measured again.
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
# over-limit trials cost no measurement; a search may draw this many per trial still missing before it gives up
ATTEMPTS_PER_TRIAL = 20


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
        try:
            before = json.loads(stored)
        except ValueError:
            before = {}
        now = json.loads(text)
        differ = sorted(k for k in {*before, *now} if before.get(k, ...) != now.get(k, ...))
        raise SearchError(
            f"study {name!r} in {storage} was made for another search space, model, data or sampler "
            f"(differs in: {', '.join(differ) or 'its identity'}); "
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


def is_feasible(trial: optuna.trial.FrozenTrial) -> bool:
    """A complete trial within every hard limit, so measured (``measured`` guards studies made before constraints)."""
    return bool(trial.user_attrs.get("measured")) and all(v <= 0 for v in trial.constraints.values())


@dataclass
class Objective:
    """The trial function: group choices -> config -> (loss, size), under optional hard limits.

    measure: the expensive quality measurement of a whole config.
    loss: ``[L, C]`` single-layer losses (for the additive prediction).
    bits: ``[C]`` nominal bits of each candidate; nbytes: ``[L, C]`` KV bytes of each layer with each candidate
    (or ``[C]``, the same in every layer).

    A trial over a hard limit is not measured: it sets its constraints (``Trial.set_constraint``),
    records ``measured=False`` and completes with the additive prediction as a placeholder loss.
    It is kept COMPLETE and constrained rather than raising ``TrialPruned`` because that is what
    keeps the sampler informed: NSGA-II builds its generations from COMPLETE trials only and
    ranks an infeasible one behind every feasible one and, among infeasible ones, by total
    violation (constrained domination), so offspring are bred toward the limit; a pruned trial
    is invisible to it (and to TPE's constraint handling). The placeholder never reaches a
    result: :func:`measured_trials` (hence the front and the picks) keep feasible trials only,
    and :func:`optimize` counts only feasible ones toward the requested number.

    Finished trials are read incrementally (:meth:`update`): each is decoded once, so the work
    per trial does not grow with the study (Optuna's cached RDB storage already fetches only
    new or unfinished rows from the database).
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
        self._seen: set[int] = set()  # numbers of the complete trials already decoded
        self.feasible = 0  # complete, feasible (measured) trials in the study, as of the last update

    def choice(self, trial: optuna.Trial) -> list[int]:
        labels = self.space.labels
        picks = [
            labels.index(trial.suggest_categorical(param_name(i), [labels[c] for c in g.options]))
            for i, g in enumerate(self.space.groups)
        ]
        return self.space.layer_choice(picks)

    def sizes(self, layer_choice: Sequence[int]) -> tuple[float, int]:
        nbytes = np.broadcast_to(self.nbytes, (len(layer_choice), self.nbytes.shape[-1]))
        return float(np.mean(self.bits[list(layer_choice)])), int(nbytes[np.arange(len(layer_choice)), layer_choice].sum())

    def limits(self) -> str:
        """The hard limits, as the flags that set them."""
        limits = []
        if self.max_avg_bits is not None:
            limits.append(f"--max-avg-bits {self.max_avg_bits:g}")
        if self.max_kv_bytes is not None:
            limits.append(f"--max-kv-bytes {self.max_kv_bytes} (set by --max-kv-bytes or --max-effective-bits)")
        return " and ".join(limits) or "no hard limit"

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
            return predicted, size  # a placeholder: constrained domination ranks this trial by its violation
        trial.set_user_attr("measured", True)
        key = tuple(layer_choice)
        if key not in self._known:
            self.update(trial.study)
        if key in self._known:
            trial.set_user_attr("duplicate", True)
            return self._known[key], size
        value = self.measure(self.space.config(layer_choice))
        self._known[key] = value
        return value, size

    def update(self, study: optuna.Study) -> int:
        """Learn the trials finished (by any process) since the last update; returns the feasible count.

        Only trials not seen before are decoded (trials finish out of number order across
        processes, so seen ones are tracked by number rather than by the highest number)."""
        for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
            if t.number in self._seen:
                continue
            self._seen.add(t.number)
            if is_feasible(t):
                self.feasible += 1
                self._known.setdefault(tuple(t.user_attrs["layer_choice"]), t.values[0])
        return self.feasible


def optimize(study: optuna.Study, objective: Objective, trials: int, progress: bool = False,
             attempts_per_trial: int = ATTEMPTS_PER_TRIAL) -> None:
    """Run trials until the study holds ``trials`` complete, feasible (measured) ones, other processes' included.

    Over-limit trials do not count; after ``attempts_per_trial`` draws per missing trial (plus
    the queued seeds) without reaching the count, raise ``SearchError`` naming the limit.
    """
    done = objective.update(study)
    todo = max(0, trials - done)
    if todo == 0:
        return
    attempts = len(study.get_trials(deepcopy=False, states=(TrialState.WAITING,))) + attempts_per_trial * todo
    bar = tqdm(total=trials, initial=done, desc="search", unit="trial", disable=not progress)

    def tick(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        bar.n = min(objective.update(study), trials)
        if trial.state == TrialState.COMPLETE and trial.user_attrs.get("measured"):
            bar.set_postfix(loss=f"{trial.values[0]:.3g}", bits=f"{trial.user_attrs['avg_bits']:.2f}")
        bar.refresh()
        if objective.feasible >= trials:
            study.stop()

    try:
        study.optimize(objective, n_trials=attempts, callbacks=[tick])
    finally:
        bar.close()
    if objective.update(study) < trials:
        raise SearchError(
            f"only {objective.feasible} of the {trials} trials asked for were within {objective.limits()} after "
            f"{attempts} attempts ({attempts_per_trial} per missing trial); over-limit trials are not measured "
            "and do not count: loosen the limit or give candidates that fit it"
        )


def measured_trials(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    """Complete trials whose loss was measured (within every hard limit), one per distinct config."""
    seen, out = set(), []
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        key = tuple(t.user_attrs.get("layer_choice", ()))
        if is_feasible(t) and key not in seen:
            seen.add(key)
            out.append(t)
    return out
