"""Requests to generate for: read and fully validated before any model work starts."""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from flexgen_dist.base.errors import UserError

# OPT reserves ids 0-3 for <s>, <pad>, </s>, <unk>; synthetic prompts avoid them.
_FIRST_ORDINARY_ID = 4
MAX_LOGPROBS = 20  # alternatives per token, at most (OpenAI's completions API allows as many)


@dataclass(frozen=True)
class Request:
    """One prompt: exactly one of `prompt` (text) or `input_ids` (pre-tokenized) is set. The fields after them are the
    prompt's own generation settings; None: the run's."""

    id: str
    prompt: str | None
    input_ids: tuple[int, ...] | None
    max_new_tokens: int | None
    stop: tuple[str, ...] | None = None  # the output ends before the first of these
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None  # of this prompt's own generator (else one from the run's seed and the id)
    logprobs: int | None = None  # alternatives per token; with it, each token's log-probability too
    echo: bool = False  # the prompt tokens' log-probabilities too


def _is_int(value: Any) -> bool:
    # JSON true/false arrive as bool, which is an int subclass in Python.
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def valid_stop(value: Any) -> bool:
    return isinstance(value, (list, tuple)) and all(isinstance(s, str) and s for s in value)


def valid_input_ids(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(_is_int(t) and t >= 0 for t in value)


# Optional per-prompt fields: (is the value valid, what it must be).
SETTINGS = {
    "max_new_tokens": (lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    "stop": (valid_stop, "a list of non-empty strings"),
    "temperature": (lambda v: _is_number(v) and v >= 0, "a number >= 0"),
    "top_p": (lambda v: _is_number(v) and 0 < v <= 1, "a number in (0, 1]"),
    "seed": (_is_int, "an integer"),
    "logprobs": (lambda v: _is_int(v) and 0 <= v <= MAX_LOGPROBS, f"an integer from 0 to {MAX_LOGPROBS}"),
    "echo": (lambda v: isinstance(v, bool), "true or false"),
}


def _parse_line(obj: Any, where: str) -> Request:
    if not isinstance(obj, dict):
        raise UserError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    if "id" not in obj:
        raise UserError(f"{where}: missing 'id'")
    rid = obj["id"]
    if not (_is_int(rid) or (isinstance(rid, str) and rid != "")):
        raise UserError(f"{where}: 'id' must be a non-empty string or an integer, got {rid!r}")
    has_prompt, has_ids = "prompt" in obj, "input_ids" in obj
    if has_prompt == has_ids:
        raise UserError(f"{where}: give exactly one of 'prompt' or 'input_ids'")
    prompt = input_ids = None
    if has_prompt:
        prompt = obj["prompt"]
        if not isinstance(prompt, str):
            raise UserError(f"{where}: 'prompt' must be a string")
        if not prompt.strip():
            raise UserError(f"{where}: 'prompt' is empty")
    else:
        ids = obj["input_ids"]
        if not valid_input_ids(ids):
            raise UserError(f"{where}: 'input_ids' must be a non-empty list of non-negative integers")
        input_ids = tuple(ids)
    for key, (valid, expected) in SETTINGS.items():
        if obj.get(key) is not None and not valid(obj[key]):
            raise UserError(f"{where}: '{key}' must be {expected}, got {obj[key]!r}")
    stop = obj.get("stop")
    return Request(str(rid), prompt, input_ids, obj.get("max_new_tokens"), None if stop is None else tuple(stop),
                   obj.get("temperature"), obj.get("top_p"), obj.get("seed"), obj.get("logprobs"),
                   obj.get("echo") or False)


def read_lines(path: str | os.PathLike[str]) -> list[str]:
    """A JSONL input file's lines (blank ones included, so indexes give line numbers); an unreadable file is a
    UserError."""
    try:
        with open(path, encoding="utf-8") as f:
            # Not splitlines(): JSON strings may hold raw U+2028 etc., which it would split on.
            return f.read().split("\n")
    except FileNotFoundError:
        raise UserError(f"prompts file {path}: not found") from None
    except UnicodeDecodeError as e:
        raise UserError(f"prompts file {path}: not valid UTF-8 ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise UserError(f"prompts file {path}: cannot read ({e.strerror or e})") from None


def load_prompts_file(path: str | os.PathLike[str]) -> list[Request]:
    """Parse a JSONL prompts file; every problem is a UserError naming the file and line."""
    lines = read_lines(path)
    requests: list[Request] = []
    first_line: dict[str, int] = {}
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path} line {lineno}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from None
        req = _parse_line(obj, where)
        if req.id in first_line:
            raise UserError(f"{where}: duplicate id {req.id!r} (first used on line {first_line[req.id]})")
        first_line[req.id] = lineno
        requests.append(req)
    if not requests:
        raise UserError(f"prompts file {path}: contains no requests")
    return requests


def requests_from_cli(prompts: list[str]) -> list[Request]:
    """Prompts given on the command line, numbered "0", "1", ... in order."""
    for i, text in enumerate(prompts):
        if not text.strip():
            raise UserError(f"prompt #{i} on the command line is empty")
    return [Request(str(i), text, None, None) for i, text in enumerate(prompts)]


def synthetic_requests(n: int, prompt_len: int, vocab_size: int, seed: int) -> list[Request]:
    """`n` random token prompts for benchmarks; the same arguments always give the same prompts."""
    if n < 1:
        raise UserError(f"synthetic prompt count must be >= 1, got {n}")
    if prompt_len < 1:
        raise UserError(f"synthetic prompt length must be >= 1, got {prompt_len}")
    if vocab_size <= _FIRST_ORDINARY_ID:
        raise UserError(f"vocab size must be > {_FIRST_ORDINARY_ID} for synthetic prompts, got {vocab_size}")
    ids = np.random.default_rng(seed).integers(_FIRST_ORDINARY_ID, vocab_size, size=(n, prompt_len))
    return [Request(f"synthetic-{i}", None, tuple(int(t) for t in row), None) for i, row in enumerate(ids)]
