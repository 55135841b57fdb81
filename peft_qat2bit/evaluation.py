"""Held-out perplexity of a causal LM on a list of texts."""

import math
from typing import Sequence

import torch


def token_blocks(tokenizer, texts: Sequence[str], block_length: int, max_tokens: int | None = None) -> torch.Tensor:
    """Tokenize ``texts``, join them with the EOS token and cut the stream into (blocks, block_length) ids.

    The tail shorter than ``block_length`` is dropped; ``max_tokens`` caps the total number of tokens.
    """
    separator = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    stream: list[int] = []
    for text in texts:
        stream.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        stream.extend(separator)
        if max_tokens is not None and len(stream) >= max_tokens:
            break
    if max_tokens is not None:
        stream = stream[:max_tokens]
    blocks = len(stream) // block_length
    if blocks == 0:
        raise ValueError(
            f"the texts give {len(stream)} tokens, fewer than one block of {block_length}; "
            f"use more text or a shorter block_length"
        )
    return torch.tensor(stream[: blocks * block_length]).view(blocks, block_length)


@torch.no_grad()
def perplexity(model: torch.nn.Module, blocks: torch.Tensor, batch_size: int = 4) -> float:
    """Return exp(mean next-token NLL) of ``model`` over every predicted token of ``blocks`` (blocks, length)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total_nll = 0.0
    total_tokens = 0
    for start in range(0, blocks.shape[0], batch_size):
        batch = blocks[start : start + batch_size].to(device)
        logits = model(input_ids=batch).logits.float()
        nll = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum"
        )
        total_nll += nll.item()
        total_tokens += batch[:, 1:].numel()
    model.train(was_training)
    return math.exp(total_nll / total_tokens)
