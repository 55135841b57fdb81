"""Stage B: LoRA quality recovery on a frozen balanced 2-bit model with TRL's SFTTrainer.

    python examples/train_lora_recovery.py --config examples/recipes/lora_recovery_qwen3_0.6b_alpaca.yaml

``--qat_checkpoint`` is a stage A checkpoint written by train_qat.py (float weights, every clip factor
``f`` and the tokenizer). Its weights and ``f`` stay frozen and only the LoRA matrices train. The
adapter is written to ``output_dir``; load it back with::

    import peft_qat2bit  # registers the QAT2BIT_LORA method with PEFT
    from peft import AutoPeftModelForCausalLM

    model = AutoPeftModelForCausalLM.from_pretrained(output_dir)
"""

import logging
from dataclasses import dataclass, field
from typing import Optional

from transformers import AutoTokenizer
from trl import ScriptArguments, SFTConfig, SFTTrainer, TrlParser

from peft_qat2bit import QATLoraConfig, load_qat_model
from peft_qat2bit.distill import DistillArguments, DistillationSFTTrainer
from peft_qat2bit.hub import load_model_and_tokenizer
from train_qat import load_train_dataset  # examples/ is on sys.path when this script runs

logger = logging.getLogger("train_lora_recovery")


@dataclass
class LoraArguments:
    qat_checkpoint: Optional[str] = field(
        default=None, metadata={"help": "Stage A checkpoint directory (save_qat_model or train_qat.py output)."}
    )
    lora_r: int = field(default=32, metadata={"help": "LoRA rank r."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha; the update is scaled by lora_alpha / r."})
    lora_dropout: float = field(default=0.05, metadata={"help": "Dropout probability on the LoRA input."})
    lora_target_modules: Optional[list[str]] = field(
        default=None, metadata={"help": "Layer names or suffixes to adapt; the default adapts every QATLinear."}
    )


def main(
    script_args: ScriptArguments,
    training_args: SFTConfig,
    lora_args: LoraArguments,
    distill_args: Optional[DistillArguments] = None,
):
    if lora_args.qat_checkpoint is None:
        raise ValueError("--qat_checkpoint is missing; pass the stage A checkpoint directory written by train_qat.py")
    model = load_qat_model(lora_args.qat_checkpoint)
    tokenizer = AutoTokenizer.from_pretrained(lora_args.qat_checkpoint)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token

    peft_config = QATLoraConfig(
        r=lora_args.lora_r,
        lora_alpha=lora_args.lora_alpha,
        lora_dropout=lora_args.lora_dropout,
        target_modules=lora_args.lora_target_modules,
    )
    trainer_class, distill_kwargs = SFTTrainer, {}
    if distill_args is not None and distill_args.distill:
        # The default teacher is the stage A checkpoint read as a plain float model: its f tensors are
        # ignored, so the weights are not quantized.
        teacher, _ = load_model_and_tokenizer(distill_args.teacher or lora_args.qat_checkpoint)
        trainer_class, distill_kwargs = DistillationSFTTrainer, distill_args.trainer_kwargs(teacher)
    trainer = trainer_class(
        model=model,
        args=training_args,
        train_dataset=load_train_dataset(script_args),
        processing_class=tokenizer,
        peft_config=peft_config,
        **distill_kwargs,
    )
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)

    # On a PEFT model this writes the adapter only (and the tokenizer), not the base weights.
    trainer.save_model(training_args.output_dir)
    logger.info("saved the LoRA adapter to %s", training_args.output_dir)
    return trainer


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    parser = TrlParser((ScriptArguments, SFTConfig, LoraArguments, DistillArguments))
    main(*parser.parse_args_and_config())
