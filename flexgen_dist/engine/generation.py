"""Generation state of one block: left padding, the next step's inputs, sampling, per-sequence stopping.

Independent of where layers run: the coordinator feeds a block's inputs to the stages and hands the sampled tokens
back to `BlockRun.advance`.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field

import torch

from flexgen_dist.base.errors import UserError


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    seed: int = 0
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            raise UserError(f"temperature must be >= 0 and top-p in (0, 1]; got {self.temperature}, {self.top_p}")

    def generator(self, block_id: int) -> torch.Generator:
        """One generator per block, so sampled text does not depend on how blocks interleave in a pipeline."""
        return torch.Generator().manual_seed(zlib.crc32(f"{self.seed}/{block_id}".encode()))


@dataclass
class Sequence:
    prompt_ids: list[int]
    max_new_tokens: int
    output_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None  # "stop" (EOS) or "length"


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


def left_pad(rows: list[list[int]], width: int, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows right-aligned in `width` columns, so every row's last token is in the last column (where the next one
    is predicted). -> ids [B, width] int64, valid [B, width] bool (False = padding)."""
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    valid = torch.zeros((len(rows), width), dtype=torch.bool)
    for r, row in enumerate(rows):
        ids[r, width - len(row) :] = torch.tensor(row)
        valid[r, width - len(row) :] = True
    return ids, valid


class BlockRun:
    """One block of up to gpu_batch_size x num_gpu_batches sequences, from prefill to its last token."""

    def __init__(self, block_id: int, sequences: list[Sequence], gpu_batch_size: int, pad_id: int, eos_id: int,
                 ignore_eos: bool) -> None:
        self.block_id, self.sequences = block_id, sequences
        self.pad_id, self.eos_id, self.ignore_eos = pad_id, eos_id, ignore_eos
        self.batches = [sequences[i : i + gpu_batch_size] for i in range(0, len(sequences), gpu_batch_size)]
        prompt_len = max(len(s.prompt_ids) for s in sequences)
        self.capacity = prompt_len + max(s.max_new_tokens for s in sequences)
        self.steps_done = 0
        self.tokens: list[torch.Tensor] = []  # next step's input ids per batch: [B, S]
        self.valid: list[torch.Tensor] = []  # [B, T] bool: real tokens (False = left padding)
        for batch in self.batches:
            ids, mask = left_pad([s.prompt_ids for s in batch], prompt_len, pad_id)
            self.tokens.append(ids)
            self.valid.append(mask)

    @property
    def batch_sizes(self) -> list[int]:
        return [len(b) for b in self.batches]

    @property
    def done(self) -> bool:
        return all(s.finish_reason is not None for s in self.sequences)

    def advance(self, next_ids: list[torch.Tensor]) -> None:
        """Record one sampled token per sequence ([B] per batch)."""
        for k, batch in enumerate(self.batches):
            for row, s in enumerate(batch):
                if s.finish_reason is not None:
                    continue
                token = int(next_ids[k][row])
                s.output_ids.append(token)
                if token == self.eos_id and not self.ignore_eos:
                    s.finish_reason = "stop"
                elif len(s.output_ids) >= s.max_new_tokens:
                    s.finish_reason = "length"
            # Finished rows keep computing (fed padding) so shapes stay fixed; their outputs are ignored.
            running = torch.tensor([s.finish_reason is None for s in batch])
            self.tokens[k] = next_ids[k].cpu().where(running, self.pad_id)[:, None]
            self.valid[k] = torch.cat([self.valid[k], torch.ones((len(batch), 1), dtype=torch.bool)], dim=1)
        self.steps_done += 1
