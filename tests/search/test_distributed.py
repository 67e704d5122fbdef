"""Many processes on one study (issue 16): killed workers lose nothing, the front does not depend on the
worker count, and bad storage or a mismatched study is refused before any model loads.

The tests that need a real PostgreSQL server read its URL from $KVTUNER_TEST_POSTGRES_URL (``.ci/run``
starts one) and skip without it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import optuna
import pytest
import typer
from optuna.trial import TrialState
from typer.testing import CliRunner

from kvtuner.search.commands import search_command, worker_command

app = typer.Typer()
app.command("search")(search_command)
app.command("worker")(worker_command)
runner = CliRunner()
POSTGRES_ENV = "KVTUNER_TEST_POSTGRES_URL"
TRIALS = 40  # more than the seeds (additive solutions, uniform configs): the sampler's batches run too
FAST = ("--heartbeat", 1, "--grace", 3, "--poll", 0.1)  # a dead worker is noticed within seconds


def run(*args):
    return runner.invoke(app, list(map(str, args)))


@pytest.fixture
def postgres_url():
    url = os.environ.get(POSTGRES_ENV)
    if not url:
        pytest.skip(f"no PostgreSQL server: set {POSTGRES_ENV} (.ci/run starts one and sets it)")
    return url


def search_args(model_dir, out: Path, *extra):
    return ("search", "--model", model_dir, "--tokens", 384, "--group-size", 16, "--pairs", "KV8,K4V4,K4V2,K2V4,K2V2",
            "--split-bits", 2, "--groups", 2, "--trials", TRIALS, "--budgets", "3,4", "--seed", 3, "--out", out, *FAST,
            *extra)


def spawn(*args) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[2] / "src")}
    return subprocess.Popen([sys.executable, "-m", "kvtuner", *map(str, args)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def kill_mid_trial(url: str, study_name: str, procs: list[subprocess.Popen], deadline_s: float = 180) -> int:
    """SIGKILL one of ``procs`` while it runs a trial of ``study_name``; returns that trial's number.

    As soon as a trial is RUNNING in one of them, that process is frozen (SIGSTOP). If the trial is
    still RUNNING a moment later (a frozen process cannot finish it), the process gets SIGKILL;
    otherwise it is let go (SIGCONT) and the watch goes on.
    """
    storage = optuna.storages.RDBStorage(url)
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        alive = {p.pid: p for p in procs if p.poll() is None}
        if not alive:
            raise AssertionError("every worker ended: " + " | ".join(p.stderr.read()[-2000:] for p in procs))
        try:
            study = optuna.load_study(study_name=study_name, storage=storage)
        except KeyError:
            time.sleep(0.05)
            continue
        while time.monotonic() < deadline:
            running = [(t.number, int(t.user_attrs["worker"].rsplit(":", 1)[1]))
                       for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)) if "worker" in t.user_attrs]
            running = [(n, pid) for n, pid in running if pid in alive]
            if not running:
                if all(p.poll() is not None for p in alive.values()):
                    break
                time.sleep(0.01)
                continue
            number, pid = running[0]
            os.kill(pid, signal.SIGSTOP)
            time.sleep(0.2)
            if optuna.load_study(study_name=study_name, storage=url).trials[number].state == TrialState.RUNNING:
                os.kill(pid, signal.SIGKILL)
                alive[pid].wait()
                return number
            os.kill(pid, signal.SIGCONT)
    raise AssertionError(f"no worker was caught running a trial of {study_name} within {deadline_s} s")


def retried(trials: list, number: int):
    """The trial that retried trial ``number`` (Optuna's heartbeat callback records the original's number)."""
    return [t for t in trials if t.system_attrs.get("failed_trial") == number]


def front(out: Path) -> list[tuple]:
    result = json.loads((out / "search.json").read_text())
    return [(tuple(p["layers"]), p["avg_bits"], round(p["loss"], 12)) for p in result["front"]]


def test_killed_workers_lose_nothing_and_the_front_is_the_single_worker_one(postgres_url, slow_model_dir, tmp_path):
    """Two workers on a tiny model; one is SIGKILLed in the middle of a profile unit, and one (after a replacement
    joined) in the middle of a search trial. The study still ends with the requested trials, each unit and
    each trial slot complete exactly once, the killed trials FAILED and retried, and the same front as one
    process with the same seed."""
    name = f"fault-{uuid.uuid4().hex[:8]}"
    coordinator = spawn(*search_args(slow_model_dir, tmp_path / "distributed", "--storage", postgres_url,
                                     "--study", name, "--workers", 0, "--json"))
    workers = [spawn("worker", "--storage", postgres_url, "--study", name) for _ in range(2)]
    try:
        killed_unit = kill_mid_trial(postgres_url, f"{name}.profile", workers)
        workers.append(spawn("worker", "--storage", postgres_url, "--study", name))
        killed_trial = kill_mid_trial(postgres_url, name, workers)
        stdout, stderr = coordinator.communicate(timeout=300)
        assert coordinator.returncode == 0, stderr[-3000:]
        survivors = [w for w in workers if w.returncode is None or w.returncode != -signal.SIGKILL]
        for w in survivors:
            w.communicate(timeout=60)
            assert w.returncode == 0
    finally:
        for p in [coordinator, *workers]:
            if p.poll() is None:
                p.kill()
    assert len(survivors) == 1 and sum(w.returncode == -signal.SIGKILL for w in workers) == 2
    assert json.loads(stdout)["study"]["feasible"] == TRIALS

    units = optuna.load_study(study_name=f"{name}.profile", storage=postgres_url).get_trials()
    complete = [t.user_attrs["unit"] for t in units if t.state == TrialState.COMPLETE]
    assert len(complete) == len(set(complete)) == 3 * (5 + 1)  # every unit once: 5 candidates + statistics a layer
    [killed] = [t for t in units if t.number == killed_unit]
    assert killed.state == TrialState.FAIL
    [retry] = retried(units, killed_unit)
    assert retry.state == TrialState.COMPLETE and retry.user_attrs["unit"] == killed.user_attrs["unit"]

    trials = optuna.load_study(study_name=name, storage=postgres_url).get_trials()
    slots = [t.user_attrs["slot"] for t in trials if t.state == TrialState.COMPLETE]
    assert len(slots) == len(set(slots)) and sorted(slots) == list(range(len(slots)))  # no slot twice, none lost
    assert max(t.user_attrs["batch"] for t in trials) >= 1  # the sampler's batches ran, not only the seeds
    assert sum(t.state == TrialState.COMPLETE and t.user_attrs["measured"] for t in trials) == TRIALS
    [killed] = [t for t in trials if t.number == killed_trial]
    assert killed.state == TrialState.FAIL
    [retry] = retried(trials, killed_trial)
    assert retry.state == TrialState.COMPLETE and retry.params == killed.system_attrs["fixed_params"]  # same proposal
    assert retry.user_attrs["slot"] == killed.user_attrs["slot"]

    single = run(*search_args(slow_model_dir, tmp_path / "single"))
    assert single.exit_code == 0, single.output
    assert front(tmp_path / "distributed") == front(tmp_path / "single")
    for study in (name, f"{name}.profile"):
        optuna.delete_study(study_name=study, storage=postgres_url)


def config_only_model(tiny_model_dir: Path, path: Path, **change) -> Path:
    """A model folder holding only a config (no weights, no tokenizer): loading it would fail, so a check that
    passes or refuses it ran before any model loaded."""
    path.mkdir()
    config = json.loads((tiny_model_dir / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, **change}))
    return path


@pytest.mark.parametrize("url,message", [
    ("postgresql://kvtuner:pw@127.0.0.1:1/kvtuner", r"error: cannot open storage postgresql://kvtuner:\*\*\*@127.0.0.1:1/kvtuner: .*(refused|failed)"),
    ("mysql://u:pw@127.0.0.1/db", "error: storage mysql://u:\\*\\*\\*@127.0.0.1/db needs the Python module 'MySQLdb'"),
    ("not a url", "error: --storage not a url is not a database URL"),
])
def test_bad_storage_is_one_line_before_the_model_loads(tiny_model_dir, tmp_path, url, message):
    import re

    model = config_only_model(tiny_model_dir, tmp_path / "model")
    out = tmp_path / "out"
    result = run("search", "--model", model, "--group-size", 16, "--storage", url, "--out", out)
    assert result.exit_code == 2 and result.stderr.count("\n") == 1, result.output
    assert re.match(message, result.stderr), result.stderr
    assert not out.exists()  # nothing written


def test_wrong_credentials(postgres_url, tiny_model_dir, tmp_path):
    from sqlalchemy.engine import make_url

    url = make_url(postgres_url).set(password="wrong").render_as_string(hide_password=False)
    model = config_only_model(tiny_model_dir, tmp_path / "model")
    result = run("search", "--model", model, "--group-size", 16, "--storage", url, "--out", tmp_path / "out")
    assert result.exit_code == 2 and result.stderr.count("\n") == 1
    assert "password authentication failed" in result.stderr and "wrong" not in result.stderr


def test_a_study_for_another_model_or_space_is_refused_before_the_model_loads(tiny_model_dir, tmp_path):
    common = ("--tokens", 64, "--group-size", 16, "--split-bits", 0, "--groups", 2, "--trials", 4, "--budgets", 4,
              "--out", tmp_path)
    first = run("search", "--model", tiny_model_dir, "--pairs", "KV8,K4V2,K2V2", *common)
    assert first.exit_code == 0, first.output
    db = tmp_path / "study.db"
    before = db.read_bytes()
    other = config_only_model(tiny_model_dir, tmp_path / "other", num_hidden_layers=4)
    for model, pairs, differ in ((other, "KV8,K4V2,K2V2", "differs in: fingerprint, model"),
                                 (tiny_model_dir, "KV8,K4V4,K2V2", "differs in: profile")):
        result = run("search", "--model", model, "--pairs", pairs, *common, "--resume")
        assert result.exit_code == 2 and result.stderr.count("\n") == 1, result.output
        assert "was made for another model, data or search space" in result.stderr and differ in result.stderr
    assert db.read_bytes() == before  # nothing written


def test_a_worker_without_a_study_says_so(tmp_path):
    result = run("worker", "--storage", f"sqlite:///{tmp_path / 'none.db'}", "--study", "nope", "--wait", 0)
    assert result.exit_code == 2 and result.stderr.startswith("error: no study 'nope' in sqlite:///")
