"""HELM requests as the engine's requests, and the engine's records back as HELM completions: pure, no model, no run.

prompt -> prompt (tokenized by the engine as HELM's HuggingFaceClient tokenizes it: the tokenizer's special tokens
added), max_tokens -> max_new_tokens, stop_sequences -> stop, temperature (0: greedy), top_p, num_completions n -> n
sequences, each sampled with its own seed from the run's --seed, `random`, the prompt and its index (greedy ones are
one sequence: they would be equal), echo_prompt -> echo. An echo with max_tokens 0 (HELM's multiple-choice "separate"
methods, language modelling) scores the prompt only: the engine generates one token, which is dropped. What the engine
cannot honour is refused (`refusal`), not ignored. Needs crfm-helm (.venv-helm)."""

from __future__ import annotations

import json
import zlib
from collections.abc import Callable

from helm.common.request import GeneratedOutput, Token
from helm.common.request import Request as HelmRequest

from flexgen_dist.io.prompts import Request

FINISH_REASONS = {"eos": "endoftext", "stop": "stop", "length": "length"}  # ours -> HELM's names


def refusal(request: HelmRequest) -> str | None:
    """What of `request` the engine cannot honour, or None. HELM 0.5.16's Token holds no alternatives, so
    top_k_per_token asks for nothing a completion could carry (HELM's HuggingFaceClient ignores it too)."""
    unsupported = {"chat messages": request.messages, "a multimodal prompt": request.multimodal_prompt,
                   "embeddings": request.embedding, "a response_format": request.response_format,
                   "image generation": request.image_generation_parameters,
                   "presence_penalty": request.presence_penalty, "frequency_penalty": request.frequency_penalty}
    asked = [what for what, value in unsupported.items() if value]
    if asked:
        return f"{', '.join(asked)} not supported"
    if request.max_tokens < 0:
        return f"max_tokens {request.max_tokens}"
    if request.max_tokens == 0 and not request.echo_prompt:
        return "max_tokens 0 without echo_prompt (nothing to generate or score)"
    if request.num_completions < 1:
        return f"num_completions {request.num_completions}"
    if request.temperature < 0 or not 0 < request.top_p <= 1:
        return f"temperature {request.temperature} / top_p {request.top_p} (need >= 0 and (0, 1])"
    if not all(isinstance(s, str) and s for s in request.stop_sequences):
        return f"stop_sequences {request.stop_sequences!r} (need non-empty strings)"
    return None


def engine_requests(request: HelmRequest, run_seed: int) -> list[Request]:
    """One engine request per completion, ids left empty (the caller numbers the distinct ones). Each token's
    log-probability always comes back (logprobs 0): HELM's completions carry them."""
    echo_only = request.echo_prompt and request.max_tokens == 0
    stop = tuple(request.stop_sequences) or None
    return [Request("", request.prompt, None, 1 if echo_only else request.max_tokens, stop, request.temperature,
                    request.top_p, _seed(request, run_seed, i), logprobs=0, echo=request.echo_prompt)
            for i in range(request.num_completions)]


def _seed(request: HelmRequest, run_seed: int, index: int) -> int | None:
    """A sampled completion's seed: the same request (and `random`) gets the same completions, as from HELM's request
    cache; None for greedy, so a greedy request's completions are one sequence."""
    if request.temperature == 0:
        return None
    return zlib.crc32(json.dumps([run_seed, request.random, request.prompt, index]).encode())


def completion(record: dict, request: HelmRequest, decode: Callable[[list[int]], str]) -> GeneratedOutput:
    """An engine record as HELM's completion, as HELM's HuggingFaceClient builds one: the text decoded with special
    tokens and cut before each stop sequence in turn; the tokens that spell it (the one a stop sequence begins in
    included, as HELM's truncate_sequence keeps it); their summed log-probability. With echo_prompt the prompt's tokens
    come first (the first, having no context, with log-probability 0), and the text starts with the prompt's."""
    logprobs = record["logprobs"]
    ids, texts, values = record["output_ids"], logprobs["tokens"], logprobs["token_logprobs"]
    echo_only = request.echo_prompt and request.max_tokens == 0
    keep = len(ids)
    if echo_only:
        keep = 0  # the token generated only to score the prompt
    elif record["finish_reason"] == "eos":
        keep -= 1  # HELM's text ends before the end-of-text token
    text = _cut(decode(ids[:keep]), request.stop_sequences)
    keep = _spelling(ids[:keep], text, decode)
    tokens = [Token(t, v) for t, v in zip(texts[:keep], values[:keep])]
    reason = "length" if echo_only else FINISH_REASONS[record["finish_reason"]]
    if request.echo_prompt:
        prompt = [Token(t, 0.0 if v is None else v) for t, v in zip(logprobs["prompt_tokens"],
                                                                     logprobs["prompt_logprobs"])]
        tokens, text = prompt + tokens, decode(record["input_ids"]) + text
    return GeneratedOutput(text, sum(t.logprob for t in tokens), tokens, finish_reason={"reason": reason})


def _cut(text: str, stops: list[str]) -> str:
    """The text before each stop sequence in turn (the engine stopped at the first it met)."""
    for stop in stops:
        text = text.split(stop)[0]
    return text


def _spelling(ids: list[int], text: str, decode: Callable[[list[int]], str]) -> int:
    """How many of `ids`, from the first, it takes to spell `text` (a prefix of their decoding): all of them unless a
    stop sequence cut the text, then those up to the one the cut falls in."""
    keep = len(ids)
    while keep > 0 and len(decode(ids[: keep - 1])) >= len(text):
        keep -= 1
    return keep
