"""Train a tiny QAT model with torch's FSDP2 (``fully_shard``) on CPU processes and check it against one process.

    python -m torch.distributed.run --nproc_per_node 2 tests/fsdp_worker.py OUT_DIR GRANULARITY

Every rank builds the same tiny Qwen3, quantizes it, and keeps an unsharded copy as the reference.
The sharded model trains on its rank's half of each batch, the reference on the whole batch. After
the steps, the full state dict is gathered to rank 0, written with ``save_qat_model`` and loaded back
with ``load_qat_model``. Rank 0 writes ``OUT_DIR/report.json`` for tests/test_distributed.py.

The Trainer cannot run FSDP on CPU processes: with ``use_cpu`` accelerate 1.16 picks ``MULTI_CPU``
(DDP) and ignores the FSDP settings, so this worker calls ``fully_shard`` directly.
"""

import copy
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist
from safetensors.torch import load_file
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
)
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from torchao.quantization import quantize_
from transformers import TrainerControl, TrainerState

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import tiny_qwen3

from peft_qat2bit import (
    Balanced2BitFakeQuantizeConfig,
    EMACallback,
    QAT2BitConfig,
    load_qat_model,
    save_qat_model,
)
from peft_qat2bit.callbacks import EMA_FILE
from peft_qat2bit.optim import qat_parameter_groups
from peft_qat2bit.stats import quantizer_statistics

STEPS = 3
EMA_DECAY = 0.5
BATCH_SIZE = 4  # the global batch: each of the 2 ranks takes 2 rows


def build_optimizer(model):
    return torch.optim.AdamW(qat_parameter_groups(model, learning_rate=5e-3, f_learning_rate=2e-2))


def train_step(model, optimizer, input_ids):
    loss = model(input_ids=input_ids, labels=input_ids).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    return loss.detach()


def main(out_dir: str, granularity: str) -> None:
    dist.init_process_group("gloo")
    rank, world_size = dist.get_rank(), dist.get_world_size()

    model = tiny_qwen3(seed=0)
    quantize_(model, QAT2BitConfig(Balanced2BitFakeQuantizeConfig(granularity)))
    model.train()
    reference = copy.deepcopy(model)

    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    f_names = [name for name, _ in model.named_parameters() if name.endswith("weight_fake_quantizer.f")]
    f_sharded = all(isinstance(param, DTensor) for name, param in model.named_parameters() if name in f_names)

    optimizer = build_optimizer(model)
    reference_optimizer = build_optimizer(reference)

    # The EMA callback runs as the Trainer would call it, on the sharded model and on the reference.
    out = Path(out_dir)
    ema, reference_ema = EMACallback(decay=EMA_DECAY), EMACallback(decay=EMA_DECAY)
    state, control = TrainerState(is_world_process_zero=rank == 0), TrainerControl()
    sharded_args = SimpleNamespace(output_dir=str(out / "sharded"))
    reference_args = SimpleNamespace(output_dir=str(out / "reference"))
    ema.on_train_begin(sharded_args, state, control, model=model)
    reference_ema.on_train_begin(reference_args, state, control, model=reference)
    generator = torch.Generator().manual_seed(0)
    losses, reference_losses = [], []
    for _ in range(STEPS):
        batch = torch.randint(0, model.config.vocab_size, (BATCH_SIZE, 16), generator=generator)
        rows = BATCH_SIZE // world_size
        # Every row has the same length, so the mean of the rank means is the whole-batch mean.
        loss = train_step(model, optimizer, batch[rank * rows : (rank + 1) * rows])
        dist.all_reduce(loss)
        losses.append(loss.item() / world_size)
        reference_losses.append(train_step(reference, reference_optimizer, batch).item())
        state.global_step += 1
        ema.on_step_end(sharded_args, state, control)
        reference_ema.on_step_end(reference_args, state, control)

    ema.on_save(sharded_args, state, control)
    reference_ema.on_save(reference_args, state, control)
    dist.barrier()  # rank 0 writes the file that every rank reads next
    checkpoint = out / "sharded" / f"checkpoint-{state.global_step}"
    resumed_ema = EMACallback(decay=EMA_DECAY, resume_from=str(checkpoint))
    resumed_ema.on_train_begin(sharded_args, state, control, model=model)
    resumed_averages = resumed_ema.state_dict()
    averages = ema.state_dict()
    stats = quantizer_statistics(model)

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    full_state = get_model_state_dict(model, options=options)
    ema.copy_to_model()
    ema_state = get_model_state_dict(model, options=options)
    if rank == 0:
        report = {"world_size": world_size, "f_count": len(f_names), "f_sharded": f_sharded,
                  "losses": losses, "reference_losses": reference_losses}
        reference_state = reference.state_dict()
        report["max_diff_to_reference"] = {
            name: (full_state[name] - reference_state[name]).abs().max().item() for name in reference_state
        }

        # Save as examples/train_qat.py does under FSDP (the sharded model and the gathered state dict),
        # then load the checkpoint into one process: it must contain the gathered state bit for bit.
        save_qat_model(model, str(Path(out_dir) / "checkpoint"), state_dict=full_state)
        loaded_state = load_qat_model(str(Path(out_dir) / "checkpoint")).state_dict()
        report["reload_mismatches"] = [
            name for name, value in full_state.items() if not torch.equal(loaded_state[name], value)
        ]
        report["reload_missing"] = sorted(set(full_state) - set(loaded_state))

        ema_file = load_file(str(checkpoint / EMA_FILE))
        reference_file = load_file(str(out / "reference" / f"checkpoint-{state.global_step}" / EMA_FILE))
        report["ema_names_match"] = ema_file.keys() == reference_file.keys()
        report["ema_max_diff_to_reference"] = max(
            (ema_file[name] - reference_file[name]).abs().max().item() for name in reference_file
        )
        report["ema_resume_mismatches"] = [
            name for name in averages if not torch.equal(resumed_averages[name], averages[name])
        ]
        report["ema_apply_mismatches"] = [
            name for name in ema_file if not torch.equal(ema_state[name].float(), ema_file[name])
        ]
        reference_stats = quantizer_statistics(reference)
        report["stats_max_diff"] = max(abs(stats[key] - reference_stats[key]) for key in reference_stats)
        (Path(out_dir) / "report.json").write_text(json.dumps(report))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit("usage: fsdp_worker.py OUT_DIR GRANULARITY")
    main(sys.argv[1], sys.argv[2])
