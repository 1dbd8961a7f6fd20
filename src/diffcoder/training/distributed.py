"""Data-parallel training under `torchrun`: PyTorch FSDP2 (`fully_shard`) and distributed checkpoints (DCP).

Each decoder layer is its own FSDP unit (parameters gathered just in time, gradients reduce-scattered), the
root holds embeddings, final norm and head. A checkpoint stores the sharded model + optimizer with
`torch.distributed.checkpoint` under `step_N/dcp/` and, gathered on rank 0, the docs/design.md §4 model files beside it
so every checkpoint stays loadable by `diffcoder.load` and `transformers`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    def barrier(self) -> None:
        if self.enabled:
            torch.distributed.barrier()


def setup_distributed(device_kind: str) -> Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device_kind == "cuda" else "gloo")
    return Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def shard_model(model) -> None:
    from torch.distributed.fsdp import fully_shard

    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)


def save_distributed(trainer, dest: Path) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_state_dict

    msd, osd = get_state_dict(trainer.model, trainer.opt)
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(dest / "dcp"))
    full = get_model_state_dict(trainer.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if trainer.dist.rank == 0:
        from diffcoder.model import DiffusionLM
        from diffcoder.training.ckpt import write_hf_dir

        with torch.device("meta"):
            plain = DiffusionLM(trainer.model.config)
        plain.load_state_dict(full, strict=False, assign=True)
        if plain.config.tie_word_embeddings:
            plain.lm_head.weight = plain.model.embed_tokens.weight
        write_hf_dir(plain, dest, trainer.tokenizer, trainer.cfg.objective.kind == "diffusion",
                     trainer.generation_config)


def load_distributed(trainer, path: Path) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    from diffcoder.errors import CheckpointError

    if not (path / "dcp").is_dir():
        raise CheckpointError(f"{path} has no distributed checkpoint (dcp/); it was written by a single-process "
                              "run: resume it without torchrun, or start a new train.out_dir")
    msd, osd = get_state_dict(trainer.model, trainer.opt)
    state = {"model": msd, "optim": osd}
    dcp.load(state, checkpoint_id=str(path / "dcp"))
    set_state_dict(trainer.model, trainer.opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
