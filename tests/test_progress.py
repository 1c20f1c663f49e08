"""The terminal progress line: blocks done and tokens per second beside tqdm's sequence bar; absent off a TTY."""

from __future__ import annotations

from flexgen_dist.observability.progress import Progress, progress


def test_progress_shows_blocks_and_token_rate():
    bar = Progress(sequences=4, blocks=2, label="generate")
    try:
        bar.step_done(8)
        bar.block_done(2)
        assert bar._bar.n == 2
        postfix = bar._bar.postfix
        assert postfix.startswith("blocks 1/2, ") and postfix.endswith(" tok/s")
        assert float(postfix.split(", ")[1].split()[0]) > 0
    finally:
        bar.close()


def test_no_bar_when_stderr_is_not_a_terminal_or_quiet(capsys):
    with progress(4, 2, enabled=True) as bar:  # pytest captures stderr: not a TTY
        assert bar is None
    with progress(4, 2, enabled=False) as bar:
        assert bar is None
