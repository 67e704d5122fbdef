"""What every process working on a study needs, stored in the study itself.

``kvtuner search`` writes the job into the study (user attributes ``kvtuner_job`` and
``kvtuner_tokens``), so that ``kvtuner worker`` needs only the storage URL and the study name.
The job holds the model, the profile's candidates, the search settings, and the calibration
token ids themselves: a worker measures exactly those tokens, whatever data files its host has.
A resumed study must have the same :meth:`SearchJob.identity`. That check runs before any model
is loaded, and the token check runs before any profiling.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import optuna
import torch

from kvtuner.config import KVConfig
from kvtuner.profile import ProfileSettings
from kvtuner.search.batches import DONE_ATTR
from kvtuner.search.storage import Liveness, find_study
from kvtuner.search.study import SearchError

JOB_ATTR = "kvtuner_job"
TOKENS_ATTR = "kvtuner_tokens"
JOB_VERSION = 1


def sha256_file(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@dataclass
class SearchJob:
    """The inputs of one search.

    data: for each ``--data`` source, its file's sha256, or ``"generated"``.
    calibration: the ``kvtuner calibrate`` file (its path must hold the same file on every host;
    ``calibration_sha256`` checks that).
    search: the settings the study's trials depend on (sampler, seed, population, groups, seed
    step, size objective, hard limits).
    context: ``--context``: every layer is priced by its KV bytes at this many tokens.
    gsm8k: for ``--objective gsm8k``, the worked examples and scored problems themselves and the
    generation length.
    longctx: for ``--objective longctx``, the filler text itself and the prompt lengths, depths
    and prompts per cell; every process builds the same calibration-split passkey prompts from
    them with its tokenizer and the search seed, whatever files its host has.
    liveness: heartbeat and grace period every process uses. It is not part of the identity.
    """

    model: str
    fingerprint: dict[str, Any]
    profile: dict[str, Any]
    data: list[str]
    tokens: int
    search: dict[str, Any]
    objective: str = "kl"
    context: int | None = None
    calibration: str | None = None
    calibration_sha256: str | None = None
    gsm8k: dict[str, Any] | None = None
    longctx: dict[str, Any] | None = None
    liveness: dict[str, Any] = field(default_factory=lambda: asdict(Liveness()))
    version: int = JOB_VERSION

    def identity(self) -> dict[str, Any]:
        """What a resumed study must share (paths and liveness may change between runs)."""
        out = asdict(self)
        del out["liveness"], out["calibration"]
        return out

    def profile_settings(self) -> ProfileSettings:
        p = self.profile
        return ProfileSettings(pairs=tuple(p["pairs"]), methods=tuple(p["methods"]), group_size=p["group_size"],
                               residual_length=p["residual_length"], split_bits=p["split_bits"])

    def get_liveness(self) -> Liveness:
        return Liveness(**self.liveness)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str, source: str) -> "SearchJob":
        try:
            data = json.loads(text)
            if data.get("version") != JOB_VERSION:
                raise ValueError(f"job version {data.get('version')}, this kvtuner reads {JOB_VERSION}")
            return cls(**{f.name: data[f.name] for f in fields(cls) if f.name in data})
        except (ValueError, TypeError, AttributeError) as e:
            raise SearchError(f"{source}: not a kvtuner job this version can run ({e})") from None


def differences(before: dict[str, Any], now: dict[str, Any]) -> list[str]:
    return sorted(k for k in {*before, *now} if before.get(k, ...) != now.get(k, ...))


def check_job(storage, name: str, job: SearchJob, resume: bool, where: str) -> None:
    """Before any model is loaded: refuse a study that exists without ``--resume``, or one made for
    another model, candidates, data or search settings. Reads only; writes nothing."""
    study = find_study(storage, name)
    if study is None:
        return
    if not resume:
        raise SearchError(f"study {name!r} already exists in {where}; pass --resume to continue it or give another --study")
    stored = study.user_attrs.get(JOB_ATTR)
    if stored is None:
        raise SearchError(f"study {name!r} in {where} was not made by kvtuner search; give another --study")
    before = SearchJob.from_json(stored, f"study {name!r}").identity()
    differ = differences(before, job.identity())
    if differ:
        detail = ""
        if "fingerprint" in differ or "model" in differ:
            detail = f" (the study's model: {before['model']} {before['fingerprint']})"
        raise SearchError(f"study {name!r} in {where} was made for another model, data or search space "
                          f"(differs in: {', '.join(differ)}){detail}; use a new --study or the original settings")


def publish_job(storage, name: str, job: SearchJob, calibration_ids: torch.Tensor, source: str) -> optuna.Study:
    """Create the study (if new) and store the job and the calibration tokens in it.

    A resumed study whose stored tokens differ from these is refused: for ``--data generated``
    that means the text was generated again differently.
    """
    study = optuna.create_study(storage=storage, study_name=name, directions=["minimize", "minimize"],
                                load_if_exists=True)
    study.set_user_attr(JOB_ATTR, job.to_json())
    ids = calibration_ids.tolist()
    stored = study.user_attrs.get(TOKENS_ATTR)
    if stored is not None and stored["ids"] != ids:
        raise SearchError(f"study {name!r} was measured on other calibration tokens than {source} gives now "
                          "(regenerated text?); use a new --study")
    study.set_user_attr(TOKENS_ATTR, {"ids": ids, "source": source})
    study.set_user_attr(DONE_ATTR, False)  # a worker that starts now must not leave on a finished earlier run
    return study


def read_job(study: optuna.Study) -> SearchJob:
    stored = study.user_attrs.get(JOB_ATTR)
    if stored is None:
        raise SearchError(f"study {study.study_name!r} was not made by kvtuner search; nothing to work on")
    return SearchJob.from_json(stored, f"study {study.study_name!r}")


def stored_tokens(study: optuna.Study) -> torch.Tensor | None:
    stored = study.user_attrs.get(TOKENS_ATTR)
    return None if stored is None else torch.tensor(stored["ids"])


def gsm8k_error(lm, tokenizer, rows: list[dict], problems: int, max_new_tokens: int) -> Callable[[KVConfig], float]:
    """Error rate of a config on GSM8K: rows 0-3 are the worked examples, the next ``problems`` are scored."""
    from kvtuner.evaluate.gsm8k import evaluate_gsm8k

    shots, scored = rows[:4], rows[4 : 4 + problems]

    def error(config: KVConfig) -> float:
        result = evaluate_gsm8k(lm, tokenizer, config, scored, shots, max_new_tokens=max_new_tokens, progress=False)
        return 1.0 - result.accuracy

    return error


def retrieval_error(lm, tokenizer, filler: str, lengths: list[int], depths: list[float], trials: int,
                    seed: int) -> Callable[[KVConfig], float]:
    """Share of calibration-split passkey prompts whose key a config loses (see kvtuner.evaluate.longctx)."""
    from kvtuner.evaluate.longctx import passkey_prompts, retrieval_accuracy

    prompts = passkey_prompts(tokenizer, filler, lengths, depths, trials, seed, split="calibration")

    def error(config: KVConfig) -> float:
        return 1.0 - retrieval_accuracy(lm, tokenizer, prompts, config)

    return error


def task_error(job: SearchJob, lm, tokenizer) -> Callable[[KVConfig], float] | None:
    """The measure of a task objective (gsm8k, longctx) from the job alone, so that the coordinator and
    every worker score trials alike; None for ``kl``, which each process measures on the study's tokens."""
    if job.objective == "gsm8k":
        g = job.gsm8k
        return gsm8k_error(lm, tokenizer, g["rows"], g["problems"], g["max_new_tokens"])
    if job.objective == "longctx":
        c = job.longctx
        return retrieval_error(lm, tokenizer, c["filler"], c["lengths"], c["depths"], c["trials"], job.search["seed"])
    return None
