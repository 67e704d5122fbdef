"""lm-evaluation-harness with a kvtuner cache: ``--model kvtuner`` and a GSM8K task read from local files.

Why: KVTuner reports GSM8K accuracy as lm-evaluation-harness computes it, and only the harness's
own prompt format, few-shot sampling and answer extraction make our numbers comparable to
published ones (``kvtuner gsm8k`` is a small harness of our own). Importing this module registers
:class:`KVTunerLM` in lm-eval's model registry; nothing else in kvtuner imports it.

:class:`KVTunerLM` is lm-eval's ``HFLM`` with two methods replaced:

* generation (``generate_until`` tasks such as GSM8K): the prompt is prefilled through a fresh
  :class:`~kvtuner.cache.MixedPrecisionCache` and every answer token decoded from it inside
  :func:`~kvtuner.cache.attention.use_packed_attention`, as ``kvtuner generate`` does. With
  ``--batch_size`` above 1 lm-eval left-pads each batch; the cache is given the batch's attention mask
  (:meth:`~kvtuner.cache.MixedPrecisionCache.set_padding`), so each row is stored and decoded as with
  batch size 1, on every supported transformers version;
* log-likelihood (multiple choice, perplexity): HFLM scores a continuation with one forward pass
  over context and continuation, which never reads a cache, so a KV config would change nothing.
  Here the context is prefilled through the cache and the continuation fed as decoded tokens, in
  chunks ending on the layers' residual-window boundaries (exactly token-by-token decoding, see
  :mod:`kvtuner.evaluate.runner`). The first continuation token is predicted by the prefill, which
  attends to the prompt in full precision as generation does, so a one-token continuation scores
  as with fp16; errors show from the second token on. One request at a time, no padding.

A 16-bit config gives HFLM's generations and (to float rounding) its log-likelihoods.

lm-eval 0.4.13 has no plugin hook that imports an outside package before it looks up ``--model``
(its ``--include_path`` only indexes task files), so ``kvtuner lm-eval ARGS`` (:func:`run_lm_eval`)
runs lm-eval's own command line with this module imported and ``lm_eval_tasks/`` included. The plain
``lm_eval`` command finds ``--model kvtuner`` too when ``--tasks`` names ``gsm8k_local.yaml`` by path:
lm-eval reads such a file, and so imports this module (the task's ``!function``), before it builds the model.

The task ``gsm8k_local`` (``lm_eval_tasks/gsm8k_local.yaml``) is lm-eval's ``gsm8k`` task with its
documents read from ``gsm8k_test.jsonl`` and ``gsm8k_train.jsonl`` (few-shot examples) in a local
folder: ``--metadata '{"data_dir": ...}'``, else ``$KVTUNER_DATA``, else ``../shared/data``.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from tqdm.auto import tqdm

try:
    from lm_eval.api.registry import register_model
    from lm_eval.models.huggingface import HFLM
except ImportError as e:  # the optional extra is missing
    raise ImportError(f"kvtuner's lm-eval integration needs lm-eval: pip install 'kvtuner[lm-eval]' ({e})") from None

from kvtuner.cache import MixedPrecisionCache, cache_kwargs, fingerprint
from kvtuner.cache.attention import use_packed_attention
from kvtuner.config import KVConfig, KVConfigError
from kvtuner.evaluate.data import DataError
from kvtuner.evaluate.runner import decode_chunk_size

TASKS_DIR = Path(__file__).with_name("lm_eval_tasks")
GSM8K_FILES = {"train": "gsm8k_train.jsonl", "test": "gsm8k_test.jsonl"}
DEFAULT_DATA_DIR = "../shared/data"


@register_model("kvtuner")
class KVTunerLM(HFLM):
    """HFLM whose generation and log-likelihoods go through a kvtuner cache.

    pretrained: ``default``, a Hugging Face id or folder, a ``.gguf`` file (:func:`kvtuner.models.load_model`),
    or a loaded model (then pass ``tokenizer``). One of ``kv_config`` (a kvtuner JSON config or KVTuner YAML
    preset) or ``kv`` (a uniform shorthand: ``fp16``, ``K8V4``, ``KV3+sink1+prerope``; with ``method``,
    ``group_size``, ``residual_length`` and ``calibration`` as in ``kvtuner eval --kv``).
    dtype: weights' dtype (``auto``: float32, kvtuner's default). Other arguments go to HFLM.
    """

    def __init__(self, pretrained="default", kv_config: str | None = None, kv: str | None = None,
                 method: str = "kivi", group_size: int = 32, residual_length: int = 32,
                 calibration: str | None = None, dtype: str | torch.dtype = "auto", device: str | None = None,
                 **kwargs):
        if (kv_config is None) == (kv is None):
            raise KVConfigError("give exactly one of kv=SHORTHAND or kv_config=FILE in --model_args")
        if device is None or (str(device).startswith("cuda") and not torch.cuda.is_available()):
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if isinstance(pretrained, str):
            from kvtuner.models import load_model

            if isinstance(dtype, str):
                dtype = torch.float32 if dtype == "auto" else getattr(torch, dtype)
            pretrained, tokenizer = load_model(pretrained, dtype=dtype, device=device)
            kwargs.setdefault("tokenizer", tokenizer)
        if kv_config is not None:
            config = KVConfig.load(kv_config)
            config.name = config.name or Path(kv_config).stem
        else:
            model_fp = fingerprint(pretrained.config)
            config = KVConfig.uniform(str(kv), model_fp.num_layers, method=method, group_size=int(group_size),
                                      residual_length=int(residual_length), model=model_fp, calibration=calibration)
        MixedPrecisionCache(config, pretrained.config)  # checks layer count, shape, layer types, calibration now
        self.kv_config = config
        super().__init__(pretrained=pretrained, device=device, **kwargs)

    def new_cache(self) -> MixedPrecisionCache:
        return MixedPrecisionCache(self.kv_config, self.model.config)

    def _model_generate(self, context, max_length, stop, **generation_kwargs):
        cache = self.new_cache()
        if generation_kwargs.get("attention_mask") is not None:  # a left-padded batch: rows stored as alone
            cache.set_padding(generation_kwargs["attention_mask"])
        with use_packed_attention(self.model, cache):
            return super()._model_generate(context, max_length, stop, **generation_kwargs,
                                           **cache_kwargs(self.model, cache))

    @torch.no_grad()
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs=None):
        """(sum of log-probs, greedy?) of each continuation, the context prefilled and the continuation decoded.

        One request at a time: ``override_bs`` (HFLM's rolling scorer passes it) has nothing to size."""
        results = []
        for request, context_enc, continuation_enc in tqdm(requests, disable=disable_tqdm or self.rank != 0,
                                                           desc="loglikelihood through the kvtuner cache"):
            # HFLM's window: the last max_length tokens of context + continuation, minus the final token
            inp = (context_enc + continuation_enc)[-(self.max_length + 1):][:-1]
            targets = torch.tensor(continuation_enc, device=self.device)
            prefill = len(inp) - len(continuation_enc) + 1  # the prompt; its last logits predict the first target
            logprobs = self._decode_logprobs(torch.tensor([inp], device=self.device), prefill)
            scores = logprobs.gather(-1, targets[:, None])[:, 0]
            answer = (float(scores.sum()), bool((logprobs.argmax(-1) == targets).all()))
            results.append(answer)
            if request is not None:
                self.cache_hook.add_partial("loglikelihood", request, answer)
        return results

    def _decode_logprobs(self, input_ids: torch.Tensor, prefill: int) -> torch.Tensor:
        """Log-probs ``[T - prefill + 1, V]`` of the tokens after ``input_ids[:, :prefill]``: the prompt is prefilled
        in one forward pass, the rest fed in chunks that end where the residual windows fill (decode-faithful)."""
        length = input_ids.shape[1]
        chunk = decode_chunk_size(self.kv_config, length)
        cache = self.new_cache()
        kwargs = cache_kwargs(self.model, cache)
        logits = [self.model(input_ids[:, :prefill], use_cache=True, logits_to_keep=1, **kwargs).logits[0]]
        start = prefill
        while start < length:
            end = min((start // chunk + 1) * chunk, length)
            logits.append(self.model(input_ids[:, start:end], use_cache=True, **kwargs).logits[0])
            start = end
        return torch.log_softmax(torch.cat(logits).float(), dim=-1)


def local_gsm8k(data_dir: str | None = None, **_metadata):
    """GSM8K's train and test splits from local jsonl files (the ``custom_dataset`` of ``gsm8k_local``).

    lm-eval passes the task's metadata (``--metadata``, merged with ``--model_args``) as keyword arguments;
    only ``data_dir`` is read."""
    import datasets

    folder = Path(data_dir or os.environ.get("KVTUNER_DATA") or DEFAULT_DATA_DIR)
    files = {split: folder / name for split, name in GSM8K_FILES.items()}
    for path in files.values():
        if not path.is_file():
            raise DataError(f"{path}: no such data file (give the folder with --metadata '{{\"data_dir\": \"...\"}}' "
                            "or KVTUNER_DATA)")
    return datasets.load_dataset("json", data_files={split: str(path) for split, path in files.items()})


def run_lm_eval(args: list[str]) -> None:
    """lm-eval's command line (``lm_eval ARGS``) with ``--model kvtuner`` registered and, unless ``args``
    give their own ``--include_path``, kvtuner's task folder included (lm-eval takes a single one)."""
    import sys

    from lm_eval.__main__ import cli_evaluate

    if args and not any(a == "--include_path" or a.startswith("--include_path=") for a in args):
        args = [*args, "--include_path", str(TASKS_DIR)]
    argv, sys.argv = sys.argv, ["lm_eval", *args]
    try:
        cli_evaluate()
    finally:
        sys.argv = argv
