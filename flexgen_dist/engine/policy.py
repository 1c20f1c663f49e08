"""The offloading policy: where weights, KV cache and activations live and how sequences are blocked."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from flexgen_dist.base.errors import UserError
from flexgen_dist.memory.compression import QuantConfig


@dataclass(frozen=True)
class Policy:
    gpu_batch_size: int = 1
    num_gpu_batches: int = 1
    w_gpu_percent: float = 100.0
    w_cpu_percent: float = 0.0
    cache_gpu_percent: float = 100.0
    cache_cpu_percent: float = 0.0
    act_gpu_percent: float = 100.0
    act_cpu_percent: float = 0.0
    overlap: bool = True
    compress_weight: bool = False  # group-wise quantized weights in every tier, dequantized just before use
    compress_cache: bool = False  # group-wise quantized KV cache in every tier
    compress_bits: int = 4
    compress_group_size: int = 64
    compress_symmetric: bool = False
    cpu_cache_compute: bool = False  # decode attention runs where a CPU-tier cache lives; only its output moves
    attn_sparsity: float = 1.0  # decode attends to the top ceil(F * length) positions per query

    def __post_init__(self) -> None:
        for name in ("gpu_batch_size", "num_gpu_batches"):
            if getattr(self, name) < 1:
                raise UserError(f"{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        for what in ("w", "cache", "act"):
            gpu, cpu = getattr(self, f"{what}_gpu_percent"), getattr(self, f"{what}_cpu_percent")
            if not (0 <= gpu <= 100 and 0 <= cpu <= 100) or gpu + cpu > 100 + 1e-9:
                raise UserError(f"--percent: {what} gpu {gpu:g} + cpu {cpu:g} must each be in 0..100 and sum to <= 100")
        act_tiers = [p for p in (self.act_gpu_percent, self.act_cpu_percent, self.act_disk_percent) if p > 0]
        if len(act_tiers) != 1 or act_tiers[0] != 100:
            raise UserError("--percent: activations live on one tier: give ACT_GPU ACT_CPU as 100 0, 0 100 or 0 0 (disk)")
        if not 0 < self.attn_sparsity <= 1:
            raise UserError(f"--attn-sparsity must be in (0, 1], got {self.attn_sparsity}")
        QuantConfig(self.compress_bits, self.compress_group_size)  # validates bits and group size

    @property
    def block_size(self) -> int:
        """Sequences per block: the zig-zag schedule reuses each layer's weights across all of them."""
        return self.gpu_batch_size * self.num_gpu_batches

    @property
    def w_disk_percent(self) -> float:
        return 100.0 - self.w_gpu_percent - self.w_cpu_percent

    @property
    def cache_disk_percent(self) -> float:
        return 100.0 - self.cache_gpu_percent - self.cache_cpu_percent

    @property
    def act_disk_percent(self) -> float:
        return 100.0 - self.act_gpu_percent - self.act_cpu_percent

    @property
    def weight_quant(self) -> QuantConfig | None:
        """Weights are grouped along their output channels (dim 0 of [out, in]), as in FlexGen."""
        if not self.compress_weight:
            return None
        return QuantConfig(self.compress_bits, self.compress_group_size, 0, self.compress_symmetric)

    def cache_quant(self, head_dim: int) -> QuantConfig | None:
        """The KV cache is grouped along the head dimension; a group never spans two heads."""
        if not self.compress_cache:
            return None
        group = min(self.compress_group_size, head_dim - head_dim % 2)
        return QuantConfig(self.compress_bits, group, -1, self.compress_symmetric)

    def weight_percents(self) -> tuple[float, float, float]:
        return self.w_gpu_percent, self.w_cpu_percent, self.w_disk_percent

    def cache_percents(self) -> tuple[float, float, float]:
        return self.cache_gpu_percent, self.cache_cpu_percent, self.cache_disk_percent

    def act_percents(self) -> tuple[float, float, float]:
        return self.act_gpu_percent, self.act_cpu_percent, self.act_disk_percent

    def placement(self) -> dict[str, tuple[float, float, float]]:
        """Tensor kind -> its (gpu, cpu, disk) percent."""
        return {"weights": self.weight_percents(), "cache": self.cache_percents(), "activations": self.act_percents()}

    def to_dict(self) -> dict:
        return asdict(self)


def load_policy_file(path: Path) -> Policy:
    """A saved policy: YAML with Policy's fields, at the top level or under `policy:`."""
    import yaml

    from flexgen_dist.base.typed_fields import dataclass_from_mapping, known_keys

    try:
        data = yaml.safe_load(path.read_text())
    except OSError as e:
        raise UserError(f"policy file {path}: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise UserError(f"policy file {path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if isinstance(data, dict) and "policy" in data:
        known_keys(data, ("policy", *REPORT_KEYS), f"policy file {path}")
        data = data["policy"]
    return dataclass_from_mapping(Policy, data, f"policy file {path}")


REPORT_KEYS = ("workload", "predicted", "budgets", "linear_programs", "candidates", "search_s",
               "pipeline")  # `policy` writes them (`pipeline` with --stages > 1)


def policy_yaml(policy: Policy, report: dict) -> str:
    """A policy file as `flexgen-dist policy` writes it: the policy, then what it was chosen for and its predicted
    figures (read back by --policy FILE.yaml, which uses only the policy)."""
    import yaml

    unknown = set(report) - set(REPORT_KEYS)
    assert not unknown, unknown
    return yaml.safe_dump({"policy": policy.to_dict(), **report}, sort_keys=False)
