"""The GPU decode path (`diffcoder.static_decoding`): its promises beyond the token-for-token equality that
tests/test_decoding.py checks for both paths: no host reads inside a block's steps, buffers reused across calls
without leaking state, the same events as the CPU path. The CUDA tests at the end run on a GPU machine only."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from diffcoder import static_decoding
from diffcoder.decode_batch import Canvas
from diffcoder.decode_rule import StepRule, commit_counts
from diffcoder.decoding import generate, generate_ar
from diffcoder.testing import tiny_model

MASK = 3


@pytest.fixture(scope="module")
def model():
    return tiny_model(seed=11, dtype=torch.float64, std=0.6)


def prompts_of(*lengths: int) -> list[list[int]]:
    return [torch.randint(4, 384, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in lengths]


class HostReads(TorchDispatchMode):
    """Records every op that makes the host wait for the device's values: a scalar read (`.item()`, `bool()`,
    `int()`), or an op whose output shape depends on values (nonzero, masked_select, boolean indexing)."""

    SYNCING = {"_local_scalar_dense", "item", "nonzero", "masked_select", "is_nonzero", "equal"}

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        indices = args[1] if name in ("index", "index_put", "index_put_") and len(args) > 1 else ()
        if name in self.SYNCING or any(isinstance(t, torch.Tensor) and t.dtype == torch.bool for t in indices or ()):
            self.seen.append(name)
        return func(*args, **(kwargs or {}))


def test_the_host_read_detector_sees_reads():
    t = torch.tensor([1.0, -2.0, 3.0])
    with HostReads() as spy:
        bool(t.any())
        t[t > 0]
        torch.nonzero(t)
    assert len(spy.seen) >= 3


@pytest.mark.parametrize("threshold", [None, 0.3])
@pytest.mark.parametrize("shift", [False, True])
def test_a_block_step_never_reads_the_device(model, threshold, shift):
    prompts = [torch.tensor(p) for p in prompts_of(9, 3, 6)]
    canvas = Canvas(prompts, 16, 4, MASK, model.device, lead=4)
    st = static_decoding.state_for(model, len(prompts), canvas.width, 4, shift)
    st.load(canvas, model.config.max_position_embeddings)
    rule = StepRule(MASK, threshold=threshold)
    s = canvas.span(0)[0]
    with HostReads() as spy:
        static_decoding.prefill(model, st, canvas.t0 - 4)
        st.block_start.fill_(s)
        st.k.fill_(1)
        for j in range(4):
            st.step.fill_(j)
            static_decoding.block_step(model, st, rule, shift, first=j == 0)
        static_decoding.finish_block(st, s, s + 4, eos_id=2)
    assert spy.seen == []
    assert not st.to_fill[: len(prompts), s : s + 4].any()  # the steps did commit the block


@pytest.mark.parametrize("S", [1, 2, 3, 4, 8])
def test_the_device_schedule_is_commit_counts(S):
    prompts = [torch.tensor(p) for p in prompts_of(9, 3, 6, 1)]
    canvas = Canvas(prompts, 24, 4, MASK, "cpu", lead=4)
    slots, counts, table = static_decoding._schedule(canvas, 8, S, "cpu")
    for b in range(canvas.n_blocks):
        s, e = canvas.span(b)
        for r in range(8):
            n = int(canvas.to_fill[r, s:e].sum()) if r < len(prompts) else 0
            assert slots[b][r] == n
            assert [counts[b][j][r] for j in range(S)] == table[b, :, r].tolist() == commit_counts(n, S)


def test_steps_that_see_part_of_the_width_give_the_same_tokens(model):
    """A long generation: early blocks attend only a bucket of the width (256 of 512 columns here)."""
    kw = dict(steps=296, gen_length=296, block_length=4, mask_id=MASK, eos_id=-1, return_result=True)
    prompts = prompts_of(5, 40)
    st = static_decoding.state_for(model, 2, 45 + 296, 4, False)
    steps = static_decoding._Steps(model, st, StepRule(MASK), False, None, False, True)
    assert steps.widths == [256, 512] and steps.visible_for(200) == 256
    ref = generate(model, prompts, static_cache=False, **kw)
    out = generate(model, prompts, static_cache=True, **kw)
    assert [s.tolist() for s in out.sequences] == [s.tolist() for s in ref.sequences]


def test_buffers_are_reused_and_leak_nothing_between_calls(model):
    kw = dict(steps=16, gen_length=16, block_length=4, mask_id=MASK, eos_id=-1, return_result=True,
              static_cache=True)
    first = generate(model, prompts_of(5, 7), **kw)
    states = dict(model.__dict__["_decode_states"])
    other = generate(model, prompts_of(6, 2), **kw)  # same bucket: the same buffers, other contents
    again = generate(model, prompts_of(5, 7), **kw)
    assert dict(model.__dict__["_decode_states"]).keys() == states.keys()
    assert [s.tolist() for s in again.sequences] == [s.tolist() for s in first.sequences]
    fresh = generate(model, prompts_of(6, 2), **{**kw, "static_cache": False})
    assert [s.tolist() for s in other.sequences] == [s.tolist() for s in fresh.sequences]


def test_buffer_shapes_are_bucketed_and_bounded(model):
    kw = dict(steps=8, gen_length=8, block_length=4, mask_id=MASK, eos_id=-1, static_cache=True)
    model.__dict__.pop("_decode_states", None)
    generate(model, prompts_of(5, 6, 7), **kw)  # 3 rows -> a bucket of 4
    (key,) = model.__dict__["_decode_states"]
    assert key[:4] == (4, static_decoding.WIDTH_MULTIPLE, 4, False)
    generate(model, prompts_of(5, 6), **kw)  # 2 rows fit the 4-row buffers: reused
    assert list(model.__dict__["_decode_states"]) == [key]
    assert [static_decoding.row_bucket(n) for n in (1, 3, 8, 9, 17, 64)] == [1, 4, 8, 16, 24, 64]
    for rows in (1, 9, 20):
        generate(model, prompts_of(*range(4, 4 + rows)), **kw)
    assert len(model.__dict__["_decode_states"]) == static_decoding.KEPT_STATES


@pytest.mark.parametrize("threshold", [None, 0.2])
def test_events_are_the_cpu_paths_events(model, threshold):
    prompts = prompts_of(3, 9, 14, 6, 5)
    kw = dict(steps=32, gen_length=32, block_length=4, mask_id=MASK, threshold=threshold, return_result=True)
    eos = generate(model, prompts, eos_id=-1, **kw).generated[1].tolist()[9]
    cpu, gpu = [], []
    a = generate(model, prompts, eos_id=eos, on_event=cpu.append, static_cache=False, **kw)
    b = generate(model, prompts, eos_id=eos, on_event=gpu.append, static_cache=True, **kw)
    assert [s.tolist() for s in a.sequences] == [s.tolist() for s in b.sequences]
    assert a.steps == b.steps
    fields = [(e.kind, e.row, e.block, e.step, e.positions, e.token_ids) for e in cpu]
    assert fields == [(e.kind, e.row, e.block, e.step, e.positions, e.token_ids) for e in gpu]
    assert any(e.kind == "done" and e.block < 7 for e in gpu)  # a row did stop at its EOS


def test_ar_on_the_static_path_is_the_ar_decoder(model):
    prompts = prompts_of(4, 11, 1)
    cpu, gpu = [], []
    a = generate_ar(model, prompts, 12, eos_id=77, on_event=cpu.append, return_result=True, static_cache=False)
    b = generate_ar(model, prompts, 12, eos_id=77, on_event=gpu.append, return_result=True, static_cache=True)
    assert [s.tolist() for s in a.sequences] == [s.tolist() for s in b.sequences]
    key = [(e.kind, e.row, e.block, e.step, e.positions, e.token_ids) for e in cpu]
    assert key == [(e.kind, e.row, e.block, e.step, e.positions, e.token_ids) for e in gpu]


def test_compiled_steps_give_the_same_tokens(model):
    """torch.compile'd steps (inductor, here on the CPU): the same tokens as the CPU path, both step shapes."""
    kw = dict(steps=8, gen_length=8, block_length=4, mask_id=MASK, eos_id=-1, return_result=True)
    prompts = prompts_of(6, 9)
    ref = generate(model, prompts, static_cache=False, **kw)
    out = generate(model, prompts, static_cache=True, compile_steps=True, **kw)
    assert [s.tolist() for s in out.sequences] == [s.tolist() for s in ref.sequences]


def test_graphs_need_cuda(model):
    with pytest.raises(ValueError, match="CUDA"):
        generate(model, prompts_of(5), steps=4, gen_length=4, mask_id=MASK, static_cache=True, cuda_graphs=True)


# ---------------------------------------------------------------------------------------------------------
# On a GPU machine (skipped elsewhere)

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
CUDA_CASES = [(4, 4, 16, 16, None), (7, 4, 16, 16, None), (5, 4, 16, 8, None), (6, 4, 16, 4, None),
              (10, 2, 12, 6, None), (11, 8, 24, 9, None), (8, 4, 16, 16, 0.05), (7, 4, 16, 4, 0.3),
              (3, 1, 8, 8, None)]


@cuda
@pytest.mark.parametrize("P,B,gen,steps,thr", CUDA_CASES)
@pytest.mark.parametrize("shift", [False, True])
def test_cuda_float32_with_graphs_gives_the_float64_cpu_tokens(model, P, B, gen, steps, thr, shift):
    gpu_model = tiny_model(seed=11, dtype=torch.float32, std=0.6).cuda()
    kw = dict(steps=steps, gen_length=gen, block_length=B, threshold=thr, shift=shift, mask_id=MASK, eos_id=-1,
              return_result=True)
    prompts = prompts_of(P, P + 3)
    ref = generate(model, prompts, static_cache=False, **kw)
    out = generate(gpu_model, prompts, **kw)  # the defaults on CUDA: static path, graphs
    assert [s.tolist() for s in out.sequences] == [s.tolist() for s in ref.sequences]
    assert model.__dict__ is not gpu_model.__dict__ and gpu_model.__dict__["_decode_states"]


@cuda
def test_cuda_steps_run_without_a_sync():
    gpu_model = tiny_model(seed=11, dtype=torch.float32, std=0.6).cuda()
    prompts = [torch.tensor(p) for p in prompts_of(9, 3)]
    canvas = Canvas(prompts, 16, 4, MASK, gpu_model.device, lead=4)
    st = static_decoding.state_for(gpu_model, 2, canvas.width, 4, False)
    rule = StepRule(MASK)
    graphed = static_decoding._Steps(gpu_model, st, rule, False, True, False, True)
    st.load(canvas, gpu_model.config.max_position_embeddings)
    static_decoding.prefill(gpu_model, st, canvas.t0 - 4)
    s, e = canvas.span(0)
    st.block_start.fill_(s)
    st.k.fill_(1)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for j in range(4):
            st.step.fill_(j)
            graphed(j == 0, graphed.visible_for(e))
            st.cache.visible = graphed.visible_for(e)
            static_decoding.block_step(gpu_model, st, rule, False, j == 0)  # the eager step too
        static_decoding.finish_block(st, s, e, eos_id=2)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@cuda
def test_cuda_ar_matches_the_cpu_ar():
    cpu_model = tiny_model(seed=3, dtype=torch.float64, std=0.6)
    gpu_model = tiny_model(seed=3, dtype=torch.float32, std=0.6).cuda()
    prompts = prompts_of(5, 12, 2)
    ref = generate_ar(cpu_model, prompts, 20, eos_id=-1, return_result=True)
    out = generate_ar(gpu_model, prompts, 20, eos_id=-1, return_result=True)
    assert [s.tolist() for s in out.sequences] == [s.tolist() for s in ref.sequences]
