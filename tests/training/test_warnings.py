"""Silent waste made loud: tiny or empty held-out splits, SFT rows with nothing to score, empty evaluations.
Everything runs through the CLI (`cli.main`) on real files."""

from __future__ import annotations

import io
import json
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

from train_helpers import base_overrides, make_code_corpus

from diffcoder.cli import main


def cli(*args: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        rc = main([str(a) for a in args])
    return rc, out.getvalue(), err.getvalue()


def warnings_in(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("warning: ")]


def test_empty_val_split_warns_with_numbers_and_likelihood_advises_a_higher_fraction(tiny_setup, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for i in range(3):
        (src / f"m{i}.py").write_text(f"def f{i}(x):\n    return x * {i}\n")
    rc, out, err = cli("data", "build", src, "--out", tmp_path / "d", "--tokenizer", tiny_setup["base"],
                       "--val-fraction", "0.01")
    assert rc == 0, err
    (w,) = warnings_in(err)
    assert "the held-out (val) split is empty: 0 of 3 documents (0 of" in w and "--val-fraction 0.01" in w
    assert "add documents" in w and json.loads(out)["warnings"] == [w.removeprefix("warning: ")]
    rc, _, err = cli("eval", "likelihood", "--model", tiny_setup["base"], "--data", tmp_path / "d",
                     "--seq-len", "16")
    line = err.strip().splitlines()[-1]
    assert rc == 2 and "split 'val'" in line and "has 0 tokens (0 documents)" in line
    assert "rebuild with a higher --val-fraction (it was 0.01)" in line and "lower val_fraction" not in line


def test_a_tiny_val_split_suggests_a_fraction_that_would_be_enough(tiny_setup, tmp_path):
    src = make_code_corpus(tmp_path / "src", n=300, seed=1)
    rc, out, err = cli("data", "build", src, "--out", tmp_path / "d", "--tokenizer", tiny_setup["base"],
                       "--val-fraction", "0.01")
    assert rc == 0, err
    (w,) = warnings_in(err)
    summary = json.loads(out)
    n_val, t_val = summary["documents"].get("val", 0), summary["tokens"]["val"]
    n_docs = sum(summary["documents"].values())  # after exact duplicates were dropped
    assert f"{n_val} of {n_docs} documents ({t_val:,} of" in w and "raise --val-fraction (to about 0." in w
    wanted = float(w.split("to about ")[1].split(")")[0])
    assert 4096 / sum(summary["tokens"].values()) <= wanted <= 0.5  # enough for MIN_VAL_TOKENS, and sane


def chat_pairs(path: Path, n_long: int, n_short: int) -> Path:
    rows = []
    for i in range(n_long):
        request = f"Task {i}: " + "please write a function that adds the numbers in a list " * 4
        rows.append({"messages": [{"role": "user", "content": request},
                                  {"role": "assistant", "content": f"def add{i}(xs):\n    return sum(xs)\n"}]})
    for i in range(n_short):
        rows.append({"messages": [{"role": "user", "content": f"add {i}"},
                                  {"role": "assistant", "content": f"def add{i}(a, b):\n    return a + b\n"}]})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def sft_run(setup, data: Path, out: Path, **extra) -> tuple[int, str]:
    recipe = out.parent / "recipe.yaml"
    recipe.write_text("train:\n  log_every: 1\n")
    ov = base_overrides(setup, out, **{"data.kind": "sft", "data.path": data, "data.seq_len": 32,
                                       "train.steps": 1, "objective.warmup_steps": 0, **extra})
    rc, _, err = cli("train", recipe, *ov, "--quiet")
    return rc, err


def test_sft_prompts_longer_than_seq_len_are_counted_and_max_prompt_tokens_fixes_them(tiny_setup, tmp_path):
    from diffcoder.testing import tiny_tokenizer
    from diffcoder.training.data import tokenize_chat

    chat = chat_pairs(tmp_path / "chat.jsonl", n_long=8, n_short=4)
    rc, _, err = cli("data", "sft", chat, "--out", tmp_path / "sft", "--tokenizer", tiny_setup["base"],
                     "--val-fraction", "0")
    assert rc == 0, err
    rc, err = sft_run(tiny_setup, tmp_path / "sft", tmp_path / "run1")
    assert rc == 0, err
    (w,) = [x for x in warnings_in(err) if "SFT samples" in x]
    assert "8 of 12 SFT samples of the train split have prompts of 32 tokens (data.seq_len) or more" in w
    assert "train on nothing" in w and "--max-prompt-tokens 16" in w and "raise data.seq_len above" in w
    # the suggested fix: keep the last 16 prompt tokens (the request's end and the generation prompt)
    rc, out, err = cli("data", "sft", chat, "--out", tmp_path / "sft", "--tokenizer", tiny_setup["base"],
                       "--val-fraction", "0", "--max-prompt-tokens", "16", "--force")
    assert rc == 0, err
    tok = tiny_tokenizer()
    full = [tokenize_chat(tok, json.loads(x)["messages"]) for x in chat.read_text().splitlines()]
    assert json.loads(out)["prompts_truncated"] == sum(len(p) > 16 for p, _ in full) >= 8
    rows = [json.loads(x) for x in (tmp_path / "sft" / "sft-train.jsonl").read_text().splitlines()]
    prompt_of = {tuple(r): p for p, r in full}
    for r in rows:
        assert r["prompt"] == prompt_of[tuple(r["response"])][-16:]  # truncated from the left
    rc, err = sft_run(tiny_setup, tmp_path / "sft", tmp_path / "run2")
    assert rc == 0 and not [x for x in warnings_in(err) if "SFT samples" in x], err


def test_an_eval_that_scores_nothing_logs_null_not_zero(tiny_setup, tmp_path):
    chat = chat_pairs(tmp_path / "chat.jsonl", n_long=16, n_short=0)
    rc, out, err = cli("data", "sft", chat, "--out", tmp_path / "sft", "--tokenizer", tiny_setup["base"],
                       "--val-fraction", "0.5")
    assert rc == 0 and json.loads(out)["val"] > 0, err
    rc, err = sft_run(tiny_setup, tmp_path / "sft", tmp_path / "run", **{"train.steps": 2})
    assert rc == 0, err
    evals = [json.loads(x) for x in (tmp_path / "run" / "log.jsonl").read_text().splitlines()
             if json.loads(x)["kind"] == "eval"]
    assert evals and all(e["eval_nelbo"] is None and e["eval_ar_nll"] is None for e in evals)
    assert any("eval_nelbo at step" in w and "logged as null, not as a value" in w for w in warnings_in(err))
    plot = tmp_path / "run" / "training.png"
    rc, _, err = cli("plot", tmp_path / "run", "--out", plot)  # a null eval does not break the plot
    assert rc == 0 and plot.is_file(), err
