"""A `generate_until` request's generation_kwargs as our per-prompt settings, read the way lm-eval's `hf` backend
reads them: pure, no model."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from flexgen_dist.base.errors import UserError

# Names lm-eval accepts for the number of new tokens, the first one given wins (max_gen_toks is lm-eval's own).
_MAX_TOKENS = ("max_gen_toks", "max_new_tokens", "max_tokens", "max_completion_tokens")
_HONOURED = ("until", "do_sample", "temperature", "top_p", "seed", *_MAX_TOKENS)


@dataclass(frozen=True)
class GenerationSettings:
    until: tuple[str, ...]  # the output ends before the first of these (the EOS text included, as lm-eval adds it)
    max_gen_toks: int
    temperature: float  # 0: greedy
    top_p: float
    seed: int | None  # of the request's own generator; None: from the run's seed and the request's place


def generation_settings(kwargs: dict[str, Any], default_max_gen_toks: int, eos_text: str) -> GenerationSettings:
    """`do_sample: false` is greedy whatever the temperature; otherwise the temperature decides (lm-eval's default
    0.0: greedy). Keys we cannot honour (top_k, num_beams, ...) are refused rather than ignored."""
    unknown = sorted(k for k, v in kwargs.items() if k not in _HONOURED and v is not None)
    if unknown:
        raise UserError(f"generate_until: generation_kwargs {', '.join(unknown)} not supported (flexgen-dist honours "
                        f"{', '.join(_HONOURED)})")
    until = kwargs.get("until")
    until = [until] if isinstance(until, str) else list(until or [])
    if not all(isinstance(s, str) for s in until):
        raise UserError(f"generate_until: until must be a string or a list of strings, got {kwargs['until']!r}")
    if eos_text not in until:
        until.append(eos_text)
    max_gen_toks = next((kwargs[k] for k in _MAX_TOKENS if kwargs.get(k) is not None), default_max_gen_toks)
    temperature = 0.0 if kwargs.get("do_sample") is False else float(kwargs.get("temperature") or 0.0)
    top_p = float(kwargs.get("top_p") if kwargs.get("top_p") is not None else 1.0)
    seed = kwargs.get("seed")
    if not isinstance(max_gen_toks, int) or max_gen_toks < 1:
        raise UserError(f"generate_until: max_gen_toks must be an integer >= 1, got {max_gen_toks!r}")
    if temperature < 0 or not 0 < top_p <= 1:
        raise UserError(f"generate_until: temperature must be >= 0 and top_p in (0, 1]; got {temperature}, {top_p}")
    if seed is not None and not isinstance(seed, int):
        raise UserError(f"generate_until: seed must be an integer, got {seed!r}")
    return GenerationSettings(tuple(s for s in until if s), max_gen_toks, temperature, top_p, seed)
