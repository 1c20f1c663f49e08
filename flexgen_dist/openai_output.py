"""OpenAI Batch API output lines for a batch file's requests (`run.Results`): a completion (`/v1/completions` response
body) per request that ran, an error record per line that could not. Every line's `id` is derived from its custom_id
(else its line number) and is the same on every run: a resumed run finds the lines already answered by it."""

from __future__ import annotations

import hashlib
import os
import time
import uuid
from typing import Any

from flexgen_dist.base.errors import ContextLengthExceeded, UserError
from flexgen_dist.engine.generation import Sequence
from flexgen_dist.io.model_source import model_config
from flexgen_dist.io.openai_batch import BatchFile, LineError, custom_id_key, is_batch_file, load_batch_file
from flexgen_dist.io.prompts import Request
from flexgen_dist.run_config import RunConfig

_FINISH_REASONS = {"eos": "stop", "stop": "stop", "length": "length"}  # OpenAI reports EOS as "stop"


def batch_input(path: str | os.PathLike[str], prompts_format: str,
                run: RunConfig) -> tuple[list[Request], BatchOutput] | None:
    """A batch file's requests and the output that answers them (`generate(run, *these)`); None: the file is in our
    own format (`prompts_format`: io/openai_batch.FORMATS)."""
    if not is_batch_file(path, prompts_format):
        return None
    batch = load_batch_file(path)
    return batch.requests, BatchOutput(batch, model_config(run.model).name, run.logprobs)


def record_id(key: str) -> str:
    return "batch_req_" + hashlib.sha256(key.encode()).hexdigest()[:32]


class BatchOutput:
    """The output lines of a BatchFile's requests. `model_name`: the model a completion names when its line names
    none; `default_logprobs`: the run's --logprobs, which lines that say nothing get (echo alone shows no
    log-probabilities, as OpenAI's)."""

    def __init__(self, batch: BatchFile, model_name: str, default_logprobs: int | None) -> None:
        self.batch, self.model_name, self.default_logprobs = batch, model_name, default_logprobs

    def key(self, request: Request) -> str:
        return record_id(custom_id_key(request.id))

    def input_errors(self) -> list[dict]:
        return [_error_record(e) for e in self.batch.errors]

    def refused(self, request: Request, error: UserError) -> dict:
        line = self.batch.line_of[request.id]
        code = "context_length_exceeded" if isinstance(error, ContextLengthExceeded) else "invalid_request"
        return _error_record(LineError(line, request.id, custom_id_key(request.id), code, f"line {line}: {error}"))

    def record(self, request: Request, seq: Sequence, tokenizer: Any) -> dict:
        prompt_text = ""
        if tokenizer is not None:
            prompt_text = request.prompt or tokenizer.decode(seq.prompt_ids, skip_special_tokens=True)
        text = (prompt_text if request.echo else "") + (seq.output_text or "")
        asked = request.logprobs is not None or self.default_logprobs is not None
        choice = {"index": 0, "text": text,
                  "logprobs": _logprobs(seq, request.echo, len(prompt_text), tokenizer) if asked else None,
                  "finish_reason": _FINISH_REASONS[seq.finish_reason], "token_ids": seq.output_ids}
        usage = {"prompt_tokens": len(seq.prompt_ids), "completion_tokens": len(seq.output_ids),
                 "total_tokens": len(seq.prompt_ids) + len(seq.output_ids)}
        body = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": self.batch.models[request.id] or self.model_name, "choices": [choice], "usage": usage}
        return {"id": self.key(request), "custom_id": request.id,
                "response": {"status_code": 200, "request_id": f"req_{uuid.uuid4().hex}", "body": body},
                "error": None}


def _error_record(error: LineError) -> dict:
    return {"id": record_id(error.key), "custom_id": error.custom_id, "response": None,
            "error": {"code": error.code, "message": error.message, "line": error.line}}


def _logprobs(seq: Sequence, echo: bool, prompt_chars: int, tokenizer: Any) -> dict:
    """OpenAI's completions logprobs: per token (with echo the prompt's first, the first of them null) its text, its
    log-probability and {text: log-probability} of the alternatives and the token itself; `text_offset`: where each
    token starts, counted from the start of the prompt's text. Without a tokenizer tokens are named "token_id:N"
    (vLLM's convention) and there are no offsets."""
    lp = seq.logprobs
    ids, values, tops = list(seq.output_ids), list(lp.tokens), list(lp.top)
    if echo and lp.prompt is not None:
        ids, values, tops = seq.prompt_ids + ids, lp.prompt + values, lp.prompt_top + tops
    token_text = (lambda i: f"token_id:{i}") if tokenizer is None else (lambda i: tokenizer.decode([i]))
    tokens = [token_text(i) for i in ids]
    top_logprobs = []
    for token, value, top in zip(tokens, values, tops):
        if top is None:
            top_logprobs.append(None)
            continue
        entry = {token_text(i): v for i, v in top}
        entry.setdefault(token, value)  # OpenAI always includes the chosen token: up to logprobs + 1 entries
        top_logprobs.append(entry)
    offsets = None
    if tokenizer is not None:
        offsets, at = [], 0 if echo else prompt_chars
        for token in tokens:
            offsets.append(at)
            at += len(token)
    return {"tokens": tokens, "token_logprobs": values, "top_logprobs": top_logprobs, "text_offset": offsets}
