"""``kvtuner worker``: measure a shared study's queued work until its coordinator says it is done.

A worker needs only the storage URL and the study name; everything else comes from the job that
``kvtuner search`` stored in the study (:mod:`kvtuner.search.job`). It checks the model's shape
against the job before it loads any weights. Then it measures profile units while any are
queued, and after that search trials, until the coordinator marks the study done. Workers can
start before or after the coordinator, on any host that reaches the storage, and can be killed
at any time: the trial they were running is retried elsewhere (see :mod:`kvtuner.search.storage`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import optuna

from kvtuner.search.batches import DONE_ATTR, SLOT_ATTR
from kvtuner.search.job import read_job, sha256_file, stored_tokens, task_error
from kvtuner.search.pipeline import PLAN_ATTR
from kvtuner.search.storage import Liveness, connect, find_study, idle, queued_only, run_queued, shown
from kvtuner.search.study import Objective, SearchError
from kvtuner.search.units import UnitObjective, profile_study_name


@dataclass
class WorkerReport:
    units: int  # profile units this worker measured
    trials: int  # search trials it ran (over-limit and already-measured ones included)
    measured: int  # configs it measured
    seconds: float


def open_job(url: str, name: str, wait_s: float, log: Callable[[str], None]):
    """The storage, the study and its job, checked against this host before any weights load: the model's shape and
    the calibration file. A study that does not exist yet is waited for up to ``wait_s`` seconds (the
    coordinator makes it once its model has loaded)."""
    from kvtuner.cache import fingerprint
    from kvtuner.method import Calibration
    from kvtuner.models import load_model_config

    where = shown(url)
    storage = connect(url)
    deadline = time.monotonic() + wait_s
    study = find_study(storage, name)
    if study is None and wait_s > 0:
        log(f"waiting up to {wait_s:g} s for kvtuner search to create study {name!r} in {where}")
        while study is None and time.monotonic() < deadline:
            time.sleep(Liveness.poll_s)
            study = find_study(storage, name)
    if study is None:
        raise SearchError(f"no study {name!r} in {where}: start kvtuner search --storage URL --study {name} "
                          "(workers may join at any time after that)")
    job = read_job(study)
    fp = fingerprint(load_model_config(job.model)).__dict__
    if fp != job.fingerprint:
        raise SearchError(f"model {job.model} on this host has the shape {fp}, but study {name!r} was made for "
                          f"{job.fingerprint}")
    calibration = None
    if job.calibration is not None:
        if sha256_file(job.calibration) != job.calibration_sha256:
            raise SearchError(f"{job.calibration} on this host is not the calibration file study {name!r} was made with")
        calibration = Calibration.load(job.calibration)
    # reconnect with the coordinator's heartbeat settings, so every process judges liveness alike
    storage = connect(url, job.get_liveness())
    return storage, optuna.load_study(study_name=name, storage=storage), job, calibration


def run_worker(url: str, name: str, device: str = "cpu", wait_s: float = 0.0,
               log: Callable[[str], None] = print) -> WorkerReport:
    from kvtuner.models import load_model
    from kvtuner.profile import BlockwiseEvaluator

    t0 = time.perf_counter()
    storage, study, job, calibration = open_job(url, name, wait_s, log)
    liveness = job.get_liveness()
    if stored_tokens(study) is None:
        log(f"waiting for kvtuner search to store the calibration tokens of study {name!r}")
        while stored_tokens(study) is None:
            idle(study, liveness)
    ids = stored_tokens(study)
    lm, tokenizer = load_model(job.model, device=device)
    units = UnitObjective(lm, ids, job.profile_settings(), calibration)
    trials = 0

    profile = None
    while PLAN_ATTR not in study.user_attrs:  # the profile stage: until the coordinator publishes the search plan
        profile = profile or find_study(storage, profile_study_name(name))
        if profile is None or not run_queued(profile, units.queued()):
            idle(profile or study, liveness)

    measure = task_error(job, lm, tokenizer)
    if measure is None:
        measure = (units.evaluator or BlockwiseEvaluator(lm, ids, calibration=calibration)).kl
    objective = Objective.from_plan(study.user_attrs[PLAN_ATTR], measure)
    queued = queued_only(objective, SLOT_ATTR)
    while True:
        if run_queued(study, queued):
            trials += 1
        elif study.user_attrs.get(DONE_ATTR):
            break
        else:
            idle(study, liveness)
    return WorkerReport(units.done, trials, objective.measured, time.perf_counter() - t0)
