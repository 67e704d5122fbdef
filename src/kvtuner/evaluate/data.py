"""Token windows from text or JSONL files, read by path (the project ships no data)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase


class DataError(ValueError):
    """A data file that cannot be used; the message names the file and the problem."""


def read_jsonl(path: str | Path, required: tuple[str, ...] = ()) -> list[dict]:
    """The objects of a JSONL file, each checked to have the ``required`` keys."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such data file")
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{n}: not valid JSON ({e.msg})") from None
        if not isinstance(row, dict) or not set(required) <= set(row):
            need = f"needs {' and '.join(map(repr, required))}" if required else "must be a JSON object"
            raise DataError(f"{path}:{n}: each line {need}")
        rows.append(row)
    if not rows:
        raise DataError(f"{path}: the data file is empty")
    return rows


def read_text(path: str | Path) -> str:
    """Plain text, or for ``.jsonl`` the ``text`` field (else question + answer) of each line, joined."""
    path = Path(path)
    if path.suffix == ".jsonl":
        rows = read_jsonl(path)
        raw = "\n\n".join(row.get("text") or "\n".join(str(row[k]) for k in ("question", "answer") if k in row)
                          for row in rows)
    elif path.is_file():
        raw = path.read_text(encoding="utf-8")
    else:
        raise DataError(f"{path}: no such data file")
    if not raw.strip():
        raise DataError(f"{path}: the data file is empty")
    return raw


def token_windows(
    path: str | Path,
    tokenizer: PreTrainedTokenizerBase,
    window: int,
    count: int = 1,
    skip_windows: int = 0,
) -> torch.Tensor:
    """``count`` disjoint windows of ``window`` tokens ([count, window]), after ``skip_windows`` windows.

    Disjoint windows let calibration and validation use different tokens of one file.
    """
    if window < 2:
        raise DataError(f"a window needs at least 2 tokens, not {window}")
    text = read_text(path)
    needed = window * (count + skip_windows)
    # Tokenize a prefix that is surely long enough (>= 1 char per token), growing if not.
    chars = needed * 8
    while True:
        ids = tokenizer(text[:chars], return_tensors="pt", add_special_tokens=False).input_ids[0]
        if ids.numel() >= needed or chars >= len(text):
            break
        chars *= 2
    if ids.numel() < needed:
        raise DataError(
            f"{path}: has {ids.numel()} tokens, fewer than the {needed} asked for "
            f"({count + skip_windows} windows of {window})"
        )
    start = skip_windows * window
    return ids[start : start + count * window].reshape(count, window)
