"""The training loop: block-diffusion CPT or SFT (docs/design.md §3) from a config, on one process or under torchrun
(FSDP2). Checkpoints, logs and evaluation live in their own modules; this file wires them together.

Reproducibility: the rows of step s are global draws [s*G, (s+1)*G) (G = micro batch x accumulation x ranks)
and the noise of step s comes from a generator seeded with (seed, s) over the whole global batch, which is then
split over ranks and micro-batches. So a resumed run, a 4x1 vs 1x4 accumulation split and a 2-rank vs 1-rank run
all see the same tokens and the same masks; the loss is normalised by the global batch's eligible-token count.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from diffcoder.checkpoint import resolve_dtype
from diffcoder.errors import CheckpointError, ConfigError, DiffcoderError
from diffcoder.nelbo import diffusion_nelbo, sample_block_noise, shift_eligible
from diffcoder.training import ckpt as ckptlib
from diffcoder.training.config import TrainConfig, validate
from diffcoder.training.distributed import setup_distributed
from diffcoder.training.objective import warmup_cap
from diffcoder.training.step import MicroBatch, MicroBatchLoss, ar_micro_batches, diffusion_micro_batches

# Config keys a resumed run may change (cadence and length); anything else means "another run".
RESUMABLE_CHANGES = {"train.steps", "train.log_every", "train.eval_every", "train.save_every", "train.eval_batches",
                     "train.keep_checkpoints", "train.device", "model.path", "train.compile",
                     "train.loss_chunk_rows"}


@dataclass
class StepBatches:
    """A step's micro-batches (this rank's), the global batch's loss-eligible token count and its noise stats."""

    batches: list[MicroBatch]
    count: int
    tokens: int
    u_max: float = 1.0
    weighted: bool = True
    mask_ratio: float = 0.0


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup, then cosine from lr to lr * min_lr_ratio at the last step."""
    o, total = cfg.optim, cfg.train.steps
    if o.warmup_steps and step < o.warmup_steps:
        return o.lr * (step + 1) / o.warmup_steps
    span = max(1, total - o.warmup_steps)
    progress = min(1.0, (step - o.warmup_steps) / span)
    return o.lr * (o.min_lr_ratio + (1 - o.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def noise_generator(seed: int, step: int, salt: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 1_000_003 + step) * 7 + salt)


def config_hash(d: dict[str, Any]) -> str:
    keep = {s: {k: v for k, v in body.items() if f"{s}.{k}" not in RESUMABLE_CHANGES} for s, body in d.items()}
    return hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()[:16]


def config_diff(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    out = []
    for s in sorted(set(a) | set(b)):
        for k in sorted(set(a.get(s, {})) | set(b.get(s, {}))):
            key = f"{s}.{k}"
            if key not in RESUMABLE_CHANGES and a.get(s, {}).get(k) != b.get(s, {}).get(k):
                out.append(f"{key}: {a.get(s, {}).get(k)!r} -> {b.get(s, {}).get(k)!r}")
    return out


class Trainer:
    def __init__(self, cfg: TrainConfig, resume: bool = False, quiet: bool = False, force: bool = False):
        self.cfg, self.resume, self.quiet, self.force = cfg, resume, quiet, force
        self.resumed_from: Path | None = None  # the checkpoint this process resumed from, and at which step
        self.resumed_step = -1
        dev = cfg.train.device
        if dev == "auto":
            dev = "cuda" if torch.cuda.is_available() else "cpu"
        if dev.startswith("cuda") and not torch.cuda.is_available():
            raise ConfigError("train.device is cuda but no GPU is visible; set train.device=cpu")
        self.dist = setup_distributed("cuda" if dev.startswith("cuda") else "cpu")
        if dev == "cuda":
            dev = f"cuda:{self.dist.local_rank}"
            torch.cuda.set_device(dev)
        self.device = torch.device(dev)
        self.out = Path(cfg.train.out_dir)
        self._seed_everything(cfg.train.seed)
        self._build_model()
        self._build_data()
        self._build_optimizer()
        if self.init_adapter is not None:
            self._init_lora_from(self.init_adapter)
        self.step = 0
        self._prepare_out_dir()

    # ------------------------------------------------------------------------------------------- setup

    def _seed_everything(self, seed: int) -> None:
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)

    def _build_model(self) -> None:
        from diffcoder.loading import resolve_model
        from diffcoder.training.modelio import load_start_model

        c = self.cfg
        self.base_path = resolve_model(c.model.path)
        start = load_start_model(self.base_path, dtype=resolve_dtype(c.model.dtype), device="cpu")
        model, tok = start
        self.generation_config = start.generation_config  # the start point's decoding defaults, kept on save
        if c.model.block_size is not None:
            model.config.block_size = c.model.block_size
        if c.model.shift is not None:
            model.config.shift = c.model.shift
        validate(c, block_size=model.config.block_size)
        model.config.extra.pop("diffusion_trained", None)
        self.block_size, self.shift = model.config.block_size, model.config.shift
        self.mask_id = model.config.mask_token_id
        if c.objective.kind == "diffusion" and self.mask_id is None:
            raise ConfigError("the model has no mask token; set model.path to a diffusion-ready checkpoint")
        self.tokenizer = tok
        self.init_adapter = adapter_source(c.lora.init_from) if c.lora.init_from else None
        self.fim_ids = self._add_fim_tokens(model, tok)
        new_token_rows = ([self.mask_id] if self.mask_id is not None else []) + self.fim_ids
        if c.lora.enabled:
            from diffcoder.training.lora import apply_lora

            if self.dist.enabled:
                raise ConfigError("LoRA under torchrun/FSDP is not supported yet; run LoRA on one process")
            apply_lora(model, c.lora, train_token_rows=new_token_rows)
        else:
            for p in model.parameters():
                p.requires_grad_(True)
        model.gradient_checkpointing = c.model.gradient_checkpointing
        model.to(self.device).train()
        if c.train.compile:  # per layer, as torchtitan does: one graph reused 30 times, before FSDP wraps them
            for layer in model.model.layers:
                layer.compile()
        if self.dist.enabled:
            from diffcoder.training.distributed import shard_model

            shard_model(model)
        self.model = model
        # LoRA: the head (tied to the embedding) learns only the new tokens' rows; compute only their gradient
        head_rows = (torch.tensor(new_token_rows, device=self.device)
                     if c.lora.enabled and model.lm_head.weight.requires_grad else None)
        self.loss_fn = MicroBatchLoss(model, self.block_size, self.mask_id, self.device,
                                      chunk_rows=c.train.loss_chunk_rows or None, compiled=c.train.compile,
                                      head_grad_rows=head_rows, full_logits=self.dist.enabled)

    def _add_fim_tokens(self, model, tokenizer) -> list[int]:
        """The FIM token ids the data uses (data built with --fim-rate) or the adapter of lora.init_from has, given
        to the model and its tokenizer under the same ids (`convert.add_special_tokens`: mean-row init, the
        vocabulary grows). None for plain data and no initial adapter."""
        from diffcoder.convert import add_special_tokens
        from diffcoder.fim import FimTokens, find_fim_tokens
        from diffcoder.training.data import load_tokenizer, read_index

        recorded = read_index(self.cfg.data.path).get("fim")
        want = FimTokens.from_dict(recorded["tokens"]) if recorded else None
        source = f"the data in {self.cfg.data.path}"
        if want is None and self.init_adapter is not None:
            want = find_fim_tokens(load_tokenizer(str(self.init_adapter)))
            source = f"the adapter in {self.init_adapter}"
        if want is None:
            return []
        if tokenizer is None:
            raise ConfigError(f"{source} uses FIM tokens {list(want.names)} but the model has no tokenizer to add "
                              "them to; start from a checkpoint with tokenizer files")
        ids = add_special_tokens(model, tokenizer, want.names)
        if tuple(ids) != want.ids:
            raise ConfigError(f"{source} has FIM tokens {list(want.names)} at ids {list(want.ids)} but the model's "
                              f"tokenizer gives them {ids}; rebuild the data with --tokenizer pointing at the model "
                              f"({self.cfg.model.path})")
        return ids

    def _init_lora_from(self, adapter_dir: Path) -> None:
        """Start from an earlier LoRA run's adapter: its LoRA matrices, and its token rows (exact from the trainer
        state of a run checkpoint, else what the adapter files hold)."""
        from diffcoder.adapters import load_adapter_weights

        try:
            load_adapter_weights(self.model, adapter_dir)
        except (KeyError, RuntimeError) as exc:
            raise ConfigError(f"lora.init_from {adapter_dir} does not fit this run's LoRA (rank {self.cfg.lora.rank}, "
                              f"targets {self.cfg.lora.targets}): {exc}") from exc
        state = ckptlib.load_state(adapter_dir) if (adapter_dir / ckptlib.STATE_FILE).is_file() else {}
        saved = state.get("token_rows")
        if saved is not None and self.token_rows is not None and saved["index"] == self.token_rows.index.tolist():
            self._restore_token_rows(saved)
        elif self.token_rows is not None:
            self.token_rows.read_weight()
        self.log(f"LoRA initialised from {adapter_dir}")

    def _build_data(self) -> None:
        from diffcoder.training.data import PackedRows, SFTRows
        from diffcoder.training.modelio import check_vocab

        c = self.cfg
        if c.data.kind == "cpt":
            rows = lambda split: PackedRows(c.data.path, split, c.data.seq_len, seed=c.train.seed)  # noqa: E731
        else:
            pad = self.model.config.pad_token_id
            pad = pad if pad is not None else self.model.config.eos_token_id or 0
            kw = dict(seed=c.train.seed, min_eos=c.data.min_eos, max_eos=c.data.max_eos, pad_id=pad)
            rows = lambda split: SFTRows(c.data.path, split, c.data.seq_len, warn=self.warn, **kw)  # noqa: E731
        self.train_rows = rows("train")
        try:
            self.val_rows = rows("val")
        except DiffcoderError as exc:  # training goes on, but nobody should read a missing eval as a value
            self.val_rows = None
            self.warn(f"no held-out evaluation for this run: {exc}")
        check_vocab(self.model, self.train_rows.index, self.tokenizer)

    def _build_optimizer(self) -> None:
        from diffcoder.training.token_rows import TokenRows

        o = self.cfg.optim
        emb = self.model.model.embed_tokens.weight
        # LoRA: AdamW gets the trained embedding rows as a [k, H] parameter, not the whole frozen embedding
        self.token_rows = (TokenRows(emb, self.model._lora_config["trainable_token_indices"])
                           if self.cfg.lora.enabled and emb.requires_grad else None)
        decay, no_decay = [], []
        for n, p in self.model.named_parameters():
            if not p.requires_grad or (self.token_rows is not None and p is emb):
                continue
            (no_decay if p.ndim < 2 or "embed" in n or "norm" in n else decay).append(p)
        if self.token_rows is not None:
            no_decay.append(self.token_rows.param)
        groups = [{"params": decay, "weight_decay": o.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        # fused AdamW (one kernel for all tensors) when everything lives on one GPU; FSDP's DTensors use foreach
        kind = {"fused": True} if self.device.type == "cuda" and not self.dist.enabled else {
            "foreach": self.device.type == "cuda"}
        self.opt = torch.optim.AdamW([g for g in groups if g["params"]], lr=o.lr, betas=(o.beta1, o.beta2),
                                     eps=o.eps, **kind)
        self.trainable = [p for g in groups for p in g["params"]]

    def _prepare_out_dir(self) -> None:
        cfgd = self.cfg.to_dict()
        run_file = self.out / "run.json"
        from diffcoder.outputs import check_output_dir

        # a folder that is not a run of ours is not ours to fill (or to clear a log in)
        self._on_rank0(lambda: check_output_dir(self.out, self.force, "write a training run into it",
                                                ours=lambda p: (p / "run.json").is_file()))
        latest = ckptlib.latest_checkpoint(self.out) if self.dist.rank == 0 else None
        if self.dist.enabled:
            obj = [str(latest) if latest else None]
            torch.distributed.broadcast_object_list(obj, src=0)
            latest = Path(obj[0]) if obj[0] else None
        if run_file.is_file():
            prev = json.loads(run_file.read_text())
            if not self.resume and latest is not None:
                raise CheckpointError(
                    f"{self.out} already holds checkpoints of a run; pass --resume to continue it, or set "
                    "train.out_dir to a new directory")
            if self.resume and prev.get("config_hash") != config_hash(cfgd):
                diff = config_diff(prev.get("config", {}), cfgd)
                raise CheckpointError(
                    f"{self.out} holds a different run (config differs in: {'; '.join(diff) or '?'}); resume it "
                    "with its own config, or set train.out_dir to a new directory")
        self.run_id = config_hash(cfgd)
        if self.dist.rank == 0:
            self.out.mkdir(parents=True, exist_ok=True)
            ckptlib.write_json_atomic(run_file, {"config": cfgd, "config_hash": self.run_id})
        if self.resume and latest is not None:
            self._load_checkpoint(latest)
        elif self.dist.rank == 0 and (self.out / "log.jsonl").exists():
            (self.out / "log.jsonl").unlink()  # a fresh start (nothing was checkpointed) starts a fresh log
        self.dist.barrier()

    # ------------------------------------------------------------------------------------------- checkpoints

    def _trainer_state(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "run_id": self.run_id,
            "config": self.cfg.to_dict(),
            "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
                    "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
            "data_position": self.step * self.global_batch,
            "optimizer": None if self.dist.enabled else self.opt.state_dict(),
            # LoRA's fully trained token rows (mask, FIM), whatever the adapter files keep of them
            "token_rows": None if self.token_rows is None else {
                "index": self.token_rows.index.tolist(), "rows": self.token_rows.param.detach().cpu()},
        }

    @property
    def global_batch(self) -> int:
        t = self.cfg.train
        return t.micro_batch_size * t.grad_accum * self.dist.world

    def save(self) -> Path:
        def write_model(d: Path) -> None:
            if self.dist.enabled:
                from diffcoder.training.distributed import save_distributed

                save_distributed(self, d)
            elif self.cfg.lora.enabled:
                from diffcoder.adapters import save_adapter

                save_adapter(self.model, d, self.base_path, self.tokenizer)
            else:
                ckptlib.write_hf_dir(self.model, d, self.tokenizer, self.cfg.objective.kind == "diffusion",
                                     self.generation_config)

        return ckptlib.write_checkpoint(self.out, self.step, write_model, self._trainer_state(),
                                        keep=self.cfg.train.keep_checkpoints, is_writer=self.dist.rank == 0,
                                        barrier=self.dist.barrier)

    def _load_checkpoint(self, path: Path) -> None:
        self._on_rank0(lambda: self._check_checkpoint(path))
        state = ckptlib.load_state(path)
        if state.get("run_id") != self.run_id:
            raise CheckpointError(f"{path} was written by another run (run id {state.get('run_id')} vs "
                                  f"{self.run_id}); set train.out_dir to a new directory")
        try:
            if self.dist.enabled:
                from diffcoder.training.distributed import load_distributed

                load_distributed(self, path)
            elif self.cfg.lora.enabled:
                from diffcoder.adapters import load_adapter_weights

                load_adapter_weights(self.model, path)
                if self.token_rows is not None:
                    self._restore_token_rows(state.get("token_rows"))
            else:
                ckptlib.load_model_weights(self.model, path)
            if state["optimizer"] is not None:
                self.opt.load_state_dict(state["optimizer"])
        except (KeyError, RuntimeError, ValueError, OSError) as exc:  # damage no manifest caught (an old one)
            raise CheckpointError(f"{path} does not load into this run's model ({exc}); "
                                  f"{ckptlib.fallback_advice(path)}") from exc
        ckptlib.check_finite(self.model, self.opt, path)
        rng = state["rng"]
        torch.set_rng_state(rng["torch"])
        np.random.set_state(rng["numpy"])
        random.setstate(rng["python"])
        if rng.get("cuda") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
        self.step = state["step"]
        self.resumed_from, self.resumed_step = path, self.step
        if self.dist.rank == 0:  # drop log lines of steps the killed run did after this checkpoint
            log = self.out / "log.jsonl"
            if log.exists():
                keep = [ln for ln in log.read_text().splitlines() if ln.strip() and _before(json.loads(ln), self.step)]
                tmp = log.with_suffix(".tmp")
                tmp.write_text("".join(x + "\n" for x in keep))
                os.replace(tmp, log)
        self.log(f"resumed from {path} at step {self.step}")

    @torch.no_grad()
    def _restore_token_rows(self, saved: dict[str, Any] | None) -> None:
        if saved is None:  # a checkpoint from before token rows were kept in the trainer state
            self.token_rows.read_weight()
            return
        self.token_rows.param.copy_(saved["rows"])
        self.token_rows.write_back()

    def _check_checkpoint(self, path: Path) -> None:
        """Before trusting a checkpoint: its manifest, and (for full models) that its config is this run's model."""
        if not ckptlib.verify_checkpoint(path):
            self.log(f"note: {path} has no manifest (written by an older version); its files cannot be checked")
        if (path / "config.json").is_file():
            ckptlib.check_same_model(path, self.model.config)

    def _on_rank0(self, check) -> None:
        """Run check() on rank 0 only and raise its DiffcoderError on every rank (no rank is left waiting)."""
        problem = None
        if self.dist.rank == 0:
            try:
                check()
            except DiffcoderError as exc:
                problem = exc
        if self.dist.enabled:
            obj = [problem]
            torch.distributed.broadcast_object_list(obj, src=0)
            problem = obj[0]
        if problem is not None:
            raise problem

    # ------------------------------------------------------------------------------------------- the step

    def autocast(self):
        if self.device.type == "cuda" and self.cfg.train.bf16:
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return nullcontext()

    def global_batch_at(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(x0 [G, L], eligible [G, L]) of a step, identical whatever the micro-batch/rank split."""
        got = self.train_rows.batch(step * self.global_batch, self.global_batch)
        if isinstance(got, tuple):
            return got
        return got, torch.ones_like(got, dtype=torch.bool)

    def step_batches(self, step: int) -> StepBatches:
        """This rank's micro-batches of a step and what the step logs about its noise; the one place that
        branches on the objective (diffusion: noised block by block, docs/design.md §3.2-3.4; AR: next token)."""
        c = self.cfg
        x0, elig = self.global_batch_at(step)
        mb = c.train.micro_batch_size
        lo = self.dist.rank * mb * c.train.grad_accum  # this rank's slice of the global batch, then micro-batches
        slices = [slice(lo + a * mb, lo + (a + 1) * mb) for a in range(c.train.grad_accum)]
        weighted = step >= c.objective.warmup_steps
        if c.objective.kind != "diffusion":
            return StepBatches(ar_micro_batches(x0, elig, slices, self.device), max(int(elig[:, 1:].sum()), 1),
                               x0.numel(), weighted=weighted)
        u_max = warmup_cap(step, c.objective.warmup_steps, c.objective.u_init)
        elig = shift_eligible(elig, self.shift)
        noise = sample_block_noise(elig, self.block_size, u_max=u_max, weighted=weighted,
                                   generator=noise_generator(c.train.seed, step), antithetic=c.objective.antithetic)
        count = max(int(elig.sum()), 1)
        return StepBatches(diffusion_micro_batches(x0, noise, slices, self.block_size, self.shift, self.device),
                           count, x0.numel(), u_max, weighted, float(noise.masked.sum()) / count)

    def forward_backward_step(self, batch: MicroBatch, count: int) -> torch.Tensor:
        """One micro-batch: its loss sum (on the device, detached) after adding its share of the gradient."""
        with self.autocast():
            loss_sum = self.loss_fn(batch)
        # x world: FSDP averages gradients over ranks, the NELBO wants their sum over the global batch
        (loss_sum / count * self.dist.world).backward()
        return loss_sum.detach()

    def optimizer_step(self, step: int) -> float:
        """Clip, step and zero the gradients at this step's learning rate; returns the gradient norm."""
        for lr_group in self.opt.param_groups:
            lr_group["lr"] = lr_at(step, self.cfg)
        if self.token_rows is not None:
            self.token_rows.take_grad()
        grad_norm = self._clip()  # the step's one read from the device (with the loss)
        self.opt.step()
        if self.token_rows is not None:
            self.token_rows.write_back()
        self.opt.zero_grad(set_to_none=True)
        return grad_norm

    def train_step(self) -> dict[str, Any]:
        t0 = time.perf_counter()
        sb = self.step_batches(self.step)
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        for batch in sb.batches:  # nothing in here waits for the device
            total += self.forward_backward_step(batch, sb.count)
        if self.dist.enabled:
            torch.distributed.all_reduce(total)
        grad_norm = self.optimizer_step(self.step)
        loss = float(total) / sb.count
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        self.step += 1
        return {"kind": "train", "step": self.step - 1, "loss": loss, "grad_norm": grad_norm,
                "lr": self.opt.param_groups[0]["lr"], "u_max": sb.u_max, "weighted": sb.weighted,
                "mask_ratio": sb.mask_ratio, "tokens_per_s": sb.tokens / dt, "step_time_s": dt}

    def _clip(self) -> float:
        clip = self.cfg.optim.grad_clip
        params = [p for p in self.trainable if p.grad is not None]
        norm = torch.nn.utils.clip_grad_norm_(params, clip if clip > 0 else float("inf"),
                                              foreach=self.device.type == "cuda")
        if hasattr(norm, "full_tensor"):
            norm = norm.full_tensor()
        return float(norm)

    # ------------------------------------------------------------------------------------------- evaluation

    @torch.no_grad()
    def evaluate(self) -> dict[str, Any]:
        """Held-out diffusion NELBO on a fixed grid of t (same masks every time) and the AR NLL.

        The rows (eval_batches global batches) and their masks do not depend on the micro-batch/rank split."""
        if self.val_rows is None:
            return {}
        c = self.cfg
        self.model.eval()
        got = list(self.val_rows.sequential(self.global_batch, c.train.eval_batches * self.global_batch))
        if isinstance(got[0], tuple):
            x0, elig = torch.cat([g[0] for g in got]), torch.cat([g[1] for g in got])
        else:
            x0 = torch.cat(got)
            elig = torch.ones_like(x0, dtype=torch.bool)
        mb = c.train.micro_batch_size
        slices = [slice(a, a + mb) for a in range(0, x0.shape[0], mb)]
        out: dict[str, Any] = {"kind": "eval", "step": self.step}
        with self.autocast():
            if self.mask_id is not None:  # the NELBO of diffcoder.nelbo, this trainer placing the forwards
                def score(x0_mb: torch.Tensor, noise_mb) -> torch.Tensor:
                    (batch,) = diffusion_micro_batches(x0_mb, noise_mb, [slice(None)], self.block_size, self.shift,
                                                       self.device)
                    return self.loss_fn(batch, suppress_id=self.mask_id)

                nelbo, count = diffusion_nelbo(score, x0, elig, self.block_size, self.shift,
                                               c.train.eval_t_points, c.train.micro_batch_size)
                out["eval_nelbo"] = self._per_token(float(nelbo), count, "eval_nelbo")
            ar = torch.zeros((), dtype=torch.float64, device=self.device)
            for batch in ar_micro_batches(x0, elig, slices, self.device):
                ar += self.loss_fn(batch, suppress_id=self.mask_id)
            out["eval_ar_nll"] = self._per_token(float(ar), int(elig[:, 1:].sum()), "eval_ar_nll")
        self.model.train()
        return out

    def _per_token(self, total: float, count: int, name: str) -> float | None:
        """A per-token eval value, or None (logged as null, with a warning) when no held-out token was scored."""
        if count > 0:
            return total / count
        self.warn(f"{name} at step {self.step} scored no tokens ({self.cfg.train.eval_batches} eval batches of "
                  f"{self.global_batch} rows had none eligible, e.g. SFT prompts of >= data.seq_len "
                  f"{self.cfg.data.seq_len} tokens); it is logged as null, not as a value")
        return None

    # ------------------------------------------------------------------------------------------- loop

    def _nonfinite_loss_error(self, rec: dict[str, Any]) -> DiffcoderError:
        """A NaN/inf loss on the first step after a resume means the checkpoint, not the learning rate."""
        if self.resumed_from is not None and rec["step"] == self.resumed_step:
            return CheckpointError(
                f"loss became {rec['loss']} at step {rec['step']}, the first step after resuming from "
                f"{self.resumed_from}: the checkpoint's weights or optimizer state are damaged (the same step ran "
                f"finite before the save, so lowering optim.lr would not help); "
                f"{ckptlib.fallback_advice(self.resumed_from)}")
        return ConfigError(f"loss became {rec['loss']} at step {rec['step']}; lower optim.lr or enable "
                           "objective.warmup_steps")

    def log(self, msg: str) -> None:
        if self.dist.rank == 0 and not self.quiet:
            tqdm.write(msg, file=sys.stderr)

    def warn(self, msg: str) -> None:
        """A warning is shown even with --quiet: it says something the user must act on."""
        if self.dist.rank == 0:
            tqdm.write(f"warning: {msg}", file=sys.stderr)

    def write_log(self, rec: dict[str, Any]) -> None:
        if self.dist.rank == 0:
            with open(self.out / "log.jsonl", "a") as fh:
                fh.write(json.dumps(rec) + "\n")

    def run(self) -> dict[str, Any]:
        c = self.cfg.train
        last: dict[str, Any] = {}
        bar = tqdm(total=c.steps, initial=self.step, desc="training", unit="step", file=sys.stderr,
                   disable=self.dist.rank != 0 or self.quiet)
        if self.step == 0 and c.eval_every:  # the start point's held-out numbers, for before/after
            ev = self.evaluate()
            if ev:
                self.write_log(ev)
        while self.step < c.steps:
            rec = self.train_step()
            last = rec
            if rec["step"] % c.log_every == 0 or self.step == c.steps:
                self.write_log(rec)
            bar.update(1)
            bar.set_postfix(loss=f"{rec['loss']:.3f}", gnorm=f"{rec['grad_norm']:.2f}", u_max=f"{rec['u_max']:.2f}")
            if not math.isfinite(rec["loss"]):
                raise self._nonfinite_loss_error(rec)
            if c.eval_every and self.step % c.eval_every == 0 and self.step < c.steps:
                ev = self.evaluate()
                if ev:
                    self.write_log(ev)
            if c.save_every and self.step % c.save_every == 0 and self.step < c.steps:
                self.save()
        bar.close()
        ev = self.evaluate()
        if ev:
            self.write_log(ev)
        final = self.save()
        if self.dist.rank == 0:  # the exported model replaces any old one in a single rename
            from diffcoder.checkpoint import atomic_directory

            atomic_directory(self.out / "final", lambda tmp: ckptlib.export_model_files(final, tmp))
        self.dist.barrier()
        return {"last": last, "eval": ev, "checkpoint": str(final), "final": str(self.out / "final")}


def adapter_source(spec: str) -> Path:
    """lora.init_from: an adapter directory as is; a LoRA run directory -> its latest checkpoint (whose trainer
    state holds the token rows exactly)."""
    p = Path(spec)
    if not p.is_dir():
        raise ConfigError(f"lora.init_from {p} does not exist; give a LoRA run directory (e.g. runs/cpt) or one "
                          "of its checkpoints")
    if (p / "adapter_config.json").is_file():
        return p
    found = ckptlib.list_checkpoints(p)
    if found and (found[-1] / "adapter_config.json").is_file():
        return found[-1]
    raise ConfigError(f"lora.init_from {p} is neither a LoRA adapter directory nor a LoRA run with checkpoints")


def _before(rec: dict[str, Any], step: int) -> bool:
    """Log records made before the checkpoint at `step` (train record k is the k-th step; eval at k after it)."""
    return rec["step"] < step if rec.get("kind") == "train" else rec["step"] <= step


def train(cfg: TrainConfig, resume: bool = False, quiet: bool = False, force: bool = False) -> dict[str, Any]:
    trainer = Trainer(cfg, resume=resume, quiet=quiet, force=force)
    try:
        return trainer.run()
    finally:
        if trainer.dist.enabled:
            # every rank passes a barrier before teardown: without it gloo runs abort at exit now and then
            torch.distributed.barrier()
            torch.distributed.destroy_process_group()
