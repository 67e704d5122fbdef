"""Quality of a KV config: perplexity, KL and top-1 agreement against full precision, GSM8K accuracy."""

from kvtuner.evaluate.data import DataError, read_text, token_windows
from kvtuner.evaluate.runner import EvalResult, Evaluator, decode_chunk_size

__all__ = ["DataError", "EvalResult", "Evaluator", "decode_chunk_size", "read_text", "token_windows"]
