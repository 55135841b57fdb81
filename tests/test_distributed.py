"""Beyond one process: DDP runs of both example scripts, FSDP2, activation checkpointing, stage B resume.

The DDP tests start 2 CPU processes (gloo) with ``accelerate launch --multi_gpu``: with ``--cpu``,
accelerate 1.16 starts a single process unless an MPI hostfile is given, while ``--multi_gpu`` goes
through torchrun and the scripts' ``--use_cpu true`` makes the Trainer use gloo. Each run is compared
with a 1-process run of the same script at the same global batch (2 x 2 against 1 x 4). The sampler's
permutation depends only on the seed, and accelerate gives rank r the batches r, r + 2, ... of size 2,
so each global batch contains the same 4 rows. DDP averages the gradients and the Trainer divides the
loss by the token count gathered across ranks (``average_tokens_across_devices``, on by default), so
both runs make the same updates up to float rounding.
"""

import copy
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import distributed_worker
import pytest
import torch
from conftest import randomize_lora_b, tiny_qwen3, tiny_sft_config
from datasets import Dataset
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file
from torchao.quantization import quantize_
from transformers import TrainerCallback
from trl import SFTTrainer

from peft_qat2bit import (
    EMACallback,
    QAT2BitConfig,
    QATLoraConfig,
    load_qat_model,
    qat_linears,
    save_qat_model,
)
from peft_qat2bit.callbacks import EMA_FILE
from peft_qat2bit.checkpoint import F_SUFFIX
from peft_qat2bit.data import alpaca_to_chat

WORKER = Path(distributed_worker.__file__)
FSDP_WORKER = WORKER.with_name("fsdp_worker.py")
LAUNCH_TIMEOUT_S = 300
LOSS_RTOL = 1e-5
# DDP sums the gradients in another order than one process does. Adam divides each gradient by its own
# running RMS, so a rounding difference in a near-zero gradient grows to up to 2e-6 after 4 steps at
# learning rate 5e-3 (measured here), against a single step of up to 5e-3.
PARAM_ATOL = 1e-5
# The FSDP worker trains 3 steps at learning rate 5e-3 on random tokens. The sharded run and the
# reference differed by up to 2.3e-5 (measured here), for the same reason as above.
FSDP_PARAM_ATOL = 1e-4

COMMON_ARGS = [
    "--max_steps", "4",
    "--assistant_only_loss", "true",
    "--max_length", "64",
    "--lr_scheduler_type", "constant",
    "--logging_steps", "1",
    "--save_strategy", "steps",
    "--save_steps", "2",
    "--seed", "0",
    "--report_to", "none",
    "--use_cpu", "true",
    "--bf16", "false",
    "--disable_tqdm", "true",
]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch_two_processes(stage: str, report_dir: Path, script_args: list[str]) -> None:
    """Run the worker on 2 CPU processes with ``accelerate launch``; fail the test with its output on error."""
    command = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", str(free_port()),
        str(WORKER), stage, str(report_dir), "--", *script_args,
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run(command, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S, env=env, check=False)
    assert result.returncode == 0, f"accelerate launch failed:\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"


def read_report(report_dir: Path, rank: int) -> tuple[dict, dict[str, torch.Tensor]]:
    report = json.loads((report_dir / f"rank{rank}.json").read_text())
    return report, load_file(str(report_dir / f"rank{rank}.safetensors"))


def run_both(stage: str, root: Path, script_args: list[str]) -> dict:
    """Run ``stage`` on 2 processes (batch 2 each) and in this process (batch 4); return both reports."""
    launch_two_processes(
        stage, root / "report2", [*script_args, "--output_dir", str(root / "out2"), "--per_device_train_batch_size", "2"]
    )
    distributed_worker.run(
        stage, str(root / "report1"),
        [*script_args, "--output_dir", str(root / "out1"), "--per_device_train_batch_size", "4"],
    )
    return {
        "root": root,
        "ranks": [read_report(root / "report2", rank) for rank in (0, 1)],
        "single": read_report(root / "report1", 0),
    }


@pytest.fixture(scope="module")
def alpaca_file(tmp_path_factory):
    from conftest import write_alpaca_file

    return write_alpaca_file(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def qat_runs(tokenizer, alpaca_file, tmp_path_factory):
    root = tmp_path_factory.mktemp("qat")
    tiny_qwen3(vocab_size=len(tokenizer)).save_pretrained(root / "base")
    tokenizer.save_pretrained(root / "base")
    script_args = [
        "--model_name_or_path", str(root / "base"),
        "--dataset_name", str(alpaca_file),
        "--learning_rate", "5e-3",
        "--f_learning_rate", "2e-2",
        "--granularity", "per_channel",
        "--ema_decay", "0.8",
        *COMMON_ARGS,
    ]
    return run_both("qat", root, script_args)


@pytest.fixture(scope="module")
def lora_runs(tokenizer, alpaca_file, tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    model = tiny_qwen3(vocab_size=len(tokenizer))
    quantize_(model, QAT2BitConfig())
    save_qat_model(model, str(root / "stage_a"))
    tokenizer.save_pretrained(root / "stage_a")
    script_args = [
        "--qat_checkpoint", str(root / "stage_a"),
        "--dataset_name", str(alpaca_file),
        "--learning_rate", "1e-2",
        "--lora_r", "4",
        "--lora_dropout", "0",  # dropout masks differ between ranks and a single process
        *COMMON_ARGS,
    ]
    return run_both("lora", root, script_args)


# DDP, stage A


def test_ddp_qat_world_size(qat_runs):
    assert [report["world_size"] for report, _ in qat_runs["ranks"]] == [2, 2]


def test_ddp_qat_loss_matches_single(qat_runs):
    losses = qat_runs["ranks"][0][0]["losses"]
    expected = qat_runs["single"][0]["losses"]
    assert len(losses) == 4
    assert losses == pytest.approx(expected, rel=LOSS_RTOL)


def test_ddp_qat_params_match_single(qat_runs):
    params = qat_runs["ranks"][0][1]
    expected = qat_runs["single"][1]
    assert params.keys() == expected.keys()
    for name, value in expected.items():
        torch.testing.assert_close(params[name], value, rtol=0, atol=PARAM_ATOL, msg=name)


def test_ddp_qat_f_equal_across_ranks(qat_runs):
    rank0, rank1 = qat_runs["ranks"][0][1], qat_runs["ranks"][1][1]
    f_names = [name for name in rank0 if name.endswith(F_SUFFIX)]
    assert len(f_names) == 14
    for name in f_names:
        assert torch.equal(rank0[name], rank1[name]), name


def test_ddp_qat_weights_equal_across_ranks(qat_runs):
    rank0, rank1 = qat_runs["ranks"][0][1], qat_runs["ranks"][1][1]
    for name in rank0:
        assert torch.equal(rank0[name], rank1[name]), name


def test_ddp_qat_only_rank0_saves(qat_runs):
    out = qat_runs["root"] / "out2"
    rank0_writes = qat_runs["ranks"][0][0]["writes"]
    rank1_writes = qat_runs["ranks"][1][0]["writes"]
    assert rank1_writes == []
    assert rank0_writes == [
        str(out / "checkpoint-2" / EMA_FILE),
        str(out / "checkpoint-4" / EMA_FILE),
        str(out),
    ]


def test_ddp_qat_checkpoints_kept(qat_runs):
    out = qat_runs["root"] / "out2"
    for step in (2, 4):
        checkpoint = out / f"checkpoint-{step}"
        assert (checkpoint / EMA_FILE).is_file(), checkpoint
        assert (checkpoint / "model.safetensors").is_file(), checkpoint
        # The Trainer writes one RNG state per rank; every other file comes from rank 0.
        assert sorted(path.name for path in checkpoint.glob("rng_state_*")) == ["rng_state_0.pth", "rng_state_1.pth"]


def test_ddp_qat_output_loads_as_ema(qat_runs):
    """The script saves the EMA (``save_ema_weights`` defaults to true), so the output equals rank 0's final params."""
    loaded = load_qat_model(str(qat_runs["root"] / "out2"))
    params = qat_runs["ranks"][0][1]
    loaded_params = dict(loaded.named_parameters())
    assert loaded_params.keys() == params.keys()
    for name, value in params.items():
        assert torch.equal(loaded_params[name].detach(), value), name


# DDP, stage B


def test_ddp_lora_loss_matches_single(lora_runs):
    losses = lora_runs["ranks"][0][0]["losses"]
    expected = lora_runs["single"][0]["losses"]
    assert len(losses) == 4
    assert losses == pytest.approx(expected, rel=LOSS_RTOL)


def test_ddp_lora_params_match_single(lora_runs):
    params = lora_runs["ranks"][0][1]
    expected = lora_runs["single"][1]
    assert params.keys() == expected.keys()
    assert all("lora_" in name for name in params)
    for name, value in expected.items():
        torch.testing.assert_close(params[name], value, rtol=0, atol=PARAM_ATOL, msg=name)


def test_ddp_lora_equal_across_ranks(lora_runs):
    rank0, rank1 = lora_runs["ranks"][0][1], lora_runs["ranks"][1][1]
    for name in rank0:
        assert torch.equal(rank0[name], rank1[name]), name


def test_ddp_lora_adapter_loads(lora_runs):
    root = lora_runs["root"]
    model = PeftModel.from_pretrained(load_qat_model(str(root / "stage_a")), str(root / "out2"))
    params = lora_runs["ranks"][0][1]
    lora = {name: param for name, param in model.named_parameters() if "lora_" in name}
    assert lora.keys() == params.keys()
    for name, param in lora.items():
        assert torch.equal(param.detach(), params[name]), name


# FSDP2 (torch's fully_shard) on CPU processes


@pytest.fixture(scope="module", params=["per_tensor", "per_channel"])
def fsdp_report(request, tmp_path_factory):
    out_dir = tmp_path_factory.mktemp(f"fsdp_{request.param}")
    command = [
        sys.executable, "-m", "torch.distributed.run",
        "--nproc_per_node", "2", "--master_port", str(free_port()),
        str(FSDP_WORKER), str(out_dir), request.param,
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run(command, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S, env=env, check=False)
    assert result.returncode == 0, f"torchrun failed:\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
    return json.loads((out_dir / "report.json").read_text())


def test_fsdp_f_is_sharded(fsdp_report):
    assert fsdp_report["world_size"] == 2
    assert fsdp_report["f_count"] == 14
    assert fsdp_report["f_sharded"]


def test_fsdp_loss_matches_single(fsdp_report):
    assert fsdp_report["losses"] == pytest.approx(fsdp_report["reference_losses"], rel=LOSS_RTOL)


def test_fsdp_params_match_single(fsdp_report):
    differences = fsdp_report["max_diff_to_reference"]
    f_differences = {name: value for name, value in differences.items() if name.endswith(F_SUFFIX)}
    assert len(f_differences) == 14
    for name, difference in differences.items():
        assert difference <= FSDP_PARAM_ATOL, name


def test_fsdp_checkpoint_reloads_exact(fsdp_report):
    assert fsdp_report["reload_missing"] == []
    assert fsdp_report["reload_mismatches"] == []


def test_fsdp_ema_matches_single(fsdp_report):
    assert fsdp_report["ema_names_match"]
    assert fsdp_report["ema_max_diff_to_reference"] <= FSDP_PARAM_ATOL


def test_fsdp_ema_resume_exact(fsdp_report):
    assert fsdp_report["ema_resume_mismatches"] == []


def test_fsdp_ema_apply_exact(fsdp_report):
    assert fsdp_report["ema_apply_mismatches"] == []


def test_fsdp_stats_match_single(fsdp_report):
    assert fsdp_report["stats_max_diff"] < 1e-6


# Gradient (activation) checkpointing


def token_batch(vocab_size=512):
    generator = torch.Generator().manual_seed(0)
    return torch.randint(0, vocab_size, (2, 16), generator=generator)


def trainable_grads(model, batch) -> dict[str, torch.Tensor]:
    model.train()
    model.zero_grad()
    model(input_ids=batch, labels=batch).loss.backward()
    return {name: param.grad.clone() for name, param in model.named_parameters() if param.requires_grad}


def qat_model():
    model = tiny_qwen3()
    quantize_(model, QAT2BitConfig())
    return model


def assert_same_grads(grads, expected):
    assert grads.keys() == expected.keys()
    for name, value in expected.items():
        assert value.abs().sum() > 0, f"{name}: the reference gradient is zero, so the check is void"
        torch.testing.assert_close(grads[name], value, rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_checkpointing_qat_grads(use_reentrant):
    model = qat_model()
    checkpointed = copy.deepcopy(model)
    checkpointed.activation_checkpointing_enable({"use_reentrant": use_reentrant})
    assert checkpointed.is_activation_checkpointing

    expected = trainable_grads(model, token_batch())
    grads = trainable_grads(checkpointed, token_batch())

    assert sum(name.endswith(F_SUFFIX) for name in grads) == 14
    assert_same_grads(grads, expected)


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_checkpointing_lora_grads(use_reentrant):
    config = QATLoraConfig(r=4, lora_alpha=8, lora_dropout=0.0)
    model = get_peft_model(qat_model(), config)
    randomize_lora_b(model, seed=1)
    checkpointed = copy.deepcopy(model)
    # With frozen embeddings, reentrant checkpointing needs an input that requires grad; transformers
    # 5.25's activation_checkpointing_enable sets that up itself (enable_input_require_grads).
    checkpointed.activation_checkpointing_enable({"use_reentrant": use_reentrant})

    expected = trainable_grads(model, token_batch())
    grads = trainable_grads(checkpointed, token_batch())

    assert len(grads) == 28  # lora_A and lora_B of 14 layers
    assert_same_grads(grads, expected)


def test_checkpointing_sft_config_lora(tokenizer, alpaca_rows, tmp_path):
    """SFTConfig(activation_checkpointing=True) on stage B trains to the same LoRA weights as without it."""
    plain = make_lora_trainer(tokenizer, alpaca_rows, tmp_path / "plain", max_steps=2)
    plain.train()
    checkpointed = make_lora_trainer(tokenizer, alpaca_rows, tmp_path / "ckpt", max_steps=2, activation_checkpointing=True)
    checkpointed.train()

    assert checkpointed.model.get_base_model().is_activation_checkpointing
    expected = lora_state(plain.model)
    for name, value in lora_state(checkpointed.model).items():
        torch.testing.assert_close(value, expected[name], rtol=1e-5, atol=1e-7, msg=name)


# Stage B resume


class StepCounter(TrainerCallback):
    def __init__(self):
        self.steps = 0

    def on_step_end(self, args, state, control, **kwargs):
        self.steps += 1


def make_lora_trainer(tokenizer, rows, output_dir, callbacks=(), **config_overrides):
    model = tiny_qwen3(vocab_size=len(tokenizer))
    quantize_(model, QAT2BitConfig())
    args = tiny_sft_config(output_dir, **{"learning_rate": 1e-2, **config_overrides})
    return SFTTrainer(
        model=model,
        args=args,
        train_dataset=alpaca_to_chat(Dataset.from_list(rows)),
        processing_class=tokenizer,
        callbacks=list(callbacks),
        peft_config=QATLoraConfig(r=4, lora_alpha=8, lora_dropout=0.1),
    )


def lora_state(model):
    return {name: param.detach().clone() for name, param in model.named_parameters() if param.requires_grad}


def test_lora_resume_matches_uninterrupted(tokenizer, alpaca_rows, tmp_path):
    """Dropout stays on (0.1): the resumed run must restore the RNG state to draw the same masks."""
    full_ema = EMACallback(decay=0.7)
    full = make_lora_trainer(
        tokenizer, alpaca_rows, tmp_path / "full", callbacks=[full_ema], save_strategy="steps", save_steps=3
    )
    full.train()
    checkpoint = tmp_path / "full" / "checkpoint-3"
    assert (checkpoint / EMA_FILE).is_file()
    assert (checkpoint / "adapter_model.safetensors").is_file()

    counter = StepCounter()
    resumed_ema = EMACallback(decay=0.7, resume_from=str(checkpoint))
    resumed = make_lora_trainer(
        tokenizer, alpaca_rows, tmp_path / "resumed", callbacks=[resumed_ema, counter],
        save_strategy="steps", save_steps=3,
    )
    resumed.train(resume_from_checkpoint=str(checkpoint))

    assert counter.steps == 3
    full_state = lora_state(full.model)
    resumed_state = lora_state(resumed.model)
    assert len(full_state) == 28
    assert all("lora_" in name for name in full_state)
    for name, value in full_state.items():
        torch.testing.assert_close(resumed_state[name], value, rtol=0, atol=1e-7, msg=name)
    full_averages = full_ema.state_dict()
    resumed_averages = resumed_ema.state_dict()
    assert resumed_averages.keys() == full_state.keys()
    for name, average in resumed_averages.items():
        torch.testing.assert_close(average, full_averages[name], rtol=0, atol=1e-7, msg=name)


def test_lora_ema_apply_at_end(tokenizer, alpaca_rows, tmp_path):
    ema = EMACallback(decay=0.5, apply_at_end=True)
    trainer = make_lora_trainer(tokenizer, alpaca_rows, tmp_path, callbacks=[ema], max_steps=2)
    base_before = {name: layer.weight.detach().clone() for name, layer in qat_linears(trainer.model).items()}
    trainer.train()

    averages = ema.state_dict()
    for name, param in lora_state(trainer.model).items():
        assert torch.equal(param, averages[name]), name
    for name, layer in qat_linears(trainer.model).items():
        assert torch.equal(layer.weight, base_before[name]), name
