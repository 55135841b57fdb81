"""Distillation from a frozen float teacher during stage A or stage B, as an ``SFTTrainer`` subclass.

TRL's ``DistillationTrainer`` (TRL 1.16) distils on completions the student generates during
training (on-policy, with a generalised JSD) and has no weight between the label loss and the
divergence. Stage A and B here train on fixed SFT data, so this module keeps ``SFTTrainer`` and
overrides ``compute_loss``, the extension point TRL documents for custom losses:

    loss = alpha * label_loss + (1 - alpha) * T^2 * KL(teacher_T || student_T)

where ``label_loss`` is ``SFTTrainer``'s next-token loss, computed here from the full logits and
equal to TRL's to fp32 round-off. ``KL`` is averaged over the tokens that carry a label, with the
same normaliser as the label loss, so ``assistant_only_loss`` and gradient accumulation apply to
both alike.
"""

from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import torch.nn.functional as F
from trl import SFTTrainer

IGNORE_INDEX = -100


def distillation_kl_sum(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0
) -> tuple[torch.Tensor, int]:
    """Return the sum over labelled tokens of ``KL(softmax(teacher / T) || softmax(student / T))`` and their count.

    Logits are (batch, seq, vocab) and predict the next token, so position ``t`` is compared where
    ``labels[:, t + 1]`` is not -100. The sum is fp32 and not yet multiplied by ``T^2``.
    """
    mask = labels[:, 1:] != IGNORE_INDEX
    student = student_logits[:, :-1][mask].float() / temperature
    teacher = teacher_logits[:, :-1][mask].float() / temperature
    per_token = F.kl_div(F.log_softmax(student, dim=-1), F.log_softmax(teacher, dim=-1), log_target=True, reduction="none")
    return per_token.sum(), int(mask.sum())


class DistillationSFTTrainer(SFTTrainer):
    """``SFTTrainer`` whose loss mixes the label loss with the KL divergence to a frozen teacher.

    Args:
        teacher: a causal LM with the same vocabulary as the student. It is frozen, put in eval mode
            and moved to the training device.
        alpha: weight of the label loss, in [0, 1]; 1 trains on labels only, 0 on the teacher only.
        temperature: softmax temperature of both distributions; the KL term is scaled by ``T^2`` so
            its gradient keeps its size as ``T`` changes.
        teacher_dtype: dtype to keep the teacher in (for example ``torch.bfloat16`` on a GPU, to halve
            its memory); default: as loaded.
        *args, **kwargs: passed to ``SFTTrainer``, ``peft_config=QATLoraConfig(...)`` included.

    ``distill/kl`` and ``distill/label_loss`` (per labelled token) are logged; TRL's entropy and token
    accuracy metrics are not, because they come from SFTTrainer's own loss path.
    """

    def __init__(
        self,
        *args,
        teacher: torch.nn.Module,
        alpha: float = 0.5,
        temperature: float = 1.0,
        teacher_dtype: Optional[torch.dtype] = None,
        **kwargs,
    ):
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha={alpha} is invalid: it weights the label loss and must be in [0, 1]")
        if temperature <= 0:
            raise ValueError(f"temperature={temperature} is invalid: use a positive value such as 1.0 or 2.0")
        super().__init__(*args, **kwargs)
        _check_vocabularies(self.model, teacher)
        self.teacher = teacher.to(device=self.args.device, dtype=teacher_dtype).eval().requires_grad_(False)
        self.alpha = alpha
        self.temperature = temperature

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        # SFTTrainer's own loss runs a fused head that returns no logits, and the KL needs them, so the
        # label loss is computed here from the full logits with SFTTrainer's normalisation.
        labels = inputs["labels"]
        model_inputs = {key: value for key, value in inputs.items() if key != "labels"}
        outputs = model(**model_inputs, use_cache=False)
        with torch.no_grad():
            teacher_logits = self.teacher(
                input_ids=inputs["input_ids"],
                attention_mask=inputs.get("attention_mask"),
                position_ids=inputs.get("position_ids"),
            ).logits

        shifted_labels = labels[:, 1:]
        token_count = (shifted_labels != IGNORE_INDEX).sum()
        normaliser = torch.as_tensor(num_items_in_batch if num_items_in_batch is not None else token_count)
        normaliser = normaliser.to(outputs.logits.device).clamp(min=1)
        nll_sum = F.cross_entropy(
            outputs.logits[:, :-1].flatten(0, 1).float(), shifted_labels.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
        )
        kl_sum, _ = distillation_kl_sum(outputs.logits, teacher_logits, labels, self.temperature)
        label_loss = nll_sum / normaliser
        kl = kl_sum / normaliser
        loss = self.alpha * label_loss + (1.0 - self.alpha) * self.temperature**2 * kl
        # As in SFTTrainer: num_items_in_batch counts every rank's tokens, and DDP averages the gradients.
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * self.accelerator.num_processes

        mode = "train" if model.training else "eval"
        self._metrics[mode]["distill/kl"].append(self.accelerator.gather(kl_sum.detach() / token_count.clamp(min=1)).mean().item())
        self._metrics[mode]["distill/label_loss"].append(
            self.accelerator.gather(nll_sum.detach() / token_count.clamp(min=1)).mean().item()
        )
        return (loss, outputs) if return_outputs else loss


def _check_vocabularies(student: torch.nn.Module, teacher: torch.nn.Module) -> None:
    student_vocab = student.get_output_embeddings().weight.shape[0]
    teacher_vocab = teacher.get_output_embeddings().weight.shape[0]
    if student_vocab != teacher_vocab:
        raise ValueError(
            f"the teacher's vocabulary has {teacher_vocab} entries but the student's has {student_vocab}; "
            f"distillation compares the two distributions token by token, so use a teacher with the "
            f"student's tokenizer (by default the student's own float checkpoint)"
        )


@dataclass
class DistillArguments:
    """Command-line arguments of the example scripts for distillation from a float teacher."""

    distill: bool = field(default=False, metadata={"help": "Train against a frozen float teacher as well as the labels."})
    teacher: Optional[str] = field(
        default=None,
        metadata={"help": "Teacher model (Hub id or directory) with the student's tokenizer. Default: the student's "
                  "own float checkpoint before quantization."},
    )
    distill_alpha: float = field(default=0.5, metadata={"help": "Weight of the label loss in [0, 1]; 1 is plain SFT."})
    distill_temperature: float = field(default=1.0, metadata={"help": "Softmax temperature of the KL term."})
    teacher_dtype: Optional[str] = field(
        default=None, metadata={"help": "Keep the teacher in this dtype, e.g. bfloat16 on a GPU; default: as loaded."}
    )

    def trainer_kwargs(self, teacher: torch.nn.Module) -> dict[str, Any]:
        """Return the keyword arguments that ``DistillationSFTTrainer`` adds to ``SFTTrainer``'s."""
        dtype = getattr(torch, self.teacher_dtype) if self.teacher_dtype else None
        return {"teacher": teacher, "alpha": self.distill_alpha, "temperature": self.distill_temperature, "teacher_dtype": dtype}
