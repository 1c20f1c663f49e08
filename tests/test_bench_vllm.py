"""`bench --baseline vllm`: vLLM as a peer in its own interpreter. Where it is missing or does not import, a one-line
skip with the reason (the real runner, in this interpreter, which has no vLLM); the spec it is given (a dummy model's
config.json, its KV cache, its offload); and, where launch/setup_vllm.sh has installed it, a real run."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

import flexgen_dist.bench.vllm_baseline as vllm_baseline
from flexgen_dist.bench.baselines import BaselineSpec
from flexgen_dist.cli import main
from flexgen_dist.io.model_source import model_config
from flexgen_dist.models.family import config_by_name

BENCH = ["bench", "--prompt-len", "8", "--gen-len", "2", "--gpu-batch-size", "2", "--device", "cpu",
         "--dtype", "float32", "--executor", "local", "--no-roofline", "--baseline", "vllm"]


def _points(capsys) -> tuple[list[dict], str]:
    captured = capsys.readouterr()
    return json.loads(captured.out.strip().splitlines()[-1])["points"], captured.err


def test_missing_vllm_is_a_skip_with_the_way_to_install_it(opt_preln_dir, capsys, monkeypatch, tmp_path):
    monkeypatch.delenv(vllm_baseline.PYTHON_ENV, raising=False)
    monkeypatch.setattr(vllm_baseline, "SETUP_VENV", tmp_path / "none")
    assert main([*BENCH, "--model", str(opt_preln_dir)]) == 0
    ours, vllm = _points(capsys)[0]
    assert ours["system"] == "flexgen_dist" and ours["sequences"] == 2
    assert vllm["system"] == "vllm" and "not installed" in vllm["skipped"] and "setup_vllm.sh" in vllm["skipped"]


def test_a_vllm_that_does_not_import_is_a_skip_with_the_reason(capsys):
    """The real runner in this interpreter, which has no vLLM: its own one-line skip comes back through the bench."""
    pytest.importorskip("transformers")
    if vllm_baseline.importlib.util.find_spec("vllm") is not None:
        pytest.skip("this interpreter has vLLM")
    # opt-125m: head size 64, which vLLM's CPU attention takes, and a size name, so the runner gets a dummy model
    assert main([*BENCH, "--model", "opt-125m", "--num-prompts", "2", "--vllm-python", sys.executable]) == 0
    points, err = _points(capsys)
    assert points[1]["skipped"] == "vllm does not import here: ModuleNotFoundError: No module named 'vllm'", points[1]
    assert "flexgen_dist / vllm" not in err


def test_vllm_python_is_checked_before_anything_runs(capsys):
    assert main([*BENCH, "--model", "opt-125m", "--vllm-python", "/nonexistent/python"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith("--vllm-python /nonexistent/python: no such interpreter") and len(err.splitlines()) == 1


def test_vllm_is_skipped_where_its_cpu_build_cannot_run_the_point(opt_preln_dir, capsys):
    # the tiny test model's head size is 16; vLLM's CPU attention refuses it at load
    assert main([*BENCH, "--model", str(opt_preln_dir), "--vllm-python", sys.executable]) == 0
    assert "head sizes 32, 64" in _points(capsys)[0][1]["skipped"]
    cfg = config_by_name("opt-1.3b")
    budget = 6 << 30  # the weights (4.9 GiB in float32) fit; with a cache for 128 x 160 (7.5 GiB) they do not
    assert vllm_baseline.why_not(cfg, "cpu", 8, 160, "float32", budget) == ""
    assert vllm_baseline.why_not(cfg, "cpu", 128, 160, "float32", budget).startswith("does not fit: needs 12.46 GiB resident")
    assert vllm_baseline.why_not(cfg, "cuda", 128, 160, "float16", 1 << 30) == ""  # a GPU run offloads instead


def test_vllm_is_given_a_dummy_model_of_our_config_and_a_cache_for_its_batch(tmp_path):
    cfg = model_config("opt-1.3b")
    spec = BaselineSpec("vllm", "opt-1.3b", [[5] * 128, [6] * 120], 32, 2, "cuda", "float16", {"gpu": 1 << 30},
                        str(tmp_path))
    argv = vllm_baseline.vllm_command("/venv/bin/python", spec, cfg, tmp_path)
    assert argv[0] == "/venv/bin/python" and argv[1].endswith("vllm_runner.py")
    runner = json.loads(Path(argv[2]).read_text())
    config = json.loads((tmp_path / "model" / "config.json").read_text())
    assert runner["model"] == str(tmp_path / "model") and runner["load_format"] == "dummy"
    assert config["architectures"] == ["OPTForCausalLM"] and config["hidden_size"] == 2048
    assert config["num_hidden_layers"] == 24 and config["ffn_dim"] == 8192
    # 2 sequences of 160 positions (ten 16-token pages), K and V, 24 layers, fp16, and the margin
    assert runner["kv_cache_bytes"] == 2 * 24 * 2 * 160 * 2048 * 2 + (64 << 20)
    assert runner["max_num_seqs"] == 2 and runner["prompts"] == spec.prompts and runner["gen_len"] == 32
    # on a GPU, what of the weights exceeds its budget goes to vLLM's CPU offload
    assert runner["cpu_offload_bytes"] == cfg.param_count() * 2 - (1 << 30)
    on_disk = BaselineSpec("vllm", str(tmp_path / "model"), [[5] * 8], 4, 1, "cpu", "float32", {}, str(tmp_path))
    (tmp_path / "x").mkdir()
    runner = json.loads(Path(vllm_baseline.vllm_command("py", on_disk, cfg, tmp_path / "x")[2]).read_text())
    assert runner["load_format"] == "auto" and runner["cpu_offload_bytes"] == 0


@pytest.fixture(scope="module")
def opt_head64_dir(tmp_path_factory, tiny_tokenizer_dir) -> Path:
    """A tiny OPT whose head size (64) vLLM's CPU attention takes."""
    from conftest import _tiny_opt, _with_tokenizer

    out = tmp_path_factory.mktemp("opt_head64")
    _tiny_opt(do_layer_norm_before=True, hidden_size=128, num_attention_heads=2, ffn_dim=256,
              word_embed_proj_dim=128).save_pretrained(out)
    return _with_tokenizer(out, tiny_tokenizer_dir)


def test_bench_against_a_real_vllm(opt_head64_dir, capsys):
    python = vllm_baseline.vllm_python()
    if python is None:
        pytest.skip(f"vLLM is not installed ({vllm_baseline.SETUP_HINT})")
    assert main([*BENCH, "--model", str(opt_head64_dir), "--num-prompts", "4", "--gen-len", "3"]) == 0
    points, err = _points(capsys)
    vllm = points[1]
    assert "skipped" not in vllm, vllm
    assert vllm["generated_tokens"] == 4 * 3 and vllm["batch_size"] == 2 and vllm["version"]
    assert "flexgen_dist / vllm" in err
