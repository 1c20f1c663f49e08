"""Generation over blocks: left padding, prefill, decode, sampling, per-sequence stopping.

Independent of where the layers run: a `Stepper` takes one step of a block (all its GPU batches) and returns the last
position's logits per batch, whether that is one in-process engine or a pipeline of stages.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Protocol

import torch

from flexgen_dist.engine import BatchInput


class Stepper(Protocol):
    def start_block(self, batch_sizes: list[int], capacity: int) -> None: ...
    def step(self, inputs: list[BatchInput]) -> list[torch.Tensor]: ...
    def end_block(self) -> None: ...


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    seed: int = 0
    ignore_eos: bool = False


@dataclass
class Sequence:
    prompt_ids: list[int]
    max_new_tokens: int
    output_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None  # "stop" (EOS) or "length"


@dataclass
class BlockTiming:
    prefill_s: float = 0.0
    decode_s: float = 0.0
    decode_steps: int = 0
    step_times: list[float] = field(default_factory=list)  # seconds per decode step, for time-per-token metrics


def sample(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator) -> torch.Tensor:
    """Next token per row. logits [B, V] float32 -> [B] int64."""
    if sampling.temperature <= 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits / sampling.temperature, dim=-1)
    if sampling.top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # Drop a token once the mass before it already reaches top_p; the most likely token always stays.
        drop = sorted_probs.cumsum(dim=-1) - sorted_probs >= sampling.top_p
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def run_block(stepper: Stepper, sequences: list[Sequence], gpu_batch_size: int, pad_id: int, eos_id: int,
              sampling: Sampling, generator: torch.Generator,
              on_token: Callable[[int], None] | None = None) -> BlockTiming:
    """Generate for up to one block of sequences in place (fills output_ids and finish_reason)."""
    timing = BlockTiming()
    batches = [sequences[i : i + gpu_batch_size] for i in range(0, len(sequences), gpu_batch_size)]
    prompt_len = max(len(s.prompt_ids) for s in sequences)
    gen_len = max(s.max_new_tokens for s in sequences)
    tokens, valid = [], []
    for batch in batches:
        ids = torch.full((len(batch), prompt_len), pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), prompt_len), dtype=torch.bool)
        for row, s in enumerate(batch):
            ids[row, prompt_len - len(s.prompt_ids) :] = torch.tensor(s.prompt_ids)
            mask[row, prompt_len - len(s.prompt_ids) :] = True
        tokens.append(ids)
        valid.append(mask)
    stepper.start_block([len(b) for b in batches], prompt_len + gen_len)
    try:
        for step in range(gen_len):
            start = time.perf_counter()
            logits = stepper.step([BatchInput(t, v) for t, v in zip(tokens, valid)])
            elapsed = time.perf_counter() - start
            if step == 0:
                timing.prefill_s += elapsed
            else:
                timing.decode_s += elapsed
                timing.decode_steps += 1
                timing.step_times.append(elapsed)
            produced = 0
            for k, batch in enumerate(batches):
                next_ids = sample(logits[k], sampling, generator)
                for row, s in enumerate(batch):
                    if s.finish_reason is None:
                        token = int(next_ids[row])
                        s.output_ids.append(token)
                        produced += 1
                        if token == eos_id and not sampling.ignore_eos:
                            s.finish_reason = "stop"
                        elif len(s.output_ids) >= s.max_new_tokens:
                            s.finish_reason = "length"
                # Finished rows keep computing (feeding padding) so shapes stay fixed; their outputs are ignored.
                tokens[k] = next_ids.where(torch.tensor([s.finish_reason is None for s in batch]), pad_id)[:, None].cpu()
                valid[k] = torch.cat([valid[k], torch.ones((len(batch), 1), dtype=torch.bool)], dim=1)
            if on_token is not None:
                on_token(produced)
            if all(s.finish_reason is not None for s in sequences):
                break
    finally:
        stepper.end_block()
    return timing
