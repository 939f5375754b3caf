"""Data-parallel training across devices and nodes with PyTorch's DDP (one process per device).

    torchrun --nproc_per_node 4 -m dpm experiment=... trainer.devices=4
    srun --ntasks-per-node 4 python -m dpm experiment=... trainer.devices=4 trainer.nodes=2

Rank and world size come from torchrun's variables (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
MASTER_PORT) or, under SLURM without torchrun, from SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID with
MASTER_ADDR the first host of SLURM_NODELIST. gloo on CPU, nccl on CUDA.

What the rest of the suite relies on:
- `trainer.<phase>.batch_size` stays the *global* batch: each rank trains on its slice of the same
  global batch, so an epoch has as many optimizer steps as on one device and DPM's N, round
  intervals and schedules mean the same iterations.
- Parameters stay identical on every rank (DDP averages gradients before the DPM hooks read them,
  broadcasts BatchNorm buffers every forward), so DPM decisions computed from them agree; the
  selection of a round is broadcast from rank 0 anyway, and removals are checked to agree.
- Only rank 0 writes files (metrics.json, checkpoints, dpm_log.json, the stage cache) and logs to
  W&B; `is_main()` guards each write.
"""

from __future__ import annotations

import datetime
import logging
import os
import re
from typing import Any

import torch
import torch.distributed as tdist
from torch.nn.parallel import DistributedDataParallel as DDP

from dpm.errors import UserError

log = logging.getLogger(__name__)

DEFAULT_PORT = 29500


def first_host(nodelist: str) -> str:
    """The first host name of a SLURM node list: `gpu[03-05,07],cpu1` -> `gpu03`."""
    nodelist = nodelist.strip()
    match = re.match(r"([^,\[]+)(\[([^\]]+)\])?", nodelist)
    if not match:
        raise UserError(f"SLURM_NODELIST={nodelist!r} is not a node list: set MASTER_ADDR yourself")
    prefix, _, ranges = match.groups()
    if not ranges:
        return prefix
    first = ranges.split(",")[0].split("-")[0]
    return prefix + first


def launch_env(environ: dict | None = None) -> dict | None:
    """(rank, world_size, local_rank, master_addr, master_port) from torchrun's or SLURM's
    environment, or None when neither launched this process."""
    env = os.environ if environ is None else environ
    if "WORLD_SIZE" in env and "RANK" in env:
        return {
            "rank": int(env["RANK"]),
            "world_size": int(env["WORLD_SIZE"]),
            "local_rank": int(env.get("LOCAL_RANK", 0)),
            "master_addr": env.get("MASTER_ADDR", "127.0.0.1"),
            "master_port": int(env.get("MASTER_PORT", DEFAULT_PORT)),
            "launcher": "torchrun",
        }
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        job = env.get("SLURM_JOB_ID", "0")
        port = (
            int(env["MASTER_PORT"])
            if "MASTER_PORT" in env
            else 20000 + int(job) % 20000
            if job.isdigit()
            else DEFAULT_PORT
        )
        addr = env.get("MASTER_ADDR") or first_host(
            env.get("SLURM_NODELIST", env.get("SLURM_JOB_NODELIST", "localhost"))
        )
        return {
            "rank": int(env["SLURM_PROCID"]),
            "world_size": int(env["SLURM_NTASKS"]),
            "local_rank": int(env.get("SLURM_LOCALID", 0)),
            "master_addr": addr,
            "master_port": port,
            "launcher": "slurm",
        }
    return None


def setup(devices: int, nodes: int, device_type: str) -> None:
    """Join (or create) the process group for `devices` x `nodes` processes; a no-op for one."""
    world = devices * nodes
    if world <= 1 or is_initialized():
        return
    env = launch_env()
    if env is None:
        raise UserError(
            f"trainer.devices={devices} x trainer.nodes={nodes} needs one process per device: launch with "
            f"`torchrun --nproc_per_node {devices} -m dpm ...` or `srun` with {devices} tasks per node"
        )
    if env["world_size"] != world:
        raise UserError(
            f"trainer.devices={devices} x trainer.nodes={nodes} = {world} processes, but the launcher "
            f"started {env['world_size']}: make them agree"
        )
    os.environ.setdefault("MASTER_ADDR", env["master_addr"])
    os.environ.setdefault("MASTER_PORT", str(env["master_port"]))
    os.environ.setdefault("RANK", str(env["rank"]))
    os.environ.setdefault("WORLD_SIZE", str(world))
    os.environ.setdefault("LOCAL_RANK", str(env["local_rank"]))
    backend = "nccl" if device_type == "cuda" else "gloo"
    if device_type == "cuda":
        if env["local_rank"] >= torch.cuda.device_count():
            raise UserError(
                f"local rank {env['local_rank']} but only {torch.cuda.device_count()} CUDA devices are "
                f"visible: lower trainer.devices to the GPUs per node"
            )
        torch.cuda.set_device(env["local_rank"])
    tdist.init_process_group(backend, rank=env["rank"], world_size=world, timeout=datetime.timedelta(minutes=30))
    log.info("rank %d of %d (%s, %s)", env["rank"], world, env["launcher"], backend)
    if env["rank"] != 0:
        logging.getLogger("dpm").setLevel(logging.WARNING)  # rank 0 tells the story; others only warn


def teardown() -> None:
    if is_initialized():
        tdist.destroy_process_group()
        logging.getLogger("dpm").setLevel(logging.NOTSET)


def is_initialized() -> bool:
    return tdist.is_available() and tdist.is_initialized()


def rank() -> int:
    return tdist.get_rank() if is_initialized() else 0


def world_size() -> int:
    return tdist.get_world_size() if is_initialized() else 1


def is_main() -> bool:
    return rank() == 0


def device_for(device: torch.device) -> torch.device:
    """The device of this rank: `cuda` becomes `cuda:<local rank>` under DDP."""
    if device.type == "cuda" and is_initialized() and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def barrier() -> None:
    if is_initialized():
        tdist.barrier()


def all_reduce_sum(*tensors: torch.Tensor) -> None:
    """Sum tensors across ranks in place (one collective for all of them)."""
    if not is_initialized() or not tensors:
        return
    flat = torch.stack([t.detach().double().reshape(()) for t in tensors])
    tdist.all_reduce(flat)
    for t, v in zip(tensors, flat):
        t.copy_(v.to(t.dtype))


def all_reduce_max(t: torch.Tensor) -> None:
    if is_initialized():
        tdist.all_reduce(t, op=tdist.ReduceOp.MAX)


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank `src`'s value of a picklable object, on every rank."""
    if not is_initialized():
        return obj
    box = [obj]
    tdist.broadcast_object_list(box, src=src)
    return box[0]


def gather_object(obj: Any) -> list[Any]:
    """Every rank's value of a picklable object, in rank order, on every rank ([obj] alone)."""
    if not is_initialized():
        return [obj]
    out: list[Any] = [None] * world_size()
    tdist.all_gather_object(out, obj)
    return out


def agree(obj: Any, what: str) -> Any:
    """Rank 0's value; a RuntimeError if another rank computed something else (a DPM decision that
    diverged would silently train different models per rank)."""
    if not is_initialized():
        return obj
    values = [None] * world_size()
    tdist.all_gather_object(values, obj)
    if any(v != values[0] for v in values[1:]):
        raise RuntimeError(
            f"{what} differs between ranks ({', '.join(f'rank {i}: {v!r}'[:200] for i, v in enumerate(values))})"
        )
    return values[0]


def shard_bounds(n: int, rank_: int, world: int) -> tuple[int, int]:
    """[lo, hi) of rank's contiguous share of n items (sizes differ by at most one)."""
    return rank_ * n // world, (rank_ + 1) * n // world


def parameter_signature(model: torch.nn.Module) -> tuple:
    """Changes whenever a parameter is replaced (a physical removal): DDP must then be rebuilt."""
    return tuple((id(p), p.shape) for p in model.parameters())


class TrainModule:
    """The module a training step calls: the model itself, wrapped in DDP under a process group and
    in torch.compile when asked; rebuilt when the model's parameters change (after a physical
    removal DDP's buckets and compiled graphs refer to the old tensors)."""

    def __init__(self, model: torch.nn.Module, compile: bool = False):
        self.model, self.compile = model, compile
        # One process, no compile: the model itself, with no per-step bookkeeping.
        self.wrapped = compile or is_initialized()
        self.signature = None
        self.module: Any = model
        if self.wrapped:
            self.refresh()

    def refresh(self) -> Any:
        signature = parameter_signature(self.model)
        if signature == self.signature:
            return self.module
        module: Any = self.model
        if is_initialized():
            # Rebuilding broadcasts rank 0's parameters and buffers: equal anyway, as every rank
            # removed the same channels at the same step.
            device_ids = [self.model_device().index] if self.model_device().type == "cuda" else None
            module = DDP(module, device_ids=device_ids)
            if self.signature is not None:
                log.info("model re-wrapped in DDP after its parameters changed")
        if self.compile:
            module = torch.compile(module)
        self.module, self.signature = module, signature
        return module

    def model_device(self) -> torch.device:
        return next(self.model.parameters()).device

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.refresh()(x) if self.wrapped else self.model(x)
