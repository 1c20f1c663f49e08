"""Bad input: exit 2, one clear line on stderr, no traceback, nothing half written."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
from safetensors.torch import load_file, save_file

from flexgen_dist.cli import main


def _prompts(tmp_path, lines):
    path = tmp_path / "p.jsonl"
    path.write_text("".join((l if isinstance(l, str) else json.dumps(l)) + "\n" for l in lines))
    return str(path)


def _fails(capsys, argv, *needles):
    rc = main(argv)
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, err
    return err


def _copy_model(src, dst):
    shutil.copytree(src, dst)
    return dst


@pytest.fixture
def ids_file(tmp_path):
    return _prompts(tmp_path, [{"id": "a", "input_ids": [5, 6, 7]}])


def test_unknown_model_name(capsys, ids_file):
    _fails(capsys, ["generate", "--model", "opt-42b", "--dummy-weights", "--prompts", ids_file], "unknown model", "opt-42b")


def test_named_model_needs_dummy_weights(capsys, ids_file):
    _fails(capsys, ["generate", "--model", "opt-125m", "--prompts", ids_file], "--dummy-weights")


def test_missing_checkpoint_weights(capsys, tmp_path, opt_preln_dir, ids_file):
    model = _copy_model(opt_preln_dir, tmp_path / "m")
    (model / "model.safetensors").unlink()
    _fails(capsys, ["generate", "--model", str(model), "--prompts", ids_file], "no *.safetensors")


def test_truncated_checkpoint(capsys, tmp_path, opt_preln_dir, ids_file):
    model = _copy_model(opt_preln_dir, tmp_path / "m")
    f = model / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    _fails(capsys, ["generate", "--model", str(model), "--prompts", ids_file], "model.safetensors")


def test_checkpoint_missing_a_tensor(capsys, tmp_path, opt_preln_dir, ids_file):
    model = _copy_model(opt_preln_dir, tmp_path / "m")
    tensors = load_file(model / "model.safetensors")
    del tensors["model.decoder.layers.1.fc2.weight"]
    save_file(tensors, model / "model.safetensors")
    _fails(capsys, ["generate", "--model", str(model), "--prompts", ids_file], "decoder.layers.1.fc2.weight")


def test_shape_mismatch_against_config(capsys, tmp_path, opt_preln_dir, ids_file):
    model = _copy_model(opt_preln_dir, tmp_path / "m")
    cfg = json.loads((model / "config.json").read_text())
    cfg["ffn_dim"] = 128
    (model / "config.json").write_text(json.dumps(cfg))
    _fails(capsys, ["generate", "--model", str(model), "--prompts", ids_file], "shape", "fc1")


@pytest.mark.parametrize("percent", [["101", "0", "100", "0", "100", "0"], ["60", "50", "100", "0", "100", "0"],
                                     ["100", "0", "-1", "0", "100", "0"], ["100", "0", "100", "0", "50", "50"]])
def test_bad_percentages(capsys, ids_file, opt_preln_dir, percent):
    _fails(capsys, ["generate", "--model", str(opt_preln_dir), "--prompts", ids_file, "--percent", *percent], "--percent")


@pytest.mark.parametrize("flag", ["--gpu-batch-size", "--num-gpu-batches"])
def test_batch_sizes_below_one(capsys, ids_file, opt_preln_dir, flag):
    _fails(capsys, ["generate", "--model", str(opt_preln_dir), "--prompts", ids_file, flag, "0"], ">= 1")


def test_prompt_longer_than_positions(capsys, tmp_path, opt_preln_dir):
    path = _prompts(tmp_path, [{"id": "long", "input_ids": [5] * 120}])
    _fails(capsys, ["generate", "--model", str(opt_preln_dir), "--prompts", path, "--max-new-tokens", "20"],
           "prompt long", "128 positions")


def test_token_id_outside_vocabulary(capsys, tmp_path, opt_preln_dir):
    path = _prompts(tmp_path, [{"id": "x", "input_ids": [5, 512]}])
    _fails(capsys, ["generate", "--model", str(opt_preln_dir), "--prompts", path], "512", "vocabulary")


def test_malformed_jsonl_names_the_line(capsys, tmp_path, opt_preln_dir):
    path = _prompts(tmp_path, [{"id": "a", "input_ids": [5]}, "{not json"])
    _fails(capsys, ["generate", "--model", str(opt_preln_dir), "--prompts", path], "line 2")


def test_duplicate_ids(capsys, tmp_path, opt_preln_dir):
    path = _prompts(tmp_path, [{"id": "a", "input_ids": [5]}, {"id": "a", "input_ids": [6]}])
    _fails(capsys, ["generate", "--model", str(opt_preln_dir), "--prompts", path], "duplicate")


def test_missing_prompts_file(capsys, tmp_path, opt_preln_dir):
    _fails(capsys, ["generate", "--model", str(opt_preln_dir), "--prompts", str(tmp_path / "nope.jsonl")], "nope.jsonl")


@pytest.mark.parametrize("budget", ["gpu=lots", "gpu:1GiB", "vram=1GiB"])
def test_unparsable_max_memory(capsys, ids_file, opt_preln_dir, budget):
    _fails(capsys, ["generate", "--model", str(opt_preln_dir), "--prompts", ids_file, "--max-memory", budget], "budget")


def test_offload_dir_that_cannot_be_created(capsys, tmp_path, opt_preln_dir, ids_file):
    blocker = tmp_path / "file"
    blocker.write_text("")
    out = tmp_path / "out.jsonl"
    _fails(capsys, ["generate", "--model", str(opt_preln_dir), "--prompts", ids_file, "--percent", "0", "0", "100", "0",
                    "100", "0", "--offload-dir", str(blocker / "sub"), "--output", str(out)], "offload directory")
    assert not out.exists(), "nothing may be written when the run is refused"


def test_budget_too_small_names_the_tier_and_shortfall(capsys, ids_file, opt_preln_dir):
    # A CPU device: its gpu and cpu tiers are one RAM, held together to the sum of their budgets.
    _fails(capsys, ["generate", "--model", str(opt_preln_dir), "--prompts", ids_file, "--percent", "0", "100", "100", "0",
                    "100", "0", "--device", "cpu", "--max-memory", "gpu=64KiB,cpu=64KiB"], "gpu and cpu tiers",
           "128.00 KiB", "short by")


def test_one_ram_pools_the_memory_budgets_and_a_gpu_holds_each_tier_to_its_own():
    from flexgen_dist.base.errors import UserError
    from flexgen_dist.memory.budget import MemoryBudget
    from flexgen_dist.memory.tiers import Tier
    from flexgen_dist.policy.memory_plan import TierPlan, check_budget

    none = {t: 0 for t in Tier}
    plan = TierPlan(weights={**none, Tier.GPU: 3 << 20}, cache={**none, Tier.CPU: 1 << 20}, activations=none,
                    buffers=none)
    check_budget(plan, MemoryBudget(gpu=2 << 20, cpu=2 << 20), one_ram=True)  # 4 MiB in all: fits
    with pytest.raises(UserError, match="gpu tier .*short by 1.00 MiB"):
        check_budget(plan, MemoryBudget(gpu=2 << 20, cpu=2 << 20), one_ram=False)
    with pytest.raises(UserError, match="gpu and cpu tiers .*short by 1.00 MiB"):
        check_budget(plan, MemoryBudget(gpu=3 << 20), one_ram=True)  # one given alone bounds both


def test_text_prompt_without_tokenizer(capsys):
    _fails(capsys, ["generate", "--model", "opt-125m", "--dummy-weights", "--prompt", "hello"], "tokenizer")


def test_console_script_prints_one_line_without_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "flexgen_dist", "generate", "--model", "opt-42b", "--dummy-weights",
                           "--synthetic", "2"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()] and "Traceback" not in proc.stderr
    assert proc.stdout == ""


@pytest.mark.parametrize("text,needle", [("policy:\n  w_gpu_percent: lots\n", "expected a number"),
                                         ("gpu_batch_size: 4\nturbo: true\n", "unknown key"),
                                         ("[1, 2", "not valid YAML")])
def test_bad_policy_file(capsys, tmp_path, ids_file, opt_preln_dir, text, needle):
    policy = tmp_path / "policy.yaml"
    policy.write_text(text)
    _fails(capsys, ["generate", "--model", str(opt_preln_dir), "--prompts", ids_file, "--policy", str(policy)], needle)


def test_policy_file_with_flag_overrides(tmp_path, opt_preln_dir, ids_file, capsys):
    policy = tmp_path / "policy.yaml"
    policy.write_text("policy:\n  gpu_batch_size: 3\n  w_gpu_percent: 0\n  w_cpu_percent: 100\n")
    assert main(["generate", "--model", str(opt_preln_dir), "--prompts", ids_file, "--policy", str(policy),
                 "--num-gpu-batches", "2", "--max-new-tokens", "2", "--executor", "local", "--quiet"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["policy"]["gpu_batch_size"] == 3 and summary["policy"]["num_gpu_batches"] == 2
    assert summary["policy"]["w_cpu_percent"] == 100
