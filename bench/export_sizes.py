"""Size of the packed export of a randomly initialised model of the Qwen/Qwen3-0.6B shape.

The model is built from Qwen3Config (vocab 151936, hidden 1024, intermediate 3072, 28 layers, 16
heads, 8 KV heads, head_dim 128, tied embeddings) with random weights, quantized with stage A's
prepare step (no training) and exported with export_packed. The sizes depend only on the shapes,
the granularity and the dtype of the float tensors, so random weights give the same numbers as the
trained model would.

    python bench/export_sizes.py          # full shape, bf16 weights: about 1.5 GB of RAM
    python bench/export_sizes.py --tiny   # 2 layers, hidden 64: seconds
"""

import argparse
import tempfile
from pathlib import Path

import torch
from torchao.quantization import quantize_
from transformers import AutoModelForCausalLM, Qwen3Config

from peft_qat2bit import Balanced2BitFakeQuantizeConfig, QAT2BitConfig, export_packed

QWEN3_0_6B = dict(vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                  num_attention_heads=16, num_key_value_heads=8, head_dim=128, max_position_embeddings=40960,
                  rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=True)
TINY = dict(QWEN3_0_6B, vocab_size=1024, hidden_size=64, intermediate_size=192, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="use a 2-layer model of hidden size 64")
    parser.add_argument("--granularity", choices=("per_tensor", "per_channel", "per_group"), default="per_tensor")
    parser.add_argument("--group-size", type=int, default=None, help="input columns per group for per_group")
    parser.add_argument("--init", choices=("absmax", "newton"), default="absmax",
                        help="how f starts; it does not change the sizes (default: absmax, the faster)")
    parser.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16",
                        help="dtype of the model and of the exported float tensors (default: bfloat16)")
    parser.add_argument("--out", default=None, help="keep the export in this directory (default: a temporary one)")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    torch.manual_seed(0)
    dtype = getattr(torch, args.dtype)
    config = Qwen3Config(**(TINY if args.tiny else QWEN3_0_6B))
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    float_bytes = sum(param.nbytes for param in model.parameters())
    weight_config = Balanced2BitFakeQuantizeConfig(args.granularity, group_size=args.group_size, init=args.init)
    quantize_(model, QAT2BitConfig(weight_config=weight_config))

    with tempfile.TemporaryDirectory(prefix="export_sizes.") as directory:
        out = Path(args.out) if args.out else Path(directory) / "packed"
        report = export_packed(model, out)
        shape = "tiny Qwen3" if args.tiny else "Qwen3-0.6B shape"
        print(f"{shape}, random weights, {args.granularity}, float tensors in {args.dtype}")
        print(report)
        print(f"  float model parameters ({args.dtype}, tied embedding counted once): {float_bytes:,} B; "
              f"packed directory / float parameters = {report.directory_bytes / float_bytes:.3f}")


if __name__ == "__main__":
    main()
