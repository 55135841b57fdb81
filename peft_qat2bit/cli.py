"""Command line: ``peft-qat2bit export CHECKPOINT OUT [--format packed|snapped|gguf] [--float-dtype DTYPE]``
and ``peft-qat2bit export-lora ADAPTER OUT.gguf [--base CHECKPOINT]``.

CHECKPOINT is a stage A directory written by ``save_qat_model`` or a ``Trainer``; it is loaded with
``load_qat_model``. ``packed`` writes the real 2-bit model and prints its size report. ``snapped``
writes a float checkpoint with the weights on the 2-bit grid, which plain transformers loads.
``gguf`` writes one llama.cpp file (OUT is the .gguf path) with the quantized linears as exact Q2_K.
``export-lora`` writes a stage B adapter as a llama.cpp GGUF LoRA file for that base.
"""

import argparse
import sys
from typing import Optional, Sequence

from .export import FLOAT_DTYPES, export_packed, export_snapped
from .gguf_export import FLOAT_TYPES, export_gguf
from .gguf_lora import ADAPTER_TENSOR_TYPES, export_gguf_lora


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="peft-qat2bit", description="Balanced 2-bit QAT tools.")
    commands = parser.add_subparsers(dest="command", required=True)
    export = commands.add_parser(
        "export",
        help="export a stage A checkpoint as a packed 2-bit model or as snapped float weights",
        description="Export a stage A (QAT) checkpoint. The output directory is written atomically.",
    )
    export.add_argument("checkpoint", help="stage A checkpoint directory (save_qat_model or Trainer output)")
    export.add_argument("out", help="output directory (a .gguf file for --format gguf); an existing one is replaced")
    export.add_argument(
        "--format",
        choices=("packed", "snapped", "gguf"),
        default="packed",
        help="packed: 2-bit codes and fp32 scales, loaded with peft_qat2bit.load_packed (default); "
        "snapped: float weights on the 2-bit grid, loaded with AutoModelForCausalLM.from_pretrained; "
        "gguf: one llama.cpp file with the quantized linears as exact Q2_K",
    )
    export.add_argument(
        "--float-dtype",
        choices=tuple(FLOAT_DTYPES),
        default=None,
        help="dtype of the float tensors (embeddings, norms, float layers; snapped weights too); "
        "default: as stored in the checkpoint",
    )
    export.add_argument(
        "--float-type",
        choices=FLOAT_TYPES,
        default="f16",
        help="gguf only: type of the embeddings and float 2-D tensors (norms stay f32); default f16",
    )
    export.add_argument(
        "--fallback",
        choices=FLOAT_TYPES,
        default=None,
        help="gguf only: write quantized linears that Q2_K cannot store exactly (per-group scales, rows not a "
        "multiple of 256) in this type; default: reject them",
    )
    lora = commands.add_parser(
        "export-lora",
        help="export a stage B adapter as a llama.cpp GGUF LoRA file",
        description="Write a LoRA adapter directory (save_pretrained output) as a GGUF LoRA file for the base "
        "that `export --format gguf` writes from the same stage A checkpoint. The file is written atomically.",
    )
    lora.add_argument("adapter", help="adapter directory written by save_pretrained")
    lora.add_argument("out", help="the .gguf file; an existing one is replaced")
    lora.add_argument(
        "--base",
        default=None,
        help="stage A checkpoint the adapter was trained on; default: the adapter's base_model_name_or_path",
    )
    lora.add_argument(
        "--tensor-type", choices=ADAPTER_TENSOR_TYPES, default="f32", help="type of the adapter tensors; default f32"
    )
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "export-lora":
        try:
            print(export_gguf_lora(args.adapter, args.out, base_checkpoint=args.base, tensor_type=args.tensor_type))
        except (FileNotFoundError, ValueError) as error:
            parser.exit(1, f"peft-qat2bit export-lora: error: {error}\n")
        return 0
    float_dtype = FLOAT_DTYPES[args.float_dtype] if args.float_dtype else None
    if args.format == "gguf" and args.float_dtype:
        parser.error("--float-dtype does not apply to --format gguf; use --float-type f32|f16|q8_0")
    try:
        if args.format == "packed":
            print(export_packed(args.checkpoint, args.out, float_dtype=float_dtype))
        elif args.format == "gguf":
            print(export_gguf(args.checkpoint, args.out, float_type=args.float_type, fallback=args.fallback))
        else:
            path = export_snapped(args.checkpoint, args.out, float_dtype=float_dtype)
            print(f"snapped float export: {path}; load it with AutoModelForCausalLM.from_pretrained")
    except (FileNotFoundError, ValueError) as error:
        parser.exit(1, f"peft-qat2bit export: error: {error}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
