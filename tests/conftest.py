"""Session fixtures: a tiny tokenizer, tiny OPT checkpoints in every layout the engine reads, and tiny Llama-family
checkpoints (Llama, Mistral, Qwen2), all built locally so no test ever touches the Hugging Face hub."""
from __future__ import annotations

import os

# Before anything imports huggingface_hub, which reads these once at import time.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import random
import shutil
import string
import sysconfig
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from collections.abc import Callable

    from transformers import OPTForCausalLM

VOCAB_SIZE = 512
# OPT's convention: </s> is both BOS and EOS; <pad> is 1.
SPECIAL_TOKENS = ["<s>", "<pad>", "</s>", "<unk>"]
_BASE_CONFIG = dict(
    vocab_size=VOCAB_SIZE, hidden_size=64, num_hidden_layers=3, ffn_dim=256, num_attention_heads=4,
    max_position_embeddings=128, pad_token_id=1, bos_token_id=2, eos_token_id=2,
    dropout=0.0, attention_dropout=0.0,
)


def _corpus_files(workdir: Path) -> list[str]:
    """Text that ships with Debian and CPython; generated words if none of it is present."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    licenses = Path("/usr/share/common-licenses")
    candidates = [stdlib / "LICENSE.txt", stdlib / "textwrap.py", stdlib / "argparse.py",
                  licenses / "GPL-3", licenses / "Apache-2.0", licenses / "MPL-2.0"]
    found = [str(p) for p in candidates if p.is_file()]
    if found:
        return found
    rng = random.Random(0)
    words = ["".join(rng.choices(string.ascii_lowercase, k=rng.randint(1, 8))) for _ in range(400)]
    fallback = workdir / "corpus.txt"
    fallback.write_text("\n".join(" ".join(rng.choices(words, k=12)) + "." for _ in range(4000)))
    return [str(fallback)]


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Byte-level BPE, 512 ids, OPT special ids, prepends </s> (id 2) as BOS like OPT's tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    out = tmp_path_factory.mktemp("tiny_tokenizer")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE, special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train(_corpus_files(tmp_path_factory.mktemp("corpus")), trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="</s> $A", pair="</s> $A </s> $B", special_tokens=[("</s>", 2)]
    )
    PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="</s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    ).save_pretrained(out)
    return out


def _init_for_clear_greedy(model, norm_marker: str) -> None:
    """The default init (std 0.02) gives near-uniform logits, so greedy picks would hinge on ties. Wider token
    embeddings and LM head widen the top-1 margin too. `norm_marker`: what the model's norm parameters are named."""
    import torch

    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
            elif norm_marker in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.5 if "embed_tokens" in name or "lm_head" in name else 0.2)
            if name.endswith("fc2.weight"):
                # ReLU outputs have a positive mean that fc2 would turn into one fixed vector added
                # at every position; in the post-LN model that swamps the input and greedy repeats
                # one or two tokens forever. Zero-mean rows remove that shared component.
                p.sub_(p.mean(dim=1, keepdim=True))
        # Zero rows give <s>, <pad>, <unk> logit 0, far below the best of ~500 others, so greedy
        # never emits them (as with a trained OPT). A 1.5x </s> row makes roughly a fifth to a half
        # of 32-token greedy runs stop at EOS, so stopping gets exercised. (A tied head is the same table.)
        tables = {id(t): t for t in (model.get_input_embeddings().weight, model.get_output_embeddings().weight)}
        for table in tables.values():
            table[[0, 1, 3]] = 0.0
            table[2] *= 1.5


def _tiny_opt(**overrides: object) -> OPTForCausalLM:
    import torch
    import transformers
    from transformers import OPTConfig, OPTForCausalLM

    transformers.logging.disable_progress_bar()
    torch.manual_seed(0)
    model = OPTForCausalLM(OPTConfig(**{**_BASE_CONFIG, **overrides})).float().eval()
    _init_for_clear_greedy(model, "layer_norm")
    return model


# The Llama family's tiny checkpoints: 4 query heads over 2 key/value heads (GQA), head size 16, OPT's special ids so
# the tiny tokenizer and hf_oracle serve them too.
_LLAMA_BASE = dict(
    vocab_size=VOCAB_SIZE, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
    num_key_value_heads=2, head_dim=16, max_position_embeddings=128, pad_token_id=1, bos_token_id=2, eos_token_id=2,
    rms_norm_eps=1e-5, attention_dropout=0.0,
)
LLAMA_FAMILY = {
    # Llama 3's rope scaling with a short original context, so the scaled, smoothed and kept frequencies all occur.
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(
        tie_word_embeddings=False, rope_parameters={"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0,
                                                    "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                    "original_max_position_embeddings": 32})),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(tie_word_embeddings=False, sliding_window=None,
                                                           rope_parameters={"rope_type": "default", "rope_theta": 1e6})),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(tie_word_embeddings=True, use_sliding_window=False,
                                                     rope_parameters={"rope_type": "default", "rope_theta": 1e6})),
}


def tiny_llama_family(kind: str, **overrides: object):
    """A random float32 model of the Llama family (`kind`: llama, mistral, qwen2), initialized like _tiny_opt."""
    import torch
    import transformers

    config_class, model_class, extra = LLAMA_FAMILY[kind]
    transformers.logging.disable_progress_bar()
    torch.manual_seed(0)
    config = getattr(transformers, config_class)(**{**_LLAMA_BASE, **extra, **overrides})
    model = getattr(transformers, model_class)(config).float().eval()
    _init_for_clear_greedy(model, "norm")
    return model


def _with_tokenizer(model_dir: Path, tokenizer_dir: Path) -> Path:
    for f in tokenizer_dir.iterdir():
        shutil.copy(f, model_dir / f.name)
    return model_dir


@pytest.fixture(scope="session")
def opt_preln_dir(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer_dir: Path) -> Path:
    """Pre-LN OPT (like opt-125m and larger) in one model.safetensors."""
    out = tmp_path_factory.mktemp("opt_preln")
    _tiny_opt(do_layer_norm_before=True, word_embed_proj_dim=64).save_pretrained(out)
    return _with_tokenizer(out, tiny_tokenizer_dir)


@pytest.fixture(scope="session")
def opt_postln_dir(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer_dir: Path) -> Path:
    """Post-LN OPT with project_in/project_out (like opt-350m) in a legacy pytorch_model.bin."""
    import torch
    from safetensors.torch import load_file

    out = tmp_path_factory.mktemp("opt_postln")
    _tiny_opt(do_layer_norm_before=False, word_embed_proj_dim=32).save_pretrained(out)
    # transformers 5 only writes safetensors; re-save the same tensors in the pickle format.
    weights = out / "model.safetensors"
    torch.save(load_file(weights), out / "pytorch_model.bin")
    weights.unlink()
    return _with_tokenizer(out, tiny_tokenizer_dir)


@pytest.fixture(scope="session")
def opt_sharded_dir(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer_dir: Path) -> Path:
    """The pre-LN model (same weights as opt_preln_dir) as sharded safetensors with an index."""
    out = tmp_path_factory.mktemp("opt_sharded")
    # ~0.75 MB of float32 weights; 200KB shards give 4 files.
    _tiny_opt(do_layer_norm_before=True, word_embed_proj_dim=64).save_pretrained(out, max_shard_size="200KB")
    return _with_tokenizer(out, tiny_tokenizer_dir)


@pytest.fixture(scope="session")
def _llama_checkpoint(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer_dir: Path) -> Callable[[str], Path]:
    """kind -> that tiny Llama-family checkpoint's directory (safetensors with the tiny tokenizer), each built once a
    session: llama_dir and llama_family_dir's llama leg are the same directory."""
    built: dict[str, Path] = {}

    def checkpoint(kind: str) -> Path:
        if kind not in built:
            out = tmp_path_factory.mktemp(f"tiny_{kind}")
            tiny_llama_family(kind).save_pretrained(out)
            built[kind] = _with_tokenizer(out, tiny_tokenizer_dir)
        return built[kind]

    return checkpoint


@pytest.fixture(scope="session", params=list(LLAMA_FAMILY))
def llama_family_dir(request, _llama_checkpoint) -> Path:
    """Each tiny Llama-family checkpoint in turn (GQA; Llama: untied head, Llama 3 rope scaling; Mistral: no sliding
    window; Qwen2: q/k/v biases, tied head)."""
    return _llama_checkpoint(request.param)


@pytest.fixture(scope="session")
def llama_dir(_llama_checkpoint) -> Path:
    """The tiny Llama alone (GQA, untied head, Llama 3 rope scaling)."""
    return _llama_checkpoint("llama")


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def ray_cluster(tmp_path_factory: pytest.TempPathFactory):
    """A real local Ray head on 127.0.0.1, one per test session: `ray start --head --block` runs as our child, and
    terminating it stops every process it started. Yields {"address": GCS address, "dashboard": job API URL}."""
    import secrets
    import subprocess
    import sys
    import time
    import urllib.error
    import urllib.request

    gcs, dashboard = _free_port(), _free_port()
    ray_bin = str(Path(sys.executable).parent / "ray")
    # Ray's token authentication stays on: the head, this process's drivers and `ray job submit` share a fresh token.
    auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16), "RAY_USAGE_STATS_ENABLED": "0"}
    saved = {k: os.environ.get(k) for k in auth}
    os.environ.update(auth)
    log = tmp_path_factory.mktemp("ray") / "ray-head.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [ray_bin, "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={gcs}",
             "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}", "--include-dashboard=true",
             f"--dashboard-agent-listen-port={_free_port()}", "--num-cpus=2", "--disable-usage-stats"],
            stdout=out, stderr=subprocess.STDOUT, env=dict(os.environ))
    url = f"http://127.0.0.1:{dashboard}"
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                pytest.fail(f"ray start exited with {proc.returncode}: {log.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(url, timeout=2):
                    break
            except urllib.error.HTTPError:
                break  # the dashboard answers: it is up
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail(f"Ray head did not come up in 120 s: {log.read_text()[-2000:]}")
                time.sleep(0.5)
        yield {"address": f"127.0.0.1:{gcs}", "dashboard": url, "process": proc}
    finally:
        import ray

        if ray.is_initialized():
            ray.shutdown()  # disconnect this test process's driver before the cluster goes away
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
