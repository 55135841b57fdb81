"""Step-time, memory and generation-speed ratios of this package against the plain float paths.

Five measurements, all from one run, with ``torch.set_num_threads(--threads)``:

1. stage A QAT step / full fine-tune step of the same float model and batch (AdamW, fwd + bwd + step),
   with the eager quantizer and with the ``compile=True`` one (torch.compile kernels), and the
   quantizer's own forward and backward on one MLP weight, compiled / eager;
2. stage B step (``QATLoraConfig`` on the QAT model) / stock PEFT ``LoraConfig`` step on the float model;
3. stage B peak RSS with the packed 2-bit base / with the fake-quantized float base, by
   bench/stage_b_memory.py's subprocess workers;
4. greedy generation tokens/s, peak RSS and RSS growth (RSS after generating minus RSS before
   loading) of the packed 2-bit export / the float model, each in a fresh subprocess;
5. the Newton init time of every linear layer of the Qwen/Qwen3-0.6B shape (random bf16 weights,
   built one layer at a time, so RAM stays under 100 MB).

For 1 and 2 the two sides alternate (A, B, A, B, ...) after warm-up steps, so that load from other
processes hits both sides alike. The ratio is the median of the per-pair ratios, and the min and max
of those ratios are its spread. Models for 1, 2 and 4 are random Qwen3 models of bench/stage_b_memory.py's
"small" shape (hidden 512, 8 layers, vocab 32000) unless ``--size`` sets another.

    python bench/speed.py                       # a few minutes on a 2-core CPU
    python bench/speed.py --size qwen3-0.6b --threads 16 --repeats 20
"""

import argparse
import copy
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import stage_b_memory  # a sibling script in bench/, not an installed package

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
QWEN3_0_6B_LINEARS = {  # (out_features, in_features) of each decoder layer's linears
    "q_proj": (2048, 1024), "k_proj": (1024, 1024), "v_proj": (1024, 1024), "o_proj": (1024, 2048),
    "gate_proj": (3072, 1024), "up_proj": (3072, 1024), "down_proj": (1024, 3072),
}
QWEN3_0_6B_LAYERS = 28


def summarize(seconds: list[float]) -> dict:
    """Return the median, min, max and count of a list of timings."""
    if not seconds:
        raise ValueError("no timings to summarize; use at least one repetition")
    return {"median": statistics.median(seconds), "min": min(seconds), "max": max(seconds), "count": len(seconds)}


def paired_ratio(numerator: list[float], denominator: list[float]) -> dict:
    """Return the median and the min/max of ``numerator[i] / denominator[i]`` over interleaved pairs."""
    if len(numerator) != len(denominator):
        raise ValueError(f"paired timings differ in length: {len(numerator)} and {len(denominator)}")
    return summarize([top / bottom for top, bottom in zip(numerator, denominator)])


def time_interleaved(first: Callable[[], None], second: Callable[[], None], repeats: int, warmup: int) -> tuple[list, list]:
    """Time ``first`` and ``second`` alternately, ``repeats`` times each after ``warmup`` untimed calls each."""
    for _ in range(warmup):
        first()
        second()
    first_times, second_times = [], []
    for _ in range(repeats):
        for step, times in ((first, first_times), (second, second_times)):
            started = time.perf_counter()
            step()
            times.append(time.perf_counter() - started)
    return first_times, second_times


def training_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, batch: torch.Tensor) -> Callable[[], None]:
    """Return a closure running one forward, backward and optimizer step of ``model`` on ``batch``."""

    def step() -> None:
        model(input_ids=batch, labels=batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def trainable(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [param for param in model.parameters() if param.requires_grad]


def random_model(size: str, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM, Qwen3Config

    torch.manual_seed(0)
    config = Qwen3Config(tie_word_embeddings=True, **stage_b_memory.SIZES[size])
    return AutoModelForCausalLM.from_config(config, dtype=dtype)


def measure_step_ratios(args: argparse.Namespace) -> dict:
    """Measurements 1 and 2: stage A / full fine-tune and stage B / PEFT LoRA step times."""
    from peft import LoraConfig, get_peft_model
    from torchao.quantization import quantize_

    from peft_qat2bit import Balanced2BitFakeQuantizeConfig, QAT2BitConfig, QATLoraConfig
    from peft_qat2bit.optim import qat_parameter_groups

    base = random_model(args.size)
    batch = torch.randint(0, base.config.vocab_size, (args.batch, args.seq_len))

    float_model = copy.deepcopy(base).train()
    float_step = training_step(float_model, torch.optim.AdamW(trainable(float_model), lr=1e-5), batch)
    results = {}
    for key, compile in (("stage_a", False), ("stage_a_compiled", True)):
        qat_model = copy.deepcopy(base).train()
        quantize_(qat_model, QAT2BitConfig(weight_config=Balanced2BitFakeQuantizeConfig(compile=compile)))
        qat_step = training_step(qat_model, torch.optim.AdamW(qat_parameter_groups(qat_model, 1e-5, 1e-4)), batch)
        # The warm-up steps of the compiled side include compiling its kernels, so they are not timed.
        qat_times, float_times = time_interleaved(qat_step, float_step, args.repeats, args.warmup)
        results[key] = {"qat_s": summarize(qat_times), "full_finetune_s": summarize(float_times),
                        "ratio": paired_ratio(qat_times, float_times)}
        del qat_step
    del float_model, float_step

    lora_model = get_peft_model(copy.deepcopy(base), LoraConfig(r=args.lora_r, lora_alpha=args.lora_r,
                                                                target_modules=list(PROJECTIONS)))
    # Stage B runs over the last QAT model (compiled quantizer); its weights are cached once frozen.
    stage_b_model = get_peft_model(qat_model, QATLoraConfig(r=args.lora_r, lora_alpha=args.lora_r))
    lora_model.train()
    stage_b_model.train()
    lora_step = training_step(lora_model, torch.optim.AdamW(trainable(lora_model), lr=1e-4), batch)
    stage_b_step = training_step(stage_b_model, torch.optim.AdamW(trainable(stage_b_model), lr=1e-4), batch)
    stage_b_times, lora_times = time_interleaved(stage_b_step, lora_step, args.repeats, args.warmup)
    results["stage_b"] = {"stage_b_s": summarize(stage_b_times), "peft_lora_s": summarize(lora_times),
                          "ratio": paired_ratio(stage_b_times, lora_times)}
    return results


def measure_quantizer_kernel(args: argparse.Namespace) -> dict:
    """Time the fake quantizer alone, forward and backward on one MLP-shaped weight, compile=True against eager."""
    from peft_qat2bit import Balanced2BitFakeQuantizeConfig, Balanced2BitFakeQuantizer

    shape = (stage_b_memory.SIZES[args.size]["intermediate_size"], stage_b_memory.SIZES[args.size]["hidden_size"])
    torch.manual_seed(0)
    weight = (torch.randn(shape) * 0.02).requires_grad_()
    upstream = torch.randn(shape)

    def quantize_step(compile: bool) -> Callable[[], None]:
        quantizer = Balanced2BitFakeQuantizer(Balanced2BitFakeQuantizeConfig(compile=compile), shape)
        quantizer.initialize_(weight)

        def step() -> None:
            quantizer(weight).backward(upstream)
            weight.grad = quantizer.f.grad = None

        return step

    compiled_times, eager_times = time_interleaved(quantize_step(True), quantize_step(False), args.repeats * 5, args.warmup)
    return {"shape": list(shape), "compiled_s": summarize(compiled_times), "eager_s": summarize(eager_times),
            "ratio": paired_ratio(compiled_times, eager_times)}


def measure_stage_b_memory(args: argparse.Namespace) -> dict:
    """Measurement 3, by bench/stage_b_memory.py: peak RSS of LoRA training on the packed / float base."""
    argv = ["--size", args.size, "--steps", "3", "--batch", str(args.batch), "--seq-len", str(args.seq_len),
            "--lora-r", str(args.lora_r)]
    memory_args = stage_b_memory.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="speed_memory.") as directory:
        workdir = Path(directory)
        stage_b_memory.build_bases(memory_args, workdir)
        results = {case: stage_b_memory.run_case(case, workdir, argv) for case in stage_b_memory.CASES}
    packed, float_base = results["packed"], results["fake-quant"]
    above = {case: result["peak_rss_mib"] - result["baseline_rss_mib"] for case, result in results.items()}
    # NOTE: on small shapes the import-time peak can exceed the training peak, so "above" can be 0.
    above_ratio = above["packed"] / above["fake-quant"] if above["fake-quant"] > 0 else None
    return {"cases": results, "peak_rss_ratio": packed["peak_rss_mib"] / float_base["peak_rss_mib"],
            "above_imports_ratio": above_ratio, "above_imports_mib": above}


def current_rss_mib() -> float:
    """Return the resident set size of this process now (Linux /proc), in MiB."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * resource.getpagesize() / 2**20


def run_generate_worker(args: argparse.Namespace) -> None:
    """Load one model (float or packed) and print tokens/s of greedy generation and peak RSS as JSON."""
    torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM

    from peft_qat2bit import load_packed

    baseline = stage_b_memory.peak_rss_mib()
    rss_before = current_rss_mib()
    directory = Path(args.workdir)
    if args.worker == "packed":
        model = load_packed(directory / "packed")
    else:
        model = AutoModelForCausalLM.from_pretrained(directory / "float", dtype=torch.float32).eval()
    torch.manual_seed(0)
    prompt = torch.randint(0, model.config.vocab_size, (1, 16))
    rates = []
    for repeat in range(args.warmup + args.generate_repeats):
        started = time.perf_counter()
        with torch.no_grad():
            output = model.generate(prompt, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                                    do_sample=False)
        if repeat >= args.warmup:
            rates.append((output.shape[1] - prompt.shape[1]) / (time.perf_counter() - started))
    peak = stage_b_memory.peak_rss_mib()
    print(json.dumps({"case": args.worker, "tokens_per_s": summarize(rates), "peak_rss_mib": peak,
                      "baseline_rss_mib": baseline, "rss_growth_mib": current_rss_mib() - rss_before}))


def measure_generation(args: argparse.Namespace, argv: list[str]) -> dict:
    """Measurement 4: generation speed and peak RSS of the packed export against the float model."""
    from torchao.quantization import quantize_

    from peft_qat2bit import QAT2BitConfig, export_packed

    with tempfile.TemporaryDirectory(prefix="speed_generate.") as directory:
        workdir = Path(directory)
        model = random_model(args.size)
        model.save_pretrained(workdir / "float")
        quantize_(model, QAT2BitConfig())
        export_packed(model, workdir / "packed")
        del model
        results = {}
        for case in ("float", "packed"):
            command = [sys.executable, __file__, *argv, "--worker", case, "--workdir", str(workdir)]
            completed = subprocess.run(command, capture_output=True, text=True, check=False)
            if completed.returncode != 0:
                raise RuntimeError(f"generation worker {case} failed with exit code {completed.returncode}:\n"
                                   f"{completed.stderr}")
            results[case] = json.loads(completed.stdout.strip().splitlines()[-1])
    packed, float_model = results["packed"], results["float"]
    return {"cases": results,
            "tokens_per_s_ratio": packed["tokens_per_s"]["median"] / float_model["tokens_per_s"]["median"],
            "peak_rss_ratio": packed["peak_rss_mib"] / float_model["peak_rss_mib"],
            "rss_growth_ratio": packed["rss_growth_mib"] / float_model["rss_growth_mib"]}


def measure_newton_init(granularity: str, layers: int = QWEN3_0_6B_LAYERS) -> dict:
    """Measurement 5: time ``QATLinear.from_linear`` (Newton init) on every linear of the Qwen3-0.6B shape.

    Weights are random N(0, 0.02) in bf16, created one layer at a time and freed after it. lm_head is
    tied to the embedding and not quantized, so it is not timed.
    """
    from peft_qat2bit import Balanced2BitFakeQuantizeConfig, QATLinear

    config = Balanced2BitFakeQuantizeConfig(granularity, group_size=64 if granularity == "per_group" else None)
    generator = torch.Generator().manual_seed(0)
    per_layer = []
    for _ in range(layers):
        for name, (out_features, in_features) in QWEN3_0_6B_LINEARS.items():
            linear = torch.nn.Linear(in_features, out_features, bias=False, device="meta")
            weight = torch.empty(out_features, in_features).normal_(0.0, 0.02, generator=generator)
            linear.weight = torch.nn.Parameter(weight.to(torch.bfloat16), requires_grad=True)
            started = time.perf_counter()
            QATLinear.from_linear(linear, config, module_name=name)
            per_layer.append(time.perf_counter() - started)
    return {"granularity": granularity, "linears": len(per_layer), "total_s": sum(per_layer),
            "per_linear_s": summarize(per_layer)}


def profile_hot_ops(args: argparse.Namespace, rows: int = 8) -> dict[str, str]:
    """Profile (torch.profiler, CPU) a stage A step, a full fine-tune step and a packed-model forward.

    Returns, per case, the table of the ``rows`` ops with the largest self CPU time.
    """
    from torch.profiler import ProfilerActivity, profile
    from torchao.quantization import quantize_

    from peft_qat2bit import Balanced2BitFakeQuantizeConfig, QAT2BitConfig, export_packed, load_packed
    from peft_qat2bit.optim import qat_parameter_groups

    base = random_model(args.size)
    batch = torch.randint(0, base.config.vocab_size, (args.batch, args.seq_len))
    float_model = copy.deepcopy(base).train()
    cases = {
        "full fine-tune step": training_step(float_model, torch.optim.AdamW(trainable(float_model), lr=1e-5), batch),
    }
    for label, compile in (("stage A step", False), ("stage A step, compile=True", True)):
        qat_model = copy.deepcopy(base).train()
        quantize_(qat_model, QAT2BitConfig(weight_config=Balanced2BitFakeQuantizeConfig(compile=compile)))
        optimizer = torch.optim.AdamW(qat_parameter_groups(qat_model, 1e-5, 1e-4))
        cases[label] = training_step(qat_model, optimizer, batch)
    with tempfile.TemporaryDirectory(prefix="speed_profile.") as directory:
        export_packed(qat_model, Path(directory) / "packed")
        packed = load_packed(Path(directory) / "packed")
    prompt = batch[:1, :16]

    def packed_forward() -> None:
        with torch.no_grad():
            packed(input_ids=prompt)

    cases["packed forward, 1 x 16 tokens"] = packed_forward
    tables = {}
    for name, step in cases.items():
        # Two untimed steps: the first compiles the compile=True kernels, forward and backward.
        step()
        step()
        with profile(activities=[ProfilerActivity.CPU]) as profiler:
            step()
        tables[name] = profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)
    return tables


def spread(summary: dict, unit: float = 1.0) -> str:
    """Format median (min-max) of ``summary``, each multiplied by ``unit`` (1000 turns seconds into ms)."""
    return f"{summary['median'] * unit:.3f} ({summary['min'] * unit:.3f}-{summary['max'] * unit:.3f})"


def print_tables(args: argparse.Namespace, results: dict) -> None:
    print(f"\nspeed.py: {args.size} Qwen3 shape, fp32, batch {args.batch} x {args.seq_len} tokens, LoRA r={args.lora_r}, "
          f"torch threads {args.threads}, {args.repeats} interleaved repetitions after {args.warmup} warm-up")
    print("| measurement | this package | baseline | ratio, median (min-max) | goal |")
    print("|---|---|---|---|---|")
    kernel = results.get("quantizer")
    if kernel:
        rows, cols = kernel["shape"]
        print(f"| fake quantizer fwd + bwd, {rows} x {cols} weight, compile=True / eager | "
              f"{spread(kernel['compiled_s'], 1000)} ms | {spread(kernel['eager_s'], 1000)} ms | "
              f"{spread(kernel['ratio'])} | - |")
    steps = results.get("steps")
    if steps:
        stage_b = steps["stage_b"]
        for key, label in (("stage_a", "eager quantizer"), ("stage_a_compiled", "compile=True")):
            stage_a = steps[key]
            print(f"| step time, stage A QAT ({label}) / full fine-tune | {spread(stage_a['qat_s'])} s | "
                  f"{spread(stage_a['full_finetune_s'])} s | {spread(stage_a['ratio'])} | <= 1.05 |")
        print(f"| step time, stage B / PEFT LoRA on float | {spread(stage_b['stage_b_s'])} s | "
              f"{spread(stage_b['peft_lora_s'])} s | {spread(stage_b['ratio'])} | <= 1.00 |")
    memory = results.get("memory")
    if memory:
        packed, float_base = memory["cases"]["packed"], memory["cases"]["fake-quant"]
        above = memory["above_imports_mib"]
        print(f"| stage B peak RSS, packed / fake-quant base | {packed['peak_rss_mib']:.0f} MiB "
              f"({above['packed']:.0f} above imports) | {float_base['peak_rss_mib']:.0f} MiB "
              f"({above['fake-quant']:.0f} above imports) | {memory['peak_rss_ratio']:.3f} | < 1 |")
    generation = results.get("generation")
    if generation:
        packed, float_model = generation["cases"]["packed"], generation["cases"]["float"]
        print(f"| generation tokens/s, packed / float | {spread(packed['tokens_per_s'])} | "
              f"{spread(float_model['tokens_per_s'])} | {generation['tokens_per_s_ratio']:.3f} | - |")
        print(f"| generation peak RSS, packed / float | {packed['peak_rss_mib']:.0f} MiB | "
              f"{float_model['peak_rss_mib']:.0f} MiB | {generation['peak_rss_ratio']:.3f} | - |")
        print(f"| generation RSS growth from load to end, packed / float | {packed['rss_growth_mib']:.0f} MiB | "
              f"{float_model['rss_growth_mib']:.0f} MiB | {generation['rss_growth_ratio']:.3f} | - |")
    for newton in results.get("newton", []):
        print(f"| Newton init, {newton['linears']} Qwen3-0.6B linears, {newton['granularity']} | "
              f"{newton['total_s']:.1f} s total, {spread(newton['per_linear_s'])} s per linear | - | - | - |")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=tuple(stage_b_memory.SIZES), default="small",
                        help="model shape for measurements 1-4 (default: small)")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads for every measurement (default: 2)")
    parser.add_argument("--batch", type=int, default=2, help="sequences per step (default: 2)")
    parser.add_argument("--seq-len", type=int, default=128, help="tokens per sequence (default: 128)")
    parser.add_argument("--lora-r", type=int, default=16, help="LoRA rank (default: 16)")
    parser.add_argument("--repeats", type=int, default=10, help="timed steps per side (default: 10)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per side first (default: 2)")
    parser.add_argument("--new-tokens", type=int, default=32, help="tokens generated per repetition (default: 32)")
    parser.add_argument("--generate-repeats", type=int, default=3, help="timed generations per model (default: 3)")
    parser.add_argument("--newton-granularity", nargs="*", default=["per_tensor", "per_channel"],
                        help="granularities to time the Newton init with (default: per_tensor per_channel)")
    parser.add_argument("--skip", nargs="*", default=[], choices=("steps", "memory", "generation", "newton"),
                        help="measurements to leave out")
    parser.add_argument("--profile", action="store_true",
                        help="also print torch.profiler's top ops of a stage A step, a full fine-tune step and a packed forward")
    parser.add_argument("--output", default="outputs/bench/speed.json", help="results JSON (default: outputs/bench/speed.json)")
    parser.add_argument("--worker", choices=("float", "packed"), help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.worker:
        run_generate_worker(args)
        return {}
    torch.set_num_threads(args.threads)
    results = {"arguments": vars(args), "torch": torch.__version__}
    if "steps" not in args.skip:
        results["quantizer"] = measure_quantizer_kernel(args)
        results["steps"] = measure_step_ratios(args)
    if "memory" not in args.skip:
        results["memory"] = measure_stage_b_memory(args)
    if "generation" not in args.skip:
        results["generation"] = measure_generation(args, argv)
    if "newton" not in args.skip:
        results["newton"] = [measure_newton_init(granularity) for granularity in args.newton_granularity]
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(results, indent=2))
    print_tables(args, results)
    if args.profile:
        for name, table in profile_hot_ops(args).items():
            print(f"\ntorch.profiler, {name}, top ops by self CPU time:\n{table}")
    return results


if __name__ == "__main__":
    main()
