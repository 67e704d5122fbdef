"""kvtuner: quantize the KV cache of a language model per layer, and measure what it costs."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from kvtuner.config import KVConfig, KVConfigError, write_atomic
from kvtuner.evaluate.data import DataError, read_text
from kvtuner.models import ModelNotFoundError
from kvtuner.search.commands import ModelOpt, calibrate_command, profile_command, search_command, worker_command

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)
app.command("calibrate")(calibrate_command)
app.command("profile")(profile_command)
app.command("search")(search_command)
app.command("worker")(worker_command)
console = Console(stderr=True)
stdout = Console(width=None if sys.stdout.isatty() else 160)

KvOpt = Annotated[Optional[list[str]], typer.Option("--kv", help="uniform shorthand: fp16, KV8, K8V4, K4V2, ... (eval: repeatable)")]
ConfigOpt = Annotated[Optional[list[Path]], typer.Option("--config", help="per-layer config: kvtuner JSON or KVTuner YAML preset (eval: repeatable)")]
MethodOpt = Annotated[str, typer.Option("--method", help="with --kv: kivi, per_token, fp8 or kvquant")]
GroupOpt = Annotated[int, typer.Option("--group-size", help="with --kv: quantization group size")]
ResidualOpt = Annotated[int, typer.Option("--residual-length", help="with --kv: full-precision window of recent tokens")]
LayersOpt = Annotated[str, typer.Option("--layers", help="with --kv: 'all' layers, or 'full': only full-attention layers "
                                         "(sliding-window layers stay fp16)")]
CalibrationOpt = Annotated[Optional[Path], typer.Option("--calibration", help="with --kv: kvtuner calibrate's file, for +nuq / +ds / kvquant shorthands")]

USER_ERRORS = (KVConfigError, DataError, ModelNotFoundError)


def fail(message: str) -> typer.Exit:
    """Print a one-line error and return the exit to raise (status 2)."""
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(2)


def resolve_configs(model: str, kv: list[str] | None, config: list[Path] | None, method: str, group_size: int,
                    residual_length: int, single: bool = False, calibration: Path | None = None,
                    layers: str = "all") -> list[KVConfig]:
    """The KVConfigs the flags ask for, checked against the model's config before any weights load
    (layer count, layer types, head shape, RoPE support, calibration file and its fingerprint).
    layers: which layers a --kv shorthand quantizes ("all", or "full": full-attention layers only)."""
    import transformers

    from kvtuner.cache import fingerprint, layer_methods
    from kvtuner.cache.mixed import check_layer_types
    from kvtuner.cache.compat import layer_types
    from kvtuner.models import load_model_config

    transformers.logging.set_verbosity_error()
    kv, config = kv or [], config or []
    count = len(kv) + len(config)
    if count == 0 or (single and count > 1):
        raise KVConfigError("give exactly one of --kv SHORTHAND or --config FILE" if single else "give --kv SHORTHAND or --config FILE")
    loaded = [KVConfig.load(path) for path in config]  # a malformed file fails before the model is looked up
    model_config = load_model_config(model)
    fp = fingerprint(model_config)
    for cfg, path in zip(loaded, config):
        cfg.check_model(fp)
        cfg.name = cfg.name or path.stem
    uniform = [KVConfig.uniform(k, fp.num_layers, method=method, group_size=group_size, residual_length=residual_length,
                                model=fp, calibration=None if calibration is None else str(calibration)) for k in kv]
    if layers == "full":
        if config:
            raise KVConfigError("--layers full applies to --kv shorthands; a config file gives every layer its own spec")
        types = [layer_type for layer_type, _ in layer_types(model_config)]
        if "full_attention" not in types:
            raise KVConfigError("the model has no full-attention layer: --layers full would quantize nothing")
        fp16 = KVConfig.uniform("fp16", 1).layers[0]
        for cfg in uniform:
            if any(t != "full_attention" for t in types):
                cfg.layers = [spec if t == "full_attention" else fp16 for spec, t in zip(cfg.layers, types)]
                cfg.name = f"{cfg.name} (full-attention layers)"
    elif layers != "all":
        raise KVConfigError(f"--layers must be 'all' or 'full', not {layers!r}")
    for cfg in uniform + loaded:
        check_layer_types(cfg, model_config)
        layer_methods(cfg, model_config)
    return uniform + loaded


def load(model: str):
    from kvtuner.models import load_model

    with console.status(f"loading model {model}"):
        return load_model(model)


@app.command("eval")
def eval_command(
    data: Annotated[Path, typer.Option("--data", help="text or jsonl file to score")],
    model: ModelOpt = "default",
    kv: KvOpt = None,
    config: ConfigOpt = None,
    method: MethodOpt = "kivi",
    group_size: GroupOpt = 32,
    residual_length: ResidualOpt = 32,
    calibration: CalibrationOpt = None,
    layers: LayersOpt = "all",
    max_tokens: Annotated[int, typer.Option("--max-tokens", help="tokens to score")] = 2048,
    skip_windows: Annotated[int, typer.Option("--skip-windows", help="windows of --max-tokens tokens skipped first (e.g. past front matter or calibration text)")] = 0,
    as_json: Annotated[bool, typer.Option("--json", help="print one JSON object per config instead of a table")] = False,
) -> None:
    """Perplexity, KL and top-1 agreement against the full-precision cache, decode-faithful; and real KV bytes."""
    from kvtuner.evaluate import Evaluator, token_windows

    try:
        if not data.is_file():
            raise DataError(f"{data}: no such data file")
        if skip_windows < 0:
            raise DataError(f"--skip-windows must not be negative, not {skip_windows}")
        configs = resolve_configs(model, kv, config, method, group_size, residual_length, calibration=calibration,
                                  layers=layers)
        lm, tokenizer = load(model)
        evaluator = Evaluator(lm, token_windows(data, tokenizer, max_tokens, skip_windows=skip_windows),
                              progress=not as_json)
    except USER_ERRORS as e:
        raise fail(str(e)) from None
    columns = ("config", "ppl", "kl", "top1", "avg_bits", "effective_bits", "kv_bytes", "kv_bytes_fp16", "kv_ratio")
    after = f" after the first {skip_windows * max_tokens}" if skip_windows else ""
    table = Table(title=f"kvtuner eval on {evaluator.tokens} tokens of {data.name}{after} "
                        f"(full-precision ppl {evaluator.reference_ppl():.3f}, model dtype {lm.dtype})")
    for key in columns:
        table.add_column(key, justify="left" if key == "config" else "right")
    for cfg in configs:
        result = evaluator.evaluate(cfg)
        row = {"config": cfg.name, **result.to_dict(), "kv_ratio": result.kv_bytes / result.kv_bytes_fp16}
        if as_json:
            print(json.dumps(row), flush=True)
            continue
        table.add_row(
            cfg.name, f"{result.ppl:.3f}", f"{result.kl:.5f}", f"{result.top1:.4f}", f"{result.avg_bits:.2f}",
            f"{result.effective_bits:.2f}", f"{result.kv_bytes:,}", f"{result.kv_bytes_fp16:,}", f"{row['kv_ratio']:.4f}",
        )
    if not as_json:
        stdout.print(table)


@app.command()
def generate(
    prompt: Annotated[str, typer.Argument(help="the prompt")],
    model: ModelOpt = "default",
    kv: KvOpt = None,
    config: ConfigOpt = None,
    method: MethodOpt = "kivi",
    group_size: GroupOpt = 32,
    residual_length: ResidualOpt = 32,
    calibration: CalibrationOpt = None,
    layers: LayersOpt = "all",
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens")] = 128,
    chat: Annotated[bool, typer.Option("--chat/--raw", help="wrap the prompt in the model's chat template")] = True,
) -> None:
    """Generate text with the quantized cache, streamed, then the KV bytes against fp16."""
    from transformers import TextStreamer

    from kvtuner.cache import MixedPrecisionCache, cache_kwargs
    from kvtuner.cache.attention import use_packed_attention

    try:
        [cfg] = resolve_configs(model, kv, config, method, group_size, residual_length, single=True,
                                 calibration=calibration, layers=layers)
        lm, tokenizer = load(model)
    except USER_ERRORS as e:
        raise fail(str(e)) from None
    if chat and tokenizer.chat_template:
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
    else:
        text = prompt
    enc = tokenizer(text, return_tensors="pt", add_special_tokens=not chat).to(lm.device)
    cache = MixedPrecisionCache(cfg, lm.config)
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    with use_packed_attention(lm, cache):  # decode steps read the packed history, never a dequantized copy
        lm.generate(**enc, **cache_kwargs(lm, cache), max_new_tokens=max_new_tokens, do_sample=False,
                    streamer=streamer, pad_token_id=tokenizer.pad_token_id)
    nbytes, fp16 = cache.nbytes(), cache.nbytes_fp16()
    console.print(
        f"KV cache: {nbytes:,} bytes vs {fp16:,} in fp16 ({nbytes / fp16:.3f}×), "
        f"{cache.get_seq_length()} tokens, config {cfg.name} ({cfg.avg_bits:.2f} avg bits)"
    )


@app.command()
def longctx(
    filler: Annotated[Path, typer.Option("--filler", help="text file the filler comes from (e.g. a novel): its first 3/4 "
                                         "(the last 1/4 is search --objective longctx's)")],
    model: ModelOpt = "default",
    kv: KvOpt = None,
    config: ConfigOpt = None,
    method: MethodOpt = "kivi",
    group_size: GroupOpt = 32,
    residual_length: ResidualOpt = 32,
    calibration: CalibrationOpt = None,
    layers: LayersOpt = "all",
    lengths: Annotated[str, typer.Option("--lengths", help="prompt lengths in tokens, e.g. 2k,4k,8k")] = "2k,4k,8k",
    depths: Annotated[str, typer.Option("--depths", help="depths of the key in percent of the filler")] = "0,25,50,75,100",
    trials: Annotated[int, typer.Option("--trials", min=1, help="prompts per (length, depth)")] = 20,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    figure: Annotated[Optional[Path], typer.Option("--figure", help="write the accuracy heatmaps here (PNG)")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the results as JSON")] = False,
    out: Annotated[Optional[Path], typer.Option("--out", help="write the results as JSON here after every prompt (and "
                                                "the --figure after every length), so a long run leaves a partial table")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="continue the partial run saved in --out (same flags)")] = False,
) -> None:
    """Passkey retrieval: a key hidden at each depth of long prompts, against the full-precision cache on the same prompts.

    Each prompt is prefilled once for all configs (the same answers as a prefill through each config's cache)."""
    from kvtuner.evaluate.longctx import RetrievalResult, evaluate_retrieval, parse_length, retrieval_figure

    try:
        length_list = [parse_length(x) for x in lengths.split(",")]
        depth_list = [float(x) / 100 for x in depths.split(",")]
    except ValueError:
        raise fail(f"--lengths and --depths take comma-separated numbers, not {lengths!r} / {depths!r}") from None
    if not all(0 <= d <= 1 for d in depth_list):
        raise fail("--depths are percentages from 0 to 100")
    try:
        configs = resolve_configs(model, kv, config, method, group_size, residual_length, calibration=calibration,
                                  layers=layers)
        if resume and out is None:
            raise fail("--resume continues the run saved in --out; give --out")
        saved = {}
        if resume and out.is_file():
            try:
                saved = json.loads(out.read_text())
                if not isinstance(saved, dict) or "results" not in saved:
                    raise ValueError("no 'results'")
            except (OSError, ValueError) as e:
                raise fail(f"{out} is not a run kvtuner longctx saved ({e}); give another --out or drop --resume") from None
            if (saved.get("trials"), saved.get("seed")) != (trials, seed):
                raise fail(f"{out} was saved with --trials {saved.get('trials')} --seed {saved.get('seed')}")
        text = read_text(filler)
        lm, tokenizer = load(model)
        started = time.perf_counter() - saved.get("seconds", 0)

        def save(results, done: int, total: int) -> None:
            if out is not None:
                document = {"done": done, "total": total, "trials": trials, "seed": seed,
                            "seconds": round(time.perf_counter() - started, 1),
                            "results": [r.to_json(results[0]) for r in results]}
                write_atomic(out, json.dumps(document))
            if figure is not None and done % (trials * len(depth_list)) == 0:  # a length is complete
                retrieval_figure(results, figure)

        results = evaluate_retrieval(lm, tokenizer, [None, *configs], text, length_list, depth_list, trials, seed,
                                     progress=not as_json, on_prompt=save,
                                     resume=[RetrievalResult.from_json(r) for r in saved.get("results", [])])
    except USER_ERRORS as e:
        raise fail(str(e)) from None
    if figure is not None:
        retrieval_figure(results, figure)
    if as_json:
        print(json.dumps([r.to_json(results[0]) for r in results]))
        return
    for r in results:
        same, misses = r.agreement(results[0])
        table = Table(title=f"passkey accuracy: {r.config} ({trials} prompts a cell)",
                      caption=None if r is results[0] else "(a/b): the same answer as fp16 on a of the b prompts whose key it misses")
        table.add_column("tokens")
        for d in r.depths:
            table.add_column(f"{d:.0%}", justify="right")
        for n, row, same_row, miss_row in zip(r.lengths, r.accuracy, same, misses):
            table.add_row(str(n), *[f"{a:.2f}" + (f" ({s}/{m})" if m and r is not results[0] else "")
                                    for a, s, m in zip(row, same_row, miss_row)])
        console.print(table)


@app.command("lm-eval", add_help_option=False,
             context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def lm_eval_command(ctx: typer.Context) -> None:
    """lm-evaluation-harness's own command line with --model kvtuner and the task gsm8k_local (local files).

    Example: kvtuner lm-eval --model kvtuner --model_args pretrained=default,kv=K4V4 --tasks gsm8k_local
    --metadata '{"data_dir": "../shared/data"}' --limit 20 --device cpu (needs pip install 'kvtuner[lm-eval]')."""
    try:
        from kvtuner.evaluate.harness import run_lm_eval
    except ImportError as e:
        raise fail(str(e)) from None
    try:
        run_lm_eval(ctx.args)
    except USER_ERRORS as e:  # a bad kv=, kv_config= or pretrained= in --model_args: ours, so one line
        raise fail(str(e)) from None


@app.command()
def gsm8k(
    data: Annotated[Path, typer.Option("--data", help="GSM8K jsonl to score (question/answer)")],
    shots_file: Annotated[Optional[Path], typer.Option("--shots-file", help="jsonl the few-shot examples come from (default: --data, disjoint from the scored ones)")] = None,
    model: ModelOpt = "default",
    kv: KvOpt = None,
    config: ConfigOpt = None,
    method: MethodOpt = "kivi",
    group_size: GroupOpt = 32,
    residual_length: ResidualOpt = 32,
    calibration: CalibrationOpt = None,
    layers: LayersOpt = "all",
    limit: Annotated[int, typer.Option("--limit", help="questions to score")] = 50,
    shots: Annotated[int, typer.Option("--shots")] = 4,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens")] = 256,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """GSM8K few-shot exact-match accuracy, greedy, with the cache under test."""
    from kvtuner.evaluate.gsm8k import evaluate_gsm8k, load_gsm8k

    try:
        rows = load_gsm8k(data)
        shot_rows = load_gsm8k(shots_file) if shots_file else rows
        [cfg] = resolve_configs(model, kv, config, method, group_size, residual_length, single=True,
                                 calibration=calibration, layers=layers)
        lm, tokenizer = load(model)
    except USER_ERRORS as e:
        raise fail(str(e)) from None
    few = shot_rows[:shots]
    examples = rows[shots : shots + limit] if shots_file is None else rows[:limit]
    result = evaluate_gsm8k(lm, tokenizer, cfg, examples, few, max_new_tokens=max_new_tokens, progress=not as_json)
    summary = {"config": cfg.name, "accuracy": result.accuracy, "correct": result.correct,
               "total": result.total, "avg_bits": cfg.avg_bits}
    if as_json:
        print(json.dumps(summary))
    else:
        console.print(f"GSM8K {shots}-shot: {result.correct}/{result.total} = {result.accuracy:.3f} ({summary['config']})")

