"""The Optuna side: one persistent multi-objective study over the group choices.

Objectives (both minimised): the measured quality loss of the whole config (decode-faithful KL
on the calibration tokens, or GSM8K error) and its size (average bits or KV bytes). Hard
limits are Optuna constraints set from inside the trial (``Trial.set_constraint``, new in
Optuna 5.0); a trial over a limit is not measured and does not count toward ``--trials`` (see
:class:`Objective` for why it is kept as a constrained trial rather than pruned).

The study lives in an Optuna storage (SQLite under the run folder by default, PostgreSQL for a
cluster; see :mod:`kvtuner.search.storage`). Its trials are proposed in deterministic batches
and queued by one coordinator (:mod:`kvtuner.search.batches`); any number of processes measure
them. A config already measured in the study, by any process, is not measured again.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import optuna
import sqlalchemy.exc
from optuna.trial import TrialState

from kvtuner.config import KVConfig, LayerSpec
from kvtuner.search.additive import predicted_loss
from kvtuner.search.space import Group, SearchSpace

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
    storage: str | optuna.storages.BaseStorage, name: str, resume: bool, identity: dict[str, Any], where: str = ""
) -> optuna.Study:
    """Create the study, or with ``resume`` load it (creating it if absent); refuse a mismatched one.

    identity: what the study's trials depend on (space, data, model, objective); a resumed study
    must have been made with the same. where: the storage as messages show it.
    The study's own sampler is never asked: every trial arrives with fixed parameters (see
    :mod:`kvtuner.search.batches`), and a trial popped from an empty queue is pruned before it
    suggests anything.
    """
    where = where or str(storage)
    sampler = optuna.samplers.RandomSampler()
    for attempt in range(STORAGE_ATTEMPTS):
        try:
            study = optuna.create_study(
                storage=storage, study_name=name, sampler=sampler, directions=["minimize", "minimize"],
                load_if_exists=resume,
            )
            break
        except optuna.exceptions.DuplicatedStudyError:
            raise SearchError(
                f"study {name!r} already exists in {where}; pass --resume to continue it or give another --study-name"
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
            f"study {name!r} in {where} was made for another search space, model, data or sampler "
            f"(differs in: {', '.join(differ) or 'its identity'}); "
            "use a new --study-name (or the original settings) to resume"
        )
    return study


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

    Trials arrive with their parameters fixed by the queue (see :mod:`kvtuner.search.batches`).
    A trial over a hard limit is not measured: it sets its constraints (``Trial.set_constraint``),
    records ``measured=False`` and completes with the additive prediction as a placeholder loss.
    It is kept COMPLETE and constrained rather than raising ``TrialPruned`` because that is what
    keeps the sampler informed: NSGA-II builds its generations from COMPLETE trials only and
    ranks an infeasible one behind every feasible one and, among infeasible ones, by total
    violation (constrained domination), so offspring are bred toward the limit; a pruned trial
    is invisible to it (and to TPE's constraint handling). The placeholder never reaches a
    result: :func:`measured_trials` (hence the front and the picks) keep feasible trials only,
    and the coordinator counts only feasible ones toward the requested number.

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
        self.measured = 0  # configs this process measured

    # --- what every process needs, stored in the study ---------------------------------------
    def to_plan(self) -> dict[str, Any]:
        return {"candidates": [asdict(s) for s in self.space.candidates],
                "groups": [{"layers": g.layers, "options": g.options} for g in self.space.groups],
                "loss": self.loss.tolist(), "bits": self.bits.tolist(), "nbytes": self.nbytes.tolist(),
                "size": self.size, "max_avg_bits": self.max_avg_bits, "max_kv_bytes": self.max_kv_bytes}

    @classmethod
    def from_plan(cls, plan: dict[str, Any], measure: Callable[[KVConfig], float]) -> "Objective":
        """The coordinator's objective in a worker: same space, costs and limits; this process's ``measure``."""
        candidates = [LayerSpec(**c) for c in plan["candidates"]]
        loss = np.array(plan["loss"])
        space = SearchSpace(candidates, [Group(g["layers"], g["options"]) for g in plan["groups"]], loss.shape[0])
        return cls(space, loss, np.array(plan["bits"]), np.array(plan["nbytes"], dtype=np.int64), measure,
                   plan["size"], plan["max_avg_bits"], plan["max_kv_bytes"])

    # --- parameters -> config -----------------------------------------------------------------
    def distributions(self) -> dict[str, optuna.distributions.CategoricalDistribution]:
        labels = self.space.labels
        return {param_name(i): optuna.distributions.CategoricalDistribution([labels[c] for c in g.options])
                for i, g in enumerate(self.space.groups)}

    def layer_choice(self, params: dict[str, Any]) -> list[int]:
        labels = self.space.labels
        return self.space.layer_choice([labels.index(params[param_name(i)]) for i in range(len(self.space.groups))])

    def choice(self, trial: optuna.Trial) -> list[int]:
        return self.layer_choice({name: trial.suggest_categorical(name, d.choices)
                                  for name, d in self.distributions().items()})

    def sizes(self, layer_choice: Sequence[int]) -> tuple[float, int]:
        nbytes = np.broadcast_to(self.nbytes, (len(layer_choice), self.nbytes.shape[-1]))
        return float(np.mean(self.bits[list(layer_choice)])), int(nbytes[np.arange(len(layer_choice)), layer_choice].sum())

    def within_limits(self, layer_choice: Sequence[int]) -> bool:
        avg_bits, kv_bytes = self.sizes(layer_choice)
        return ((self.max_avg_bits is None or avg_bits <= self.max_avg_bits)
                and (self.max_kv_bytes is None or kv_bytes <= self.max_kv_bytes))

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
        if self.max_avg_bits is not None:
            trial.set_constraint("avg_bits", avg_bits - self.max_avg_bits)
        if self.max_kv_bytes is not None:
            trial.set_constraint("kv_bytes", (kv_bytes - self.max_kv_bytes) / self.max_kv_bytes)
        if not self.within_limits(layer_choice):
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
        self.measured += 1
        self._known[key] = value
        return value, size

    def update(self, study: optuna.Study) -> None:
        """Learn the configs measured (by any process) since the last update.

        Only trials not seen before are decoded (trials finish out of number order across
        processes, so seen ones are tracked by number rather than by the highest number)."""
        for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
            if t.number in self._seen:
                continue
            self._seen.add(t.number)
            if is_feasible(t):
                self._known.setdefault(tuple(t.user_attrs["layer_choice"]), t.values[0])


def measured_trials(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    """Complete trials whose loss was measured (within every hard limit), one per distinct config."""
    seen, out = set(), []
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        key = tuple(t.user_attrs.get("layer_choice", ()))
        if is_feasible(t) and key not in seen:
            seen.add(key)
            out.append(t)
    return out
