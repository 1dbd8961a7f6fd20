"""Infilling: the FIM prompt of every token naming, and `diffcoder.infill` end to end on tiny models with FIM tokens
(its middle is what `generate` makes of the same prompt, cut at the FIM end)."""

from __future__ import annotations

import pytest
import torch

import diffcoder
from diffcoder.decoding import generate
from diffcoder.errors import DecodingError, DiffcoderError
from diffcoder.fim import FIM_TOKENS, NoFimTokensError, find_fim_tokens, infill_prompt_ids
from diffcoder.infilling import infill, infill_batch, infill_settings
from diffcoder.testing import tiny_fim_tokenizer, tiny_model, tiny_tokenizer

PREFIX = "def add(a, b):\n    "
SUFFIX = "\n\nprint(add(1, 2))\n"

# (label, (prefix, suffix, middle) names, end-of-middle token, suffix first, BOS before the prompt)
NAMINGS = [
    ("ours", FIM_TOKENS, "<|fim_pad|>", False, False),
    ("starcoder", ("<fim_prefix>", "<fim_suffix>", "<fim_middle>"), "<fim_pad>", False, False),
    ("santacoder", ("<fim-prefix>", "<fim-suffix>", "<fim-middle>"), "<fim-pad>", False, False),
    ("seed-coder", ("<[fim-prefix]>", "<[fim-suffix]>", "<[fim-middle]>"), None, True, False),
    ("deepseek", ("<｜fim▁begin｜>", "<｜fim▁hole｜>", "<｜fim▁end｜>"), "<|EOT|>", False, True),
    ("codellama", ("▁<PRE>", "▁<SUF>", "▁<MID>"), "▁<EOT>", False, True),
]


@pytest.mark.parametrize("naming", NAMINGS, ids=[n[0] for n in NAMINGS])
def test_prompt_layout_of_each_naming(naming):
    _, names, end, suffix_first, bos = naming
    tok = tiny_fim_tokenizer(names, (end,) if end else (), bos=bos)
    fim = find_fim_tokens(tok)
    assert fim.names == names and fim.order == ("spm" if suffix_first else "psm")
    assert fim.end_ids == ((tok.convert_tokens_to_ids(end),) if end else ())
    p, s, m = (tok.convert_tokens_to_ids(n) for n in names)
    pre, suf = (tok(x, add_special_tokens=False)["input_ids"] for x in (PREFIX, SUFFIX))
    lead = [tok.bos_token_id] if bos else []
    want = lead + ([s, *suf, p, *pre, m] if suffix_first else [p, *pre, s, *suf, m])
    prompt = infill_prompt_ids(tok, PREFIX, SUFFIX)
    assert prompt == want
    # read back as text: the layout a reader of the model card expects
    pieces = [names[1], SUFFIX, names[0], PREFIX] if suffix_first else [names[0], PREFIX, names[1], SUFFIX]
    head = tok.bos_token if bos else ""
    assert tok.decode(prompt, clean_up_tokenization_spaces=False) == head + "".join(pieces) + names[2]


def test_text_that_spells_a_fim_token_stays_text():
    tok = tiny_fim_tokenizer()
    fim = find_fim_tokens(tok)
    prompt = infill_prompt_ids(tok, "s = '<|fim_suffix|>'\n", "<|fim_middle|>")
    assert [prompt.count(i) for i in fim.ids] == [1, 1, 1]


def test_no_fim_tokens_is_a_clear_error():
    tok = tiny_tokenizer()
    model = tiny_model(vocab_size=len(tok))
    with pytest.raises(NoFimTokensError) as err:
        diffcoder.infill(model, tok, PREFIX, SUFFIX, max_new_tokens=8)
    assert isinstance(err.value, DiffcoderError)
    msg = str(err.value)
    assert "fill-in-the-middle" in msg and "--fim-rate 0.5" in msg and "diffcoder train" in msg


def fim_model(names=None, extra=(), seed=0):
    tok = tiny_fim_tokenizer(names, extra)
    model = tiny_model(seed=seed, std=0.5, vocab_size=len(tok), mask_token_id=tok.mask_token_id,
                       eos_token_id=tok.eos_token_id)
    return model, tok


def reference_middle(model, tok, prompt, settings, ends) -> tuple[list[int], str]:
    """What `generate` makes of the prompt, cut at the first end token: the middle infill must return."""
    out = generate(model, [prompt], return_result=True, **{**settings.generate_kwargs(), "eos_id": -1})
    ids = out.generated[0].tolist()
    cut = next((i for i, t in enumerate(ids) if t in ends), len(ids))
    return ids[:cut], tok.decode(ids[:cut], skip_special_tokens=True, clean_up_tokenization_spaces=False)


@pytest.mark.parametrize("decoding", [{"max_new_tokens": 24}, {"max_new_tokens": 32, "threshold": 0.3},
                                      {"gen_length": 32, "steps": 16, "block_length": 8}],
                         ids=["one-per-step", "threshold", "two-per-step"])
@pytest.mark.parametrize("names", [FIM_TOKENS, ("<[fim-prefix]>", "<[fim-suffix]>", "<[fim-middle]>")],
                         ids=["psm", "spm"])
def test_infill_is_prefix_middle_suffix_and_matches_generate(names, decoding):
    model, tok = fim_model(names)
    res = diffcoder.infill(model, tok, PREFIX, SUFFIX, **decoding)
    assert res.text == PREFIX + res.middle + SUFFIX
    assert res.prompt_ids == infill_prompt_ids(tok, PREFIX, SUFFIX)
    ids, text = reference_middle(model, tok, res.prompt_ids, infill_settings(model, **decoding), {tok.eos_token_id})
    assert res.middle_ids == ids and res.middle == text
    assert res.finish_reason == ("stop" if len(ids) < res.settings.new_tokens else "length")
    assert res.forwards >= 1 and res.stats["tokens_per_forward"] > 0


def test_a_stop_token_ends_decoding_early():
    """With EOS set to a token the model writes mid-way, the middle ends there and later blocks are not decoded."""
    model, tok = fim_model()
    full = infill(model, tok, PREFIX, SUFFIX, max_new_tokens=40, eos_id=-1)
    assert full.finish_reason == "length" and len(full.middle_ids) == 40
    k = next(i for i in range(8, 40) if full.middle_ids[i] not in full.middle_ids[:i])
    stop_id = full.middle_ids[k]
    res = infill(model, tok, PREFIX, SUFFIX, max_new_tokens=40, eos_id=stop_id)
    assert res.middle_ids == full.middle_ids[:k] and res.finish_reason == "stop"
    assert res.text == PREFIX + res.middle + SUFFIX
    assert res.forwards < full.forwards and res.generated_tokens <= k + 4  # stopped at the block holding it


def test_the_checkpoints_end_of_middle_token_ends_the_middle():
    """A Qwen-style <|fim_pad|> ends the middle like EOS. The model is made to write it: the LM-head rows of the pad
    and of a token the model first writes mid-way are swapped, so the pad wins where that token did."""
    model, tok = fim_model(extra=("<|fim_pad|>",))
    pad = tok.convert_tokens_to_ids("<|fim_pad|>")
    assert find_fim_tokens(tok).end_ids == (pad,)
    ids = infill(model, tok, PREFIX, SUFFIX, max_new_tokens=40, eos_id=-1).middle_ids
    target = ids[next(i for i in range(12, 40) if ids[i] not in ids[:i])]
    with torch.no_grad():
        w = model.lm_head.weight
        w[[target, pad]] = w[[pad, target]]
    settings = infill_settings(model, max_new_tokens=40)
    res = infill(model, tok, PREFIX, SUFFIX, settings=settings)
    written = generate(model, [res.prompt_ids], return_result=True,
                       **{**settings.generate_kwargs(), "eos_id": -1}).generated[0].tolist()
    assert pad in written  # the surgery worked: the model writes the end token
    ids, text = reference_middle(model, tok, res.prompt_ids, settings, {pad, tok.eos_token_id})
    assert res.middle_ids == ids and res.middle == text and res.finish_reason == "stop"
    assert 12 <= len(ids) < 40 and pad not in res.middle_ids


def test_a_stop_string_cuts_the_middle():
    model, tok = fim_model()
    full = infill(model, tok, PREFIX, SUFFIX, max_new_tokens=40, eos_id=-1)
    # a piece of the middle that first appears after a few tokens
    k = next(i for i in range(6, 40) if (t := tok.decode([full.middle_ids[i]])).strip() and t not in
             tok.decode(full.middle_ids[:i]))
    piece = tok.decode([full.middle_ids[k]])
    res = infill(model, tok, PREFIX, SUFFIX, max_new_tokens=40, eos_id=-1, stop=["\x00never", piece])
    assert res.middle == full.middle[: full.middle.index(piece)] and res.finish_reason == "stop"
    assert res.text == PREFIX + res.middle + SUFFIX
    assert res.forwards < full.forwards


def test_settings_are_checked_by_name():
    model, tok = fim_model()
    with pytest.raises(DecodingError, match="block_length"):
        infill(model, tok, PREFIX, SUFFIX, block_length=0)
    with pytest.raises(DecodingError, match="steps"):
        infill(model, tok, PREFIX, SUFFIX, max_new_tokens=16, steps=3)
    with pytest.raises(DecodingError, match="not both"):
        infill(model, tok, PREFIX, SUFFIX, settings=infill_settings(model, max_new_tokens=8), threshold=0.5)
    with pytest.raises(DecodingError, match="unknown decoding setting"):
        infill(model, tok, PREFIX, SUFFIX, max_tokens=8)
    with pytest.raises(DecodingError, match="stop strings"):
        infill(model, tok, PREFIX, SUFFIX, stop=[""])


def test_sampling_with_a_seed_repeats():
    model, tok = fim_model()
    a = infill(model, tok, PREFIX, SUFFIX, max_new_tokens=16, temperature=1.0, seed=7)
    b = infill(model, tok, PREFIX, SUFFIX, max_new_tokens=16, temperature=1.0, seed=7)
    assert a.middle_ids == b.middle_ids and a.settings.seed == 7


def test_a_batch_of_gaps_gives_each_what_it_gets_alone():
    model, tok = fim_model()
    gaps = [(PREFIX, SUFFIX), ("x = ", "\n"), ("import os\n\n\ndef main():\n", "\n\nmain()\n")]
    full = infill(model, tok, *gaps[0], max_new_tokens=24, eos_id=-1)
    stop = [tok.decode([full.middle_ids[6]])]  # ends the first row early (rows leave the batch at different blocks)
    batch = infill_batch(model, tok, gaps, max_new_tokens=24, stop=stop)
    alone = [infill(model, tok, p, s, max_new_tokens=24, stop=stop) for p, s in gaps]
    assert [(r.middle_ids, r.middle, r.finish_reason) for r in batch] == [
        (r.middle_ids, r.middle, r.finish_reason) for r in alone]
    assert batch[0].finish_reason == "stop" and [r.text for r in batch] == [p + r.middle + s for (p, s), r in
                                                                          zip(gaps, batch)]
    with pytest.raises(DecodingError, match="no gaps"):
        infill_batch(model, tok, [])
