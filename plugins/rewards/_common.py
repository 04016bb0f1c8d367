"""Helpers shared by the reward functions: completion text, answer tags, row columns."""
from __future__ import annotations

import re
from typing import Any, Sequence

_ANSWER_BLOCK = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)


def completion_text(completion: Any) -> str:
    """The text of one completion.

    dare passes plain strings; a chat-style completion (a list of messages, or one message
    dict, as trl's reward functions receive) gives the content of its last message.
    """
    if completion is None:
        return ""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, dict):
        return str(completion.get("content") or "")
    if isinstance(completion, (list, tuple)):
        return completion_text(completion[-1]) if completion else ""
    return str(completion)


def last_answer_block(text: str) -> str | None:
    """Stripped content of the last closed ``<answer>...</answer>`` block, or None (d1's
    ``extract_solution`` / ``extract_answer_sudoku``)."""
    blocks = _ANSWER_BLOCK.findall(text)
    return blocks[-1].strip() if blocks else None


def column(reward: str, row: dict, name: str, parent: str) -> Sequence[Any]:
    """The per-completion values of column ``name``.

    Datasets flatten the parquet layout to top-level keys (``ground_truth``, ``numbers``,
    ``puzzle``); raw verl/DARE rows, which keep them nested under ``reward_model`` or
    ``extra_info``, work too.
    """
    if name in row and row[name] is not None:
        return row[name]
    if parent in row and row[parent] is not None:
        return [d.get(name) if isinstance(d, dict) else None for d in row[parent]]
    raise KeyError(f"reward {reward!r} needs a {name!r} column (or {parent}.{name}) in the "
                   f"rows; got columns: {', '.join(sorted(row)) or 'none'}")


def check_lengths(reward: str, completions: Sequence[Any], **columns: Sequence[Any]) -> None:
    for name, values in columns.items():
        if len(values) != len(completions):
            raise ValueError(f"reward {reward!r}: {len(completions)} completions but "
                             f"{len(values)} values of {name!r} (one per completion expected)")
