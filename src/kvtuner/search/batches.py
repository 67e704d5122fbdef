"""The search trials: deterministic batches, queued by one coordinator, measured by any number of workers.

An Optuna sampler proposes a trial from whatever trials are complete when it is asked. With
several workers that depends on timing, so two runs with the same seed would measure different
configs, and so would a run that lost a worker. Here the coordinator proposes a whole batch at
once, and only after the previous batch is complete:

* batch 0 is the seeds (the additive solutions, then each candidate used uniformly);
* batch ``b >= 1`` is ``population`` asks of the chosen sampler, seeded by ``(seed, b)``, on an
  in-memory study that replays the finished batches in slot order.

For NSGA-II this is its textbook generational form (a batch is a generation; the seeds are
generation 0). For TPE a batch is ``population`` draws from one model. The proposals depend only
on the seed and on the results of earlier batches. They never depend on how many processes
measured those results or in which order. Measuring is deterministic, so with 1 worker or
many, with or without a killed one, the study holds the same configs and gives the same front.
Batches are cut at the requested number of trials within the hard limits: the coordinator
knows a proposal's size before it queues it, so it queues no more than it needs.

Each queued trial carries its ``slot`` (its place in that order), ``batch``, ``source`` and the
system attributes the sampler gave it during the replay (``sampler_attrs``: NSGA-II's generation),
so any later replay rebuilds the same history from the storage.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import optuna
from optuna.trial import FrozenTrial, TrialState
from tqdm.auto import tqdm

from kvtuner.search.storage import Liveness, idle, pieces, queued_only, requeue_orphans, run_queued
from kvtuner.search.study import Objective, SearchError, make_sampler

SLOT_ATTR = "slot"
DONE_ATTR = "kvtuner_done"  # set by the coordinator when nothing more will be queued; workers then exit
# over-limit trials cost no measurement; a search may queue this many per requested trial before it gives up
ATTEMPTS_PER_TRIAL = 20


@dataclass
class Slot:
    """One queued proposal and the trials that ran it (more than one after a retry), by number."""

    index: int
    batch: int
    feasible: bool  # within the hard limits (known from its parameters, before it runs)
    trials: dict[int, FrozenTrial] = field(default_factory=dict)
    complete: FrozenTrial | None = None  # its first trial to complete


def batch_seed(seed: int, batch: int) -> int:
    return int(np.random.SeedSequence([seed, batch]).generate_state(1)[0])


class Coordinator:
    """Queues the batches of one study until it holds ``trials`` complete trials within the hard limits.

    seeds: ``(params, source)`` of batch 0, in order.
    """

    def __init__(self, study: optuna.Study, objective: Objective, seeds: list[tuple[dict[str, str], str]],
                 sampler: str, seed: int, population: int, trials: int, liveness: Liveness = Liveness(),
                 attempts_per_trial: int = ATTEMPTS_PER_TRIAL):
        self.study, self.objective, self.seeds = study, objective, seeds
        self.sampler, self.seed, self.population, self.trials = sampler, seed, population, trials
        self.liveness = liveness
        self.max_slots = len(seeds) + attempts_per_trial * trials
        self.queued_seeds = 0  # seed trials this coordinator queued (0 when it resumed a study)
        self.done = 0  # complete trials within the hard limits, one per slot
        self._slots: dict[int, Slot] = {}
        self._final: set[int] = set()  # numbers of the trials seen finished
        self._history: dict[int, FrozenTrial] = {}  # slot -> its complete trial, as a replay adds it

    def refresh(self) -> list[Slot]:
        """The slots in order, updated from the trials that are new or were unfinished at the last look.

        A finished trial is decoded once: the work of a look does not grow with the study.
        """
        for t in self.study.get_trials(deepcopy=False):
            if t.number in self._final:
                continue
            if t.state.is_finished():
                self._final.add(t.number)
            if SLOT_ATTR not in t.user_attrs:
                continue  # a stray, popped from an empty queue
            index = t.user_attrs[SLOT_ATTR]
            slot = self._slots.get(index)
            if slot is None:
                slot = self._slots[index] = Slot(index, t.user_attrs["batch"], self.feasible(t.system_attrs["fixed_params"]))
            slot.trials[t.number] = t
            if t.state == TrialState.COMPLETE and slot.complete is None:
                slot.complete = t
                self.done += slot.feasible
                self._history[index] = optuna.trial.create_trial(  # as the replay of later batches reads it
                    params=t.params, distributions=self.objective.distributions(), values=t.values,
                    constraints=t.constraints, system_attrs=t.user_attrs["sampler_attrs"])
        return [self._slots[i] for i in sorted(self._slots)]

    def feasible(self, params: dict[str, Any]) -> bool:
        return self.objective.within_limits(self.objective.layer_choice(params))

    def step(self) -> bool:
        """Queue the next batch if the last one is complete and more trials are needed; True when done."""
        slots = self.refresh()
        if any(s.complete is None for s in slots):
            return False
        feasible = sum(s.feasible for s in slots)
        if feasible >= self.trials:
            return True
        if len(slots) >= self.max_slots:
            raise SearchError(
                f"only {feasible} of the {self.trials} trials asked for were within {self.objective.limits()} after "
                f"{len(slots)} attempts ({self.max_slots - len(self.seeds)} beyond the {len(self.seeds)} seeds); "
                "over-limit trials are not measured and do not count: loosen the limit or give candidates that fit it"
            )
        batch = slots[-1].batch + 1 if slots else 0 if self.seeds else 1
        index = len(slots)
        for params, source, attrs in self.propose(batch, [self._history[s.index] for s in slots]):
            if feasible >= self.trials or index >= self.max_slots:
                break
            self.study.enqueue_trial(params, user_attrs={SLOT_ATTR: index, "batch": batch, "source": source,
                                                         "sampler_attrs": attrs})
            self.queued_seeds += batch == 0
            feasible += self.feasible(params)
            index += 1
        return False

    def propose(self, batch: int, history: list[FrozenTrial]) -> list[tuple[dict[str, Any], str, dict[str, Any]]]:
        """``(params, source, sampler_attrs)`` of every proposal of ``batch``, given the complete trials of
        the earlier batches in slot order."""
        distributions = self.objective.distributions()
        memory = optuna.create_study(directions=["minimize", "minimize"],
                                     sampler=make_sampler(self.sampler, batch_seed(self.seed, batch), self.population))
        memory.add_trials(history)
        if batch == 0:
            out = []
            for params, source in self.seeds:
                memory.enqueue_trial(params)
                params, attrs = self._ask(memory, distributions)
                out.append((params, source, attrs))
            return out
        return [(params, f"batch {batch}", attrs)
                for params, attrs in (self._ask(memory, distributions) for _ in range(self.population))]

    @staticmethod
    def _ask(memory: optuna.Study, distributions) -> tuple[dict[str, Any], dict[str, Any]]:
        trial = memory.ask()
        params = {name: trial.suggest_categorical(name, d.choices) for name, d in distributions.items()}
        generation = getattr(memory.sampler, "get_trial_generation", None)
        if generation is not None:  # a seed (fixed params) never reaches NSGA-II's sampling, which assigns it
            generation(memory, memory.get_trials(deepcopy=False)[-1])
        frozen = memory.get_trials(deepcopy=False)[-1]
        attrs = {k: v for k, v in frozen.system_attrs.items() if k != "fixed_params" and not k.startswith("constraints")}
        return params, attrs

    def run(self, work: bool = True, progress: bool = False) -> None:
        """Queue batches until done; with ``work``, also measure queued trials in this process.

        Without ``work`` the coordinator only queues and waits: ``kvtuner worker`` processes
        on the same study do the measuring.
        """
        requeue_orphans(self.study, pieces(self.study, SLOT_ATTR), "trial slot", 0.0, self.liveness)  # after a Ctrl-C
        self.study.set_user_attr(DONE_ATTR, False)
        objective = queued_only(self.objective, SLOT_ATTR)
        bar = tqdm(total=self.trials, desc="search", unit="trial", disable=not progress)
        finished = False
        try:
            while not self.step():
                if not (work and run_queued(self.study, objective)):
                    pending = {s.index: list(s.trials.values()) for s in self._slots.values() if s.complete is None}
                    requeue_orphans(self.study, pending, "trial slot", self.liveness.grace_s, self.liveness)
                    idle(self.study, self.liveness)
                bar.n = min(self.done, self.trials)
                bar.refresh()
            finished = True
        except SearchError:
            finished = True  # nothing more will be queued: let the workers go
            raise
        finally:
            bar.close()
            if finished:
                self.study.set_user_attr(DONE_ATTR, True)
