"""The GPU decode path: the rule of docs/design.md §2 (the same as `diffcoder.decoding`), with shapes that never
change and no host sync inside a block's steps, so that a step is one CUDA-graph replay.

Why it differs from the CPU path: on a GPU the model's step is a few milliseconds of kernels, and every value the
host reads back (a count, a `bool(tensor)`, a boolean index) drains the queue and leaves the GPU idle while Python
launches the next kernels. So here:

- The KV cache is a `StaticKVCache` over a fixed-width canvas, written by index; attention always spans the whole
  width under a mask. The batch is padded to a power of two rows and the width to a multiple of 256 columns, and the
  buffers (and graphs) are kept on the model for the next call of the same shape.
- A block's first step runs 2B queries: the block before (now clean: its keys are written, the commit forward
  fused as in `decoding`) and the block itself; later steps run the block alone. So there are two step shapes, each
  one CUDA graph. With shift, the hidden state before the block predicts its first slot; AR (block 1 with shift)
  runs one query per token. The prompt before the first block is one prefill forward.
- How many slots a step commits depends only on the layout, so the whole schedule goes to the device once per call.
  Proposal, selection, commits and the bookkeeping for events happen on the device. Once per block the host reads
  one small tensor (the block's tokens, which step committed each slot, which rows are done) to stream events and
  stop. With a threshold the number of steps depends on the confidences: one boolean per step says whether the
  block is done.
- A finished row stays in the batch with nothing left to fill (inert) rather than reshaping the cache.

Sampling (temperature > 0, `random` remasking) runs the same steps eagerly, without graphs, and draws noise for
every slot of the block: the samples are as valid as the CPU path's but not the same draws.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch

from diffcoder.decode_batch import ActiveRows, Canvas, DecodeEvent, GenerationResult
from diffcoder.decode_rule import StepRule, choose_commits, propose
from diffcoder.masks import canvas_attention_mask

WIDTH_MULTIPLE, KEPT_STATES = 256, 2


@dataclass
class DecodeState:
    """Every tensor a block step reads or writes, allocated once per (rows, width, block) and reused: a captured
    graph keeps pointers to exactly these tensors."""

    ids: torch.Tensor  # [R, W] canvas tokens (mask ids where not yet decoded)
    positions: torch.Tensor  # [R, W] position ids (a row's left padding shifts them)
    valid: torch.Tensor  # [R, W] real tokens (prompt or generation), keys other columns never see
    to_fill: torch.Tensor  # [R, W] generation slots still masked
    gen_start: torch.Tensor  # [R] first generated column per row
    ends: torch.Tensor  # [R] end column (exclusive) per row
    done: torch.Tensor  # [R] rows finished (or padding)
    block_start: torch.Tensor  # () first column of the current block
    step: torch.Tensor  # () step index within the block
    k: torch.Tensor  # [R] commits per row in this step (fixed schedule)
    commit_step: torch.Tensor  # [R, B] step at which each slot of the block was committed (-1: not yet)
    committed: torch.Tensor  # [R, B] the token committed there (before any EOS fill)
    prev_hidden: torch.Tensor  # [R, H] with shift: the hidden state of the column before the block
    all_cols: torch.Tensor  # [W] 0..W-1
    first_cols: torch.Tensor  # a block's first step, relative to block_start: the block before and the block
    later_cols: torch.Tensor  # [B] later steps: the block only
    before_index: int  # where the column before the block sits among first_cols
    cache: object  # StaticKVCache
    block: int
    graphs: dict

    @classmethod
    def allocate(cls, model, rows: int, width: int, block: int, shift: bool) -> DecodeState:
        dev = model.device
        long = dict(dtype=torch.long, device=dev)
        # AR (block 1 with shift) needs no query at the masked slot: the column before predicts it
        first = [-1] if block == 1 and shift else list(range(-block, block))
        return cls(
            ids=torch.zeros(rows, width, **long), positions=torch.zeros(rows, width, **long),
            valid=torch.zeros(rows, width, dtype=torch.bool, device=dev),
            to_fill=torch.zeros(rows, width, dtype=torch.bool, device=dev),
            gen_start=torch.zeros(rows, **long), ends=torch.zeros(rows, **long),
            done=torch.ones(rows, dtype=torch.bool, device=dev),
            block_start=torch.tensor(block, **long), step=torch.zeros((), **long), k=torch.zeros(rows, **long),
            commit_step=torch.full((rows, block), -1, **long), committed=torch.zeros(rows, block, **long),
            prev_hidden=torch.zeros(rows, model.config.hidden_size, dtype=model.dtype, device=dev),
            all_cols=torch.arange(width, **long), first_cols=torch.tensor(first, **long),
            later_cols=torch.arange(block, **long), before_index=first.index(-1),
            cache=model.new_cache(rows, width, static=True), block=block, graphs={},
        )

    def load(self, canvas: Canvas, max_positions: int) -> None:
        """Put a batch's canvas into the buffers; padding rows and columns are inert (not valid, nothing to fill)."""
        n, w = canvas.ids.shape
        for t in (self.ids, self.valid, self.to_fill, self.gen_start, self.ends):
            t.zero_()
        self.ids[:n, :w] = canvas.ids
        self.valid[:n, :w] = canvas.valid
        self.to_fill[:n, :w] = canvas.to_fill
        pads = torch.zeros(self.ids.shape[0], dtype=torch.long)
        pads[:n] = canvas.pads
        # columns past a row's end get positions too (never attended): keep them inside the RoPE table
        self.positions.copy_((self.all_cols[None] - pads.to(self.ids.device)[:, None]).clamp(0, max_positions - 1))
        self.gen_start[:n] = canvas.gen_start.to(self.ids.device)
        self.ends[:n] = canvas.ends.to(self.ids.device)
        self.done.fill_(True)
        self.done[:n] = False
        for c in self.cache.k + self.cache.v:  # stale keys are masked, but must be finite (0 * NaN is NaN)
            c.zero_()


# ---------------------------------------------------------------------------------------------------------
# The device side: one step, the end of a block, the prefill (no host reads in any of them)


def block_step(model, st: DecodeState, rule: StepRule, shift: bool, first: bool) -> None:
    """One denoising step of the block at `st.block_start`, in place on `st`: run the model, propose, choose,
    commit (docs/design.md §2.4-2.5). A block's first step also runs the clean block before it, rewriting the keys
    of what was just committed there (the fused commit forward); later steps run the block alone."""
    B = st.block
    cols = st.block_start + (st.first_cols if first else st.later_cols)
    cur = st.block_start + st.later_cols
    attn = canvas_attention_mask(cols, st.all_cols[: st.cache.visible], st.valid, B)
    hidden = model.hidden_states(st.ids.index_select(1, cols), st.positions.index_select(1, cols), attn, st.cache,
                                 cols)
    pred = hidden[:, -B:]
    if shift:  # column i-1 predicts column i; the block's first slot from the column before the block
        if first:
            st.prev_hidden.copy_(hidden[:, st.before_index])
        pred = torch.cat([st.prev_hidden[:, None], pred[:, :-1]], dim=1)
    x0, conf = propose(model.lm_head(pred), rule.mask_id, rule.temperature, rule.remasking, rule.generator,
                       rule.top_k, rule.top_p)
    masked = st.to_fill.index_select(1, cur)
    commit = choose_commits(conf, masked, st.k, rule.threshold)
    st.ids.index_copy_(1, cur, torch.where(commit, x0, st.ids.index_select(1, cur)))
    st.to_fill.index_copy_(1, cur, masked & ~commit)
    st.commit_step.copy_(torch.where(commit, st.step, st.commit_step))
    st.committed.copy_(torch.where(commit, x0, st.committed))


def finish_block(st: DecodeState, s: int, e: int, eos_id: int | None) -> torch.Tensor:
    """After block [s, e) is clean: EOS in a row's generated part turns the rest of its block into EOS and ends the
    row (docs/design.md §2.6); a row at its end is done too; a done row gets nothing more to fill.
    Returns what the host reads once per block: [R, 3B + 1] = tokens, committed tokens, commit steps, done."""
    cols = st.all_cols[s:e][None]
    tokens = st.ids[:, s:e]
    in_row = cols < st.ends[:, None]
    if eos_id is not None:
        hit = (tokens == eos_id) & (cols >= st.gen_start[:, None]) & in_row
        tokens.copy_(torch.where((hit.cumsum(-1) > 0) & in_row, eos_id, tokens))
        st.done |= hit.any(-1)
    st.done |= st.ends <= e
    st.to_fill &= ~st.done[:, None]
    return torch.cat([tokens, st.committed, st.commit_step, st.done[:, None].long()], dim=1)


def prefill(model, st: DecodeState, upto: int) -> None:
    """Keys of the prompt columns [0, upto), block-causal, into the cache (one eager forward that sees only those
    columns)."""
    cols = st.all_cols[:upto]
    st.cache.visible = upto
    model.hidden_states(st.ids[:, :upto], st.positions[:, :upto],
                        canvas_attention_mask(cols, cols, st.valid, st.block), st.cache, cols)


class _StepGraph:
    """`block_step` captured once as a CUDA graph; replaying it re-runs every kernel on the same buffers."""

    def __init__(self, step, pool) -> None:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up outside capture: lazy inits, workspaces, autotuning
            for _ in range(2):
                step()
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        # thread_local: the server decodes on its engine thread while other threads may touch CUDA
        # one memory pool per state: its graphs never run at once and keep no outputs of their own
        with torch.cuda.graph(self.graph, pool=pool, capture_error_mode="thread_local"):
            step()

    def __call__(self) -> None:
        self.graph.replay()


# ---------------------------------------------------------------------------------------------------------
# The host side


def row_bucket(n: int) -> int:
    """Rows a batch of n is padded to: 1, 2, 4, 8, then multiples of 8 (a graph per bucket, little waste)."""
    return 1 << (n - 1).bit_length() if n <= 8 else -(-n // 8) * 8


def state_for(model, rows: int, width: int, block: int, shift: bool) -> DecodeState:
    """Buffers for a batch of this shape: an existing state of the model that holds it without doubling its rows or
    width, else a new one (the least recently used beyond KEPT_STATES is dropped, its graphs with it)."""
    rows, width = row_bucket(rows), -(-width // WIDTH_MULTIPLE) * WIDTH_MULTIPLE
    cos, _ = model.rope_table(model.dtype, model.device)  # graphs hold its address too
    same = (block, shift, model.dtype, str(model.device),
            hash((cos.data_ptr(), *(p.data_ptr() for p in model.parameters()))))  # new weights: new graphs
    states: OrderedDict = model.__dict__.setdefault("_decode_states", OrderedDict())
    fits = [k for k in states if k[2:] == same and rows <= k[0] <= 2 * rows and width <= k[1] <= 2 * width]
    key = min(fits, key=lambda k: k[0] * k[1]) if fits else (rows, width, *same)
    if key not in states:
        while len(states) >= KEPT_STATES:
            states.popitem(last=False)
        states[key] = DecodeState.allocate(model, rows, width, block, shift)
    states.move_to_end(key)
    return states[key]


def release(model) -> None:
    """Free the buffers and graphs this path keeps on `model` for later calls (e.g. before training it)."""
    model.__dict__.pop("_decode_states", None)


def _graphable(rule: StepRule) -> bool:
    return rule.temperature == 0 and rule.remasking == "low_confidence"


_COMPILED: dict[str, object] = {}


def compiled_block_step():
    """`block_step` through torch.compile (fused elementwise kernels: RMSNorm, RoPE, SwiGLU, the rule), compiled
    once per shape on first use; graphs then capture the compiled kernels."""
    if "step" not in _COMPILED:
        import torch._dynamo

        config = torch._dynamo.config  # a shape per (rows, width, visible width, first/later): more than 8
        for name in ("recompile_limit", "cache_size_limit"):
            if hasattr(config, name):
                setattr(config, name, max(getattr(config, name), 64))
        _COMPILED["step"] = torch.compile(block_step, dynamic=False)
    return _COMPILED["step"]


class _Steps:
    """`run(first, visible)`: one step over the first `visible` cache columns, eager or as the replay of its CUDA
    graph. Graphs are captured before the call's canvas is loaded (their warm-up runs real steps on the buffers), one
    per (first/later, visible width) this call can need; with `compile_steps` the step is torch.compile'd."""

    def __init__(self, model, st: DecodeState, rule: StepRule, shift: bool, cuda_graphs: bool | None,
                 compile_steps: bool, later_steps: bool):
        use_graphs = (model.device.type == "cuda" and _graphable(rule)) if cuda_graphs is None else cuda_graphs
        if use_graphs and (model.device.type != "cuda" or not _graphable(rule)):
            raise ValueError("cuda_graphs=True needs a CUDA model and greedy low_confidence decoding")
        step_fn = compiled_block_step() if compile_steps else block_step
        W = st.ids.shape[1]
        # a few visible widths (a compiled step recompiles per width: then the whole width only)
        self.widths = [W] if compile_steps else sorted({min(W, -(-W * i // 4 // WIDTH_MULTIPLE) * WIDTH_MULTIPLE)
                                                          for i in (1, 2, 3, 4)})
        self.st, self.graphs = st, None

        def eager(first: bool) -> None:
            step_fn(model, st, rule, shift, first)

        self.eager = eager
        if use_graphs:
            if "pool" not in st.graphs:
                st.graphs["pool"] = torch.cuda.graph_pool_handle()
            self.graphs = {}
            for first in (True, False) if later_steps else (True,):
                for vis in self.widths:
                    key = (shift, rule.mask_id, rule.threshold, compile_steps, first, vis)
                    if key not in st.graphs:
                        st.block_start.fill_(st.block)  # the warm-up steps need valid columns
                        st.cache.visible = vis
                        st.graphs[key] = _StepGraph(lambda first=first: eager(first), st.graphs["pool"])
                    self.graphs[first, vis] = st.graphs[key]

    def visible_for(self, block_end: int) -> int:
        return next(w for w in self.widths if w >= block_end)

    def __call__(self, first: bool, visible: int) -> None:
        if self.graphs is not None:
            self.graphs[first, visible]()
        else:
            self.st.cache.visible = visible
            self.eager(first)


def _schedule(canvas: Canvas, rows: int, S: int, device):
    """The masked slots per (block, row), read off the canvas before any step, and the commits per (block, step, row)
    (docs/design.md §2.3) as lists for the host and as one tensor for the device."""
    n, B = canvas.ids.shape[0], canvas.block
    slots = torch.zeros(canvas.n_blocks, rows, dtype=torch.long)
    slots[:, :n] = canvas.to_fill[:, canvas.t0 :].reshape(n, canvas.n_blocks, B).sum(-1).T.cpu()
    steps = torch.arange(S)[None, :, None]
    table = slots[:, None] // S + (steps < slots[:, None] % S).long()  # [blocks, S, rows]
    return slots.tolist(), table.tolist(), table.to(device)


@torch.no_grad()
def decode_static(model, prompts: list[torch.Tensor], S: int, gen_length: int, rule: StepRule, block: int,
                  shift: bool, eos_id: int | None, active: ActiveRows, on_event=None, ar: bool = False,
                  cuda_graphs: bool | None = None, compile_steps: bool = False) -> GenerationResult:
    """Decode a batch on fixed-shape buffers; same arguments and result as the CPU path (`decoding._decode`).
    `ar`: block 1 with shift is AR decoding; its events then number steps by token, as `generate_ar` does."""
    n = len(prompts)
    canvas = Canvas(prompts, gen_length, block, rule.mask_id if rule.mask_id is not None else 0, model.device,
                    lead=block)
    st = state_for(model, n, canvas.width, block, shift)
    run_step = _Steps(model, st, rule, shift, cuda_graphs, compile_steps,
                      later_steps=block > 1 and (S > 1 or rule.threshold is not None))
    st.load(canvas, model.config.max_position_embeddings)
    slots, counts, k_table = _schedule(canvas, st.ids.shape[0], S, model.device)
    host_ids = canvas.ids.cpu()
    layout = (canvas.pads.tolist(), canvas.gen_start.tolist(), canvas.ends.tolist())
    forwards = steps_taken = 0
    if canvas.t0 > block:
        prefill(model, st, canvas.t0 - block)
        forwards += 1
    for b in range(canvas.n_blocks):
        s, e = canvas.span(b)
        visible = run_step.visible_for(e)
        st.block_start.fill_(s)
        st.commit_step.fill_(-1)
        ran = []  # (step index, forwards after it)
        if rule.threshold is None:
            for j in range(S):
                if any(counts[b][j][r] for r in active.rows):  # a step that commits nothing is skipped
                    st.k.copy_(k_table[b, j])
                    st.step.fill_(j)
                    run_step(not ran, visible)
                    forwards += 1
                    ran.append((j, forwards))
        elif any(slots[b][r] for r in active.rows):
            while True:
                st.step.fill_(len(ran))
                run_step(not ran, visible)
                forwards += 1
                ran.append((len(ran), forwards))
                if not bool(st.to_fill[:, s:e].any()):  # the one read per step that a threshold needs
                    break
        report = finish_block(st, s, e, eos_id).cpu()  # the one read per block
        before = set(active.rows)
        steps_taken += _emit_block(report, layout, host_ids, active, on_event, b, s, e, ran, forwards, ar)
        for r in before - set(active.rows):
            if not report[r, -1]:  # cancelled during this block: make the row inert
                st.done[r] = True
                st.to_fill[r] = False
        if not active.rows:
            break
    return GenerationResult(sequences=[active.finished[i] for i in range(n)],
                            prompt_lengths=[len(p) for p in prompts], forwards=forwards, steps=steps_taken)


def _emit_block(report: torch.Tensor, layout: tuple[list[int], list[int], list[int]], host_ids: torch.Tensor,
                active: ActiveRows, on_event, b: int, s: int, e: int, ran: list[tuple[int, int]], forwards: int,
                ar: bool) -> int:
    """The host's side of a finished block, from the one tensor read: commit events in step order, block events,
    finished rows settled. Returns the (row, step) pairs that committed something."""
    B = e - s
    tokens, committed, when, done = report[:, :B], report[:, B : 2 * B], report[:, 2 * B : 3 * B], report[:, -1]
    pads, gen_starts, ends = layout
    host_ids[:, s:e] = tokens[: host_ids.shape[0]]
    rows = list(active.rows)
    ordered = when[rows].sort(-1).values  # distinct commit steps per row: count the changes, -1 (none) aside
    steps_taken = int(((ordered[:, 1:] != ordered[:, :-1]) & (ordered[:, 1:] >= 0)).sum() + (ordered[:, 0] >= 0).sum())
    commits: dict[int, list[DecodeEvent]] = {r: [] for r in rows}  # per row, in step order
    if on_event is not None:
        for j, fwd in ran:
            for r in rows:
                c = torch.nonzero(when[r] == j).flatten()
                if len(c):
                    commits[r].append(DecodeEvent("commit", r, b, b if ar else j, (c + s - pads[r]).tolist(),
                                                  committed[r, c].tolist(), fwd))
        if not ar:  # the CPU path streams a step's commits as the step ends: step-major, rows in order
            for event in sorted((ev for r in rows for ev in commits[r]), key=lambda ev: ev.step):
                on_event(event)
    step = b if ar else (ran[-1][0] + 1 if ran else 0)
    done_rows = done.tolist()
    keep = []
    for i, r in enumerate(rows):
        gen_start, blk_end = max(s, gen_starts[r]), min(e, ends[r])
        if on_event is not None:
            if ar:  # the AR decoder streams each row's token, then its block
                for event in commits[r]:
                    on_event(event)
            if gen_start < blk_end:
                on_event(DecodeEvent("block", r, b, step, list(range(gen_start - pads[r], blk_end - pads[r])),
                                     host_ids[r, gen_start:blk_end].tolist(), forwards))
        if active.settle(i, bool(done_rows[r]), host_ids[r, pads[r] : blk_end], b, step, forwards):
            keep.append(i)
    active.rows = [rows[i] for i in keep]
    return steps_taken
