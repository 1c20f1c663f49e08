"""The `flexgen-dist` model of lm-evaluation-harness: each of its calls runs all the call's requests as one offline
job through the engine (blocks formed by length, as `generate` and `score` form them), and answers in request order.

Text becomes tokens exactly as lm-eval's `hf` backend (HFLM) makes them: the same `TemplateLM` splits context and
continuation (trailing whitespace of the context moves to the continuation), `tok_encode` adds special tokens as
HFLM's does, long inputs are cut from the left to the model's positions, and rolling windows come from lm-eval's own
helpers (windows.py). Log-likelihoods are scored by the last stage on the continuation's positions only
(engine/scoring.py); `generate_until` runs `generate` with each request's own stop strings, token budget, sampling
and seed, and cuts the decoded text at the stop strings as HFLM does.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import lm_eval.models  # noqa: F401  (lm-eval's own models first: its registry loads them only while it is empty)
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model

from flexgen_dist.base.devices import resolve_device, resolve_dtype
from flexgen_dist.base.errors import UserError
from flexgen_dist.engine.scoring import ScoredSequence
from flexgen_dist.evaluation.generation import generation_settings
from flexgen_dist.evaluation.model_args import run_config
from flexgen_dist.evaluation.windows import continuation_window, rolling_windows
from flexgen_dist.io.model_source import load_tokenizer, model_config
from flexgen_dist.io.prompts import Request
from flexgen_dist.run import generate
from flexgen_dist.run_config import RunConfig
from flexgen_dist.score_run import check_scoring_policy, plan_scoring, run_scoring

DEFAULT_MAX_GEN_TOKS = 256  # new tokens of a generate_until request that does not say (HFLM's default)


@register_model("flexgen-dist")
class FlexGenLM(TemplateLM):
    """`run`: the engine's settings (`flexgen-dist eval` builds them from its flags); without it, lm-eval's
    model_args give them (model_args.py), e.g. `model=DIR,dtype=float32,stages=2`."""

    def __init__(self, run: RunConfig | None = None, **model_args: object) -> None:
        super().__init__()
        run = run if run is not None else run_config(model_args)
        self.run = replace(run, output=None)  # results come back in memory, never through an output file
        self.config = model_config(run.model)
        path = Path(run.model).expanduser()
        self.tokenizer = load_tokenizer(path) if path.is_dir() else None
        if self.tokenizer is None:
            raise UserError(f"--model {run.model}: evaluation tokenizes text, so it needs a checkpoint directory "
                            "with a tokenizer (with --dummy-weights too)")
        self.jobs: list[dict] = []  # each call's job summary, in call order

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        """The context of a continuation given none (and of a rolling window's first token): BOS, else EOS."""
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.tokenizer.eos_token_id

    @property
    def max_length(self) -> int:
        return self.config.max_positions

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, left_truncate_len: int | None = None,
                   **kwargs: object) -> list[int]:
        """As HFLM: the tokenizer's special tokens unless told otherwise or the text already starts with the prefix
        token; the last `left_truncate_len` tokens."""
        special = {} if add_special_tokens is None else {"add_special_tokens": add_special_tokens}
        if add_special_tokens is None and string.startswith(self.tokenizer.decode(self.prefix_token_id)):
            special["add_special_tokens"] = False
        ids = self.tokenizer.encode(string, **special)
        return ids[-left_truncate_len:] if left_truncate_len else ids

    def tok_decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=True)

    def _loglikelihood_tokens(self, requests: list[tuple[tuple[str, str], list[int], list[int]]],
                              **kwargs: object) -> list[tuple[float, bool]]:
        sequences = [continuation_window(context, continuation, self.max_length)
                     for _, context, continuation in requests]
        self._score(sequences, "loglikelihood", len(requests))
        return [(-s.nll, s.greedy) for s in sequences]

    def loglikelihood_rolling(self, requests: list, disable_tqdm: bool = False) -> list[float]:
        documents = [rolling_windows(self.tok_encode(text), self.prefix_token_id, self.max_length)
                     for (text,) in (r.args for r in requests)]
        self._score([w for windows in documents for w in windows], "loglikelihood_rolling", len(requests))
        return [-sum(w.nll for w in windows) for windows in documents]

    def generate_until(self, requests: list, disable_tqdm: bool = False) -> list[str]:
        eos_text = self.tokenizer.decode([self.eot_token_id])
        settings, job = [], []
        for i, (context, kwargs) in enumerate(r.args for r in requests):
            s = generation_settings(kwargs, DEFAULT_MAX_GEN_TOKS, eos_text)
            room = self.max_length - s.max_gen_toks  # the context is cut from the left to leave room for them all
            if room < 1:
                raise UserError(f"generate_until: max_gen_toks {s.max_gen_toks} leaves no room for a context in the "
                                f"model's {self.max_length} positions")
            settings.append(s)
            job.append(Request(str(i), None, tuple(self.tok_encode(context, left_truncate_len=room)), s.max_gen_toks,
                               s.until, s.temperature, s.top_p, s.seed))
        outputs: dict[str, list[int]] = {}
        summary = generate(self.run, job, sink=lambda records: outputs.update((r["id"], r["output_ids"])
                                                                               for r in records))
        self.jobs.append({"request_type": "generate_until", "requests": len(requests), **summary,
                          "output_tokens_quartiles": _quartiles(sorted(len(ids) for ids in outputs.values()))})
        return [_cut(self.tok_decode(outputs[str(i)]), s.until) for i, s in enumerate(settings)]

    def _score(self, sequences: list[ScoredSequence], request_type: str, requests: int) -> None:
        """One scoring job over every sequence of a call's `requests`: each gets its nll and greedy."""
        check_scoring_policy(self.run)
        device = resolve_device(self.run.device)
        plan = plan_scoring(self.run, self.config, resolve_dtype(self.run.dtype, device), device, sequences)
        summary = run_scoring(self.run, self.config, plan, sequences, label=request_type)
        self.jobs.append({"request_type": request_type, "requests": requests, **summary})


def _cut(text: str, until: tuple[str, ...]) -> str:
    """The text before each stop string in turn, as HFLM cuts it (the engine stopped generating at the first)."""
    for stop in until:
        text = text.split(stop)[0]
    return text


def _quartiles(values: list[int]) -> list[int]:
    """Of sorted `values`: min, 25th percentile, median, 75th percentile, max (nearest rank); [] for none."""
    return [values[round(q * (len(values) - 1))] for q in (0, 0.25, 0.5, 0.75, 1)] if values else []
