"""Reference greedy generation with Hugging Face transformers, the oracle the engine is checked against."""
from __future__ import annotations

import functools
import os

import torch
from transformers import AutoModelForCausalLM

PAD_ID = 1
EOS_ID = 2


@functools.lru_cache(maxsize=8)
def _load(model_dir: str):
    # float32 + eager attention: the most literal form of the math, least exposed to kernel choices.
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager").eval()


def hf_greedy(model_dir: str | os.PathLike[str], input_ids_list: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    """New tokens per prompt from one left-padded greedy batch, each cut after its first EOS (kept)."""
    if not input_ids_list or not all(input_ids_list):
        raise ValueError("hf_greedy needs at least one prompt and no empty prompts")
    model = _load(str(model_dir))
    width = max(len(ids) for ids in input_ids_list)
    input_ids = torch.tensor([[PAD_ID] * (width - len(ids)) + list(ids) for ids in input_ids_list])
    attention_mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in input_ids_list])
    # Everything that controls stopping is passed explicitly so a generation_config.json in the
    # model dir cannot change it; no min_length is set, so EOS stops a row as soon as it appears.
    out = model.generate(
        input_ids=input_ids,
        attention_mask=attention_mask,
        do_sample=False,
        max_new_tokens=max_new_tokens,
        pad_token_id=PAD_ID,
        eos_token_id=EOS_ID,
    )
    results = []
    for row in out[:, width:].tolist():
        # Rows that finish early are filled with PAD_ID after their EOS; the cut drops that fill.
        results.append(row[: row.index(EOS_ID) + 1] if EOS_ID in row else row)
    return results


def hf_nll(model_dir: str | os.PathLike[str], input_ids_list: list[list[int]]) -> list[float]:
    """Summed NLL (nats) of tokens 2..n of each sequence, alone and unpadded: HF's mean loss times the count."""
    model = _load(str(model_dir))
    out = []
    with torch.no_grad():
        for ids in input_ids_list:
            x = torch.tensor([ids])
            out.append(model(input_ids=x, labels=x).loss.item() * (len(ids) - 1))
    return out


def hf_log_softmax(model_dir: str | os.PathLike[str], ids: list[int]) -> torch.Tensor:
    """Float32 log-softmax of HF's logits at every position of one unpadded sequence: [len(ids), V]."""
    with torch.no_grad():
        return torch.log_softmax(_load(str(model_dir))(input_ids=torch.tensor([ids])).logits[0].float(), dim=-1)
