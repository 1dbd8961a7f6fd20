"""FIM in the data build (share, layout, ids in the index) and in training (the model gets the tokens; LoRA trains
their rows), end to end on the tiny model."""

from __future__ import annotations

import json
import math
import random

import numpy as np
import pytest
import torch
from train_helpers import base_overrides

from diffcoder.errors import ConfigError
from diffcoder.fim import FIM_TOKENS, FimTokens, split_fim_ids
from diffcoder.training.config import load_config
from diffcoder.training.data import build_corpus, load_tokenizer, read_index
from diffcoder.training.trainer import Trainer, train


def write_docs(root, n: int, seed: int = 0) -> dict[str, str]:
    r = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    texts = {}
    for i in range(n):
        body = "".join(f"def f{i}_{j}(x):\n    return x * {r.randint(0, 999)}\n" for j in range(r.randint(1, 4)))
        (root / f"m{i:04d}.py").write_text(body)
        texts[f"m{i:04d}.py"] = body
    return texts


def stored_documents(data_dir) -> list[list[int]]:
    index = read_index(data_dir)
    docs = []
    for split in ("train", "val"):
        for sh in index["shards"].get(split, []):
            stream = np.fromfile(data_dir / sh["file"], dtype=index["dtype"]).tolist()
            cur: list[int] = []
            for t in stream:
                if t == index["eos_token_id"]:
                    docs.append(cur)
                    cur = []
                else:
                    cur.append(t)
    return docs


def test_fim_share_layout_and_index(tmp_path, tiny_setup):
    texts = write_docs(tmp_path / "src", 600)
    tok = load_tokenizer(str(tiny_setup["base"]))
    assert len(tok) == 384
    rate = 0.5
    idx = build_corpus([str(tmp_path / "src")], tok, tmp_path / "data", val_fraction=0.05, fim_rate=rate)
    fim = FimTokens.from_dict(idx["fim"]["tokens"])
    assert fim.names == FIM_TOKENS and fim.ids == (384, 385, 386) and idx["vocab_size"] == 387
    assert idx["fim"]["rate"] == rate
    docs = stored_documents(tmp_path / "data")
    assert len(docs) == 600
    fim_docs = [d for d in docs if d and d[0] == fim.prefix_id]
    # the share is Binomial(n, rate): within 4 standard deviations
    n = len(docs)
    assert abs(len(fim_docs) - n * rate) <= 4 * math.sqrt(n * rate * (1 - rate))
    assert sum(idx["summary"]["fim_documents"].values()) == len(fim_docs)
    originals = set(texts.values())
    for d in docs:
        if d and d[0] == fim.prefix_id:
            p, m, s = (tok.decode(x, clean_up_tokenization_spaces=False) for x in split_fim_ids(d, fim))
            assert p + m + s in originals
        else:
            assert not set(d) & set(fim.ids)  # plain documents carry no FIM token
            assert tok.decode(d, clean_up_tokenization_spaces=False) in originals
    # the same build again gives the same documents (draws seeded by content)
    again = build_corpus([str(tmp_path / "src")], load_tokenizer(str(tiny_setup["base"])), tmp_path / "data2",
                         val_fraction=0.05, fim_rate=rate)
    assert again["summary"] == idx["summary"] and stored_documents(tmp_path / "data2") == docs


def test_fim_rates_zero_and_one_and_literal_tokens(tmp_path, tiny_setup):
    src = tmp_path / "src"
    write_docs(src, 20)
    (src / "literal.py").write_text('MARK = "<|fim_prefix|>"  # text, not a control token\n')
    none = build_corpus([str(src)], load_tokenizer(str(tiny_setup["base"])), tmp_path / "d0", val_fraction=0)
    assert "fim" not in none and none["vocab_size"] == 384
    tok = load_tokenizer(str(tiny_setup["base"]))
    all_fim = build_corpus([str(src)], tok, tmp_path / "d1", val_fraction=0, fim_rate=1.0)
    fim = FimTokens.from_dict(all_fim["fim"]["tokens"])
    docs = stored_documents(tmp_path / "d1")
    assert len(docs) == 21 and all(d[0] == fim.prefix_id for d in docs)
    assert all(sum(t in fim.ids for t in d) == 3 for d in docs)  # one of each FIM token per document
    # a tokenizer that has the FIM tokens still reads their spelling in a document as text
    build_corpus([str(src)], tok, tmp_path / "d2", val_fraction=0, fim_rate=0.0)
    assert not any(set(d) & set(fim.ids) for d in stored_documents(tmp_path / "d2"))
    with pytest.raises(ConfigError, match="fim_rate"):
        build_corpus([str(src)], tok, tmp_path / "d3", fim_rate=1.5)


@pytest.fixture(scope="module")
def fim_data(tmp_path_factory, tiny_setup):
    root = tmp_path_factory.mktemp("fim")
    write_docs(root / "src", 80, seed=1)
    build_corpus([str(root / "src")], load_tokenizer(str(tiny_setup["base"])), root / "data", val_fraction=0.1,
                 fim_rate=0.5)
    return root / "data"


def test_cpt_with_fim_full_finetune_saves_and_reloads_the_tokens(tiny_setup, fim_data, tmp_path):
    import diffcoder

    cfg = load_config(None, base_overrides(tiny_setup, tmp_path / "run", **{
        "data.path": fim_data, "train.steps": 4, "objective.warmup_steps": 0}))
    tr = Trainer(cfg, quiet=True)
    assert tr.fim_ids == [384, 385, 386] and tr.model.config.vocab_size == 387
    emb0 = tr.model.model.embed_tokens.weight.detach().clone()
    assert torch.allclose(emb0[384], emb0[:384].mean(0), atol=1e-6)  # mean-row init
    res = tr.run()
    assert res["last"]["loss"] > 0 and res["eval"]["eval_nelbo"] > 0
    model, tok = diffcoder.load(tmp_path / "run" / "final")
    assert model.config.vocab_size == 387
    assert [tok.convert_tokens_to_ids(n) for n in FIM_TOKENS] == [384, 385, 386]
    assert not torch.equal(model.model.embed_tokens.weight[384:387], emb0[384:387])  # the rows learned
    added = json.loads((tmp_path / "run" / "final" / "tokenizer.json").read_text())["added_tokens"]
    assert {(a["content"], a["id"], a["special"]) for a in added} >= {(n, 384 + i, True) for i, n in
                                                                      enumerate(FIM_TOKENS)}


def test_cpt_with_fim_lora_trains_the_new_rows_in_full(tiny_setup, fim_data, tmp_path):
    cfg = load_config(None, base_overrides(tiny_setup, tmp_path / "run", **{
        "data.path": fim_data, "train.steps": 4, "objective.warmup_steps": 0, "lora.enabled": True,
        "lora.rank": 4, "optim.lr": 1e-2}))
    tr = Trainer(cfg, quiet=True)
    assert tr.model._lora_config["trainable_token_indices"] == [3, 384, 385, 386]
    emb0 = tr.model.model.embed_tokens.weight.detach().clone()
    tr.run()
    emb = tr.model.model.embed_tokens.weight.detach()
    changed = (emb != emb0).any(-1).nonzero().flatten().tolist()
    assert changed == [3, 384, 385, 386]  # the mask and FIM rows, nothing else
    from diffcoder.checkpoint import load_tokenizer as load_dir_tokenizer

    tok = load_dir_tokenizer(tmp_path / "run" / "final")
    assert [tok.convert_tokens_to_ids(n) for n in FIM_TOKENS] == [384, 385, 386]


def test_fim_ids_that_the_model_cannot_match_are_refused(tiny_setup, tmp_path):
    tok = load_tokenizer(str(tiny_setup["base"]))
    tok.add_tokens(["<|other|>"], special_tokens=True)  # shifts the FIM ids by one
    write_docs(tmp_path / "src", 10)
    build_corpus([str(tmp_path / "src")], tok, tmp_path / "data", val_fraction=0, fim_rate=0.5)
    cfg = load_config(None, base_overrides(tiny_setup, tmp_path / "run", **{"data.path": tmp_path / "data"}))
    with pytest.raises(ConfigError, match="rebuild the data with --tokenizer"):
        train(cfg, quiet=True)


def test_lora_fim_resume_restores_the_token_rows(tiny_setup, fim_data, tmp_path):
    """Resuming a LoRA run restores every fully trained row (mask and FIM), so the curve continues exactly."""
    ov = {"data.path": fim_data, "train.steps": 4, "objective.warmup_steps": 0, "lora.enabled": True,
          "lora.rank": 4, "optim.lr": 1e-2, "train.eval_every": 0}
    ref = Trainer(load_config(None, base_overrides(tiny_setup, tmp_path / "ref", **ov)), quiet=True)
    ref_losses = [ref.train_step()["loss"] for _ in range(4)]
    cut = Trainer(load_config(None, base_overrides(tiny_setup, tmp_path / "cut", **ov)), quiet=True)
    for _ in range(2):
        cut.train_step()
    cut.save()
    resumed = Trainer(load_config(None, base_overrides(tiny_setup, tmp_path / "cut", **ov)), resume=True,
                      quiet=True)
    assert resumed.step == 2
    assert torch.equal(resumed.model.model.embed_tokens.weight, cut.model.model.embed_tokens.weight)
    assert [resumed.train_step()["loss"] for _ in range(2)] == ref_losses[2:]


def test_sft_continues_the_cpt_adapter(tiny_setup, fim_data, tmp_path):
    """The GPU recipe's two stages in small: LoRA CPT on FIM data, then SFT with lora.init_from the CPT run (its
    LoRA matrices, token rows and FIM tokens carry over; SFT data tokenized with the CPT adapter's tokenizer)."""
    from diffcoder.training.data import build_sft
    from diffcoder.training.lora import lora_modules

    lora = {"lora.enabled": True, "lora.rank": 4, "optim.lr": 1e-2, "objective.warmup_steps": 0}
    cpt = Trainer(load_config(None, base_overrides(tiny_setup, tmp_path / "cpt", **{
        "data.path": fim_data, "train.steps": 3, **lora})), quiet=True)
    cpt.run()
    src = tmp_path / "src"
    src.mkdir()
    for i in range(10):
        (src / f"m{i}.py").write_text(f'def add{i}(a, b):\n    """Add {i} to a plus b."""\n    s = a + b\n'
                                      f'    return s + {i}\n')
    build_sft([str(src)], load_tokenizer(str(tmp_path / "cpt" / "final")), tmp_path / "sft", mine=True,
              val_fraction=0.2)
    sft = Trainer(load_config(None, base_overrides(tiny_setup, tmp_path / "sft-run", **{
        "data.kind": "sft", "data.path": tmp_path / "sft", "data.seq_len": 128, "train.steps": 2,
        "lora.init_from": tmp_path / "cpt", **lora})), quiet=True)
    assert sft.fim_ids == [384, 385, 386]
    rows = [3, 384, 385, 386]
    assert torch.equal(sft.model.model.embed_tokens.weight[rows], cpt.model.model.embed_tokens.weight[rows])
    got, want = lora_modules(sft.model), lora_modules(cpt.model)
    assert all(torch.equal(got[k].lora_B, want[k].lora_B) and torch.equal(got[k].lora_A, want[k].lora_A)
               for k in want)
    assert any(want[k].lora_B.abs().sum() > 0 for k in want)  # the CPT adapter had learned something
    assert sft.run()["last"]["loss"] > 0
    with pytest.raises(ConfigError, match="needs lora.enabled"):
        load_config(None, base_overrides(tiny_setup, tmp_path / "x", **{"lora.init_from": tmp_path / "cpt"}))
    with pytest.raises(ConfigError, match="neither a LoRA adapter"):
        Trainer(load_config(None, base_overrides(tiny_setup, tmp_path / "y", **{
            "lora.enabled": True, "lora.init_from": tmp_path / "src"})), quiet=True)
