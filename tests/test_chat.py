"""Chat templates applied one way: the CLI, the server, SFT data and instruct benchmarks get the same ids."""

from __future__ import annotations

import pytest
import torch

from diffcoder.chat import NoChatTemplateError, chat_prompt_ids, token_ids
from diffcoder.testing import tiny_tokenizer

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Write quicksort."}]


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def test_ids_are_the_rendered_template_tokenized_without_extra_special_tokens(tok):
    text = tok.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    assert text.endswith("<|im_start|>assistant\n")
    assert chat_prompt_ids(tok, MESSAGES) == tok(text, add_special_tokens=False)["input_ids"]
    whole = chat_prompt_ids(tok, MESSAGES, add_generation_prompt=False)
    assert chat_prompt_ids(tok, MESSAGES)[: len(whole)] == whole and len(whole) < len(chat_prompt_ids(tok, MESSAGES))


def test_every_return_type_of_a_tokenizer_gives_the_same_list(tok):
    enc = tok("def f(): pass", add_special_tokens=False)
    want = list(enc["input_ids"])
    assert token_ids(enc) == token_ids(dict(enc)) == token_ids(want) == want
    assert token_ids(tok("def f(): pass", add_special_tokens=False, return_tensors="pt")) == want
    assert token_ids(torch.tensor([want])) == want
    batch = tok.apply_chat_template(MESSAGES, add_generation_prompt=True, return_tensors="pt")
    assert token_ids(batch) == chat_prompt_ids(tok, MESSAGES)


def test_cli_server_and_sft_lay_a_prompt_out_the_same_way(tok):
    from diffcoder.commands import encode_prompt
    from diffcoder.serving.prompts import PromptBuilder
    from diffcoder.serving.schemas import ChatRequest
    from diffcoder.training.data import tokenize_chat

    user = [{"role": "user", "content": "Write quicksort."}]
    cli = encode_prompt(tok, "Write quicksort.", chat=True)
    server = PromptBuilder(tok, len(tok), 4096).chat(ChatRequest(model="m", messages=user))
    sft_prompt, _ = tokenize_chat(tok, [*user, {"role": "assistant", "content": "def qs(xs): ..."}])
    assert cli == server == sft_prompt == chat_prompt_ids(tok, user)


def test_a_tokenizer_without_a_template_is_refused(tok):
    plain = tiny_tokenizer()
    plain.chat_template = None
    with pytest.raises(NoChatTemplateError, match="no chat template"):
        chat_prompt_ids(plain, MESSAGES)


def test_generate_takes_a_tokenizer_output_as_input_ids(tok):
    """What `apply_chat_template(..., return_tensors="pt")` returns (a BatchEncoding on transformers 5) goes
    straight into `model.generate`, as a tensor, one id list or a list of them does: the same ids come out."""
    from diffcoder.testing import tiny_model

    model = tiny_model(seed=3, vocab_size=len(tok), mask_token_id=tok.mask_token_id, eos_token_id=tok.eos_token_id)
    enc = tok.apply_chat_template(MESSAGES, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    ids = chat_prompt_ids(tok, MESSAGES)
    kw = {"steps": 8, "gen_length": 8, "block_length": 4, "eos_id": -1}
    want = model.generate(torch.tensor([ids]), **kw)
    for given in (enc, dict(enc), enc["input_ids"], ids, [ids]):
        assert torch.equal(model.generate(given, **kw), want), type(given)
