"""Distillation from a float teacher with DistillationSFTTrainer, in stage A and stage B."""

import copy

import pytest
import torch
from conftest import qat_modules, tiny_qwen3, tiny_sft_config, write_alpaca_file, write_tiny_base
from datasets import Dataset
from torchao.quantization import quantize_
from trl import SFTConfig, SFTTrainer

from peft_qat2bit import EMACallback, QAT2BitConfig, QATLoraConfig
from peft_qat2bit.data import alpaca_to_chat
from peft_qat2bit.distill import DistillationSFTTrainer, distillation_kl_sum


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def sft_config(tmp_path, **overrides):
    return tiny_sft_config(tmp_path, **overrides)


def chat_dataset(rows):
    return alpaca_to_chat(Dataset.from_list(rows))


def qat_student(tokenizer, seed=0):
    model = tiny_qwen3(seed=seed, vocab_size=len(tokenizer))
    quantize_(model, QAT2BitConfig())
    return model


def first_batch(trainer):
    batch = next(iter(trainer.get_train_dataloader()))
    return {key: value.to(trainer.args.device) for key, value in batch.items()}


def batch_kl(trainer, batch):
    trainer.model.eval()
    with torch.no_grad():
        student = trainer.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        teacher = trainer.teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    kl_sum, count = distillation_kl_sum(student, teacher, batch["labels"])
    return (kl_sum / count).item()


def test_kl_of_identical_logits_is_zero():
    logits = torch.randn(2, 5, 11)
    labels = torch.tensor([[-100, 1, 2, 3, 4], [-100, -100, 5, 6, -100]])
    kl_sum, count = distillation_kl_sum(logits, logits.clone(), labels)
    assert kl_sum.item() == 0.0
    assert count == 6


def test_kl_matches_definition():
    student = torch.randn(1, 3, 7)
    teacher = torch.randn(1, 3, 7)
    labels = torch.tensor([[-100, 4, 2]])
    kl_sum, _ = distillation_kl_sum(student, teacher, labels, temperature=2.0)
    p = torch.softmax(teacher[0, :2] / 2.0, dim=-1)
    expected = (p * (torch.log(p) - torch.log_softmax(student[0, :2] / 2.0, dim=-1))).sum()
    torch.testing.assert_close(kl_sum, expected, rtol=1e-5, atol=1e-6)


def test_label_only_equals_sft_loss(tokenizer, alpaca_rows, tmp_path):
    student = qat_student(tokenizer)
    dataset = chat_dataset(alpaca_rows)
    plain = SFTTrainer(model=student, args=sft_config(tmp_path), train_dataset=dataset, processing_class=tokenizer)
    distilled = DistillationSFTTrainer(
        model=student,
        args=sft_config(tmp_path),
        train_dataset=dataset,
        processing_class=tokenizer,
        teacher=tiny_qwen3(seed=1, vocab_size=len(tokenizer)),
        alpha=1.0,
    )
    batch = first_batch(plain)
    student.eval()
    with torch.no_grad():
        plain_loss = plain.compute_loss(student, dict(batch))
        distilled_loss = distilled.compute_loss(student, dict(batch))
    torch.testing.assert_close(distilled_loss, plain_loss, rtol=1e-5, atol=1e-6)


def test_identical_teacher_gives_zero_kl(tokenizer, alpaca_rows, tmp_path):
    student = tiny_qwen3(vocab_size=len(tokenizer))
    trainer = DistillationSFTTrainer(
        model=student,
        args=sft_config(tmp_path),
        train_dataset=chat_dataset(alpaca_rows),
        processing_class=tokenizer,
        teacher=copy.deepcopy(student),
        alpha=0.0,
    )
    assert batch_kl(trainer, first_batch(trainer)) < 1e-6


def sharp_teacher(tokenizer):
    """Return a tiny float model whose scaled (tied) output embedding gives a peaked next-token distribution."""
    teacher = tiny_qwen3(seed=1, vocab_size=len(tokenizer))
    with torch.no_grad():
        teacher.get_output_embeddings().weight.mul_(30.0)
    return teacher


def test_training_lowers_kl(tokenizer, alpaca_rows, tmp_path):
    teacher = sharp_teacher(tokenizer)
    student = qat_student(tokenizer)
    trainer = DistillationSFTTrainer(
        model=student,
        args=sft_config(tmp_path, max_steps=16, learning_rate=3e-3),
        train_dataset=chat_dataset(alpaca_rows),
        processing_class=tokenizer,
        teacher=teacher,
        alpha=0.0,
        temperature=2.0,
    )
    batch = first_batch(trainer)
    kl_before = batch_kl(trainer, batch)
    trainer.train()
    kl_after = batch_kl(trainer, batch)
    assert kl_after < 0.8 * kl_before
    assert any("distill/kl" in record for record in trainer.state.log_history)


def test_stage_b_with_ema_keeps_base(tokenizer, alpaca_rows, tmp_path):
    teacher = tiny_qwen3(vocab_size=len(tokenizer))
    student = copy.deepcopy(teacher)
    quantize_(student, QAT2BitConfig())
    base_before = {name: layer.weight.detach().clone() for name, layer in qat_modules(student).items()}
    ema = EMACallback(decay=0.9)
    trainer = DistillationSFTTrainer(
        model=student,
        args=sft_config(tmp_path, max_steps=3, learning_rate=1e-3),
        train_dataset=chat_dataset(alpaca_rows),
        processing_class=tokenizer,
        peft_config=QATLoraConfig(r=4, lora_alpha=4),
        callbacks=[ema],
        teacher=teacher,
        alpha=0.5,
    )
    trainer.train()
    trainable = {name for name, param in trainer.model.named_parameters() if param.requires_grad}
    assert trainable and all("lora_" in name for name in trainable)
    assert set(ema.state_dict()) == trainable
    for name, layer in qat_modules(trainer.model).items():
        assert torch.equal(layer.weight, base_before[name.replace("base_model.model.", "").replace(".base_layer", "")])


def test_other_vocabulary_raises(tokenizer, alpaca_rows, tmp_path):
    with pytest.raises(ValueError, match="teacher's vocabulary has 300 entries"):
        DistillationSFTTrainer(
            model=qat_student(tokenizer),
            args=sft_config(tmp_path),
            train_dataset=chat_dataset(alpaca_rows),
            processing_class=tokenizer,
            teacher=tiny_qwen3(vocab_size=300),
        )


def test_invalid_alpha_raises(tokenizer, alpaca_rows, tmp_path):
    with pytest.raises(ValueError, match="alpha=1.5 is invalid"):
        DistillationSFTTrainer(
            model=qat_student(tokenizer),
            args=sft_config(tmp_path),
            train_dataset=chat_dataset(alpaca_rows),
            processing_class=tokenizer,
            teacher=tiny_qwen3(vocab_size=len(tokenizer)),
            alpha=1.5,
        )


def test_train_qat_script_distills(tokenizer, alpaca_rows, tmp_path):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
    from train_qat import QATArguments, main
    from trl import ModelConfig, ScriptArguments, TrlParser

    from peft_qat2bit.distill import DistillArguments

    model_dir = write_tiny_base(tmp_path / "base", tokenizer)
    data_file = write_alpaca_file(tmp_path, alpaca_rows)

    parser = TrlParser((ScriptArguments, SFTConfig, ModelConfig, QATArguments, DistillArguments))
    parsed = parser.parse_args_and_config(
        args=[
            "--model_name_or_path", str(model_dir),
            "--dataset_name", str(data_file),
            "--output_dir", str(tmp_path / "out"),
            "--max_steps", "2",
            "--per_device_train_batch_size", "4",
            "--assistant_only_loss", "true",
            "--max_length", "64",
            "--report_to", "none",
            "--use_cpu", "true",
            "--bf16", "false",
            "--save_strategy", "no",
            "--distill", "true",
            "--distill_alpha", "0.3",
            "--distill_temperature", "2.0",
        ]
    )
    trainer = main(*parsed)
    assert isinstance(trainer, DistillationSFTTrainer)
    assert (trainer.alpha, trainer.temperature) == (0.3, 2.0)
    assert any("distill/kl" in record for record in trainer.state.log_history)
