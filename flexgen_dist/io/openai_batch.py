"""OpenAI Batch API input files for `/v1/completions` (the files `vllm run-batch` reads too): each line becomes a
Request, or a LineError when it cannot run, which the run answers with that line's error record (openai_output.py)
instead of failing. docs/openai-batch.md has the mapping and what is unsupported."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

from flexgen_dist.base.errors import UserError
from flexgen_dist.io.prompts import SETTINGS, Request, read_lines, valid_input_ids

FORMATS = ("auto", "flexgen", "openai-batch")
URL = "/v1/completions"
# Body field -> the Request field it sets, checked by io/prompts.py's SETTINGS.
_FIELDS = {"max_tokens": "max_new_tokens", "stop": "stop", "temperature": "temperature", "top_p": "top_p",
           "seed": "seed", "logprobs": "logprobs", "echo": "echo"}
# Fields accepted at OpenAI's default values only (or null): anything else asks for what the engine does not do.
_DEFAULT_ONLY = {"n": (1,), "best_of": (1,), "stream": (False,), "suffix": (), "presence_penalty": (0, 0.0),
                 "frequency_penalty": (0, 0.0), "logit_bias": ({},), "stream_options": ()}
_IGNORED = ("model", "user")  # model: one run serves one model, whatever a line names (it is echoed back)


class _Refused(Exception):
    """A line that cannot run: its error record's code and message."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class LineError:
    """An input line that cannot run. `key`: what names it across runs (its custom_id, else its line)."""

    line: int
    custom_id: str | None
    key: str
    code: str
    message: str


@dataclass(frozen=True)
class BatchFile:
    requests: list[Request]  # the lines that can run; a request's id is its custom_id
    models: dict[str, str | None]  # custom_id -> the body's model
    line_of: dict[str, int]  # custom_id -> its line
    errors: list[LineError]


def custom_id_key(custom_id: str) -> str:
    """The key of a line that owns its custom_id (the first line to use it)."""
    return f"custom_id {custom_id}"


def is_batch_file(path: str | os.PathLike[str], prompts_format: str) -> bool:
    """auto: the first non-empty line decides: a batch file if it has a "custom_id" (or, not being valid JSON,
    mentions one)."""
    if prompts_format != "auto":
        return prompts_format == "openai-batch"
    try:
        with open(path, encoding="utf-8") as f:
            line = next((line for line in f if line.strip()), "")
    except (OSError, UnicodeDecodeError):
        return False  # the prompts reader reports it
    try:
        first = json.loads(line)
    except ValueError:
        return '"custom_id"' in line
    return isinstance(first, dict) and "custom_id" in first


def load_batch_file(path: str | os.PathLike[str]) -> BatchFile:
    """Every non-empty line is a request or a LineError; only an unreadable or empty file is a UserError."""
    batch = BatchFile([], {}, {}, [])
    for lineno, line in enumerate(read_lines(path), start=1):
        if not line.strip():
            continue
        custom_id, key = None, f"line {lineno}"
        try:
            obj = _json_object(line)
            custom_id = obj.get("custom_id")
            if not (isinstance(custom_id, str) and custom_id):
                custom_id = None
                raise _Refused("invalid_request", "'custom_id' must be a non-empty string")
            if custom_id in batch.line_of:
                raise _Refused("duplicate_custom_id", f"custom_id {custom_id!r} is already used on line "
                                                      f"{batch.line_of[custom_id]}")
            key = custom_id_key(custom_id)
            batch.line_of[custom_id] = lineno
            request, model = _request(obj, custom_id)
        except _Refused as e:
            batch.errors.append(LineError(lineno, custom_id, key, e.code, f"line {lineno}: {e}"))
            continue
        batch.requests.append(request)
        batch.models[custom_id] = model
    if not batch.requests and not batch.errors:
        raise UserError(f"prompts file {path}: contains no requests")
    return batch


def _json_object(line: str) -> dict:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise _Refused("invalid_json_line", f"invalid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(obj, dict):
        raise _Refused("invalid_json_line", f"expected a JSON object, got {type(obj).__name__}")
    return obj


def _request(obj: dict, custom_id: str) -> tuple[Request, str | None]:
    if obj.get("method") != "POST":
        raise _Refused("invalid_request", f"'method' must be \"POST\", got {obj.get('method')!r}")
    if obj.get("url") != URL:
        raise _Refused("unsupported", f"url {obj.get('url')!r} is not supported: only {URL}")
    body = obj.get("body")
    if not isinstance(body, dict):
        raise _Refused("invalid_request", "'body' must be a JSON object")
    for name, value in body.items():
        if name in _DEFAULT_ONLY and not _is_default(value, _DEFAULT_ONLY[name]):
            raise _Refused("unsupported", f"'{name}': {value!r} is not supported")
        if name not in (*_FIELDS, *_DEFAULT_ONLY, *_IGNORED, "prompt"):
            raise _Refused("unsupported", f"body field '{name}' is not supported")
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise _Refused("invalid_request", f"'model' must be a string, got {model!r}")
    prompt, input_ids = _prompt(body.get("prompt"))
    settings: dict[str, Any] = {"max_new_tokens": None}
    for theirs, ours in _FIELDS.items():
        value = body.get(theirs)
        if theirs == "stop" and isinstance(value, str):
            value = [value]  # OpenAI takes one stop string or a list
        if value is None:
            continue
        valid, expected = SETTINGS[ours]
        if not valid(value):
            raise _Refused("invalid_request", f"'{theirs}' must be {expected}, got {body[theirs]!r}")
        settings[ours] = tuple(value) if ours == "stop" else value
    return Request(custom_id, prompt, input_ids, **settings), model


def _is_default(value: Any, defaults: tuple) -> bool:
    # By type too: JSON true would equal 1, and 0 would equal false.
    return value is None or any(type(value) is type(d) and value == d for d in defaults)


def _prompt(value: Any) -> tuple[str | None, tuple[int, ...] | None]:
    """(text, None) or (None, token ids). OpenAI also takes a list of prompts: one, here, per line."""
    if value is None:
        raise _Refused("invalid_request", "missing 'prompt'")
    if isinstance(value, list) and value and isinstance(value[0], (str, list)):
        if len(value) != 1:
            raise _Refused("unsupported", f"'prompt' holds {len(value)} prompts: give one prompt per line")
        value = value[0]
    if isinstance(value, str):
        if not value.strip():
            raise _Refused("invalid_request", "'prompt' is empty")
        return value, None
    if valid_input_ids(value):
        return None, tuple(value)
    raise _Refused("invalid_request", "'prompt' must be a string or a non-empty list of non-negative token ids")
