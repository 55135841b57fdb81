"""Real SFTTrainer runs of stage A on a tiny Qwen3 model: loss, f, weight decay, EMA and resume."""

import logging
from pathlib import Path

import pytest
import torch
from conftest import requires_cpp_compiler, tiny_qwen3, tiny_sft_config, write_alpaca_file, write_tiny_base
from datasets import Dataset
from torchao.quantization import quantize_
from transformers import TrainerCallback
from trl import SFTConfig, SFTTrainer

from peft_qat2bit import (
    Balanced2BitFakeQuantizeConfig,
    EMACallback,
    QAT2BitConfig,
    QATStatsCallback,
    load_qat_model,
    qat_linears,
)
from peft_qat2bit.callbacks import EMA_FILE
from peft_qat2bit.data import alpaca_to_chat
from peft_qat2bit.optim import build_qat_optimizer


class ParameterRecorder(TrainerCallback):
    """Record a copy of every trainable parameter at the start and after each optimizer step."""

    def __init__(self):
        self.snapshots: list[dict[str, torch.Tensor]] = []

    def _record(self, model):
        self.snapshots.append(
            {name: param.detach().double().clone() for name, param in model.named_parameters() if param.requires_grad}
        )

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._record(model)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self._record(model)


def make_trainer(tokenizer, rows, output_dir, callbacks=(), seed=0, weight_config=None, **config_overrides):
    model = tiny_qwen3(seed=seed, vocab_size=len(tokenizer))
    quantize_(model, QAT2BitConfig(weight_config=weight_config or Balanced2BitFakeQuantizeConfig()))
    args = tiny_sft_config(output_dir, seed=seed, data_seed=seed, **config_overrides)
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=alpaca_to_chat(Dataset.from_list(rows)),
        eval_dataset=alpaca_to_chat(Dataset.from_list(rows)),
        processing_class=tokenizer,
        callbacks=list(callbacks),
        optimizers=(build_qat_optimizer(model, args, f_learning_rate=2e-2), None),
    )
    trainer.add_callback(QATStatsCallback(trainer))
    return trainer


def trainable_state(model):
    return {name: param.detach().clone() for name, param in model.named_parameters() if param.requires_grad}


def test_sft_lowers_loss_and_updates_f(tokenizer, alpaca_rows, tmp_path):
    trainer = make_trainer(tokenizer, alpaca_rows, tmp_path)
    loss_before = trainer.evaluate()["eval_loss"]
    f_before = {name: layer.weight_fake_quantizer.f.detach().clone() for name, layer in qat_linears(trainer.model).items()}

    trainer.train()

    loss_after = trainer.evaluate()["eval_loss"]
    assert loss_after < loss_before - 0.1
    for name, layer in qat_linears(trainer.model).items():
        assert not torch.equal(layer.weight_fake_quantizer.f, f_before[name]), name


@requires_cpp_compiler
def test_compiled_quantizer_trains_like_eager(tokenizer, alpaca_rows, tmp_path):
    finals = []
    for compile in (False, True):
        weight_config = Balanced2BitFakeQuantizeConfig("per_channel", compile=compile)
        trainer = make_trainer(tokenizer, alpaca_rows, tmp_path / str(compile), weight_config=weight_config, max_steps=3)
        trainer.train()
        finals.append(trainable_state(trainer.model))

    eager, compiled = finals
    assert eager.keys() == compiled.keys()
    for name in eager:
        # Only the order of the f-gradient sums may differ, so three steps stay within float noise.
        assert torch.allclose(compiled[name], eager[name], rtol=1e-4, atol=1e-6), name


def test_optimizer_has_no_weight_decay(tokenizer, alpaca_rows, tmp_path):
    trainer = make_trainer(tokenizer, alpaca_rows, tmp_path, max_steps=1)
    trainer.train()
    groups = trainer.optimizer.param_groups
    assert [group["weight_decay"] for group in groups] == [0.0, 0.0]
    assert groups[1]["lr"] == 2e-2
    f_ids = {id(layer.weight_fake_quantizer.f) for layer in qat_linears(trainer.model).values()}
    assert {id(param) for param in groups[1]["params"]} == f_ids


def test_nonzero_weight_decay_warns(tokenizer, alpaca_rows, tmp_path, caplog):
    trainer = make_trainer(tokenizer, alpaca_rows, tmp_path, max_steps=1, weight_decay=0.1)
    with caplog.at_level(logging.WARNING, logger="peft_qat2bit.callbacks"):
        trainer.train()
    assert "weight_decay=0.1" in caplog.text


def test_stats_in_log_history(tokenizer, alpaca_rows, tmp_path):
    trainer = make_trainer(tokenizer, alpaca_rows, tmp_path, max_steps=2)
    trainer.train()
    stats_records = [record for record in trainer.state.log_history if "qat/mean_f" in record]
    loss_records = [record for record in trainer.state.log_history if "loss" in record]
    assert [record["step"] for record in stats_records] == [1, 2]
    assert [record["step"] for record in loss_records] == [1, 2]
    levels = [stats_records[-1][f"qat/level_{level:+.1f}"] for level in (-1.5, -0.5, 0.5, 1.5)]
    assert sum(levels) == pytest.approx(1.0)


def test_ema_matches_hand_computed(tokenizer, alpaca_rows, tmp_path):
    decay = 0.8
    recorder = ParameterRecorder()
    ema = EMACallback(decay=decay)
    trainer = make_trainer(tokenizer, alpaca_rows, tmp_path, callbacks=[recorder, ema], max_steps=4)
    trainer.train()

    assert len(recorder.snapshots) == 5
    expected = dict(recorder.snapshots[0])
    for snapshot in recorder.snapshots[1:]:
        expected = {name: decay * expected[name] + (1 - decay) * snapshot[name] for name in expected}
    averages = ema.state_dict()
    assert set(averages) == set(expected)
    for name, value in expected.items():
        torch.testing.assert_close(averages[name].double(), value, rtol=1e-6, atol=1e-7, msg=name)


def test_ema_apply_at_end_writes_average(tokenizer, alpaca_rows, tmp_path):
    ema = EMACallback(decay=0.5, apply_at_end=True)
    trainer = make_trainer(tokenizer, alpaca_rows, tmp_path, callbacks=[ema], max_steps=2)
    trainer.train()
    averages = ema.state_dict()
    for name, param in trainer.model.named_parameters():
        if param.requires_grad:
            assert torch.equal(param.detach(), averages[name].to(param.dtype)), name


def test_resume_matches_uninterrupted_run(tokenizer, alpaca_rows, tmp_path):
    full_ema = EMACallback(decay=0.7)
    full = make_trainer(
        tokenizer, alpaca_rows, tmp_path / "full", callbacks=[full_ema], save_strategy="steps", save_steps=3
    )
    full.train()
    checkpoint = tmp_path / "full" / "checkpoint-3"
    assert (checkpoint / EMA_FILE).is_file()

    resumed_ema = EMACallback(decay=0.7, resume_from=str(checkpoint))
    resumed = make_trainer(
        tokenizer, alpaca_rows, tmp_path / "resumed", callbacks=[resumed_ema], save_strategy="steps", save_steps=3
    )
    resumed.train(resume_from_checkpoint=str(checkpoint))

    full_state = trainable_state(full.model)
    resumed_state = trainable_state(resumed.model)
    for name in full_state:
        torch.testing.assert_close(resumed_state[name], full_state[name], rtol=0, atol=1e-7, msg=name)
    full_averages = full_ema.state_dict()
    for name, average in resumed_ema.state_dict().items():
        torch.testing.assert_close(average, full_averages[name], rtol=0, atol=1e-7, msg=name)


def test_resume_without_ema_state_raises(tokenizer, alpaca_rows, tmp_path):
    first = make_trainer(tokenizer, alpaca_rows, tmp_path, save_strategy="steps", save_steps=3, max_steps=3)
    first.train()
    second = make_trainer(tokenizer, alpaca_rows, tmp_path, callbacks=[EMACallback(decay=0.9)])
    with pytest.raises(FileNotFoundError, match="no EMA state was found"):
        second.train(resume_from_checkpoint=str(tmp_path / "checkpoint-3"))


def test_trainer_checkpoint_loads_with_layout(tokenizer, alpaca_rows, tmp_path):
    trainer = make_trainer(tokenizer, alpaca_rows, tmp_path, save_strategy="steps", save_steps=2, max_steps=2)
    trainer.train()
    loaded = load_qat_model(str(tmp_path / "checkpoint-2"))
    assert loaded.config.qat2bit["modules"].keys() == qat_linears(trainer.model).keys()
    batch = torch.randint(0, len(tokenizer), (2, 12))
    trainer.model.eval()
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=batch).logits, trainer.model(input_ids=batch).logits)


def test_ema_rejects_invalid_decay():
    with pytest.raises(ValueError, match="decay must be in"):
        EMACallback(decay=1.0)


def test_train_qat_script_runs(tokenizer, alpaca_rows, tmp_path):
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
    from train_qat import QATArguments, main
    from trl import ModelConfig, ScriptArguments, TrlParser

    model_dir = write_tiny_base(tmp_path / "base", tokenizer)
    data_file = write_alpaca_file(tmp_path, alpaca_rows)
    output_dir = tmp_path / "out"

    parser = TrlParser((ScriptArguments, SFTConfig, QATArguments, ModelConfig))
    script_args, training_args, qat_args, model_args = parser.parse_args_and_config(
        args=[
            "--model_name_or_path", str(model_dir),
            "--dataset_name", str(data_file),
            "--output_dir", str(output_dir),
            "--max_steps", "2",
            "--per_device_train_batch_size", "4",
            "--assistant_only_loss", "true",
            "--max_length", "64",
            "--granularity", "per_group",
            "--group_size", "32",
            "--ema_decay", "0.9",
            "--report_to", "none",
            "--use_cpu", "true",
            "--bf16", "false",
            "--save_strategy", "no",
        ]
    )
    trainer = main(script_args, training_args, model_args, qat_args)

    loaded = load_qat_model(str(output_dir))
    layers = qat_linears(loaded)
    assert len(layers) == 14
    assert {layer.weight_config.group_size for layer in layers.values()} == {32}
    batch = torch.randint(0, len(tokenizer), (1, 10))
    trainer.model.eval()
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=batch).logits, trainer.model(input_ids=batch).logits)
