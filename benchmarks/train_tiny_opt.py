"""Train a tiny OPT (or, with --family llama, a tiny Llama with grouped-query attention) on text this machine ships,
for judging approximations (compression, sparse attention) by quality.

The corpus is the docstrings of CPython's standard library (present wherever python3 is) plus Debian's license texts
when present: nothing is downloaded. Whole documents are held out (about 5 % of the text), a byte-level BPE tokenizer
and the model learn from the rest (float32 on the CPU, 2 threads, for a fixed wall time), and the result is an HF checkpoint directory that `flexgen-dist --model DIR` reads,
plus `heldout.jsonl`: held-out chunks as `{"id", "input_ids"}` lines for `flexgen-dist score`.

    python benchmarks/train_tiny_opt.py --out /tmp/tiny-opt --minutes 5
"""

from __future__ import annotations

import argparse
import ast
import json
import math
import re
import sysconfig
import time
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

# OPT's special ids: <s> 0, <pad> 1, </s> 2 (BOS and EOS, also between documents), <unk> 3.
SPECIAL_TOKENS = ["<s>", "<pad>", "</s>", "<unk>"]
PAD_ID, EOS_ID = 1, 2
HELDOUT_EVERY = 20  # one document in 20 (by a hash of its name) is held out: ~5 % of the text


@dataclass(frozen=True)
class TrainConfig:
    out: Path
    minutes: float = 2.0  # wall-time bound
    steps: int = 0  # step bound (0: none); with both, whichever comes first ends training
    vocab_size: int = 2048
    hidden_size: int = 128
    num_layers: int = 2
    num_heads: int = 4  # head_dim 32
    context: int = 128  # training sequence length = max positions = held-out chunk length
    batch_size: int = 16
    peak_lr: float = 1e-2
    warmup_steps: int = 30
    heldout_chunks: int = 64
    seed: int = 0
    family: str = "opt"  # or "llama": RMSNorm, rotary positions, SwiGLU, 2 key/value heads for the 4 query heads
    bf16: bool = False  # bf16 autocast: for CPUs with bf16 matmul units (AVX-512 BF16, AMX); 5x slower without them


def _docstrings(path: Path) -> str:
    """A module's docstrings (module, classes, functions) in source order: English prose, unlike the code around it."""
    try:
        tree = ast.parse(path.read_text(encoding="utf-8", errors="replace"))
    except (SyntaxError, ValueError):
        return ""
    nodes = (n for n in ast.walk(tree) if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)))
    return "\n\n".join(d for d in map(ast.get_docstring, nodes) if d)


def _unwrap(text: str) -> str:
    """Paragraphs on one line each: hard-wrapped text otherwise teaches a tiny model mostly where lines break, and
    its greedy output degenerates into newlines."""
    paragraphs = (" ".join(p.split()) for p in re.split(r"\n\s*\n", text))
    return "\n\n".join(p for p in paragraphs if p)


def corpus_documents() -> dict[str, str]:
    """Name -> text: Debian's license texts (base-files) when present, and the docstrings of CPython's standard
    library (its own tests and IDLE left out), in a fixed order."""
    docs = {p.name: _unwrap(p.read_text(encoding="utf-8", errors="replace"))
            for p in sorted(Path("/usr/share/common-licenses").glob("*")) if p.is_file() and not p.is_symlink()}
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(stdlib.rglob("*.py")):
        parts = path.relative_to(stdlib).parts
        if not ({"test", "tests", "idlelib", "site-packages"} & set(parts)):
            text = _unwrap(_docstrings(path))
            if text:
                docs["/".join(parts)] = text
    return docs


def split_corpus(docs: dict[str, str]) -> tuple[list[str], list[str]]:
    """(train, held-out) documents, split by document so no held-out text was seen in training."""
    train, heldout = [], []
    for name, text in docs.items():
        (heldout if zlib.crc32(name.encode()) % HELDOUT_EVERY == 0 else train).append(text)
    if not train or not heldout:
        raise SystemExit(f"corpus too small: {len(train)} train and {len(heldout)} held-out documents")
    return train, heldout


def train_tokenizer(documents: list[str], vocab_size: int):
    """Byte-level BPE with OPT's special ids; prepends </s> like OPT's tokenizer. Returns a PreTrainedTokenizerFast."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(documents, trainer)
    tok.post_processor = processors.TemplateProcessing(single="</s> $A", pair="</s> $A </s> $B",
                                                       special_tokens=[("</s>", EOS_ID)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="</s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")


def token_chunks(tokenizer, documents: list[str], context: int) -> torch.Tensor:
    """Documents joined by </s> (as OPT was pretrained), cut into rows of </s> + (context - 1) tokens. [N, context]"""
    stream: list[int] = []
    for ids in tokenizer(documents, add_special_tokens=False).input_ids:
        stream += ids + [EOS_ID]
    body = context - 1
    rows = torch.tensor(stream[: len(stream) // body * body]).view(-1, body)
    return torch.cat([torch.full((rows.shape[0], 1), EOS_ID), rows], dim=1)


def build_model(cfg: TrainConfig):
    from transformers import LlamaConfig, LlamaForCausalLM, OPTConfig, OPTForCausalLM

    if cfg.family == "llama":  # the MLP's width matches OPT's parameter count: 3 matrices of 8/3 h, not 2 of 4 h
        return LlamaForCausalLM(LlamaConfig(
            vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers,
            intermediate_size=8 * cfg.hidden_size // 3, num_attention_heads=cfg.num_heads,
            num_key_value_heads=cfg.num_heads // 2, max_position_embeddings=cfg.context, tie_word_embeddings=True,
            pad_token_id=PAD_ID, bos_token_id=EOS_ID, eos_token_id=EOS_ID, attention_dropout=0.0))
    return OPTForCausalLM(OPTConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers,
        ffn_dim=4 * cfg.hidden_size, num_attention_heads=cfg.num_heads, max_position_embeddings=cfg.context,
        word_embed_proj_dim=cfg.hidden_size, pad_token_id=PAD_ID, bos_token_id=EOS_ID, eos_token_id=EOS_ID,
        dropout=0.0, attention_dropout=0.0))


def train(model, data: torch.Tensor, cfg: TrainConfig) -> dict:
    """AdamW until the wall time or step budget is spent, with warmup and a cosine decay over that budget.

    A step budget makes the model the same on any machine (up to the corpus); a wall-time budget alone gives a
    loaded machine a weaker model."""
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.peak_lr, betas=(0.9, 0.95), weight_decay=0.1)
    gen = torch.Generator().manual_seed(cfg.seed)
    budget = cfg.minutes * 60
    start, step, loss_ema = time.perf_counter(), 0, None
    model.train()
    while (progress := max((time.perf_counter() - start) / budget, step / cfg.steps if cfg.steps else 0.0)) < 1:
        lr = cfg.peak_lr * min(1.0, (step + 1) / cfg.warmup_steps) * 0.5 * (1 + math.cos(math.pi * progress))
        for group in opt.param_groups:
            group["lr"] = lr
        batch = data[torch.randint(0, data.shape[0], (cfg.batch_size,), generator=gen)]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.bf16):
            loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss_ema = loss.item() if loss_ema is None else 0.95 * loss_ema + 0.05 * loss.item()
        step += 1
        if step % 50 == 0:
            print(f"step {step}  {time.perf_counter() - start:6.1f}s  loss {loss_ema:.3f}  lr {lr:.2e}", flush=True)
    model.eval()
    return {"steps": step, "train_s": time.perf_counter() - start, "train_loss_ema": loss_ema,
            "train_tokens": step * cfg.batch_size * cfg.context}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="checkpoint directory to write")
    for name, default in asdict(TrainConfig(out=Path())).items():
        flag = f"--{name.replace('_', '-')}"
        if isinstance(default, bool):
            p.add_argument(flag, action="store_true")
        elif name != "out":
            p.add_argument(flag, type=type(default), default=default)
    cfg = TrainConfig(**vars(p.parse_args(argv)))
    torch.set_num_threads(2)
    torch.manual_seed(cfg.seed)

    train_docs, heldout_docs = split_corpus(corpus_documents())
    tokenizer = train_tokenizer(train_docs, cfg.vocab_size)
    data = token_chunks(tokenizer, train_docs, cfg.context)
    heldout = token_chunks(tokenizer, heldout_docs, cfg.context)
    # Spread the held-out chunks over all held-out documents rather than taking the first one's.
    pick = torch.linspace(0, heldout.shape[0] - 1, min(cfg.heldout_chunks, heldout.shape[0])).long()
    model = build_model(cfg)
    stats = train(model, data, cfg)

    cfg.out.mkdir(parents=True, exist_ok=True)
    model.float().save_pretrained(cfg.out)
    tokenizer.save_pretrained(cfg.out)
    with open(cfg.out / "heldout.jsonl", "w") as f:
        for i in pick.tolist():
            f.write(json.dumps({"id": f"heldout-{i}", "input_ids": heldout[i].tolist()}) + "\n")
    info = {**stats, "train_chunks": data.shape[0], "heldout_chunks": len(pick), "train_chars":
            sum(map(len, train_docs)), "heldout_chars": sum(map(len, heldout_docs)),
            "config": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(cfg).items()}}
    (cfg.out / "training.json").write_text(json.dumps(info, indent=2) + "\n")
    print(json.dumps(info), flush=True)


if __name__ == "__main__":
    main()
