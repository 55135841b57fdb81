"""Check examples/train_qat.py under accelerate's FSDP2 on GPUs against a 1-process run without FSDP.

    python bench/gpu_fsdp_check.py --num_processes 2      # one process per GPU; 1 works on a single GPU

The Trainer cannot run FSDP on CPU processes (accelerate 1.16 turns ``use_cpu`` into DDP and ignores
the FSDP settings), so tests/test_distributed.py checks FSDP2 only through torch's ``fully_shard``.
This script covers the Trainer path on a GPU machine, offline. It builds a tiny Qwen3 and tokenizer
as the tests do and trains stage A with TRL's ``accelerate_configs/fsdp2.yaml`` (fp32, EMA on). It
then trains the same global batch on one process without FSDP and checks that

- the FSDP output directory loads with ``load_qat_model`` and every ``f`` is finite and positive;
- the final parameters match the 1-process run within ``--atol`` (different reduction order);
- the logged losses match within ``--loss_rtol``;
- the last Trainer checkpoint contains ``ema.safetensors`` and loads with ``load_qat_model``.

It prints one line per check and exits with status 1 when any fails.
"""

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import trl

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from conftest import ALPACA_ROWS, build_tokenizer, tiny_qwen3

from peft_qat2bit import load_qat_model

FSDP2_CONFIG = Path(trl.__file__).parent / "accelerate_configs" / "fsdp2.yaml"


def train(work: Path, name: str, launcher: list[str], per_device_batch: int, steps: int) -> Path:
    output_dir = work / name
    command = [
        *launcher, str(ROOT / "examples" / "train_qat.py"),
        "--model_name_or_path", str(work / "base"),
        "--dataset_name", str(work / "alpaca.json"),
        "--output_dir", str(output_dir),
        "--max_steps", str(steps),
        "--per_device_train_batch_size", str(per_device_batch),
        "--learning_rate", "5e-3",
        "--lr_scheduler_type", "constant",
        "--assistant_only_loss", "true",
        "--max_length", "64",
        "--ema_decay", "0.8",
        "--logging_steps", "1",
        "--save_strategy", "steps",
        "--save_steps", str(steps),
        "--seed", "0",
        "--bf16", "false",
        "--report_to", "none",
    ]
    print("running:", " ".join(command), flush=True)
    subprocess.run(command, check=True)
    return output_dir


def logged_losses(output_dir: Path, steps: int) -> list[float]:
    state = json.loads((output_dir / f"checkpoint-{steps}" / "trainer_state.json").read_text())
    return [record["loss"] for record in state["log_history"] if "loss" in record]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num_processes", type=int, default=torch.cuda.device_count(), help="FSDP processes, one per GPU.")
    parser.add_argument("--steps", type=int, default=4, help="Optimizer steps of each run.")
    parser.add_argument("--atol", type=float, default=1e-4, help="Absolute tolerance on the final parameters.")
    parser.add_argument("--loss_rtol", type=float, default=1e-4, help="Relative tolerance on the logged losses.")
    args = parser.parse_args()
    if not torch.cuda.is_available() or args.num_processes < 1:
        raise SystemExit("no CUDA GPU found: this check needs at least one GPU; see tests/test_distributed.py for CPU")

    work = Path(tempfile.mkdtemp(prefix="gpu_fsdp_check."))
    tokenizer = build_tokenizer()
    tiny_qwen3(vocab_size=len(tokenizer)).save_pretrained(work / "base")
    tokenizer.save_pretrained(work / "base")
    (work / "alpaca.json").write_text(json.dumps(ALPACA_ROWS))
    global_batch = 2 * args.num_processes

    fsdp_launcher = [
        "accelerate", "launch", "--config_file", str(FSDP2_CONFIG),
        "--num_processes", str(args.num_processes), "--mixed_precision", "no",
    ]
    fsdp_dir = train(work, "fsdp", fsdp_launcher, 2, args.steps)
    single_dir = train(work, "single", [sys.executable], global_batch, args.steps)

    fsdp_model = load_qat_model(str(fsdp_dir))
    single_params = dict(load_qat_model(str(single_dir)).named_parameters())
    fsdp_params = dict(fsdp_model.named_parameters())
    f_values = [param for name, param in fsdp_params.items() if name.endswith("weight_fake_quantizer.f")]
    max_difference = max((fsdp_params[name] - value).abs().max().item() for name, value in single_params.items())
    fsdp_losses, single_losses = logged_losses(fsdp_dir, args.steps), logged_losses(single_dir, args.steps)
    loss_close = len(fsdp_losses) == len(single_losses) and all(
        abs(a - b) <= args.loss_rtol * abs(b) for a, b in zip(fsdp_losses, single_losses)
    )
    checkpoint = fsdp_dir / f"checkpoint-{args.steps}"

    checks = {
        "f present, finite and positive": bool(f_values) and all(bool((f > 0).all() and f.isfinite().all()) for f in f_values),
        f"parameters within {args.atol} of 1 process (max {max_difference:.2e})": max_difference <= args.atol,
        f"losses match (FSDP {fsdp_losses}, 1 process {single_losses})": loss_close,
        "checkpoint contains ema.safetensors": (checkpoint / "ema.safetensors").is_file(),
        "checkpoint loads with load_qat_model": bool(load_qat_model(str(checkpoint)).config.qat2bit["modules"]),
    }
    for description, passed in checks.items():
        print(("PASS " if passed else "FAIL ") + description)
    print("outputs in", work)
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
