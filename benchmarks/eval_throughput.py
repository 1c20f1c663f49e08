"""Throughput of `flexgen-dist eval` against lm-eval's own `hf` backend, per request kind, on the same local tasks and
the same random checkpoint of a real OPT size (issue 21).

The checkpoint is `flexgen-dist checkpoint` of --size (our seeded dummy weights as HF safetensors, with the size's HF
config) in --dtype, plus a byte-level BPE tokenizer trained on CPython's standard library source to 50,265 ids, as
many as OPT's own (the model's 50,272 embedding rows include 7 unused): every id the random model emits decodes to
text, so stop strings can match. It is built once into --workdir and reused.

Three tasks of --docs documents each, passages of the text train_tiny_opt.py reads: multiple choice (a 200-800
character context, 4 choices of 40-300: 4 `loglikelihood` requests a document), rolling perplexity over 400-2000
characters (`loglikelihood_rolling`), and greedy `generate_until` after a 200-800 character context, stopping at
strings the random model emits now and then (--until) or after 32 tokens, so output lengths vary (printed: our job's
quartiles).

Each request kind is its own task, run alone in its own process, one process at a time: lm-eval's `hf` backend at
each of --hf-batch-sizes, then `flexgen-dist eval` with the given policy. A run's wall time is its process's; its model
load (HFLM's construction; our job's `load_s`) is recorded beside it, and the ratio hf / ours (above 1: ours is
faster) is taken with and without the load, against hf's best batch. Every run appends one JSON line to --out.
With --memlimit SIZE every run is under ../shared/tools/memlimit SIZE (the page cache counts: the disk tier is
disk); a run killed for memory is reported as oom-killed, one past --timeout as timeout (thrashing), not as a time.

    python benchmarks/eval_throughput.py --size opt-1.3b --docs 1000 --hf-batch-sizes 8,16,32,64 \\
        --gpu-batch-size 32 --num-gpu-batches 4 --out eval-throughput.jsonl
    python benchmarks/eval_throughput.py --size opt-1.3b --docs 1000 --hf-batch-sizes 16 --memlimit 3G \\
        --timeout 3600 --ours-args "--percent 0 20 100 0 100 0 --offload-dir /mnt/offload" --out eval-throughput.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shlex
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from train_tiny_opt import corpus_documents, train_tokenizer

from flexgen_dist.evaluation.local_tasks import write_local_task

BENCHMARKS = Path(__file__).resolve().parent
MEMLIMIT = BENCHMARKS.parents[1] / "shared" / "tools" / "memlimit"
SIZES = ("opt-125m", "opt-350m", "opt-1.3b")
OPT_TOKENS = 50265  # ids of OPT's own tokenizer
TASKS = {"loglikelihood": "et_choice", "loglikelihood_rolling": "et_rolling", "generate_until": "et_generate"}
REQUESTS_PER_DOC = {"loglikelihood": 4, "loglikelihood_rolling": 1, "generate_until": 1}
METRICS = {"loglikelihood": "acc,none", "loglikelihood_rolling": "word_perplexity,none",
           "generate_until": "exact_match,none"}
MAX_GEN_TOKS = 32
# Of 24 greedy outputs of random opt-125m weights after passages of this text, these stopped 17 before 32 tokens
# (after 1 to 29).
UNTIL = (".", "se")
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
SIZE_TEXT = re.compile(r"\d+(\.\d+)?[KMGTP]?B?")  # what memlimit's numfmt --from=iec reads


# --- the checkpoint and the tasks ------------------------------------------------------------------------------------


def stdlib_sources() -> list[str]:
    """CPython's standard library source: enough text for a BPE of 50,265 ids (its docstrings alone are not)."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    return [p.read_text(encoding="utf-8", errors="replace") for p in sorted(stdlib.rglob("*.py"))
            if "site-packages" not in p.parts]


def run_or_exit(cmd: list[str]) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **OFFLINE})
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed: {proc.stderr[-2000:]}")


def build_checkpoint(size: str, dtype: str, directory: Path) -> None:
    """The size's random checkpoint with the tokenizer; written beside and renamed, so an existing one is whole."""
    partial = directory.with_name(directory.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    print(f"building {directory} (once)", flush=True)
    run_or_exit([sys.executable, "-m", "flexgen_dist", "checkpoint", "--model", size, "--dtype", dtype, "--output",
                 str(partial)])
    train_tokenizer(stdlib_sources(), OPT_TOKENS).save_pretrained(partial)
    partial.rename(directory)


def passage(text: str, chars: tuple[int, int], rng: random.Random) -> str:
    """A stretch of `text` of about `chars` (fewest, most) characters, whole words, whitespace made single spaces."""
    length = rng.randint(*chars)
    start = text.find(" ", rng.randrange(len(text) - length)) + 1
    return " ".join(text[start : start + length].split()[:-1])  # the last word may be cut


def write_tasks(directory: Path, docs: int, until: list[str], seed: int) -> None:
    text = "\n\n".join(corpus_documents().values())
    rng = random.Random(seed)
    choice = [{"context": passage(text, (200, 800), rng), "choices": [passage(text, (40, 300), rng) for _ in range(4)],
               "answer": rng.randrange(4)} for _ in range(docs)]
    write_local_task(directory, TASKS["loglikelihood"], choice, output_type="multiple_choice", doc_to_text="{{context}}",
               doc_to_choice="choices", doc_to_target="answer", metric_list=[{"metric": "acc"}])
    rolling = [{"text": passage(text, (400, 2000), rng)} for _ in range(docs)]
    write_local_task(directory, TASKS["loglikelihood_rolling"], rolling, output_type="loglikelihood_rolling",
               doc_to_text="", doc_to_target="{{text}}", metric_list=[{"metric": "word_perplexity"}])
    generate = [{"context": passage(text, (200, 800), rng), "target": passage(text, (20, 100), rng)}
                for _ in range(docs)]
    write_local_task(directory, TASKS["generate_until"], generate, output_type="generate_until", doc_to_text="{{context}}",
               doc_to_target="{{target}}", metric_list=[{"metric": "exact_match"}],
               generation_kwargs={"until": until, "max_gen_toks": MAX_GEN_TOKS, "do_sample": False})


# --- one measured run ----------------------------------------------------------------------------------------------


def hf_eval(model: str, dtype: str, device: str, task: str, tasks_dir: str, batch_size: str, out: str) -> None:
    """In the child process: lm-eval's `hf` backend on one task, its model load timed apart; writes them to `out`."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    start = time.perf_counter()
    lm = HFLM(pretrained=model, dtype=dtype, batch_size=int(batch_size), device=device)
    load_s = time.perf_counter() - start
    results = lm_eval.simple_evaluate(model=lm, tasks=[task],
                                      task_manager=TaskManager(include_path=tasks_dir, include_defaults=False))
    Path(out).write_text(json.dumps({"load_s": load_s, "results": results["results"][task]}, default=str))


def stop_session(proc: subprocess.Popen) -> str:
    """SIGTERM to the run's whole session (memlimit's shell removes its cgroup on it), SIGKILL if it lingers."""
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        return proc.communicate(timeout=30)[1]
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        return proc.communicate()[1]


def timed(cmd: list[str], memlimit: str | None, timeout: float | None) -> dict:
    """Run `cmd` in its own session, under memlimit when given; -> its status, wall seconds and memlimit's peak."""
    if memlimit:
        cmd = [str(MEMLIMIT), memlimit, "--", *cmd]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            env={**os.environ, **OFFLINE})
    try:
        err = proc.communicate(timeout=timeout)[1]
        rc = proc.returncode
        status = "ok" if rc == 0 else "oom-killed" if rc in (137, -signal.SIGKILL) else f"failed (exit {rc})"
    except subprocess.TimeoutExpired:
        err, status = stop_session(proc), "timeout"
    outcome = {"status": status, "wall_s": time.perf_counter() - start}
    peak = re.search(r"memlimit: peak (\S+)", err)
    if peak:
        outcome["memlimit_peak"] = peak.group(1)
    if status.startswith("failed"):
        outcome["error"] = err.strip().splitlines()[-1] if err.strip() else ""
    return outcome


def hf_run(args: argparse.Namespace, model: Path, kind: str, tasks: Path, batch: int) -> dict:
    out = tasks.parent / f"hf-{kind}-{batch}.json"
    code = f"import sys; sys.path.insert(0, {str(BENCHMARKS)!r}); from eval_throughput import hf_eval; " \
           "hf_eval(*sys.argv[1:])"
    outcome = timed([sys.executable, "-c", code, str(model), args.dtype, args.device, TASKS[kind], str(tasks),
                     str(batch), str(out)], args.memlimit, args.timeout)
    record = {"system": "hf", "batch_size": batch, **outcome}
    if outcome["status"] == "ok":
        child = json.loads(out.read_text())
        record.update(load_s=child["load_s"], metric=child["results"][METRICS[kind]])
    return record


def ours_run(args: argparse.Namespace, model: Path, kind: str, tasks: Path, ours_args: str) -> dict:
    out = tasks.parent / f"ours-{kind}.json"
    flags = ["--gpu-batch-size", str(args.gpu_batch_size), "--num-gpu-batches", str(args.num_gpu_batches),
             *shlex.split(ours_args)]
    outcome = timed([sys.executable, "-m", "flexgen_dist", "eval", "--model", str(model), "--tasks", TASKS[kind],
                     "--include-path", str(tasks), "--output", str(out), "--dtype", args.dtype, "--device",
                     args.device, "--quiet", *flags], args.memlimit, args.timeout)
    record = {"system": "flexgen-dist", "flags": flags, **outcome}
    if outcome["status"] == "ok":
        results = json.loads(out.read_text())
        (job,) = results["flexgen_dist"]["jobs"]  # one task of one kind: one job
        record.update(load_s=job["load_s"], job_s=job["total_s"], metric=results["results"][TASKS[kind]][METRICS[kind]])
        # generate_until's output lengths; a scoring job's tokens fed, and those its shared rows did not feed again.
        record.update({key: job[key] for key in ("output_tokens_quartiles", "prompt_tokens", "rows",
                                                 "shared_tokens_saved") if key in job})
    return record


def measured_runs(args: argparse.Namespace, model: Path, kind: str, tasks: Path) -> Iterator[dict]:
    """hf at each batch size, then ours with each --ours-args, one at a time: each run's record as it ends."""
    for batch in args.hf_batch_sizes:
        yield hf_run(args, model, kind, tasks, batch)
    for ours_args in args.ours_args:
        yield ours_run(args, model, kind, tasks, ours_args)


# --- the table -------------------------------------------------------------------------------------------------------


def without_load(record: dict) -> float:
    return record["wall_s"] - record["load_s"]


def with_load(record: dict) -> float:
    return record["wall_s"]


def kind_rows(kind: str, runs: list[dict]) -> list[str]:
    """A request kind's rows, one per configuration of ours: hf's best batch (the fastest without load), the seconds of
    both, with and without the model load, and the ratios hf / ours."""
    hf_runs = [r for r in runs if r["system"] == "hf"]
    return [kind_row(kind, hf_runs, ours) for ours in runs if ours["system"] == "flexgen-dist"]


def kind_row(kind: str, hf_runs: list[dict], ours: dict) -> str:
    hf = min((r for r in hf_runs if r["status"] == "ok"), key=without_load, default=None)
    failed = ", ".join(f"{r['batch_size']}: {r['status']}" for r in hf_runs)
    both = hf is not None and ours["status"] == "ok"

    def seconds(record: dict | None, measure) -> str:
        return "-" if record is None else f"{measure(record):.1f}" if record["status"] == "ok" else record["status"]

    cells = [str(hf["batch_size"]) if hf else f"none ran ({failed})"]
    for measure in (without_load, with_load):
        ratio = f"{measure(hf) / measure(ours):.2f}x" if both else "-"
        cells += [seconds(hf, measure), seconds(ours, measure), ratio]
    return f"| {kind} | {ours['requests']} | {' '.join(ours['flags'])} | " + " | ".join(cells) + " |"


def print_table(records: list[dict]) -> None:
    print("\n| kind | requests | ours | hf best batch | hf s | ours s | ratio | hf s with load | ours s with load "
          "| ratio with load |\n|---|---|---|---|---|---|---|---|---|---|")
    for kind in TASKS:
        for row in kind_rows(kind, [r for r in records if r["kind"] == kind]):
            print(row)
    for r in records:
        if "output_tokens_quartiles" in r:
            print(f"\ngenerate_until output tokens (min / 25% / median / 75% / max): {r['output_tokens_quartiles']}")
        if "shared_tokens_saved" in r:
            print(f"\n{r['kind']}: {r['prompt_tokens']} tokens fed in {r['rows']} rows; shared contexts saved "
                  f"{r['shared_tokens_saved']} more")


# --- the command line ------------------------------------------------------------------------------------------------


def positive_ints(text: str) -> list[int]:
    values = [int(v) for v in text.split(",") if v.isdigit()]
    if len(values) != len(text.split(",")) or min(values, default=0) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected positive integers, comma-separated")
    return values


def kinds(text: str) -> list[str]:
    chosen = list(dict.fromkeys(text.split(",")))  # each kind once
    unknown = [k for k in chosen if k not in TASKS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown request kind {', '.join(unknown)} (expected {', '.join(TASKS)})")
    return chosen


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=SIZES, default="opt-1.3b")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32",
                   help="stored and computed, both systems (default float32: bf16 is slow without AVX512-BF16/AMX)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--docs", type=int, default=1000, help="documents per task (default 1000)")
    p.add_argument("--kinds", type=kinds, default=list(TASKS), help=f"request kinds to run (default {','.join(TASKS)})")
    p.add_argument("--until", action="append", metavar="TEXT",
                   help=f"a generate_until stop string, repeatable (default {' and '.join(map(repr, UNTIL))})")
    p.add_argument("--hf-batch-sizes", type=positive_ints, default=[8, 16, 32, 64], metavar="B,B,…",
                   help="hf batch sizes to run; the best is compared (default 8,16,32,64)")
    p.add_argument("--gpu-batch-size", type=int, default=32, help="ours (default 32)")
    p.add_argument("--num-gpu-batches", type=int, default=1, help="ours (default 1)")
    p.add_argument("--ours-args", action="append", metavar="'FLAGS'",
                   help="more `flexgen-dist eval` flags, one string; repeated, one run of ours each (default: none)")
    p.add_argument("--memlimit", metavar="SIZE", help="run both systems under ../shared/tools/memlimit SIZE")
    p.add_argument("--timeout", type=float, metavar="S", help="a run past S seconds is stopped and reported as such")
    p.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "eval-throughput",
                   help="where checkpoints are built and kept (default: $TMPDIR/eval-throughput)")
    p.add_argument("--seed", type=int, default=0, help="which passages (default 0)")
    p.add_argument("--out", type=Path, required=True, help="JSON lines of every run are appended here")
    args = p.parse_args()
    if min(args.docs, args.gpu_batch_size, args.num_gpu_batches) < 1:
        p.error("--docs, --gpu-batch-size and --num-gpu-batches must be at least 1")
    if args.timeout is not None and args.timeout <= 0:
        p.error(f"--timeout must be > 0, got {args.timeout:g}")
    if args.memlimit is not None and not (SIZE_TEXT.fullmatch(args.memlimit) and MEMLIMIT.is_file()):
        p.error(f"--memlimit {args.memlimit}: expected a size such as 3G, and {MEMLIMIT} to exist")
    if not args.out.parent.is_dir():
        p.error(f"--out {args.out}: no directory {args.out.parent}")
    args.ours_args = args.ours_args or [""]
    for ours_args in args.ours_args:
        try:
            shlex.split(ours_args)
        except ValueError as e:
            p.error(f"--ours-args {ours_args!r}: {e}")
    args.until = args.until or list(UNTIL)
    return args


def main() -> None:
    args = parse_args()
    model = args.workdir / f"{args.size}-{args.dtype}"
    if not model.is_dir():
        build_checkpoint(args.size, args.dtype, model)
    common = {"size": args.size, "dtype": args.dtype, "device": args.device, "docs": args.docs,
              "until": args.until, "memlimit": args.memlimit}
    records = []
    with tempfile.TemporaryDirectory() as tmp, args.out.open("a") as out:
        tasks = Path(tmp) / "tasks"  # the runs' results JSONs go beside it
        tasks.mkdir()
        write_tasks(tasks, args.docs, args.until, args.seed)
        for kind in args.kinds:
            for run in measured_runs(args, model, kind, tasks):
                record = {**common, "kind": kind, "requests": args.docs * REQUESTS_PER_DOC[kind], **run}
                out.write(json.dumps(record) + "\n")
                out.flush()
                records.append(record)
                print(json.dumps(record), flush=True)
    print_table(records)


if __name__ == "__main__":
    main()
