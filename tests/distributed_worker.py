"""Run an example training script, in this process or as one rank of ``accelerate launch``, and report per rank.

    accelerate launch --multi_gpu --num_processes 2 tests/distributed_worker.py qat REPORT_DIR -- <train_qat.py args>
    python tests/distributed_worker.py lora REPORT_DIR -- <train_lora_recovery.py args>

On CPU processes the script arguments must include ``--use_cpu true`` (see docs/multi_gpu.md).

The script's own ``main`` runs unchanged. Each rank then writes to REPORT_DIR:

- ``rank<R>.json``: the rank, the world size, the logged losses, and the files that this rank wrote
  through ``save_qat_model`` and ``EMACallback.save``;
- ``rank<R>.safetensors``: the trainable parameters of the final model (stage A: weights and every
  ``f``; stage B: the LoRA matrices), in fp32.

tests/test_distributed.py compares the reports of a 2-process run with those of a 1-process run.
"""

import contextlib
import json
import sys
from pathlib import Path

from safetensors.torch import save_file

EXAMPLES_DIR = Path(__file__).resolve().parents[1] / "examples"


@contextlib.contextmanager
def record_writes(module, name: str, writes: list[str]):
    """Wrap ``module.<name>`` while the block runs, appending each call's path argument to ``writes``."""
    original = getattr(module, name)

    def wrapper(*args, **kwargs):
        writes.append(str(args[1] if len(args) > 1 else kwargs["save_directory"]))
        return original(*args, **kwargs)

    setattr(module, name, wrapper)
    try:
        yield
    finally:
        setattr(module, name, original)


def run(stage: str, report_dir: str, script_args: list[str]):
    """Run ``examples/train_qat.py`` (stage "qat") or ``examples/train_lora_recovery.py`` ("lora") and write the report."""
    if str(EXAMPLES_DIR) not in sys.path:
        sys.path.insert(0, str(EXAMPLES_DIR))
    import train_lora_recovery
    import train_qat
    from trl import ModelConfig, ScriptArguments, SFTConfig, TrlParser

    from peft_qat2bit import callbacks

    writes: list[str] = []
    with record_writes(callbacks, "_atomic_save_file", writes), record_writes(train_qat, "save_qat_model", writes):
        if stage == "qat":
            parser = TrlParser((ScriptArguments, SFTConfig, ModelConfig, train_qat.QATArguments))
            script, training, model_args, qat_args = parser.parse_args_and_config(args=script_args)
            trainer = train_qat.main(script, training, model_args, qat_args)
        elif stage == "lora":
            parser = TrlParser((ScriptArguments, SFTConfig, train_lora_recovery.LoraArguments))
            trainer = train_lora_recovery.main(*parser.parse_args_and_config(args=script_args))
        else:
            raise ValueError(f"unknown stage {stage!r}; expected 'qat' or 'lora'")

    state = trainer.accelerator.state
    report = {
        "rank": state.process_index,
        "world_size": state.num_processes,
        "distributed_type": str(state.distributed_type),
        "model_class": type(trainer.model_wrapped).__name__,
        "losses": [record["loss"] for record in trainer.state.log_history if "loss" in record],
        "writes": writes,
    }
    model = trainer.accelerator.unwrap_model(trainer.model)
    params = {
        name: param.detach().float().cpu().contiguous()
        for name, param in model.named_parameters()
        if param.requires_grad
    }
    report_path = Path(report_dir)
    report_path.mkdir(parents=True, exist_ok=True)
    save_file(params, str(report_path / f"rank{state.process_index}.safetensors"))
    (report_path / f"rank{state.process_index}.json").write_text(json.dumps(report))
    return trainer


if __name__ == "__main__":
    if len(sys.argv) < 4 or sys.argv[3] != "--":
        raise SystemExit("usage: distributed_worker.py {qat,lora} REPORT_DIR -- <script args>")
    run(sys.argv[1], sys.argv[2], sys.argv[4:])
