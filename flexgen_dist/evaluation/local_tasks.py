"""lm-eval tasks over local files, for machines without a dataset hub (tests, benchmarks, air-gapped users)."""

from __future__ import annotations

import json
from pathlib import Path


def write_local_task(directory: Path, name: str, docs: list[dict], **config) -> None:
    """Task `name` in `directory` (an --include-path): its documents as `name`.jsonl, and `name`.yaml reading them
    (`dataset_path: json`, the test split), with lm-eval task `config` (output_type, doc_to_text, metric_list, ...)."""
    data = directory / f"{name}.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in docs))
    task = {"task": name, "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(data)}},
            "test_split": "test", **config}
    (directory / f"{name}.yaml").write_text(json.dumps(task, indent=1))  # JSON is YAML
