"""One outcome for every process of a distributed run: rank 0 writes OUT alone, and its verdict
(the record, or the error and its exit code) is sent to the other ranks so that all of them end
the same way instead of waiting for a process that has given up."""

from __future__ import annotations

import json

import torch

from ..errors import UsageError


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


def check_launch(args) -> None:
    """FSDP shards the model across the processes of a distributed launch; one process has nothing
    to shard with, and transformers' Trainer would refuse it only after the data and the model are
    loaded ("Using fsdp only works in distributed training"). Said first, with what to do."""
    from transformers.training_args import ParallelMode

    if args.fsdp and not args.fsdp_config.get("xla", False) and args.parallel_mode != ParallelMode.DISTRIBUTED:
        raise UsageError(
            "the --args file sets fsdp, which shards the model across the processes of a distributed launch, "
            "but this is one process: launch with torchrun --nproc_per_node N $(which opt-deus) train ... "
            "(or accelerate launch), or remove fsdp from the --args file"
        )


def fsdp_units(model) -> dict[str, dict[str, int]]:
    """Each FSDP unit of a wrapped model (a module given to fully_shard, or a legacy FSDP wrapper)
    and how many frozen and trainable parameters it shards: those of its module that no unit nested
    inside it holds (the innermost unit holding a parameter owns it, as FSDP assigns them).
    {unit name ("" for the root): {"frozen": n, "trainable": n}}."""
    from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel

    units = [(name, m) for name, m in model.named_modules() if isinstance(m, (FSDPModule, FullyShardedDataParallel))]
    owner: dict[int, str] = {}
    counts = {name: {"frozen": 0, "trainable": 0} for name, _ in units}
    for name, module in sorted(units, key=lambda unit: -unit[0].count(".") - bool(unit[0])):  # innermost first
        for parameter in module.parameters():
            if id(parameter) not in owner:
                owner[id(parameter)] = name
                counts[name]["trainable" if parameter.requires_grad else "frozen"] += 1
    return counts


def mixed_units(units: dict[str, dict[str, int]]) -> list[str]:
    """The units holding both frozen and trainable parameters (a wrap coarser than one unit per layer)."""
    return [name or "(root)" for name, n in units.items() if n["frozen"] and n["trainable"]]


def engine_that_ran(trainer, trainer_args: dict) -> dict:
    """What accelerate actually ran (not what was asked): its distributed type, the engine
    (none / DDP / FSDP / DeepSpeed), for FSDP its version, the number of wrapped units and those
    that mix frozen and trainable parameters."""
    kind = trainer.accelerator.distributed_type.value
    ran = {"engine": ENGINES.get(kind, "DDP"), "distributed_type": kind, "requested": requested_engine(trainer_args)}
    if kind == "FSDP":
        units = fsdp_units(trainer.model_wrapped)
        ran["fsdp_version"] = getattr(trainer.accelerator.state.fsdp_plugin, "fsdp_version", 1)
        ran["wrapped_units"] = len(units)
        ran["mixed_units"] = mixed_units(units)
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
