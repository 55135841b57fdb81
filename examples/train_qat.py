"""Stage A: balanced 2-bit quantization-aware training of a causal LM with TRL's SFTTrainer.

    python examples/train_qat.py --config examples/recipes/qat_qwen3_0.6b_alpaca.yaml

Any field of the recipe can be overridden on the command line, for example
``--granularity per_group --group_size 64`` or ``--dataset_name data/alpaca.json``. An Alpaca-format
dataset (instruction, input, output) is converted to chat messages. With ``assistant_only_loss``
TRL then computes the loss on the assistant turns only, through its training chat templates.
``--distill`` adds the KL divergence to a frozen float teacher (by default the model before
quantization), weighted by ``--distill_alpha`` and ``--distill_temperature``.
"""

import copy
import logging
from dataclasses import dataclass, field
from typing import Optional

import torch
from datasets import load_dataset
from torchao.quantization import quantize_
from trl import ModelConfig, ScriptArguments, SFTConfig, SFTTrainer, TrlParser

from peft_qat2bit import (
    Balanced2BitFakeQuantizeConfig,
    EMACallback,
    QAT2BitConfig,
    QATStatsCallback,
    save_qat_model,
)
from peft_qat2bit.data import alpaca_to_chat
from peft_qat2bit.distill import DistillArguments, DistillationSFTTrainer
from peft_qat2bit.hub import load_model_and_tokenizer
from peft_qat2bit.optim import build_qat_optimizer

logger = logging.getLogger("train_qat")


@dataclass
class QATArguments:
    granularity: str = field(default="per_tensor", metadata={"help": "per_tensor, per_channel or per_group."})
    group_size: Optional[int] = field(default=None, metadata={"help": "Input columns per group for per_group."})
    init: str = field(default="newton", metadata={"help": "Initial f: newton (MSE-optimal clip) or absmax (f = 1)."})
    compile_quantizer: bool = field(
        default=False,
        metadata={"help": "Run the fake quantizer as torch.compile kernels: faster steps after a few seconds of compiling."},
    )
    exclude_modules: list[str] = field(
        default_factory=lambda: ["lm_head"], metadata={"help": "Linear layers kept in float, by name or suffix."}
    )
    f_learning_rate: Optional[float] = field(
        default=None, metadata={"help": "Learning rate of the clip factors f; defaults to learning_rate."}
    )
    ema_decay: Optional[float] = field(
        default=None, metadata={"help": "Keep an EMA of the trainable parameters with this decay, e.g. 0.999."}
    )
    save_ema_weights: bool = field(
        default=True, metadata={"help": "With ema_decay, write the EMA weights as the final model."}
    )
    gguf_file: Optional[str] = field(default=None, metadata={"help": "GGUF file inside model_name_or_path."})


def load_train_dataset(script_args: ScriptArguments):
    name = script_args.dataset_name
    if name.endswith((".json", ".jsonl")):
        dataset = load_dataset("json", data_files=name, split="train")
    else:
        dataset = load_dataset(name, script_args.dataset_config, split=script_args.dataset_train_split)
    if {"instruction", "output"} <= set(dataset.column_names):
        dataset = alpaca_to_chat(dataset)
    return dataset


def main(
    script_args: ScriptArguments,
    training_args: SFTConfig,
    model_args: ModelConfig,
    qat_args: QATArguments,
    distill_args: Optional[DistillArguments] = None,
):
    dtype = getattr(torch, model_args.dtype) if model_args.dtype not in (None, "auto") else torch.float32
    model, tokenizer = load_model_and_tokenizer(model_args.model_name_or_path, qat_args.gguf_file, dtype=dtype)

    teacher = None
    if distill_args is not None and distill_args.distill:
        # The default teacher is the float model itself, copied before quantize_ swaps its layers.
        if distill_args.teacher is None:
            teacher = copy.deepcopy(model)
        else:
            teacher, _ = load_model_and_tokenizer(distill_args.teacher, dtype=dtype)

    weight_config = Balanced2BitFakeQuantizeConfig(
        qat_args.granularity, group_size=qat_args.group_size, init=qat_args.init, compile=qat_args.compile_quantizer
    )
    quantize_(model, QAT2BitConfig(weight_config=weight_config, exclude_modules=qat_args.exclude_modules))

    callbacks = []
    ema = None
    if qat_args.ema_decay is not None:
        ema = EMACallback(decay=qat_args.ema_decay, apply_at_end=qat_args.save_ema_weights)
        callbacks.append(ema)
    trainer_class, distill_kwargs = SFTTrainer, {}
    if teacher is not None:
        trainer_class, distill_kwargs = DistillationSFTTrainer, distill_args.trainer_kwargs(teacher)
    trainer = trainer_class(
        model=model,
        args=training_args,
        train_dataset=load_train_dataset(script_args),
        processing_class=tokenizer,
        callbacks=callbacks,
        optimizers=(build_qat_optimizer(model, training_args, qat_args.f_learning_rate), None),
        **distill_kwargs,
    )
    trainer.add_callback(QATStatsCallback(trainer))
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)

    # Under FSDP the parameters are sharded: every rank takes part in gathering them, then rank 0 writes.
    save_kwargs = {"state_dict": trainer.accelerator.get_state_dict(trainer.model)} if trainer.is_fsdp_enabled else {}
    if trainer.is_world_process_zero():
        save_qat_model(model, training_args.output_dir, **save_kwargs)
        tokenizer.save_pretrained(training_args.output_dir)
        logger.info("saved the %s QAT model to %s", "EMA" if ema and ema.apply_at_end else "final", training_args.output_dir)
    return trainer


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    parser = TrlParser((ScriptArguments, SFTConfig, ModelConfig, QATArguments, DistillArguments))
    main(*parser.parse_args_and_config())
