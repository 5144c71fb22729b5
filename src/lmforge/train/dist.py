"""torchrun: DDP and FSDP2 in a few functions.

Under ``torchrun`` each process reads RANK / WORLD_SIZE / LOCAL_RANK and joins one process group (NCCL on CUDA,
gloo on CPU). Without torchrun everything degrades to a single process with no group, and every helper here is
a no-op, so the training loop has one code path.

Two ways to spread training over processes (TrainConfig.parallel):
  ddp   every rank holds the whole model, gradients and optimizer state; gradients are all-reduced.
  fsdp  FSDP2 (``fully_shard``): every parameter, its gradient and its AdamW moments are split along dim 0
        over the ranks (DTensors). Each transformer block is its own unit, all-gathered just before it runs
        and freed after; the rest (embeddings, final norm, heads) is the root unit.
"""

from __future__ import annotations

import copy
import os
import sys
from dataclasses import dataclass, field

import torch
import torch.distributed as td
from torch.nn.parallel import DistributedDataParallel

from lmforge.model import unwrap  # noqa: F401  (train.dist.unwrap: the loop and stages take it from here)
from lmforge.modelio import pick_device


@dataclass
class DistInfo:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that writes files and prints."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_distributed(device: str = "auto") -> DistInfo:
    """Join torchrun's process group if there is one; returns this process's rank, world size and device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    dev = pick_device(device)
    if world == 1:
        return DistInfo(device=dev)
    if "RANK" not in os.environ:
        raise RuntimeError("WORLD_SIZE is set but RANK is not: launch multi-process runs with torchrun")
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if dev.type == "cuda":
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    if not td.is_initialized():
        if dev.type == "cuda":
            td.init_process_group(backend="nccl", device_id=dev)
        else:
            _loopback_for_single_node_gloo(world)
            td.init_process_group(backend="gloo")
    return DistInfo(rank=rank, local_rank=local_rank, world_size=world, device=dev)


def _loopback_for_single_node_gloo(world: int) -> None:
    """All ranks on this machine: talk over loopback. Gloo otherwise binds to whatever the hostname resolves to,
    which in containers and CI sandboxes is often an address the other ranks cannot reach."""
    single_node = int(os.environ.get("LOCAL_WORLD_SIZE", world)) == world
    if single_node and "GLOO_SOCKET_IFNAME" not in os.environ and os.path.exists("/sys/class/net/lo"):
        os.environ["GLOO_SOCKET_IFNAME"] = "lo"


def is_distributed() -> bool:
    return td.is_available() and td.is_initialized() and td.get_world_size() > 1


def wrap_ddp(model: torch.nn.Module, info: DistInfo) -> torch.nn.Module:
    """DistributedDataParallel around ``model`` in a multi-process run; the model itself otherwise."""
    if not info.distributed:
        return model

    return DistributedDataParallel(model, device_ids=[info.local_rank] if info.device.type == "cuda" else None)


PARALLEL = ("ddp", "fsdp")


def wrap_model(model: torch.nn.Module, info: DistInfo, parallel: str = "ddp", *, reshard_after_forward: bool = True,
               bf16: bool = False) -> torch.nn.Module:
    """The module to train: ``model`` itself in one process; under torchrun DDP around it (``ddp``) or a sharded
    copy of it (``fsdp``; see shard_model). ``bf16`` (fsdp): all-gather parameters in bf16, reduce in fp32."""
    if parallel not in PARALLEL:
        raise ValueError(f"unknown parallel {parallel!r} ({', '.join(PARALLEL)})")
    if not info.distributed:
        return model
    if parallel == "fsdp":
        return shard_model(model, info, reshard_after_forward=reshard_after_forward, bf16=bf16)
    return wrap_ddp(model, info)


def shard_model(model: torch.nn.Module, info: DistInfo, *, reshard_after_forward: bool = True,
                bf16: bool = False) -> torch.nn.Module:
    """An FSDP2-sharded deep copy of ``model``; ``model`` itself is parked on the CPU, untouched.

    Units: every child of each ``nn.ModuleList`` named ``layers`` (lmforge's Transformer: ``model.layers[i]``,
    one per block; LoRA-wrapped ones too) gets its own ``fully_shard``, then the root takes everything else.
    A module without such a list is one unit (the root). Parameter names do not change, so the copy's
    state_dict keys are the plain model's; gather_weights copies trained weights back into ``model``.

    The root (embeddings, final norm, lm_head, score heads) stays gathered from its forward to the end of the
    backward (FSDP2's own default for the root): the preference, reward and RL losses apply the lm_head or the
    score head to the hidden states the forward returns, outside the forward, and those weights must then be
    whole tensors. Their gradients accumulate into the gathered parameters and are reduce-scattered by the
    root's post-backward, which FSDP2 runs at the end of backward. Blocks follow ``reshard_after_forward``.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(info.device.type, (info.world_size,))
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 \
        else MixedPrecisionPolicy()
    model.to("cpu")  # the plain copy waits on the CPU: GPU memory holds only the shards
    sharded = copy.deepcopy(model)
    blocks = [block for name, mod in sharded.named_modules()
              if name.rsplit(".", 1)[-1] == "layers" and isinstance(mod, torch.nn.ModuleList) for block in mod]
    for block in blocks:
        fully_shard(block, mesh=mesh, reshard_after_forward=reshard_after_forward, mp_policy=mp)
    fully_shard(sharded, mesh=mesh, mp_policy=mp)  # reshard_after_forward unset: the root stays gathered (above)
    return sharded


def is_sharded(model: torch.nn.Module) -> bool:
    fsdp = sys.modules.get("torch.distributed.fsdp")  # never imported (0.6 s) when nothing was sharded
    return fsdp is not None and isinstance(model, fsdp.FSDPModule)


def is_dtensor(t) -> bool:
    tensor = sys.modules.get("torch.distributed.tensor")  # likewise
    return tensor is not None and isinstance(t, tensor.DTensor)


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """A DTensor gathered whole (a collective: every rank must call it in the same order); plain tensors as is."""
    return t.full_tensor() if is_dtensor(t) else t


def gather_weights(sharded: torch.nn.Module, model: torch.nn.Module) -> None:
    """Copy the sharded copy's weights (and buffers) into the plain ``model`` on every rank, one all-gather per
    parameter (so at most one whole parameter at a time sits on the device). Every rank must call it."""
    targets = dict(model.named_parameters(remove_duplicate=False)) | dict(model.named_buffers())
    with torch.no_grad():
        for name, t in [*sharded.named_parameters(), *sharded.named_buffers()]:
            targets[name].copy_(full_tensor(t.detach()))


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    """Element-wise sum over ranks (a copy; the input is untouched). NCCL needs the values on the GPU."""
    if not is_distributed():
        return values.clone()
    t = values.detach().clone()
    if td.get_backend() == "nccl" and not t.is_cuda:
        t = t.cuda()
    td.all_reduce(t)
    return t.to(values.device)


def all_reduce_mean(value: float | torch.Tensor) -> float | torch.Tensor:
    """Mean over ranks: a float for a float, a tensor for a tensor (a no-op in a single process)."""
    if isinstance(value, torch.Tensor):
        return all_reduce_sum(value) / (td.get_world_size() if is_distributed() else 1)
    if not is_distributed():
        return float(value)
    return float(all_reduce_sum(torch.tensor(float(value), dtype=torch.float64))) / td.get_world_size()


def gather_objects(obj) -> list:
    """Every rank's ``obj`` (picklable; CPU tensors too), in rank order, on every rank: a collective under torchrun,
    ``[obj]`` in one process."""
    if not is_distributed():
        return [obj]
    out = [None] * td.get_world_size()
    td.all_gather_object(out, obj)
    return out


def barrier() -> None:
    if is_distributed():
        td.barrier()


def cleanup() -> None:
    """Leave the process group together: a rank that tears gloo down while another is still talking to it
    can abort the other ("terminate called without an active exception")."""
    if td.is_available() and td.is_initialized():
        if td.get_world_size() > 1:
            td.barrier()
        td.destroy_process_group()
