"""The progress bar on a terminal: sequences done (the bar and its ETA), blocks done, tokens per second."""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Iterator

REFRESH_S = 0.5  # tiny models step every millisecond; the terminal need not hear of each one


class Progress:
    def __init__(self, sequences: int, blocks: int, label: str) -> None:
        from tqdm import tqdm

        self._bar = tqdm(total=sequences, unit="seq", desc=label, file=sys.stderr, dynamic_ncols=True)
        self._blocks, self._blocks_done, self._tokens = blocks, 0, 0
        self._start = self._shown = time.perf_counter()
        self._describe()

    def step_done(self, new_tokens: int) -> None:
        self._tokens += new_tokens
        if time.perf_counter() - self._shown >= REFRESH_S:
            self._describe()
            self._bar.refresh()

    def block_done(self, sequences: int) -> None:
        self._blocks_done += 1
        self.sequences_done(sequences)

    def sequences_done(self, sequences: int) -> None:
        """Sequences written before their block ends (refill retires them as their rows are taken)."""
        self._describe()
        self._bar.update(sequences)

    def close(self) -> None:
        self._bar.close()

    def _describe(self) -> None:
        self._shown = time.perf_counter()
        elapsed = self._shown - self._start
        rate = self._tokens / elapsed if elapsed > 0 else 0.0
        self._bar.set_postfix_str(f"blocks {self._blocks_done}/{self._blocks}, {rate:.1f} tok/s", refresh=False)


@contextlib.contextmanager
def progress(sequences: int, blocks: int, enabled: bool, label: str = "generate") -> Iterator[Progress | None]:
    """A Progress on a terminal unless disabled (`--quiet`); None when stderr is not a TTY (logs, pipes, CI).
    `label`: the command, shown before the bar."""
    if not (enabled and sys.stderr.isatty()):
        yield None
        return
    bar = Progress(sequences, blocks, label)
    try:
        yield bar
    finally:
        bar.close()
