"""What both decode paths share besides the rule: the batch laid out on one canvas (`Canvas`), the rows still
decoding (`ActiveRows`), the streamed events (`DecodeEvent`) and the result (`GenerationResult`)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class DecodeEvent:
    """kind: 'commit' (slots committed in a step), 'block' (a block is final), 'done' (the row is finished).

    positions are absolute positions in the row's sequence (prompt starts at 0); forwards is the number of model
    forwards the batch has run so far (on a 'done' event: what that row cost)."""

    kind: str
    row: int
    block: int
    step: int
    positions: list[int] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    forwards: int = 0
    logprobs: list[float] = field(default_factory=list)  # commits only, when asked: log p of each token
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)  # and the most likely alternatives


@dataclass
class GenerationResult:
    sequences: list[torch.Tensor]  # prompt + generated ids per row
    prompt_lengths: list[int]
    forwards: int  # model forwards (NFE) for the whole batch
    steps: int  # denoising steps that committed something, summed over rows

    @property
    def generated(self) -> list[torch.Tensor]:
        return [s[p:] for s, p in zip(self.sequences, self.prompt_lengths)]

    @property
    def generated_tokens(self) -> int:
        return sum(len(g) for g in self.generated)

    def padded(self, pad_id: int, device=None) -> torch.Tensor:
        """[N, L] ids, rows right-padded with pad_id (the EOS id, so a padded row still reads as stopped)."""
        out = torch.full((len(self.sequences), max(len(x) for x in self.sequences)), pad_id, dtype=torch.long)
        for i, x in enumerate(self.sequences):
            out[i, : len(x)] = x
        return out.to(device) if device is not None else out


class ActiveRows:
    """The rows still decoding: their original indices, and the finished sequences of the others."""

    def __init__(self, n: int, on_event, cancelled):
        self.rows = list(range(n))
        self.finished: dict[int, torch.Tensor] = {}
        self.on_event, self.cancelled = on_event, cancelled

    def settle(self, r: int, done: bool, sequence: torch.Tensor, block: int, step: int, forwards: int) -> bool:
        """Finish row r if it is done (or its caller went away); return whether it stays in the batch."""
        if not done and self.cancelled is not None and self.cancelled(self.rows[r]):
            done = True
        if done:
            self.finished[self.rows[r]] = sequence.cpu()
            if self.on_event is not None:
                self.on_event(DecodeEvent("done", self.rows[r], block, step, forwards=forwards))
        return not done

    def shrink(self, keep: list[int], cache, *tensors):
        """Drop finished rows from the cache and from every per-row tensor given (None passes through)."""
        idx = torch.tensor(keep)
        cache.keep_rows(idx.to(cache.k[0].device))
        self.rows = [self.rows[r] for r in keep]
        return tuple(None if t is None else t[idx.to(t.device)] for t in tensors)


class Canvas:
    """The batch on one canvas: each row left-padded by a multiple of B, so every row's blocks fall on the same
    columns; `to_fill` marks the generation slots still masked."""

    def __init__(self, prompts: list[torch.Tensor], gen_length: int, block: int, mask_id: int, device,
                 lead: int = 0):
        lens = torch.tensor([len(p) for p in prompts])
        first_block = lens - lens % block
        # the column where the first generation block starts (at least `lead`: room for a block before it)
        self.t0 = max(int(first_block.max()), lead)
        self.pads = self.t0 - first_block
        self.lens = lens
        self.gen_start = self.pads + lens  # first generated column per row
        self.ends = self.gen_start + gen_length  # exclusive canvas end per row
        self.n_blocks = -(-(int(self.ends.max()) - self.t0) // block)
        self.block = block
        width = self.t0 + self.n_blocks * block
        cols = torch.arange(width)
        valid = (cols >= self.pads[:, None]) & (cols < self.ends[:, None])  # real tokens (prompt or generation)
        to_fill = (cols >= self.gen_start[:, None]) & valid
        ids = torch.full((len(prompts), width), mask_id, dtype=torch.long)
        ids[~valid] = 0  # padding columns: never attended to, any id will do
        for i, p in enumerate(prompts):
            ids[i, self.pads[i] : self.pads[i] + lens[i]] = p
        self.ids, self.valid, self.to_fill = ids.to(device), valid.to(device), to_fill.to(device)
        self.positions = (cols.to(device)[None] - self.pads.to(device)[:, None]).clamp(min=0)

    @property
    def width(self) -> int:
        return self.ids.shape[1]

    def span(self, b: int) -> tuple[int, int]:
        return self.t0 + b * self.block, self.t0 + (b + 1) * self.block

    def commit(self, s: int, e: int, x0: torch.Tensor, commit: torch.Tensor) -> None:
        self.ids[:, s:e] = torch.where(commit, x0, self.ids[:, s:e])
        self.to_fill[:, s:e] &= ~commit

    def finish_block(self, r: int, s: int, e: int, eos_id: int | None) -> tuple[bool, int, int]:
        """After block [s, e) of row r is clean: (row done, first generated column, block end in the row).
        EOS in the generated part fills the rest of the block with EOS and ends the row (docs/design.md §2.6)."""
        row_end = int(self.ends[r])
        blk_end = min(e, row_end)
        gen_start = max(s, int(self.gen_start[r]))
        done = blk_end >= row_end
        if eos_id is not None and gen_start < blk_end:
            hits = torch.nonzero(self.ids[r, gen_start:blk_end] == eos_id).flatten()
            if len(hits):
                self.ids[r, gen_start + int(hits[0]) : blk_end] = eos_id
                done = True
        return done, gen_start, blk_end

    def keep_rows(self, idx: torch.Tensor) -> None:
        on_device = idx.to(self.ids.device)
        self.ids, self.valid, self.to_fill, self.positions = (
            t[on_device] for t in (self.ids, self.valid, self.to_fill, self.positions))
        self.pads, self.lens, self.gen_start, self.ends = (
            t[idx] for t in (self.pads, self.lens, self.gen_start, self.ends))
