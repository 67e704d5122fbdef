"""Where a study lives, and the queue that every process working on it shares.

A study lives in an Optuna RDB storage: a SQLite file under the run folder by default, or a
PostgreSQL database when many hosts share one search. We use RDB rather than JournalStorage
because its queue pop (``Study.ask`` → ``set_trial_state_values(RUNNING)``) runs under a row lock
(``SELECT ... FOR UPDATE``) on a server every host reaches over TCP. The journal needs a file
on a shared filesystem whose locks every host honours (NFS locks often are not) or a Redis
server, and every process replays the whole log. optuna-dashboard reads the same URL.

No process samples its own work. Every piece of work (a profile unit, a search trial) is queued
with fixed parameters (``Study.enqueue_trial``), and ``Study.optimize`` pops one. The pop runs
under the lock, so each queued trial runs in exactly one process. Crash safety comes from
Optuna too. A running trial records a heartbeat every ``heartbeat_s``. When a trial's heartbeat
is older than ``grace_s``, the next process that looks (``fail_stale_trials``, which Optuna
calls before each trial and we call while idle) marks it FAIL. Only one process can make that
change, and ``RetryHeartbeatStaleTrialCallback`` then queues a copy with the same parameters
and user attributes. So the killed piece is done again, once, and nothing that finished is lost.
"""

from __future__ import annotations

import os
import socket
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import optuna
import sqlalchemy.exc
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.trial import FrozenTrial, TrialState

from kvtuner.search.study import SearchError


@dataclass(frozen=True)
class Liveness:
    """How fast a dead worker is noticed.

    heartbeat_s: how often a running trial records that its process is alive.
    grace_s: how long a heartbeat may be missing before the trial counts as dead. Keep it well
    above ``heartbeat_s``: a process stalled in a long GPU call or a slow database still
    records heartbeats from its own thread.
    poll_s: how long an idle process sleeps before it looks at the queue again.
    max_retry: how many times a piece whose process died is queued again before the search fails.
    """

    heartbeat_s: int = 10
    grace_s: int = 60
    poll_s: float = 2.0
    max_retry: int = 3

    def __post_init__(self) -> None:
        if not (self.heartbeat_s >= 1 and self.grace_s > self.heartbeat_s and self.poll_s > 0 and self.max_retry >= 0):
            raise SearchError(f"bad liveness settings {self}: need heartbeat_s >= 1, grace_s > heartbeat_s, poll_s > 0")


def shown(url: str) -> str:
    """The URL with its password hidden, for messages."""
    try:
        return sqlalchemy.engine.make_url(url).render_as_string(hide_password=True)
    except sqlalchemy.exc.ArgumentError:
        return url


def connect(url: str, liveness: Liveness = Liveness()) -> RDBStorage:
    """Open (and on first use create the tables of) the storage at ``url``, with heartbeats.

    Raises ``SearchError`` with one line for a URL that is not one, a missing database driver,
    an unreachable server and refused credentials. Nothing is written unless the connection works.
    """
    engine_kwargs: dict[str, Any] = {"pool_pre_ping": True}  # a long-idle worker's connection may be gone
    if url.startswith("postgresql"):
        engine_kwargs["connect_args"] = {"connect_timeout": 10}
    try:
        with warnings.catch_warnings():  # heartbeats have been "experimental" since Optuna 2.8
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return RDBStorage(
                url, engine_kwargs=engine_kwargs, heartbeat_interval=liveness.heartbeat_s,
                grace_period=liveness.grace_s,
                heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=liveness.max_retry),
            )
    except ImportError as e:
        missing = getattr(e.__cause__, "name", None) or "its database driver"
        raise SearchError(f"storage {shown(url)} needs the Python module {missing!r}, which is not installed "
                          "(for PostgreSQL: pip install 'kvtuner[postgres]')") from None
    except sqlalchemy.exc.ArgumentError as e:
        raise SearchError(f"--storage {shown(url)} is not a database URL ({e}); "
                          "e.g. sqlite:///runs/study.db or postgresql://user:password@host:5432/db") from None
    except sqlalchemy.exc.SQLAlchemyError as e:
        detail = str(getattr(e, "orig", None) or e).strip().splitlines()
        raise SearchError(f"cannot open storage {shown(url)}: {detail[0] if detail else type(e).__name__}") from None


def find_study(storage: RDBStorage, name: str) -> optuna.Study | None:
    """The study ``name`` in ``storage``, or None if there is none."""
    try:
        storage.get_study_id_from_name(name)
    except KeyError:
        return None
    return optuna.load_study(study_name=name, storage=storage)


def process_id() -> str:
    """``host:pid``, recorded on every trial a process runs (the dashboard shows who ran what)."""
    return f"{socket.gethostname()}:{os.getpid()}"


def queued_only(objective: Callable[[optuna.Trial], Any], key: str) -> Callable[[optuna.Trial], Any]:
    """Wrap an objective so that it only runs trials popped from the queue, and records who ran them.

    ``Study.optimize`` makes a new trial when the queue is empty, and another process can take
    the last queued trial between our look and our pop. A trial without the ``key`` user
    attribute is such a stray: it is pruned without any work.
    """

    def run(trial: optuna.Trial) -> Any:
        if key not in trial.user_attrs:
            raise optuna.TrialPruned("popped from an empty queue")
        trial.set_user_attr("worker", process_id())
        return objective(trial)

    return run


def run_queued(study: optuna.Study, objective: Callable[[optuna.Trial], Any]) -> bool:
    """Pop one queued trial and run it in this process; False if nothing is queued."""
    if not study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
        return False
    study.optimize(objective, n_trials=1)
    return True


def idle(study: optuna.Study, liveness: Liveness) -> None:
    """Nothing to run here now: fail the trials of dead processes (queueing their retries), then sleep."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)
    time.sleep(liveness.poll_s)


def pieces(study: optuna.Study, key: str) -> dict[Any, list[FrozenTrial]]:
    """The trials of each piece of work (the trials that share the user attribute ``key``)."""
    out: dict[Any, list[FrozenTrial]] = {}
    for t in study.get_trials(deepcopy=False):
        if key in t.user_attrs:
            out.setdefault(_hashable(t.user_attrs[key]), []).append(t)
    return out


def requeue_orphans(study: optuna.Study, pieces: dict[Any, list[FrozenTrial]], what: str, min_age_s: float,
                    liveness: Liveness) -> None:
    """Queue each piece of work again if all its trials ended without completing and none is queued or running.

    Stale trials are queued again by the heartbeat callback. This covers the pieces that
    callback never sees: a trial ended by Ctrl-C or by an error in its process. ``min_age_s``
    skips trials that ended in the last few seconds, because the callback queues its copy just
    after it marks the trial failed. A piece that has failed more than ``max_retry`` times raises
    ``SearchError``.
    """
    now = time.time()
    for piece, trials in pieces.items():
        if any(t.state in (TrialState.COMPLETE, TrialState.RUNNING, TrialState.WAITING) for t in trials):
            continue
        last = max(trials, key=lambda t: t.number)
        if last.datetime_complete is not None and now - last.datetime_complete.timestamp() < min_age_s:
            continue
        if len(trials) > liveness.max_retry:
            raise SearchError(f"{what} {piece} of study {study.study_name!r} failed {len(trials)} times "
                              f"(trials {', '.join(str(t.number) for t in trials)}); see the worker logs")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            RetryHeartbeatStaleTrialCallback()(study, last)


def _hashable(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value
