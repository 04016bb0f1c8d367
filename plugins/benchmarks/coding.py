"""``code``: write a Python function from its signature and docstring; unit tests decide.

Problems: ``data/code_problems.jsonl`` beside this file (20 original HumanEval-style
problems; each line has ``task_id``, ``prompt`` = imports + signature + docstring,
``entry_point``, ``tests`` = assert statements, and a reference ``solution`` body, which
is never shown to the model and only checked by the tests). Another file in the same
layout can be given with ``path=``.

prompt: one user turn asking for the whole function in a ```python block, with the stub
quoted. few-shot: up to 2 hand-written solved examples (``CODE_EXAMPLES``) as earlier
user/assistant turns.

score: the code is the last fenced block that defines the entry point (else the last
fenced block; an unclosed fence runs to the end; no fence: the whole completion). When it
defines ``def <entry_point>(`` at the top level the program is prompt + code (the code's
definition replaces the stub, and the prompt's imports stay available), otherwise the code
is taken as the function's body (indented when it is not) and appended to the prompt. The
tests follow, and the program runs in ``sandbox.run_python`` (``timeout_s`` per problem,
default 5 s, ``memory_mb`` 256). 1.0 when it exits 0 having run to its end (so a
``sys.exit(0)`` in the code does not skip the asserts), else 0.0. prediction: the code.
"""
from __future__ import annotations

import json
import re
import textwrap
from pathlib import Path

from dare_plugins.rewards._common import completion_text

from ._data import check_counts, with_shots
from .sandbox import run_python

PROBLEMS = Path(__file__).resolve().parent / "data" / "code_problems.jsonl"
DEFAULT_TIMEOUT_S = 5.0
DEFAULT_MEMORY_MB = 256

CODE_INSTRUCTION = ("Complete the following Python function. Reply with the whole function "
                    "(signature and body) in one ```python code block, using only the "
                    "standard library.\n\n```python\n{stub}```")

_FENCE = re.compile(r"```[ \t]*(?:python3?|py)?[ \t]*\n(.*?)```", re.DOTALL | re.IGNORECASE)
_OPEN_FENCE = re.compile(r"```[ \t]*(?:python3?|py)?[ \t]*\n", re.IGNORECASE)

# Hand-written (stub, reply) pairs for few-shot prompts; not in the problem file.
CODE_EXAMPLES: tuple[tuple[str, str], ...] = (
    ('def sum_of_squares(a: int, b: int) -> int:\n    """Return a squared plus b squared.'
     '\n\n    >>> sum_of_squares(2, 3)\n    13\n    """\n',
     "```python\ndef sum_of_squares(a: int, b: int) -> int:\n    return a * a + b * b\n```"),
    ('def reverse_words(sentence: str) -> str:\n    """Return the words of sentence in '
     'reverse order, joined by single spaces.\n\n    >>> reverse_words("to be  or")\n'
     '    \'or be to\'\n    """\n',
     "```python\ndef reverse_words(sentence: str) -> str:\n"
     "    return \" \".join(reversed(sentence.split()))\n```"),
)


def load_code(limit: int | None = None, few_shot: int = 0, data_dir: str | None = None,
              path: str | None = None, timeout_s: float = DEFAULT_TIMEOUT_S,
              memory_mb: int = DEFAULT_MEMORY_MB, **options) -> list[dict]:
    """``data_dir`` is accepted for a uniform call and ignored (the problems ship with the
    plugin); ``path`` reads another problem file; ``timeout_s``/``memory_mb`` go into every
    row for the scorer."""
    check_counts("code", limit, few_shot, len(CODE_EXAMPLES), options)
    file = Path(path) if path else PROBLEMS
    if not file.is_file():
        raise FileNotFoundError(f"benchmark 'code': problem file {file} not found")
    shots = [(CODE_INSTRUCTION.format(stub=stub), reply) for stub, reply in
             CODE_EXAMPLES[:few_shot]]
    rows = []
    with open(file, encoding="utf-8") as f:
        problems = [json.loads(line) for line in f if line.strip()]
    for p in problems[:limit] if limit is not None else problems:
        rows.append({
            "id": p["task_id"],
            "prompt": with_shots(shots, CODE_INSTRUCTION.format(stub=p["prompt"])),
            "code_prompt": p["prompt"],
            "entry_point": p["entry_point"],
            "tests": list(p["tests"]),
            "ground_truth": p.get("solution"),
            "timeout_s": timeout_s,
            "memory_mb": memory_mb,
        })
    return rows


def _defines(code: str, entry_point: str) -> bool:
    return re.search(rf"^def\s+{re.escape(entry_point)}\s*\(", code, re.MULTILINE) is not None


def extract_code(text: str, entry_point: str | None = None) -> str:
    """The code of a completion: the last fenced block defining ``entry_point`` (else the
    last fenced block, else what follows an unclosed fence, else the whole text)."""
    blocks = _FENCE.findall(text)
    if blocks:
        if entry_point:
            defining = [b for b in blocks if _defines(b, entry_point)]
            if defining:
                return defining[-1]
        return blocks[-1]
    opened = list(_OPEN_FENCE.finditer(text))
    if opened:
        return text[opened[-1].end():]
    return text


def build_program(code: str, row: dict) -> str:
    """The script the sandbox runs: stub + the completion's code + the tests."""
    stub = row["code_prompt"]
    if _defines(code, row["entry_point"]):
        body = "\n\n" + code.strip("\n") + "\n"
    else:
        lines = code.strip("\n")
        first = next((line for line in lines.splitlines() if line.strip()), "")
        if first and not first[0].isspace():
            lines = textwrap.indent(lines, "    ")
        body = lines + "\n"
    return stub.rstrip("\n") + "\n" + body + "\n\n" + "\n".join(row["tests"]) + "\n"


def score_code(completion, row: dict) -> tuple[float, str | None]:
    code = extract_code(completion_text(completion), row["entry_point"])
    if not code.strip():
        return 0.0, None
    result = run_python(build_program(code, row),
                        timeout_s=float(row.get("timeout_s", DEFAULT_TIMEOUT_S)),
                        memory_mb=int(row.get("memory_mb", DEFAULT_MEMORY_MB)))
    return (1.0 if result.ok and result.completed else 0.0), code.strip("\n")
