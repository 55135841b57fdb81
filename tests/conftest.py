"""Shared fixtures: tiny Qwen3 models, a small offline tokenizer with Qwen3's chat template, Alpaca rows."""

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM
from trl.chat_template_utils import qwen3_chat_template

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]

ALPACA_ROWS = [
    {"instruction": "Give three tips for staying healthy.", "input": "",
     "output": "Eat a balanced diet, exercise regularly and sleep well."},
    {"instruction": "Translate the sentence to French.", "input": "The cat sleeps.",
     "output": "Le chat dort."},
    {"instruction": "Add the two numbers.", "input": "2 and 3", "output": "2 plus 3 is 5."},
    {"instruction": "Name the capital of Italy.", "input": "", "output": "The capital of Italy is Rome."},
    {"instruction": "Write a haiku about rain.", "input": "",
     "output": "Soft rain on the roof, the garden drinks slowly, clouds drift to the east."},
    {"instruction": "Reverse the word.", "input": "stone", "output": "The word reversed is enots."},
    {"instruction": "Classify the animal.", "input": "whale", "output": "A whale is a mammal."},
    {"instruction": "Summarise the sentence.", "input": "The meeting moved from Monday to Friday at noon.",
     "output": "The meeting is now on Friday at noon."},
]


def tiny_qwen3_config(vocab_size: int = 512, **overrides) -> Qwen3Config:
    settings = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=256,
        tie_word_embeddings=True,
    )
    settings.update(overrides)
    return Qwen3Config(**settings)


def tiny_qwen3(seed: int = 0, **overrides) -> Qwen3ForCausalLM:
    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(tiny_qwen3_config(**overrides))
    return model.float().eval()


@pytest.fixture
def tiny_model():
    return tiny_qwen3()


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on the test rows and give it Qwen3's chat template and special tokens."""
    backend = Tokenizer(models.BPE(unk_token=None))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    corpus = [row["instruction"] + " " + row["input"] + " " + row["output"] for row in ALPACA_ROWS] * 4
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    backend.train_from_iterator(corpus, trainer=trainer)
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=SPECIAL_TOKENS[1:],
    )
    wrapped.chat_template = qwen3_chat_template
    return wrapped


@pytest.fixture(scope="session")
def tokenizer():
    return build_tokenizer()


@pytest.fixture
def alpaca_rows():
    return [dict(row) for row in ALPACA_ROWS]
