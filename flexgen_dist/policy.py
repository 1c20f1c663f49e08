"""The offloading policy: where weights, KV cache and activations live and how sequences are blocked."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from flexgen_dist.errors import UserError


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
    compress_weight: bool = False  # not wired into the tiers yet: refused below rather than silently ignored
    compress_cache: bool = False
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
        if self.compress_weight or self.compress_cache:
            raise UserError("weight/cache compression is not available in this version (the quantizer exists, "
                            "its placement in the tiers does not yet)")

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

    def weight_percents(self) -> tuple[float, float, float]:
        return self.w_gpu_percent, self.w_cpu_percent, self.w_disk_percent

    def cache_percents(self) -> tuple[float, float, float]:
        return self.cache_gpu_percent, self.cache_cpu_percent, self.cache_disk_percent

    def act_percents(self) -> tuple[float, float, float]:
        return self.act_gpu_percent, self.act_cpu_percent, self.act_disk_percent

    def to_dict(self) -> dict:
        return asdict(self)


def load_policy_file(path: Path) -> Policy:
    """A saved policy: YAML with Policy's fields, at the top level or under `policy:`."""
    import yaml

    from flexgen_dist.typed_fields import dataclass_from_mapping

    try:
        data = yaml.safe_load(path.read_text())
    except OSError as e:
        raise UserError(f"policy file {path}: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise UserError(f"policy file {path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if isinstance(data, dict) and set(data) == {"policy"}:
        data = data["policy"]
    return dataclass_from_mapping(Policy, data, f"policy file {path}")
