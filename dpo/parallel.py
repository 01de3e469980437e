"""Processes, device and data parallelism for stage 2: one process, DDP, or FSDP2 (PyTorch's `fully_shard`).

Launch several processes with torchrun or `accelerate launch` (env WORLD_SIZE/RANK/LOCAL_RANK); gloo on CPU, nccl
on GPU. DDP keeps a full copy of the model, its gradients and AdamW state on every process; FSDP2 shards all
three over the processes (dim 0 of every parameter), all-gathering one decoder layer's weights at a time for
its forward and backward. FSDP2 also runs on one process (a one-member group), which is how a single GPU gets
its mixed precision and the sharded checkpoint format.

Sharded checkpoints go through torch.distributed.checkpoint (DCP): each process writes its own shards, and DCP
reshards on load, so a run may resume on another number of processes.
"""

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from refcache_base import UserError


@dataclass
class World:
    size: int
    rank: int
    device: torch.device
    own_group: bool  # this process created the process group (and destroys it at the end)

    @property
    def master(self) -> bool:
        return self.rank == 0

    def barrier(self):
        if dist.is_initialized():
            dist.barrier()

    def broadcast(self, obj):
        """Rank 0's `obj` on every process."""
        if self.size == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, obj) -> list:
        """Every process's `obj`, in rank order, on every process."""
        if self.size == 1:
            return [obj]
        out = [None] * self.size
        dist.all_gather_object(out, obj)
        return out

    def max(self, n: int) -> int:
        return max(self.gather(n))

    def stop(self):
        if self.own_group and dist.is_initialized():
            dist.destroy_process_group()


def start(device: str, parallel: str) -> World:
    """This process's place: rank and size from the launcher's environment, the device, and the process group
    (created here unless the caller made one). FSDP on one process gets a one-member group."""
    size, rank, local_rank = (int(os.environ.get(k, d)) for k, d in
                              (("WORLD_SIZE", 1), ("RANK", 0), ("LOCAL_RANK", 0)))
    if size > 1 and not all(k in os.environ for k in ("RANK", "MASTER_ADDR", "MASTER_PORT")):
        raise UserError(f"WORLD_SIZE={size} but RANK/MASTER_ADDR/MASTER_PORT are not all set: launch the processes "
                        "with torchrun (or `accelerate launch --multi_gpu`, which uses it)")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is visible to torch; use --device cpu")
    dev = torch.device(f"cuda:{local_rank}" if device == "cuda" else device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    own = (size > 1 or parallel == "fsdp") and not dist.is_initialized()
    if own:
        backend = "nccl" if dev.type == "cuda" else "gloo"
        if size == 1:  # a one-process group needs no rendezvous
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
        else:
            dist.init_process_group(backend)
    return World(size=size, rank=rank, device=dev, own_group=own)


def mode(parallel: str, world: World) -> str:
    """'fsdp', 'ddp' (several processes) or 'none'."""
    if parallel == "fsdp":
        return "fsdp"
    return "ddp" if world.size > 1 else "none"


def decoder_layers(model) -> list:
    """The transformer blocks of a Hugging Face causal LM (also under a peft wrapper)."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    layers = getattr(decoder, "layers", None)
    if layers is None:
        raise UserError(f"{type(model).__name__}: no decoder layers found to shard; use --parallel ddp")
    return list(layers)


def shard(net, model, world: World, dtype: str):
    """FSDP2 in place: one group per decoder layer, then the root (embeddings, final norm, head). With bf16:
    parameters all-gathered in bf16, gradients reduced in fp32, master weights and AdamW state fp32."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(world.device.type, (world.size,))
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if dtype == "bfloat16" \
        else MixedPrecisionPolicy()
    for layer in decoder_layers(model):
        fully_shard(layer, mesh=mesh, mp_policy=mp)
    fully_shard(net, mesh=mesh, mp_policy=mp)
    return net


def wrap(net, model, world: World, how: str, dtype: str):
    """The module the training forward runs through: `net` itself, DDP around it, or `net` sharded in place."""
    if how == "fsdp":
        return shard(net, model, world, dtype)
    net = net.to(world.device)
    if how == "ddp":
        # broadcast_buffers=False: the only buffers (rotary frequencies) are constants, and a broadcast in every
        # forward would tie the processes' forward passes to each other.
        return torch.nn.parallel.DistributedDataParallel(
            net, device_ids=[world.device.index] if world.device.type == "cuda" else None, broadcast_buffers=False)
    return net


def no_sync(train_net, last: bool):
    """DDP: reduce gradients only in the last backward of a step. FSDP reduces (scatters) in every backward,
    which keeps the accumulated gradients sharded."""
    if last or not isinstance(train_net, torch.nn.parallel.DistributedDataParallel):
        return contextlib.nullcontext()
    return train_net.no_sync()


def clip_grad_norm(params, max_norm: float) -> float:
    """Clip to the global gradient norm (max_norm 0 = no clipping); returns the norm before clipping. Works on
    sharded (DTensor) gradients: the norm is reduced over the processes."""
    grads = [p.grad for p in params if p.grad is not None]
    norm = torch.nn.utils.get_total_norm(grads)
    if hasattr(norm, "full_tensor"):  # DTensor: a partial norm on each process
        norm = norm.full_tensor()
    if max_norm > 0:
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
    return float(norm)


def _local(t) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def local_sizes(net, opt) -> dict:
    """Elements this process holds: parameters, and optimizer state (AdamW's two moments; step counters left
    out)."""
    params = sum(_local(p).numel() for p in net.parameters())
    state = sum(_local(v).numel() for s in opt.state.values() for k, v in s.items()
                if torch.is_tensor(v) and k != "step")
    return {"param_elements": params, "optimizer_elements": state}


# ---- sharded checkpoints (FSDP) ---------------------------------------------------------------------------


def _options(**kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(ignore_frozen_params=True, **kw)  # LoRA: the frozen base comes from --model


def save_sharded(path: str, net, opt):
    """Every process writes its shards of the trainable weights and optimizer state into directory `path`."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_sd, optim_sd = get_state_dict(net, opt, options=_options())
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=path)


def load_sharded(path: str, net, opt):
    """Load weights and optimizer state saved by save_sharded, resharded to this process group's size."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_sd, optim_sd = get_state_dict(net, opt, options=_options())
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=path)
    set_state_dict(net, opt, model_state_dict=state["model"], optim_state_dict=state["optim"],
                   options=_options(strict=False))


def full_state(net) -> dict:
    """All weights, unsharded, on rank 0's CPU (an empty dict elsewhere); every process must call it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(net, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
