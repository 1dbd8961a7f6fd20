"""Corpus building, packing, held-out split, dedup and SFT data."""

from __future__ import annotations

import json

import numpy as np
import pytest

from diffcoder.errors import DiffcoderError
from diffcoder.testing import tiny_tokenizer
from diffcoder.training.data import (
    PackedRows,
    SFTRows,
    build_corpus,
    build_sft,
    is_held_out,
    mine_instruction_pairs,
    read_index,
    resolve_source,
    tokenize_chat,
)

FUNC = '''
def area(w, h):
    """Return the area of a w by h rectangle."""
    result = w * h
    return result


def _private(x):
    """Skipped: private."""
    return x
'''


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def make_corpus(root):
    (root / "pkg").mkdir(parents=True)
    texts = {f"pkg/m{i}.py": f"def f{i}(x):\n    return x + {i}\n" * (i + 1) for i in range(30)}
    texts["pkg/dup.py"] = texts["pkg/m3.py"]  # exact duplicate: dropped
    texts["pkg/readme.md"] = "# Title\nsome words\n"
    texts["pkg/empty.py"] = "   \n"
    for name, t in texts.items():
        (root / name).write_text(t)
    (root / "pkg" / "binary.py").write_bytes(b"\xff\xfe\x00bad")
    return texts


def test_build_pack_split_dedup(tmp_path, tok):
    texts = make_corpus(tmp_path / "src")
    idx = build_corpus([str(tmp_path / "src")], tok, tmp_path / "data", val_fraction=0.2, shard_tokens=300)
    s = idx["summary"]
    assert s["duplicates_removed"] == 1
    assert s["documents"]["train"] + s["documents"].get("val", 0) == 31  # 30 + readme; empty/binary skipped
    assert s["languages"]["py"]["documents"] == 30 and s["languages"]["md"]["documents"] == 1
    assert len(idx["shards"]["train"]) > 1  # several shards
    # the shards hold exactly the tokenized documents, each followed by EOS
    stream = np.concatenate([np.fromfile(tmp_path / "data" / sh["file"], dtype=idx["dtype"])
                             for split in ("train", "val") for sh in idx["shards"][split]])
    assert stream.size == sum(s["tokens"].values())
    eos = tok.eos_token_id
    unique = {t for n, t in texts.items() if n not in ("pkg/dup.py", "pkg/empty.py")}
    expect = sum(len(tok(t, add_special_tokens=False)["input_ids"]) + 1 for t in unique)
    assert stream.size == expect and (stream == eos).sum() == len(unique)
    # held-out assignment is by content hash: stable and about the requested fraction on many hashes
    import hashlib

    frac = np.mean([is_held_out(hashlib.sha256(str(i).encode()).hexdigest(), 0.2) for i in range(5000)])
    assert abs(frac - 0.2) < 0.02


def test_packed_rows_deterministic_and_cover_epoch(tmp_path, tok):
    make_corpus(tmp_path / "src")
    build_corpus([str(tmp_path / "src")], tok, tmp_path / "data", val_fraction=0.0)
    rows = PackedRows(tmp_path / "data", "train", seq_len=16, seed=3)
    b1 = rows.batch(0, rows.num_rows)
    b2 = PackedRows(tmp_path / "data", "train", seq_len=16, seed=3).batch(0, rows.num_rows)
    assert (b1 == b2).all() and b1.shape == (rows.num_rows, 16)
    # one epoch visits every row exactly once
    assert sorted(rows.draw(k) for k in range(rows.num_rows)) == list(range(rows.num_rows))
    # resuming at draw k gives the same rows as reading through
    assert (rows.batch(5, 4) == b1[5:9]).all()


def test_sources_and_errors(tmp_path, tok):
    jl = tmp_path / "c.jsonl"
    jl.write_text("\n".join(json.dumps({"text": f"print({i})\n"}) for i in range(5)))
    idx = build_corpus([str(jl)], tok, tmp_path / "d1", val_fraction=0)
    assert idx["summary"]["documents"]["train"] == 5
    with pytest.raises(DiffcoderError, match="--text-field"):
        build_corpus([str(jl)], tok, tmp_path / "d2", text_field="content")
    with pytest.raises(DiffcoderError, match="does not exist"):
        build_corpus([str(tmp_path / "nope")], tok, tmp_path / "d3")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DiffcoderError, match="no readable"):
        build_corpus([str(tmp_path / "empty")], tok, tmp_path / "d4")
    with pytest.raises(DiffcoderError, match="not a built dataset"):
        read_index(tmp_path / "empty")
    with pytest.raises(DiffcoderError, match="fewer than one row"):
        PackedRows(tmp_path / "d1", "train", seq_len=4096)


def test_parquet_source(tmp_path, tok):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"content": ["x = 1\n", "y = 2\n", "x = 1\n"]}), tmp_path / "c.parquet")
    idx = build_corpus([str(tmp_path / "c.parquet")], tok, tmp_path / "d", val_fraction=0, text_field="content")
    assert idx["summary"]["documents"]["train"] == 2 and idx["summary"]["duplicates_removed"] == 1


def test_python_env_source_finds_stdlib():
    files = resolve_source("python-env")
    names = {f.name for f in files}
    assert "os.py" in names and "json" in {f.parent.name for f in files}


def test_mined_pairs_and_chat_tokenization(tmp_path, tok):
    from diffcoder.training.data import Document

    pairs = list(mine_instruction_pairs(iter([Document("m.py", FUNC)])))
    assert len(pairs) == 1
    user, assistant = pairs[0]["messages"]
    assert "def area(w, h):" in user["content"] and "area of a w by h" in user["content"]
    assert "result = w * h" in assistant["content"] and "Return the area" not in assistant["content"]
    prompt, response = tokenize_chat(tok, pairs[0]["messages"])
    assert tok.decode(prompt).endswith("<|im_start|>assistant\n")
    assert response[-1] == tok.eos_token_id and tok.eos_token_id not in response[:-1]
    assert tok.decode(response[:-1]) == assistant["content"]


def test_sft_build_and_rows(tmp_path, tok):
    src = tmp_path / "src"
    src.mkdir()
    (src / "m.py").write_text(FUNC + FUNC.replace("area", "volume"))
    idx = build_sft([str(src)], tok, tmp_path / "sft", mine=True, val_fraction=0)
    assert idx["summary"]["train"] == 2
    rows = SFTRows(tmp_path / "sft", "train", seq_len=256, seed=0, pad_id=0)
    n_eos = []
    for k in range(40):
        ids, elig = rows.batch(k, 1)
        ids, elig = ids[0], elig[0]
        s = rows.samples[rows.draw(k)]
        p, r = len(s["prompt"]), len(s["response"])
        assert not elig[:p].any() and elig[p: p + r].all()  # prompt clean, response scored
        extra = int(elig.sum()) - r
        assert (ids[p + r: p + r + extra] == tok.eos_token_id).all()
        n_eos.append(extra)
    assert set(n_eos) == {1, 2, 3, 4}  # 1-4 random trailing EOS
    chat = tmp_path / "chat.jsonl"
    chat.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    with pytest.raises(DiffcoderError, match="assistant"):
        build_sft([str(chat)], tok, tmp_path / "sft2")
