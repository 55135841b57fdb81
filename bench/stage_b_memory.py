"""Peak memory of stage B LoRA training on a packed 2-bit base versus the fake-quantized float base.

The script builds a randomly initialised Qwen3-shaped model, quantizes it (stage A prepare, no
training) and saves it twice: as a stage A checkpoint (float weights and f) and as a packed export.
Each case then runs in a fresh subprocess, so that peaks do not mix: load the base, add
QATLoraConfig adapters and run a few AdamW steps on random tokens. Peak memory is the process's peak
RSS (VmHWM from /proc/self/status on Linux, ru_maxrss elsewhere), with the peak after the imports
reported separately, and torch.cuda.max_memory_allocated on a GPU. The ratios printed are from this run only.

    python bench/stage_b_memory.py                    # hidden 512, 8 layers, vocab 32000, CPU
    python bench/stage_b_memory.py --size qwen3-0.6b --device cuda --dtype bfloat16
"""

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SIZES = {
    "small": dict(vocab_size=32000, hidden_size=512, intermediate_size=1536, num_hidden_layers=8,
                  num_attention_heads=8, num_key_value_heads=4, head_dim=64),
    "qwen3-0.6b": dict(vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                       num_attention_heads=16, num_key_value_heads=8, head_dim=128),
}
CASES = ("fake-quant", "packed")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=tuple(SIZES), default="small", help="model shape (default: small)")
    parser.add_argument("--steps", type=int, default=3, help="LoRA training steps per case (default: 3)")
    parser.add_argument("--batch", type=int, default=2, help="sequences per step (default: 2)")
    parser.add_argument("--seq-len", type=int, default=128, help="tokens per sequence (default: 128)")
    parser.add_argument("--lora-r", type=int, default=16, help="LoRA rank (default: 16)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                        help="dtype of the model weights (default: float32)")
    parser.add_argument("--worker", choices=CASES, help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def peak_rss_mib() -> float:
    """Return this process's peak RSS in MiB: VmHWM from /proc on Linux, else ru_maxrss.

    ru_maxrss survives execve on Linux, so a worker started by a large parent would report the
    parent's RSS at fork time; VmHWM belongs to the worker's own address space.
    """
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def build_bases(args: argparse.Namespace, workdir: Path) -> None:
    """Save the stage A checkpoint and the packed export of one random model into ``workdir``."""
    import torch
    from torchao.quantization import quantize_
    from transformers import AutoModelForCausalLM, Qwen3Config

    from peft_qat2bit import QAT2BitConfig, export_packed, save_qat_model

    torch.manual_seed(0)
    config = Qwen3Config(tie_word_embeddings=True, **SIZES[args.size])
    model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, args.dtype))
    quantize_(model, QAT2BitConfig())
    save_qat_model(model, str(workdir / "stage_a"))
    print(export_packed(model, workdir / "packed"), flush=True)


def run_worker(args: argparse.Namespace) -> None:
    """Train LoRA for ``args.steps`` steps on one base and print the measurements as one JSON line."""
    import torch
    from peft import get_peft_model

    from peft_qat2bit import QATLoraConfig, load_packed, load_qat_model

    torch.manual_seed(0)
    baseline = peak_rss_mib()
    workdir = Path(args.workdir)
    if args.worker == "packed":
        model = load_packed(workdir / "packed")
    else:
        model = load_qat_model(str(workdir / "stage_a"))
    model.to(args.device)
    peft_model = get_peft_model(model, QATLoraConfig(r=args.lora_r, lora_alpha=args.lora_r))
    optimizer = torch.optim.AdamW([param for param in peft_model.parameters() if param.requires_grad], lr=1e-4)
    vocab_size = model.config.vocab_size
    peft_model.train()
    started = time.perf_counter()
    for _ in range(args.steps):
        batch = torch.randint(0, vocab_size, (args.batch, args.seq_len), device=args.device)
        peft_model(input_ids=batch, labels=batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    seconds_per_step = (time.perf_counter() - started) / args.steps
    cuda_peak = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None
    result = {
        "case": args.worker,
        "peak_rss_mib": peak_rss_mib(),
        "baseline_rss_mib": baseline,
        "cuda_peak_mib": cuda_peak,
        "seconds_per_step": seconds_per_step,
    }
    print(json.dumps(result))


def run_case(case: str, workdir: Path, argv: list[str]) -> dict:
    command = [sys.executable, __file__, *argv, "--worker", case, "--workdir", str(workdir)]
    completed = subprocess.run(command, capture_output=True, text=True, check=False)
    if completed.returncode != 0:
        raise RuntimeError(f"case {case} failed with exit code {completed.returncode}:\n{completed.stderr}")
    return json.loads(completed.stdout.strip().splitlines()[-1])


def print_table(args: argparse.Namespace, results: dict[str, dict]) -> None:
    print(f"\nstage B LoRA training, {args.size} Qwen3 shape, {args.dtype} weights, {args.device}, "
          f"{args.steps} steps of {args.batch} x {args.seq_len} tokens, r={args.lora_r}")
    print(f"{'base':<12}{'peak RSS MiB':>14}{'above imports MiB':>19}{'CUDA peak MiB':>15}{'s/step':>9}")
    for case in CASES:
        result = results[case]
        above = result["peak_rss_mib"] - result["baseline_rss_mib"]
        cuda = f"{result['cuda_peak_mib']:.0f}" if result["cuda_peak_mib"] is not None else "-"
        print(f"{case:<12}{result['peak_rss_mib']:>14.0f}{above:>19.0f}{cuda:>15}{result['seconds_per_step']:>9.2f}")
    packed, float_base = results["packed"], results["fake-quant"]
    rss_ratio = packed["peak_rss_mib"] / float_base["peak_rss_mib"]
    above_ratio = (packed["peak_rss_mib"] - packed["baseline_rss_mib"]) / (
        float_base["peak_rss_mib"] - float_base["baseline_rss_mib"]
    )
    print(f"packed / fake-quant: peak RSS {rss_ratio:.2f}, above imports {above_ratio:.2f}", end="")
    if packed["cuda_peak_mib"] is not None:
        print(f", CUDA peak {packed['cuda_peak_mib'] / float_base['cuda_peak_mib']:.2f}", end="")
    print()


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.worker:
        run_worker(args)
        return
    with tempfile.TemporaryDirectory(prefix="stage_b_memory.") as directory:
        workdir = Path(directory)
        build_bases(args, workdir)
        results = {case: run_case(case, workdir, argv) for case in CASES}
    print_table(args, results)


if __name__ == "__main__":
    main()
