"""What the in-process step drivers (profile_step.py, ab_steps.py) share: a block of synthetic prompts, and one greedy
step of it through an engine's `step`."""

from __future__ import annotations

from collections.abc import Callable

import torch

from flexgen_dist.engine import BatchInput
from flexgen_dist.generation import BlockRun, Sequence
from flexgen_dist.models.opt import OptConfig
from flexgen_dist.policy import Policy


def synthetic_block(cfg: OptConfig, policy: Policy, prompt_len: int, new_tokens: int) -> BlockRun:
    """One block of the policy's size: prompts of `prompt_len` ordinary tokens, `new_tokens` each, EOS ignored."""
    return BlockRun(0, [Sequence([4 + (i + j) % 1000 for j in range(prompt_len)], new_tokens)
                        for i in range(policy.block_size)], policy.gpu_batch_size, cfg.pad_token_id, cfg.eos_token_id,
                    ignore_eos=True)


def greedy_step(step: Callable[[int, list[BatchInput]], list[torch.Tensor]], block: BlockRun) -> None:
    """Run the block's next step through `step` (block id 0) and feed each row's argmax back."""
    logits = step(0, [BatchInput(t, v) for t, v in zip(block.tokens, block.valid)])
    block.advance([x.argmax(-1) for x in logits])
