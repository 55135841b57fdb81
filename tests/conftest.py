"""Shared fixtures: tiny Qwen3 models, a small offline tokenizer with Qwen3's chat template, Alpaca rows."""

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM
from trl.chat_template_utils import qwen3_chat_template

# torch.compile on a CPU builds its kernels with a C++ compiler (Inductor looks at $CXX, then g++ and clang++).
requires_cpp_compiler = pytest.mark.skipif(
    not any(shutil.which(name) for name in (os.environ.get("CXX", ""), "g++", "clang++", "c++") if name),
    reason="torch.compile needs a C++ compiler on a CPU, and none was found",
)

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


def qat_model_with_trained_f(granularity="per_tensor", group_size=None, seed=0, **overrides):
    """Return a tiny Qwen3 after prepare, with every f moved off its Newton value as training would."""
    from torchao.quantization import quantize_

    from peft_qat2bit import Balanced2BitFakeQuantizeConfig, QAT2BitConfig

    model = tiny_qwen3(seed=seed, **overrides)
    quantize_(model, QAT2BitConfig(Balanced2BitFakeQuantizeConfig(granularity, group_size=group_size)))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in qat_modules(model).values():
            f = module.weight_fake_quantizer.f
            f.mul_(1.0 + 0.1 * torch.rand(f.shape, generator=generator))
    return model


def qat_modules(model):
    from peft_qat2bit import QATLinear

    return {name: module for name, module in model.named_modules() if isinstance(module, QATLinear)}


def token_ids():
    """Return a fixed (2, 16) batch of token ids below 512, the default tiny vocabulary."""
    generator = torch.Generator().manual_seed(0)
    return torch.randint(0, 512, (2, 16), generator=generator)


def logits_of(model):
    with torch.no_grad():
        return model(token_ids()).logits


def randomize_lora_b(model, seed):
    """Give every LoRA B a non-zero value, so that adapters change the output."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)


def tiny_sft_config(output_dir, **overrides):
    """Return an SFTConfig for a few fp32 CPU steps on the Alpaca test rows, with the given overrides."""
    from trl import SFTConfig

    settings = dict(
        output_dir=str(output_dir),
        max_steps=6,
        per_device_train_batch_size=4,
        learning_rate=5e-3,
        lr_scheduler_type="constant",
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        assistant_only_loss=True,
        max_length=64,
        use_cpu=True,
        bf16=False,
        disable_tqdm=True,
        seed=0,
        data_seed=0,
    )
    settings.update(overrides)
    return SFTConfig(**settings)


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


def write_alpaca_file(directory, rows=ALPACA_ROWS) -> Path:
    """Write ``rows`` as ``alpaca.json`` in ``directory``, the file the example scripts read with --dataset_name."""
    path = Path(directory) / "alpaca.json"
    path.write_text(json.dumps(rows))
    return path


def write_tiny_base(directory, tokenizer) -> Path:
    """Save a tiny Qwen3 and ``tokenizer`` to ``directory`` as a model the example scripts load by path."""
    tiny_qwen3(vocab_size=len(tokenizer)).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return Path(directory)
