"""FSDP2 as the README's fsdp.yaml asks for it, on two CPU processes (gloo): run by test_fsdp2.py as
`torchrun --standalone --nproc_per_node 2 fsdp2_worker.py MODEL OUT VIEWS`.

accelerate engages FSDP only on GPU backends (on CPU the Trainer runs DDP), so this drives FSDP2
itself, as accelerate's fsdp2_prepare_model does with TRANSFORMER_BASED_WRAP: opt-deus's
freeze_base, then `fully_shard` on each decoder layer and then on the root. It takes a few AdamW
steps on the trainable parameters (each rank its own batch), then gathers with opt-deus's own
gathered_state_dict (accelerate's get_state_dict, whose FSDP2 branch runs once accelerate's state
says FSDP2, as it does on GPUs) and saves with opt-deus's own save_checked (cast to the input's
dtypes, save_pretrained, the bit-identity check against the input).

Written for the test to read: OUT (rank 0's save), VIEWS/rank<r>.safetensors (each rank's
all-gathered view of the trained parameters), VIEWS/reference.safetensors (rank 0: the same steps
in one process without FSDP, on both ranks' batches at once) and VIEWS/report.json."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import torch

from opt_deus_cli.manifest import read_manifest
from opt_deus_cli.training.distributed import engine_that_ran, fsdp_units, mixed_units
from opt_deus_cli.training.freeze import freeze_base, frozen_rule
from opt_deus_cli.training.save import gathered_state_dict, save_checked

STEPS = 2
BATCH, SEQ_LEN = 2, 32  # per rank
LR = 1e-3


def batch(step: int, rank: int, vocab: int) -> torch.Tensor:
    """Rank `rank`'s token ids at `step`: (BATCH, SEQ_LEN), the same in every run."""
    generator = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randint(vocab, (BATCH, SEQ_LEN), generator=generator)


def load(model_dir: Path):
    """The model in float32 (opt-deus's default master weights), frozen by opt-deus's freeze_base."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, local_files_only=True)
    trainable = freeze_base(model, model_dir)
    return model, trainable


def train(model, batches: list[torch.Tensor]) -> list[float]:
    """AdamW on the parameters that require gradients (what the Trainer hands its optimizer), one
    step per batch; the losses."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR, weight_decay=0.01)
    losses = []
    for ids in batches:
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def main(model_dir: Path, out: Path, views: Path) -> None:
    import torch.distributed as dist
    from accelerate import Accelerator
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin
    from safetensors.torch import save_file
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    torch.set_num_threads(1)
    accelerator = Accelerator(cpu=True)  # joins torchrun's processes (gloo), as the Trainer's does
    rank, world = dist.get_rank(), dist.get_world_size()
    model, trainable = load(model_dir)
    manifest = read_manifest(model_dir)
    vocab = model.config.vocab_size

    # the README's wrap: one unit per decoder layer, then the root (embeddings, final norm, head)
    mesh = init_device_mesh("cpu", (world,))
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    units = fsdp_units(model)
    coarse, _ = load(model_dir)  # a wrap of the root alone, for the test to see a mix reported
    fully_shard(coarse, mesh=mesh)
    coarse_mixed = mixed_units(fsdp_units(coarse))
    del coarse

    losses = torch.tensor(train(model, [batch(step, rank, vocab) for step in range(STEPS)]))
    dist.all_reduce(losses)  # the mean over the ranks: the loss of both batches at once
    losses /= world

    # accelerate's state as it is on GPUs with fsdp_config version 2: get_state_dict takes its FSDP2 branch
    accelerator.state.distributed_type = DistributedType.FSDP
    accelerator.state.fsdp_plugin = FullyShardedDataParallelPlugin(fsdp_version=2)
    trainer = SimpleNamespace(accelerator=accelerator, model=model, model_wrapped=model, is_deepspeed_enabled=False)
    state_dict = gathered_state_dict(trainer)  # collective: every rank takes part, rank 0 gets the full tensors

    # each rank's own view of the trained parameters, all-gathered from the shards (collective too)
    named = dict(model.named_parameters())
    view = {name: named[name].full_tensor().detach().contiguous() for name in trainable}
    save_file(view, str(views / f"rank{rank}.safetensors"))

    if rank == 0:
        report = {
            "world_size": world,
            "trainable": trainable,
            "units": units,
            "mixed_units": mixed_units(units),
            "coarse_mixed_units": coarse_mixed,
            "engine": engine_that_ran(trainer, {"fsdp": True}),
            "gathered": {
                name: {"type": type(t).__name__, "shape": list(t.shape), "device": t.device.type}
                for name, t in state_dict.items()
            },
            "losses": losses.tolist(),
        }
        out.mkdir()
        try:  # opt-deus's refusal (frozen weights moved, shapes differ, ...) is the test's to report
            report["check"] = save_checked(model, state_dict, model_dir, out, 5 << 30, frozen_rule(manifest))
        except Exception as e:
            report["save_error"] = f"{type(e).__name__}: {e}"
        reference, _ = load(model_dir)  # the same steps in one process, on both ranks' batches at once
        report["reference_losses"] = train(
            reference, [torch.cat([batch(step, r, vocab) for r in range(world)]) for step in range(STEPS)]
        )
        save_file(
            {name: p.detach().contiguous() for name, p in reference.named_parameters() if name in trainable},
            str(views / "reference.safetensors"),
        )
        (views / "report.json").write_text(json.dumps(report, indent=1))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]))
