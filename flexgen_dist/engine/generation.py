"""Generation state of one block: left padding, the next step's inputs, sampling, per-sequence stopping.

Independent of where layers run: the coordinator feeds a block's inputs to the stages and hands what the last stage
returns (`head_output`) back to `BlockRun.advance`. Each sequence carries its own sampling, stop strings and
log-probability request; sampling draws from the sequence's own generator, so its output does not depend on which
block it is in, its row there, or how blocks interleave in a pipeline.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import NamedTuple

import torch

from flexgen_dist.base.errors import UserError
from flexgen_dist.engine.stage_engine import RefillRows
from flexgen_dist.models.likelihood import next_token_targets, target_logprobs

# With refill, a block's KV cache holds its prompt width plus this many times its longest generation, and a finished
# row takes a waiting sequence while the cache has room for that sequence's whole generation: a block then runs up to
# about twice its longest generation, and its cache (and decode attention) costs what a generation twice as long does.
REFILL_SPAN = 2


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    seed: int = 0
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            raise UserError(f"temperature must be >= 0 and top-p in (0, 1]; got {self.temperature}, {self.top_p}")


def generator_seed(key: str) -> int:
    """The seed of one sequence's own generator, from a key naming the sequence (e.g. the run's seed and its id)."""
    return zlib.crc32(key.encode())


@dataclass(frozen=True)
class SequenceHead:
    """What the last stage does with one sequence's logits; it travels with the block, a few numbers a sequence."""

    sampling: Sampling = Sampling()  # its seed is the sequence's generator's (generator_seed)
    logprobs: int | None = None  # alternatives returned per token; None: no log-probabilities
    echo: bool = False  # the prompt tokens' log-probabilities too


class PositionLogprobs(NamedTuple):
    """Per sequence and position, from the raw float32 logits (before temperature and top-p)."""

    chosen: torch.Tensor  # [B, S] float32: the log-probability of the token at each position
    top_ids: torch.Tensor  # [B, S, k] int64: the k most likely tokens there
    top_values: torch.Tensor  # [B, S, k] float32: their log-probabilities


def position_logprobs(logits: torch.Tensor, targets: torch.Tensor, k: int) -> PositionLogprobs:
    """logits [B, S, V] float32, targets [B, S] int64 (NOT_SCORED: none) -> on the CPU, only these values."""
    top = torch.log_softmax(logits, dim=-1).topk(k, dim=-1)
    return PositionLogprobs(target_logprobs(logits, targets).cpu(), top.indices.cpu(), top.values.cpu())


class EchoedPrefill(NamedTuple):
    """The head's prefill output for a GPU batch where a sequence echoes its prompt."""

    last: torch.Tensor  # [B, V] float32: the last position's logits, to sample from
    prompt: PositionLogprobs  # of every prompt position's next token


@dataclass(frozen=True)
class Sampled:
    """One step's output for a GPU batch where a sequence asked for log-probabilities (else just the tokens, [B])."""

    tokens: torch.Tensor  # [B] int64
    generated: PositionLogprobs  # [B, 1, ...]: of each token
    prompt: PositionLogprobs | None  # the prefill, where a sequence echoes: [B, P, ...], P the block's prompt width


def _alternatives(heads: tuple[SequenceHead, ...]) -> int | None:
    """Alternatives a batch's head returns per token: the most any of its sequences asks for (None: no one asks)."""
    return max((h.logprobs for h in heads if h.logprobs is not None), default=None)


def sample(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator) -> torch.Tensor:
    """Next token per row. logits [B, V] float32 -> [B] int64."""
    if sampling.temperature <= 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.cpu() / sampling.temperature, dim=-1)
    if sampling.top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # Drop a token once the mass before it already reaches top_p; the most likely token always stays.
        drop = sorted_probs.cumsum(dim=-1) - sorted_probs >= sampling.top_p
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def sequence_generator(head: SequenceHead) -> torch.Generator | None:
    """A sampled sequence's own generator, seeded from its head (None: greedy)."""
    return torch.Generator().manual_seed(head.sampling.seed) if head.sampling.temperature > 0 else None


@dataclass(frozen=True, eq=False)
class Decoding:
    """A block's head task when generating (scoring's is `Scoring`): per GPU batch, each sequence's head and, where
    one of them echoes, the token each prompt position predicts ([B, P] int64) for the prompt's log-probabilities."""

    heads: tuple[tuple[SequenceHead, ...], ...]
    prompt_targets: tuple[torch.Tensor | None, ...]

    def generators(self) -> list[list[torch.Generator | None]]:
        """Per GPU batch, each sampled sequence's own generator (None: greedy)."""
        return [[sequence_generator(h) for h in batch] for batch in self.heads]

    def with_rows(self, batch: int, rows: tuple[int, ...], heads: tuple[SequenceHead, ...]) -> Decoding:
        """This task with rows of GPU batch `batch` running new sequences (a refill; they never echo, so the
        prompt targets, which only a block's first prefill reads, stay)."""
        changed = list(self.heads[batch])
        for row, head in zip(rows, heads):
            changed[row] = head
        return replace(self, heads=(*self.heads[:batch], tuple(changed), *self.heads[batch + 1 :]))

    def prefill_head(self, part_batch: int | None, rows: slice) -> Callable[[int, torch.Tensor], object] | None:
        """What the head makes of a prefill's every-position logits per GPU batch k (`part_batch`: the block's batch
        of a prefill part, whose sequences are `rows`): None where no sequence echoes, so only the last position's
        logits are computed."""
        if all(t is None for t in self.prompt_targets):
            return None

        def reduce(k: int, logits: torch.Tensor) -> torch.Tensor | EchoedPrefill:
            batch = k if part_batch is None else part_batch
            targets = self.prompt_targets[batch]
            if targets is None:
                return logits[:, -1]
            prompt = position_logprobs(logits, targets[rows].to(logits.device), _alternatives(self.heads[batch]))
            return EchoedPrefill(logits[:, -1], prompt)

        return reduce

    def head_output(self, k: int, logits: torch.Tensor | EchoedPrefill,
                    generators: list[torch.Generator | None]) -> torch.Tensor | Sampled:
        """GPU batch k's step output from its last position's logits ([B, V]): the next token per sequence and, where
        one asked, the log-probabilities; only these values leave the stage."""
        heads = self.heads[k]
        prompt = logits.prompt if isinstance(logits, EchoedPrefill) else None
        last = logits.last if isinstance(logits, EchoedPrefill) else logits
        tokens = last.argmax(dim=-1)
        for row, generator in enumerate(generators):
            if generator is not None:
                tokens[row] = sample(last[row : row + 1], heads[row].sampling, generator)[0]
        alternatives = _alternatives(heads)
        if alternatives is None:
            return tokens.cpu()
        generated = position_logprobs(last[:, None], tokens[:, None], alternatives)
        return Sampled(tokens.cpu(), generated, prompt)


def _top(logprobs: PositionLogprobs, row: int, position: int, k: int) -> list[tuple[int, float]]:
    return list(zip(logprobs.top_ids[row, position, :k].tolist(), logprobs.top_values[row, position, :k].tolist()))


@dataclass
class SequenceLogprobs:
    """The log-probabilities a sequence asked for: of each generated token with its `k` most likely alternatives and,
    with echo, the same for each prompt token (None for the first, which nothing predicts)."""

    k: int
    tokens: list[float] = field(default_factory=list)
    top: list[list[tuple[int, float]]] = field(default_factory=list)
    prompt: list[float | None] | None = None
    prompt_top: list[list[tuple[int, float]] | None] | None = None

    def add(self, out: Sampled, row: int, prompt_len: int, echo: bool) -> None:
        if echo and out.prompt is not None:
            width = out.prompt.chosen.shape[1]  # left padded: this prompt's positions are the last prompt_len
            positions = range(width - prompt_len, width - 1)  # each predicts the prompt's next token
            self.prompt = [None] + [float(out.prompt.chosen[row, p]) for p in positions]
            self.prompt_top = [None] + [_top(out.prompt, row, p, self.k) for p in positions]
        self.tokens.append(float(out.generated.chosen[row, 0]))
        self.top.append(_top(out.generated, row, 0, self.k))

    def to_record(self, output_ids: list[int], prompt_ids: list[int],
                  token_text: Callable[[int], str] | None) -> dict:
        """The output record's `logprobs` (README, "Generation features"): token texts where a tokenizer gives them."""

        def entries(top: list[tuple[int, float]] | None) -> list[dict] | None:
            if top is None:
                return None
            return [{"id": i, "logprob": v, **({"text": token_text(i)} if token_text else {})} for i, v in top]

        record: dict = {}
        if token_text is not None:
            record["tokens"] = [token_text(i) for i in output_ids]
        record.update(token_logprobs=self.tokens, top_logprobs=[entries(t) for t in self.top])
        if self.prompt is not None:
            if token_text is not None:
                record["prompt_tokens"] = [token_text(i) for i in prompt_ids]
            record.update(prompt_logprobs=self.prompt, prompt_top_logprobs=[entries(t) for t in self.prompt_top])
        return record


@dataclass
class Sequence:
    prompt_ids: list[int]
    max_new_tokens: int
    head: SequenceHead = SequenceHead()
    stop: tuple[str, ...] = ()  # the output text ends before the first of these
    detokenize: Callable[[list[int]], str] | None = None  # token ids -> text: needed for stop strings
    output_ids: list[int] = field(default_factory=list)  # with a stop string, up to the token that completed it
    finish_reason: str | None = None  # "eos" (EOS token), "stop" (a stop string) or "length"
    text: str | None = None  # set by a stop string: the output text, cut before it
    logprobs: SequenceLogprobs | None = None  # where head.logprobs asks for them

    def __post_init__(self) -> None:
        if self.head.logprobs is not None and self.logprobs is None:
            self.logprobs = SequenceLogprobs(self.head.logprobs)

    def add_token(self, token: int, eos_ids: tuple[int, ...]) -> None:
        """Record one generated token and whether it ends the sequence (any of `eos_ids`; none: EOS does not)."""
        self.output_ids.append(token)
        if token in eos_ids:
            self.finish_reason = "eos"
        elif self._reached_stop_string():
            self.finish_reason = "stop"
        elif len(self.output_ids) >= self.max_new_tokens:
            self.finish_reason = "length"

    @property
    def output_text(self) -> str | None:
        """The generated text, cut before a stop string; None without a tokenizer."""
        if self.text is not None or self.detokenize is None:
            return self.text
        return self.detokenize(self.output_ids)

    def _reached_stop_string(self) -> bool:
        if not self.stop:
            return False
        text = self.detokenize(self.output_ids)
        found = [at for at in (text.find(s) for s in self.stop) if at >= 0]
        if found:
            self.text = text[: min(found)]
        return bool(found)


def left_pad(rows: list[list[int]], width: int, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows right-aligned in `width` columns, so every row's last token is in the last column (where the next one
    is predicted). -> ids [B, width] int64, valid [B, width] bool (False = padding)."""
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    valid = torch.zeros((len(rows), width), dtype=torch.bool)
    for r, row in enumerate(rows):
        ids[r, width - len(row) :] = torch.tensor(row)
        valid[r, width - len(row) :] = True
    return ids, valid


@dataclass(frozen=True)
class StepCount:
    """What one step of a block computed: prompt tokens (a prefill, or the prompts of rows refilled before it),
    generated tokens (one per row whose sequence was still running) and rows (all of them, finished or not)."""

    prompt_tokens: int
    generated_tokens: int
    rows: int


# waiting(max_prompt_len, max_new_tokens) -> a waiting sequence within both, taken from the queue; None: none fits.
Waiting = Callable[[int, int], "Sequence | None"]


class BlockRun:
    """One block of up to gpu_batch_size x num_gpu_batches sequences, from prefill to its last token. With `waiting`
    (refill), a row whose sequence has stopped takes a waiting one and the block runs on (see `_refill`)."""

    def __init__(self, block_id: int, sequences: list[Sequence], gpu_batch_size: int, pad_id: int,
                 eos_ids: tuple[int, ...], ignore_eos: bool, waiting: Waiting | None = None) -> None:
        # Its sequences not yet handed out: refills join, and a sequence whose row a refill takes is retired.
        self.block_id, self.sequences = block_id, list(sequences)
        self.pad_id, self.eos_ids, self.ignore_eos, self.waiting = pad_id, eos_ids, ignore_eos, waiting
        self.batches = [sequences[i : i + gpu_batch_size] for i in range(0, len(sequences), gpu_batch_size)]
        prompt_len = max(len(s.prompt_ids) for s in sequences)
        self.capacity = prompt_len + max(s.max_new_tokens for s in sequences) * (REFILL_SPAN if waiting else 1)
        self.steps_done = 0
        self.refilled = 0  # sequences that took a finished row
        self.last_step: StepCount | None = None
        self._prompt_tokens_next = sum(len(s.prompt_ids) for s in sequences)  # computed by the next step
        self._refills: list[tuple[RefillRows, torch.Tensor, torch.Tensor]] = []  # computed by the next step
        self._retired: list[Sequence] = []  # finished sequences whose rows refills took, not yet handed out
        self.tokens: list[torch.Tensor] = []  # next step's input ids per batch: [B, S]
        self.valid: list[torch.Tensor] = []  # [B, T] bool: real tokens (False = left padding)
        prompt_targets = []
        for batch in self.batches:
            ids, mask = left_pad([s.prompt_ids for s in batch], prompt_len, pad_id)
            self.tokens.append(ids)
            self.valid.append(mask)
            prompt_targets.append(next_token_targets(ids, mask) if any(s.head.echo for s in batch) else None)
        self.head_task = Decoding(tuple(tuple(s.head for s in batch) for batch in self.batches), tuple(prompt_targets))

    @property
    def batch_sizes(self) -> list[int]:
        return [len(b) for b in self.batches]

    @property
    def done(self) -> bool:
        return all(s.finish_reason is not None for s in self.sequences)

    def take_retired(self) -> list[Sequence]:
        """The finished sequences whose rows refills took since the last call, once: their output can be written
        now, not when the block ends (a block with refill may run through a whole job)."""
        retired, self._retired = self._retired, []
        return retired

    def take_refills(self) -> list[tuple[RefillRows, torch.Tensor, torch.Tensor]]:
        """The refills the next step computes (each with its input ids and valid), once."""
        refills, self._refills = self._refills, []
        return refills

    def advance(self, outputs: list[torch.Tensor | Sampled]) -> None:
        """Record one step's output per GPU batch: the sampled token per sequence ([B]), with log-probabilities
        (`Sampled`) where one of the batch's sequences asked for them; then, with refill, give the rows whose
        sequence has stopped waiting sequences."""
        eos_ids = () if self.ignore_eos else self.eos_ids
        generated = 0
        for k, batch in enumerate(self.batches):
            out = outputs[k]
            next_ids = out.tokens if isinstance(out, Sampled) else out
            for row, s in enumerate(batch):
                if s.finish_reason is not None:
                    continue
                if s.logprobs is not None:
                    s.logprobs.add(out, row, len(s.prompt_ids), s.head.echo)
                s.add_token(int(next_ids[row]), eos_ids)
                generated += 1
            # Finished rows stay in the block, so shapes stay fixed, fed padding: their new position is not valid,
            # which tells every stage to leave them out of the step's GEMMs (stage_engine._live_rows).
            running = torch.tensor([s.finish_reason is None for s in batch])
            self.tokens[k] = next_ids.cpu().where(running, self.pad_id)[:, None]
            self.valid[k] = torch.cat([self.valid[k], running[:, None]], dim=1)
        self.steps_done += 1
        self.last_step = StepCount(self._prompt_tokens_next, generated, sum(self.batch_sizes))
        self._prompt_tokens_next = 0
        if self.waiting is not None:
            self._refill()

    def _refill(self) -> None:
        """Rows whose sequence has stopped take waiting sequences, each one whose prompt fits before the next
        position and whose whole generation fits in the cache. A new sequence's prompt takes the positions that end
        at the next one: the next step computes all but its last token as a prefill of the refilled rows alone
        (RefillRows), then takes the last as the row's input, which gives its first token. The row's earlier
        positions (the stopped sequence's) become padding, so it attends to its own tokens only and computes what it
        would alone."""
        column = self.valid[0].shape[1] - 1  # the next step's input position
        placed: dict[int, list[tuple[int, Sequence]]] = {}  # GPU batch -> (row, its new sequence)
        for k, batch in enumerate(self.batches):
            for row, s in enumerate(batch):
                if s.finish_reason is None:
                    continue
                taken = self.waiting(column + 1, self.capacity - column)
                if taken is None:  # nothing waiting fits this step, for any row
                    break
                placed.setdefault(k, []).append((row, taken))
            else:
                continue
            break
        for k, pairs in placed.items():
            self._place(k, [row for row, _ in pairs], [s for _, s in pairs], column)

    def _place(self, k: int, rows: list[int], new: list[Sequence], column: int) -> None:
        width = max(len(s.prompt_ids) for s in new) - 1
        ids, mask = left_pad([s.prompt_ids[:-1] for s in new], width, self.pad_id)
        tokens, valid = self.tokens[k].clone(), self.valid[k].clone()  # the coordinator keeps the sent ones to replay
        for row, s in zip(rows, new):
            valid[row] = False
            valid[row, column + 1 - len(s.prompt_ids) :] = True
            tokens[row, 0] = s.prompt_ids[-1]
            self._retired.append(self.batches[k][row])
            self.batches[k][row] = s
        self.tokens[k], self.valid[k] = tokens, valid
        heads = tuple(s.head for s in new)
        self.head_task = self.head_task.with_rows(k, tuple(rows), heads)
        self._refills.append((RefillRows(k, tuple(rows), column - width, heads), ids, mask))
        retired = {id(s) for s in self._retired}
        self.sequences = [s for s in self.sequences if id(s) not in retired] + new
        self.refilled += len(new)
        self._prompt_tokens_next += sum(len(s.prompt_ids) for s in new)
