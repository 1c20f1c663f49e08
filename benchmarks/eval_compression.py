"""What 4-bit compression costs in `flexgen-dist eval` metrics, on the tiny OPT trained by train_tiny_opt.py.

Three local lm-eval tasks over the text held out from that model's training (so its scores are above chance):
multiple choice (up to two sentences of a held-out paragraph, then its true next sentence among 3 copies with two words
swapped: acc, acc_norm), rolling perplexity over held-out paragraphs (loglikelihood_rolling: word/byte perplexity, bits
per byte) and greedy generate_until (at most 8 tokens; exact match of the output's first word with the true next
word). Each is run through `flexgen-dist eval` in float32 uncompressed, then with 4-bit weights, 4-bit KV cache and
both (groups of 64, asymmetric: the defaults). Markdown tables give every metric and its delta from float32, and how
many documents' answers (the choice picked, the generated text) differ from float32's. Log-likelihood requests are
scored in one prefill, which never reads the KV cache back: only generate_until can see `--compress-cache`.

    python benchmarks/eval_compression.py [--model DIR | --out DIR]   # without --model: trains the 300-step model
"""

from __future__ import annotations

import argparse
import json
import random
import re
import subprocess
import sys
import tempfile
from pathlib import Path

from quality_study import train
from train_tiny_opt import corpus_documents, split_corpus

from flexgen_dist.evaluation.local_tasks import write_local_task

CONFIGS = {  # name -> `flexgen-dist eval` flags
    "float32": (),
    "4-bit weights": ("--compress-weight",),
    "4-bit KV cache": ("--compress-cache",),
    "4-bit weights + KV cache": ("--compress-weight", "--compress-cache"),
}
TASKS = ("ec_next_sentence", "ec_heldout_ppl", "ec_next_word")
METRICS = [("ec_next_sentence", "acc,none"), ("ec_next_sentence", "acc_norm,none"),
           ("ec_heldout_ppl", "word_perplexity,none"), ("ec_heldout_ppl", "byte_perplexity,none"),
           ("ec_heldout_ppl", "bits_per_byte,none"), ("ec_next_word", "exact_match,first_word")]
# A prose sentence: capital first, ending in . ! or ?, no doctest or code marks; 4 words or more.
PROSE = re.compile(r"[A-Z][^<>{}\[\]=`|]{15,200}[.!?]")
WORD = re.compile(r"\w+")
# (task, what) -> that answer of a logged document: the choice of highest log-likelihood (acc's), the generated text,
# its first word (what exact_match compares).
ANSWERS = {
    ("ec_next_sentence", "choices picked"):
        lambda sample: max(range(len(sample["resps"])), key=lambda i: sample["resps"][i][0][0]),
    ("ec_next_word", "generated texts"): lambda sample: sample["resps"][0][0],
    ("ec_next_word", "first words"): lambda sample: sample["filtered_resps"][0],
}


def prose_paragraphs(documents: list[str]) -> list[list[str]]:
    """Each paragraph's run of prose sentences, for paragraphs of two or more."""
    runs = []
    for paragraph in (p for doc in documents for p in doc.split("\n\n")):
        sentences = [s for s in re.split(r"(?<=[.!?])\s+", paragraph) if PROSE.fullmatch(s) and len(s.split()) >= 4]
        if len(sentences) >= 2:
            runs.append(sentences)
    return runs


def swapped(sentence: str, rng: random.Random) -> str:
    """The sentence with two of its words swapped (two different words, so the text changes)."""
    words = sentence.split()
    while True:
        i, j = sorted(rng.sample(range(len(words)), 2))
        if words[i] != words[j]:
            return " ".join([*words[:i], words[j], *words[i + 1 : j], words[i], *words[j + 1 :]])


def next_sentence_docs(paragraphs: list[list[str]], count: int, rng: random.Random) -> list[dict]:
    """Up to two sentences of a paragraph as context; its true next sentence among 3 copies with two words swapped.
    (Against 3 random other sentences this model scores below chance: it cannot tell which sentence follows.)"""
    places = [(sentences, i) for sentences in paragraphs for i in range(1, len(sentences))]
    docs = []
    for sentences, i in rng.sample(places, min(count, len(places))):
        choices = [sentences[i], *(swapped(sentences[i], rng) for _ in range(3))]
        rng.shuffle(choices)
        docs.append({"context": " ".join(sentences[max(0, i - 2) : i]), "choices": choices,
                     "answer": choices.index(sentences[i])})
    return docs


def next_word_docs(paragraphs: list[list[str]], count: int, rng: random.Random) -> list[dict]:
    """Up to two sentences of a paragraph and the next one cut after a random word (its third or later); the target
    is the next word."""
    places = [(sentences, i) for sentences in paragraphs for i in range(len(sentences))]
    docs = []
    for sentences, i in rng.sample(places, min(count, len(places))):
        words = sentences[i].split()
        cut = rng.randrange(3, len(words))
        target = WORD.search(words[cut])
        if target:
            docs.append({"prompt": " ".join([*sentences[max(0, i - 2) : i], *words[:cut]]), "target": target.group()})
    return docs


def write_tasks(directory: Path, docs: int, seed: int) -> dict[str, int]:
    """The three tasks over held-out text; -> documents per task."""
    _, heldout = split_corpus(corpus_documents())
    paragraphs = prose_paragraphs(heldout)
    rng = random.Random(seed)
    mc = next_sentence_docs(paragraphs, docs, rng)
    write_local_task(directory, "ec_next_sentence", mc, output_type="multiple_choice", doc_to_text="{{context}}",
               doc_to_choice="choices", doc_to_target="answer",
               metric_list=[{"metric": "acc"}, {"metric": "acc_norm"}])
    ppl = [{"text": " ".join(sentences)} for sentences in rng.sample(paragraphs, min(docs, len(paragraphs)))]
    write_local_task(directory, "ec_heldout_ppl", ppl, output_type="loglikelihood_rolling", doc_to_text="",
               doc_to_target="{{text}}",
               metric_list=[{"metric": m} for m in ("word_perplexity", "byte_perplexity", "bits_per_byte")])
    gen = next_word_docs(paragraphs, docs, rng)
    # The first word of the output, punctuation aside, against the true next word.
    first_word = {"name": "first_word", "filter": [{"function": "regex", "regex_pattern": r"^\W*(\w+)"},
                                                   {"function": "take_first"}]}
    write_local_task(directory, "ec_next_word", gen, output_type="generate_until", doc_to_text="{{prompt}}",
               doc_to_target="{{target}}", generation_kwargs={"until": ["\n"], "max_gen_toks": 8, "do_sample": False},
               filter_list=[first_word], metric_list=[{"metric": "exact_match"}])
    return {"ec_next_sentence": len(mc), "ec_heldout_ppl": len(ppl), "ec_next_word": len(gen)}


def evaluate(model: Path, tasks: Path, out: Path, flags: tuple[str, ...]) -> dict:
    """`flexgen-dist eval` of the three tasks in a subprocess; -> lm-eval's results JSON, with samples."""
    cmd = [sys.executable, "-m", "flexgen_dist", "eval", "--model", str(model), "--tasks", ",".join(TASKS),
           "--include-path", str(tasks), "--output", str(out), "--log-samples", "--dtype", "float32", "--device",
           "cpu", "--executor", "local", "--quiet", "--gpu-batch-size", "16", *flags]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed: {proc.stderr[-2000:]}")
    return json.loads(out.read_text())


def changed_answers(run: dict, base: dict, task: str, answer) -> int:
    """Documents of `task` whose `answer` differs from the float32 run's: more sensitive than a metric's delta,
    where a change between two wrong answers does not show."""
    before = {s["doc_id"]: answer(s) for s in base["samples"][task]}
    return sum(answer(s) != before[s["doc_id"]] for s in run["samples"][task])


def print_tables(runs: dict[str, dict], counts: dict[str, int]) -> None:
    base = runs["float32"]
    names = [n for n in CONFIGS if n != "float32"]
    print("| task | metric | float32 | " + " | ".join(f"{n} | Δ" for n in names) + " |")
    print("|---|---|---|" + "---|---|" * len(names))
    for task, metric in METRICS:
        ref = base["results"][task][metric]
        cells = " | ".join(f"{r['results'][task][metric]:.4f} | {r['results'][task][metric] - ref:+.4f}"
                           for r in (runs[n] for n in names))
        print(f"| {task} | {metric.split(',')[0]} | {ref:.4f} | {cells} |")
    print("\n| answers that differ from float32 | " + " | ".join(names) + " |")
    print("|---|" + "---|" * len(names))
    for (task, what), answer in ANSWERS.items():
        cells = " | ".join(f"{changed_answers(runs[n], base, task, answer)} / {counts[task]}" for n in names)
        print(f"| {task}: {what} | {cells} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, help="a checkpoint train_tiny_opt.py wrote: skip training")
    p.add_argument("--out", type=Path, help="where the trained checkpoint goes (default: a temporary directory)")
    p.add_argument("--docs", type=int, default=200, help="documents per task, at most (default 200)")
    p.add_argument("--seed", type=int, default=0, help="which held-out documents and distractors (default 0)")
    args = p.parse_args()
    if args.docs < 1:
        p.error(f"--docs must be at least 1, got {args.docs}")
    if args.model is not None and not (args.model / "training.json").is_file():
        p.error(f"--model {args.model}: not a checkpoint of train_tiny_opt.py (no training.json)")
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or args.out or Path(tmp) / "tiny-opt"
        if args.model is None:
            train(model, minutes=10, steps=300)  # docs/quality.md's recipe: the same model on any machine load
        training = json.loads((model / "training.json").read_text())
        tasks = Path(tmp) / "tasks"
        tasks.mkdir()
        counts = write_tasks(tasks, args.docs, args.seed)
        runs = {name: evaluate(model, tasks, Path(tmp) / f"{i}.json", flags)
                for i, (name, flags) in enumerate(CONFIGS.items())}
    cfg = training["config"]
    print(f"model: tiny OPT, hidden {cfg['hidden_size']}, {cfg['num_layers']} layers, {cfg['vocab_size']} ids, "
          f"{training['steps']} training steps, loss {training['train_loss_ema']:.2f}")
    print(f"documents: {counts}\n")
    print_tables(runs, counts)


if __name__ == "__main__":
    main()
