"""Input validation (prompts, memory budgets) and durable results: every bad input is a one-line UserError."""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import pytest

from flexgen_dist.base.errors import UserError
from flexgen_dist.io import outputs
from flexgen_dist.io.outputs import ResultWriter, read_done_ids
from flexgen_dist.io.prompts import Request, load_prompts_file, requests_from_cli, synthetic_requests
from flexgen_dist.memory.budget import MemoryBudget, format_bytes, parse_max_memory, parse_size


def _user_error(fn, *args) -> str:
    with pytest.raises(UserError) as info:
        fn(*args)
    message = str(info.value)
    assert message and "\n" not in message
    return message


# ---------------------------------------------------------------- prompts


def _write(tmp_path: Path, text: str | bytes, name: str = "prompts.jsonl") -> Path:
    path = tmp_path / name
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


def test_load_prompts_file_valid_forms(tmp_path: Path) -> None:
    path = _write(tmp_path, "\n".join([
        '{"id": "a", "prompt": "Hello there"}',
        "",
        '{"id": 7, "input_ids": [2, 0, 511], "max_new_tokens": 5}',
        "   ",
        '{"id": "c", "prompt": "line\\nbreak \u2028 kept", "max_new_tokens": null}',
    ]) + "\n")
    assert load_prompts_file(path) == [
        Request("a", "Hello there", None, None),
        Request("7", None, (2, 0, 511), 5),
        Request("c", "line\nbreak \u2028 kept", None, None),
    ]


def test_load_prompts_file_accepts_crlf_and_no_final_newline(tmp_path: Path) -> None:
    path = _write(tmp_path, '{"id": 1, "prompt": "x"}\r\n{"id": 2, "prompt": "y"}')
    assert [r.id for r in load_prompts_file(path)] == ["1", "2"]


def test_request_is_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        Request("a", "p", None, None).id = "b"  # type: ignore[misc]


GOOD = '{"id": "ok", "prompt": "fine"}\n'


@pytest.mark.parametrize(
    "bad_line, expected",
    [
        ("{not json", "invalid JSON"),
        ('{"id": "x", "prompt": "a"} trailing', "invalid JSON"),
        ("[1, 2]", "JSON object"),
        ('"just a string"', "JSON object"),
        ('{"prompt": "x"}', "missing 'id'"),
        ('{"id": null, "prompt": "x"}', "'id'"),
        ('{"id": "", "prompt": "x"}', "'id'"),
        ('{"id": 1.5, "prompt": "x"}', "'id'"),
        ('{"id": true, "prompt": "x"}', "'id'"),
        ('{"id": ["a"], "prompt": "x"}', "'id'"),
        ('{"id": "x"}', "exactly one of"),
        ('{"id": "x", "prompt": "a", "input_ids": [5]}', "exactly one of"),
        ('{"id": "x", "input_ids": []}', "input_ids"),
        ('{"id": "x", "input_ids": "1 2 3"}', "input_ids"),
        ('{"id": "x", "input_ids": [5, -1]}', "input_ids"),
        ('{"id": "x", "input_ids": [5, 2.0]}', "input_ids"),
        ('{"id": "x", "input_ids": [5, "6"]}', "input_ids"),
        ('{"id": "x", "input_ids": [true]}', "input_ids"),
        ('{"id": "x", "input_ids": [[5]]}', "input_ids"),
        ('{"id": "x", "prompt": ""}', "empty"),
        ('{"id": "x", "prompt": "  \\n\\t "}', "empty"),
        ('{"id": "x", "prompt": 42}', "'prompt' must be a string"),
        ('{"id": "x", "prompt": null}', "'prompt' must be a string"),
        ('{"id": "x", "prompt": "a", "max_new_tokens": 0}', "max_new_tokens"),
        ('{"id": "x", "prompt": "a", "max_new_tokens": -3}', "max_new_tokens"),
        ('{"id": "x", "prompt": "a", "max_new_tokens": 1.5}', "max_new_tokens"),
        ('{"id": "x", "prompt": "a", "max_new_tokens": "8"}', "max_new_tokens"),
        ('{"id": "x", "prompt": "a", "max_new_tokens": true}', "max_new_tokens"),
    ],
)
def test_load_prompts_file_errors_name_file_and_line(tmp_path: Path, bad_line: str, expected: str) -> None:
    # A good line and a blank line first: the reported number must count both.
    path = _write(tmp_path, GOOD + "\n" + bad_line + "\n" + GOOD.replace("ok", "later"))
    message = _user_error(load_prompts_file, path)
    assert f"{path} line 3" in message and expected in message


def test_duplicate_id_names_both_lines(tmp_path: Path) -> None:
    # 1 and "1" are the same id once normalised to str.
    path = _write(tmp_path, '{"id": 1, "prompt": "a"}\n{"id": 2, "prompt": "b"}\n\n{"id": "1", "input_ids": [9]}\n')
    message = _user_error(load_prompts_file, path)
    assert "line 4" in message and "line 1" in message and "'1'" in message


@pytest.mark.parametrize("text", ["", "\n", "  \n\n\t\n"])
def test_empty_prompts_file(tmp_path: Path, text: str) -> None:
    path = _write(tmp_path, text)
    message = _user_error(load_prompts_file, path)
    assert str(path) in message and "no requests" in message


def test_missing_unreadable_and_non_utf8_prompts_files(tmp_path: Path) -> None:
    assert "not found" in _user_error(load_prompts_file, tmp_path / "nope.jsonl")
    assert "cannot read" in _user_error(load_prompts_file, tmp_path)
    assert "UTF-8" in _user_error(load_prompts_file, _write(tmp_path, b'{"id": 1, "prompt": "\xff"}\n'))


def test_requests_from_cli() -> None:
    assert requests_from_cli(["a b", "c"]) == [Request("0", "a b", None, None), Request("1", "c", None, None)]
    assert requests_from_cli([]) == []
    assert "#1" in _user_error(requests_from_cli, ["fine", "  "])


def test_synthetic_requests_are_deterministic_and_in_range() -> None:
    reqs = synthetic_requests(5, 7, 50, seed=3)
    assert [r.id for r in reqs] == [f"synthetic-{i}" for i in range(5)]
    assert all(r.prompt is None and r.max_new_tokens is None and len(r.input_ids) == 7 for r in reqs)
    assert all(type(t) is int and 4 <= t < 50 for r in reqs for t in r.input_ids)
    assert synthetic_requests(5, 7, 50, seed=3) == reqs
    assert synthetic_requests(5, 7, 50, seed=4) != reqs
    assert len({r.input_ids for r in reqs}) == 5
    assert {t for r in synthetic_requests(50, 50, 6, seed=0) for t in r.input_ids} == {4, 5}


@pytest.mark.parametrize("args", [(0, 4, 50, 0), (2, 0, 50, 0), (2, 4, 4, 0)])
def test_synthetic_requests_reject_bad_arguments(args: tuple[int, int, int, int]) -> None:
    _user_error(synthetic_requests, *args)


# ---------------------------------------------------------------- outputs


def _lines(path: Path) -> list[dict]:
    data = path.read_bytes()
    assert data.endswith(b"\n")
    return [json.loads(line) for line in data.decode().split("\n")[:-1]]


def test_writer_round_trip_and_resume_ids(tmp_path: Path) -> None:
    path = tmp_path / "deep" / "er" / "out.jsonl"
    assert read_done_ids(path) == set() and not path.exists()
    with ResultWriter(path) as w:
        w.write({"id": "a", "text": "naïve ☃\nnext"})
        w.write_many([{"id": "b", "tokens": [1, 2]}, {"id": 3}])
        w.write_many([])
    with ResultWriter(path) as w:  # reopening appends
        w.write({"id": "d"})
    assert _lines(path) == [{"id": "a", "text": "naïve ☃\nnext"}, {"id": "b", "tokens": [1, 2]}, {"id": 3}, {"id": "d"}]
    assert read_done_ids(path) == {"a", "b", "3", "d"}


def test_write_many_is_one_write_and_one_fsync(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    real_write, real_fsync = os.write, os.fsync
    monkeypatch.setattr(outputs.os, "write", lambda fd, b: calls.append("write") or real_write(fd, b))
    monkeypatch.setattr(outputs.os, "fsync", lambda fd: calls.append("fsync") or real_fsync(fd))
    path = tmp_path / "out.jsonl"
    with ResultWriter(path) as w:
        w.write_many({"id": str(i), "pad": "x" * 1000} for i in range(50))
        assert calls == ["write", "fsync"]
        w.write({"id": "last"})
        assert calls == ["write", "fsync"] * 2
    assert [r["id"] for r in _lines(path)] == [str(i) for i in range(50)] + ["last"]


def test_short_os_writes_still_produce_whole_lines(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_write = os.write
    monkeypatch.setattr(outputs.os, "write", lambda fd, b: real_write(fd, bytes(b[:7])))
    path = tmp_path / "out.jsonl"
    with ResultWriter(path) as w:
        w.write_many([{"id": "a", "v": "ü" * 20}, {"id": "b"}])
    assert _lines(path) == [{"id": "a", "v": "ü" * 20}, {"id": "b"}]


def test_unserialisable_record_leaves_file_untouched(tmp_path: Path) -> None:
    path = tmp_path / "out.jsonl"
    with ResultWriter(path) as w:
        w.write({"id": "a"})
        with pytest.raises(TypeError):
            w.write_many([{"id": "b"}, {"id": "c", "bad": object()}])
    assert _lines(path) == [{"id": "a"}]


@pytest.mark.parametrize(
    "tail",
    [
        b'{"id": "c", "te',  # crash mid-write
        b'{"id": "c"}',  # whole record but its newline never landed
        b'{"id": "c", "te\x00\x00\n',  # garbage that happens to end in a newline
        b"   ",
        b"[1, 2]\n",  # parses, but is not a record
    ],
)
def test_torn_last_line_is_repaired_then_appended(tmp_path: Path, tail: bytes) -> None:
    path = tmp_path / "out.jsonl"
    good = b'{"id": "a"}\n{"id": "b"}\n'
    path.write_bytes(good + tail)
    assert read_done_ids(path) == {"a", "b"}
    assert path.read_bytes() == good
    with ResultWriter(path) as w:
        w.write({"id": "c"})
    assert [r["id"] for r in _lines(path)] == ["a", "b", "c"]
    assert read_done_ids(path) == {"a", "b", "c"}


def test_torn_only_line(tmp_path: Path) -> None:
    path = tmp_path / "out.jsonl"
    path.write_bytes(b'{"id"')
    assert read_done_ids(path) == set() and path.read_bytes() == b""


def test_blank_lines_are_tolerated(tmp_path: Path) -> None:
    path = tmp_path / "out.jsonl"
    path.write_bytes(b'{"id": "a"}\n\n{"id": "b"}\n\n')
    assert read_done_ids(path) == {"a", "b"}
    assert path.read_bytes() == b'{"id": "a"}\n\n{"id": "b"}\n\n'


@pytest.mark.parametrize("bad", [b"{oops", b'{"no_id": 1}', b'{"id": null}', b'{"id": true}', b"42"])
def test_malformed_middle_line_is_an_error_and_file_is_kept(tmp_path: Path, bad: bytes) -> None:
    path = tmp_path / "out.jsonl"
    data = b'{"id": "a"}\n\n' + bad + b'\n{"id": "b"}\n'
    path.write_bytes(data)
    message = _user_error(read_done_ids, path)
    assert f"{path} line 3" in message
    assert path.read_bytes() == data


def test_writer_refuses_a_file_with_a_torn_tail(tmp_path: Path) -> None:
    path = tmp_path / "out.jsonl"
    path.write_bytes(b'{"id": "a"}\n{"id": "b"')
    assert "incomplete line" in _user_error(ResultWriter(path).__enter__)
    assert path.read_bytes() == b'{"id": "a"}\n{"id": "b"'


def test_writer_bad_destinations(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    _user_error(ResultWriter(blocker / "sub" / "out.jsonl").__enter__)  # parent is a file
    _user_error(ResultWriter(tmp_path).__enter__)  # the path is a directory
    assert "cannot read" in _user_error(read_done_ids, tmp_path)


def test_writer_outside_with_block(tmp_path: Path) -> None:
    w = ResultWriter(tmp_path / "out.jsonl")
    with pytest.raises(RuntimeError):
        w.write({"id": "a"})
    with w:
        w.write({"id": "a"})
    with pytest.raises(RuntimeError):
        w.write({"id": "b"})


# ---------------------------------------------------------------- memory budget


@pytest.mark.parametrize(
    "text, expected",
    [
        ("16GiB", 16 * 2**30),
        ("16GB", 16 * 10**9),
        ("16gb", 16 * 10**9),
        ("16G", 16 * 2**30),
        ("16g", 16 * 2**30),
        ("512MiB", 512 * 2**20),
        ("512M", 512 * 2**20),
        ("1.5GiB", 1610612736),
        (" 1.5 gib ", 1610612736),
        (".5KiB", 512),
        ("100KB", 100_000),
        ("1.5KB", 1500),
        ("8K", 8192),
        ("2TiB", 2 * 2**40),
        ("2T", 2 * 2**40),
        ("3TB", 3 * 10**12),
        ("4096", 4096),
        ("10B", 10),
        ("0", 0),
        ("0.1KiB", 102),  # rounded down to whole bytes
        (1024, 1024),
    ],
)
def test_parse_size_valid(text: str | int, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize(
    "text",
    ["", "  ", "abc", "GiB", "-1GiB", "-5", "1.5", "16 GiBs", "16PB", "1e9", "1..5GiB", "1.GiB",
     "1,000", "nan", "inf", "16 G B", "１６GiB", -1, True, None, 1.5],
)
def test_parse_size_invalid(text: object) -> None:
    _user_error(parse_size, text)


@pytest.mark.parametrize(
    "n, expected",
    [(0, "0 B"), (512, "512 B"), (1023, "1023 B"), (1536, "1.50 KiB"), (1610612736, "1.50 GiB"),
     (2**40, "1.00 TiB"), (5 * 2**20, "5.00 MiB"), (-1536, "-1.50 KiB")],
)
def test_format_bytes(n: int, expected: str) -> None:
    assert format_bytes(n) == expected


def test_parse_max_memory_valid() -> None:
    assert parse_max_memory("gpu=16GiB,cpu=64GiB,disk=500GiB") == MemoryBudget(16 * 2**30, 64 * 2**30, 500 * 2**30)
    assert parse_max_memory(" Disk = 1TB , gpu=0 ") == MemoryBudget(gpu=0, cpu=None, disk=10**12)
    assert parse_max_memory("cpu=1.5GiB") == MemoryBudget(None, 1610612736, None)


@pytest.mark.parametrize(
    "text, named",
    [
        ("", "empty"),
        ("gpu", "'gpu'"),
        ("cpu:64GiB", "'cpu:64GiB'"),
        ("gpu=1GiB,,cpu=2GiB", "''"),
        ("gpu=1GiB,", "''"),
        ("tpu=1GiB", "'tpu=1GiB'"),
        ("gpu=1GiB,cpu=2GiB,GPU=3GiB", "'GPU=3GiB'"),
        ("gpu=lots", "'gpu=lots'"),
        ("disk=-1GiB", "'disk=-1GiB'"),
        ("gpu=", "'gpu='"),
    ],
)
def test_parse_max_memory_invalid_names_the_bad_part(text: str, named: str) -> None:
    assert named in _user_error(parse_max_memory, text)


def test_memory_budget_str_and_frozen() -> None:
    budget = MemoryBudget(gpu=1610612736, cpu=None, disk=2**40)
    assert str(budget) == "gpu=1.50 GiB, cpu=auto, disk=1.00 TiB"
    with pytest.raises(dataclasses.FrozenInstanceError):
        budget.gpu = 1  # type: ignore[misc]
