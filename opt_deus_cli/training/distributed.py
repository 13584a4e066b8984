"""One outcome for every process of a distributed run: rank 0 writes OUT alone, and its verdict
(the record, or the error and its exit code) is sent to the other ranks so that all of them end
the same way instead of waiting for a process that has given up."""

from __future__ import annotations

import json

import torch


def outcome_of_rank_zero(outcome: dict, device: torch.device) -> dict:
    """Rank 0's outcome on every rank (JSON bytes in a tensor: nothing is unpickled)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return outcome
    device = device if dist.get_backend() == "nccl" else torch.device("cpu")
    payload = json.dumps(outcome).encode() if dist.get_rank() == 0 else b""
    size = torch.tensor([len(payload)], dtype=torch.int64, device=device)
    dist.broadcast(size, src=0)
    buffer = torch.zeros(int(size.item()), dtype=torch.uint8, device=device)
    if dist.get_rank() == 0:
        buffer.copy_(torch.frombuffer(bytearray(payload), dtype=torch.uint8))
    dist.broadcast(buffer, src=0)
    return json.loads(bytes(buffer.cpu().tolist()))


ENGINES = {"NO": "none", "FSDP": "FSDP", "DEEPSPEED": "DeepSpeed"}  # other accelerate types: data parallel (DDP)


def requested_engine(trainer_args: dict) -> str | None:
    """The sharding engine the --args file asks for (None: plain data parallel or one process)."""
    if trainer_args.get("deepspeed"):
        return "DeepSpeed"
    if trainer_args.get("fsdp"):
        return "FSDP"
    return None


def engine_that_ran(trainer, trainer_args: dict) -> dict:
    """What accelerate actually ran (not what was asked): its distributed type, the engine
    (none / DDP / FSDP / DeepSpeed), for FSDP its version and the number of wrapped units."""
    kind = trainer.accelerator.distributed_type.value
    ran = {"engine": ENGINES.get(kind, "DDP"), "distributed_type": kind, "requested": requested_engine(trainer_args)}
    if kind == "FSDP":
        from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel

        ran["fsdp_version"] = getattr(trainer.accelerator.state.fsdp_plugin, "fsdp_version", 1)
        ran["wrapped_units"] = sum(
            isinstance(m, (FSDPModule, FullyShardedDataParallel)) for m in trainer.model_wrapped.modules()
        )
    return ran


def engine_warning(ran: dict) -> str | None:
    """A requested engine that did not engage (accelerate uses FSDP and DeepSpeed on GPU backends only)."""
    if ran["requested"] and ran["engine"] != ran["requested"]:
        return (
            f"the --args file asks for {ran['requested']}, but accelerate ran {ran['engine']} "
            f"(distributed type {ran['distributed_type']}; {ran['requested']} engages only on GPU backends "
            "under a distributed launch); the training record says what ran"
        )
    return None
