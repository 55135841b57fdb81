"""The YAML recipes parse with their scripts' TrlParser and give the documented settings.

The recipes set bf16 for GPUs; on a CPU-only machine SFTConfig rejects bf16, so the tests override it.
"""

import sys
from pathlib import Path

from trl import ModelConfig, ScriptArguments, SFTConfig, TrlParser

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
sys.path.insert(0, str(EXAMPLES))

from train_lora_recovery import LoraArguments  # noqa: E402
from train_qat import QATArguments  # noqa: E402


def test_qat_recipe_parses():
    parser = TrlParser((ScriptArguments, SFTConfig, ModelConfig, QATArguments))
    script_args, training_args, model_args, qat_args = parser.parse_args_and_config(
        args=["--config", str(EXAMPLES / "recipes" / "qat_qwen3_0.6b_alpaca.yaml"), "--bf16", "false"]
    )
    assert model_args.model_name_or_path == "Qwen/Qwen3-0.6B"
    assert script_args.dataset_name == "tatsu-lab/alpaca"
    assert training_args.weight_decay == 0.0
    assert training_args.assistant_only_loss
    assert qat_args.granularity == "per_tensor"
    assert qat_args.ema_decay == 0.999


def test_lora_recipe_parses():
    parser = TrlParser((ScriptArguments, SFTConfig, LoraArguments))
    _, training_args, lora_args = parser.parse_args_and_config(
        args=["--config", str(EXAMPLES / "recipes" / "lora_recovery_qwen3_0.6b_alpaca.yaml"), "--bf16", "false"]
    )
    assert (lora_args.lora_r, lora_args.lora_alpha, lora_args.lora_dropout) == (32, 32, 0.05)
    assert training_args.learning_rate == 2e-4
