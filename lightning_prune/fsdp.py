"""FSDP for healing and distillation: one shard unit per decoder layer, frozen base and adapters together.

Lightning's ``FSDPStrategy`` (GPU only in Lightning 2.6: it refuses ``accelerator: cpu``) wraps
the module after ``setup``, so the stages and the LoRA adapters are in place first.
:func:`decoder_layer_policy` is its ``auto_wrap_policy``: every decoder layer of a supported
family (and of a teacher) becomes one unit, so a layer's frozen base weights and its trainable
LoRA matrices are sharded and gathered together; mixing frozen and trainable parameters in one
unit needs ``use_orig_params: true``, which also lets ``configure_optimizers`` (run by Lightning
after the wrap) see the original adapter parameters. bitsandbytes 4-bit weights (QLoRA) cannot be
sharded by this strategy: :func:`check_fsdp` refuses them before any weight loads.
"""

from typing import Literal

from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy
from torch import nn

from lightning_prune.errors import InputError

__all__ = ["DecoderLayerFSDP", "decoder_layer_policy", "is_sharded_strategy", "check_fsdp"]


def decoder_layer_policy(module: nn.Module, recurse: bool, nonwrapped_numel: int) -> bool:
    """FSDP ``auto_wrap_policy``: descend everywhere, wrap each decoder layer (``*DecoderLayer``) in its own unit."""
    return recurse or type(module).__name__.endswith("DecoderLayer")


def is_sharded_strategy(strategy) -> bool:
    """Whether a Lightning strategy shards parameters (FSDP, or FSDP2 through ModelParallelStrategy)."""
    return isinstance(strategy, (FSDPStrategy, ModelParallelStrategy))


def check_fsdp(strategy, quantize: str | None, what: str = "quantize") -> None:
    """Refuse a 4-bit base under a sharding strategy (bitsandbytes weights are not FSDP-shardable here)."""
    if quantize and is_sharded_strategy(strategy):
        raise InputError(
            f"{what}: {quantize} cannot run under {type(strategy).__name__}: its 4-bit bitsandbytes weights cannot be sharded; "
            "use strategy ddp for QLoRA, or leave quantize unset to shard a full-precision base with FSDP"
        )


class DecoderLayerFSDP(FSDPStrategy):
    """Lightning's ``FSDPStrategy`` with :func:`decoder_layer_policy` and ``use_orig_params``, for recipes.

    ``trainer.strategy: {class_path: lightning_prune.fsdp.DecoderLayerFSDP}`` (the plain
    strategy's ``use_orig_params`` is a keyword jsonargparse cannot reach). GPU only, as
    Lightning's FSDP: on another device it stops with one line before any weight loads.

    Args:
        sharding_strategy: FULL_SHARD, SHARD_GRAD_OP, NO_SHARD or HYBRID_SHARD (multi-node).
        cpu_offload: keep sharded parameters in CPU memory between uses.
        state_dict_type: ``full`` (one checkpoint file, gathered on rank 0) or ``sharded``.
    """

    def __init__(
        self,
        sharding_strategy: Literal["FULL_SHARD", "SHARD_GRAD_OP", "NO_SHARD", "HYBRID_SHARD"] = "FULL_SHARD",
        cpu_offload: bool = False,
        state_dict_type: Literal["full", "sharded"] = "full",
    ):
        super().__init__(
            auto_wrap_policy=decoder_layer_policy,
            use_orig_params=True,
            sharding_strategy=sharding_strategy,
            cpu_offload=cpu_offload,
            state_dict_type=state_dict_type,
        )

    def setup_environment(self) -> None:
        if self.root_device.type != "cuda":
            raise InputError(
                f"DecoderLayerFSDP needs CUDA GPUs (Lightning's FSDP does not run on {self.root_device.type}); "
                "use trainer.accelerator gpu, or strategy ddp on this machine"
            )
        super().setup_environment()
