"""`diffcoder eval humaneval-infilling` and `cruxeval` on real tiny checkpoints: the FIM prompt and middle are what
`diffcoder.infill` gives (an end-of-middle token included), the no-FIM error, the CLI, and the run identity."""

from __future__ import annotations

import json

import pytest
import torch

import diffcoder
from diffcoder.cli import main
from diffcoder.errors import ConfigError
from diffcoder.evaluation.benchmarks import load_tasks
from diffcoder.evaluation.data import default_data_dir
from diffcoder.evaluation.harness import EvalConfig, read_records, run_eval, select_tasks
from diffcoder.fim import FIM_SPELLINGS, infill_prompt_ids

pytestmark = pytest.mark.skipif(not (default_data_dir() / "cruxeval.jsonl").is_file(),
                                reason="benchmark data not in ../shared/data or $DIFFCODER_DATA")
CONTEXT = 4096  # the tiny tokenizer spends a token per byte or two: HumanEval prompts need the room
FIM_PAD = "<|fim_pad|>"
DECODING = {"max_new_tokens": 24, "block_length": 4, "steps": 24}
SPLIT = "random-span-light"


@pytest.fixture(scope="module")
def fim_ckpt(tmp_path_factory):
    """A tiny FIM checkpoint with Qwen's <|fim_pad|>, which it writes part-way through the first task's middle: the
    LM-head rows of the pad and of a token it first writes there are swapped (the logits are only relabelled)."""
    from diffcoder.checkpoint import save_checkpoint
    from diffcoder.testing import tiny_fim_tokenizer, tiny_model

    tok = tiny_fim_tokenizer(extra=(FIM_PAD,))
    model = tiny_model(seed=0, std=0.5, vocab_size=len(tok), mask_token_id=tok.mask_token_id,
                       eos_token_id=tok.eos_token_id, max_position_embeddings=CONTEXT)
    task = load_tasks("humaneval-infilling", None, SPLIT)[0]
    ids = diffcoder.infill(model, tok, task.prompt, task.suffix, eos_id=-1, **DECODING).middle_ids
    t = ids[next(i for i in range(6, 20) if ids[i] not in ids[:i])]
    with torch.no_grad():
        w = model.lm_head.weight
        pad = tok.convert_tokens_to_ids(FIM_PAD)
        w[[t, pad]] = w[[pad, t]]
    return save_checkpoint(model, tmp_path_factory.mktemp("ckpt") / "tiny-fim", tokenizer=tok)


@pytest.fixture(scope="module")
def plain_ckpt(tmp_path_factory):
    from diffcoder.testing import write_tiny_checkpoint

    return write_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", max_position_embeddings=CONTEXT)


def test_fim_run_gives_what_infill_gives(fim_ckpt, tmp_path):
    model, tok = diffcoder.load(fim_ckpt)
    cfg = EvalConfig("humaneval-infilling", str(fim_ckpt), "fim", limit=3, variant=SPLIT, decoding=DECODING,
                     batch_size=3, workers=2)
    s = run_eval(cfg, tmp_path / "run", model=model, tokenizer=tok, progress=False)
    tasks = {t.task_id: t for t in load_tasks("humaneval-infilling", None, SPLIT)[:3]}
    records = read_records(tmp_path / "run" / "tasks.jsonl")
    assert sorted(r["task_id"] for r in records) == sorted(tasks)
    for r in records:
        task = tasks[r["task_id"]]
        want = diffcoder.infill(model, tok, task.prompt, task.suffix, **DECODING)
        assert r["prompt"] == tok.decode(infill_prompt_ids(tok, task.prompt, task.suffix))
        assert r["raw_output"] == want.middle and r["code"] == want.middle
    first = next(r for r in records if r["task_id"] == next(iter(tasks)))
    assert first["tokens"] < DECODING["max_new_tokens"]  # the pad ended that middle early
    assert s["benchmark"] == f"humaneval-infilling/{SPLIT}" and s["prompt_style"] == "fim" and s["tasks"] == 3


def test_prefix_only_run_continues_the_prefix(plain_ckpt, tmp_path):
    cfg = EvalConfig("humaneval-infilling", str(plain_ckpt), "prefix-only", spread=2, variant="single-line",
                     decoding={"max_new_tokens": 8}, ar=True, workers=2)
    s = run_eval(cfg, tmp_path / "run", progress=False)
    want = select_tasks(load_tasks("humaneval-infilling/single-line"), None, 2)
    records = {r["task_id"]: r for r in read_records(tmp_path / "run" / "tasks.jsonl")}
    assert sorted(records) == sorted(t.task_id for t in want) and s["selection"] == {"limit": None, "spread": 2}
    for t in want:
        assert records[t.task_id]["prompt"] == t.prompt.rstrip()
        assert records[t.task_id]["code"] == t.completion_code(records[t.task_id]["raw_output"], "prefix-only")


def test_no_fim_tokens_is_one_clear_line(plain_ckpt, tmp_path, capsys):
    rc = main(["eval", "humaneval-infilling", "--split", SPLIT, "--model", str(plain_ckpt), "--limit", "1",
               "--out", str(tmp_path / "r"), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and "has no fill-in-the-middle tokens" in err and "--fim-rate" in err
    assert "Traceback" not in err


def test_cruxeval_cli_run_and_identity(plain_ckpt, tmp_path, capsys):
    out = tmp_path / "crux"
    common = ["--model", str(plain_ckpt), "--ar", "--limit", "3", "--max-new-tokens", "6", "--out", str(out),
              "--no-progress", "--workers", "2"]
    assert main(["eval", "cruxeval", "--task", "input", *common]) == 0
    s = json.loads((out / "summary.json").read_text())
    assert s["benchmark"] == "cruxeval/input" and s["tasks"] == 3 and s["mode"] == "ar"
    for r in read_records(out / "tasks.jsonl"):
        assert r["prompt"].endswith("== f(") and "\n" not in r["code"]
    capsys.readouterr()
    # The other task is another run: refused in the same folder rather than mixed in
    assert main(["eval", "cruxeval", "--task", "output", *common]) == 2
    assert "variant" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="--prompt-style fim or prefix-only"):
        run_eval(EvalConfig("humaneval-infilling", str(plain_ckpt), "base", variant=SPLIT), tmp_path / "x")


@pytest.mark.parametrize("spelling", FIM_SPELLINGS)
def test_fim_prompt_layout_for_each_token_naming(spelling):
    """The eval prompt of an infilling task puts the prefix and suffix around the checkpoint's own FIM tokens, in
    its order (suffix first for Seed-Coder's spelling), whatever their names."""
    from diffcoder.evaluation.harness import encode
    from diffcoder.fim import SUFFIX_FIRST, find_fim_tokens
    from diffcoder.testing import tiny_tokenizer

    tok = tiny_tokenizer()
    tok.add_tokens(list(spelling), special_tokens=True)
    fim = find_fim_tokens(tok)
    task = load_tasks("humaneval-infilling", None, SPLIT)[1]
    ids = encode(tok, task, "fim")
    first, second = (fim.suffix_id, fim.prefix_id) if spelling[0] in SUFFIX_FIRST else (fim.prefix_id, fim.suffix_id)
    assert ids[0] == first and ids[-1] == fim.middle_id and ids.count(second) == 1
    a, b = ids[1: ids.index(second)], ids[ids.index(second) + 1: -1]
    pieces = [tok.decode(x, clean_up_tokenization_spaces=False) for x in (a, b)]
    assert pieces == ([task.suffix, task.prompt] if spelling[0] in SUFFIX_FIRST else [task.prompt, task.suffix])
