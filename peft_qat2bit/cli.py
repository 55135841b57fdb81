"""Command line: ``peft-qat2bit export CHECKPOINT OUT [--format packed|snapped] [--float-dtype DTYPE]``.

CHECKPOINT is a stage A directory written by ``save_qat_model`` or a ``Trainer``; it is loaded with
``load_qat_model``. ``packed`` writes the real 2-bit model and prints its size report. ``snapped``
writes a float checkpoint with the weights on the 2-bit grid, which plain transformers loads.
"""

import argparse
import sys
from typing import Optional, Sequence

from .export import FLOAT_DTYPES, export_packed, export_snapped


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="peft-qat2bit", description="Balanced 2-bit QAT tools.")
    commands = parser.add_subparsers(dest="command", required=True)
    export = commands.add_parser(
        "export",
        help="export a stage A checkpoint as a packed 2-bit model or as snapped float weights",
        description="Export a stage A (QAT) checkpoint. The output directory is written atomically.",
    )
    export.add_argument("checkpoint", help="stage A checkpoint directory (save_qat_model or Trainer output)")
    export.add_argument("out", help="output directory; an existing one is replaced")
    export.add_argument(
        "--format",
        choices=("packed", "snapped"),
        default="packed",
        help="packed: 2-bit codes and fp32 scales, loaded with peft_qat2bit.load_packed (default); "
        "snapped: float weights on the 2-bit grid, loaded with AutoModelForCausalLM.from_pretrained",
    )
    export.add_argument(
        "--float-dtype",
        choices=tuple(FLOAT_DTYPES),
        default=None,
        help="dtype of the float tensors (embeddings, norms, float layers; snapped weights too); "
        "default: as stored in the checkpoint",
    )
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    float_dtype = FLOAT_DTYPES[args.float_dtype] if args.float_dtype else None
    try:
        if args.format == "packed":
            print(export_packed(args.checkpoint, args.out, float_dtype=float_dtype))
        else:
            path = export_snapped(args.checkpoint, args.out, float_dtype=float_dtype)
            print(f"snapped float export: {path}; load it with AutoModelForCausalLM.from_pretrained")
    except (FileNotFoundError, ValueError) as error:
        parser.exit(1, f"peft-qat2bit export: error: {error}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
