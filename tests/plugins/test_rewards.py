"""The rewards plugin: math_answer, countdown, sudoku and the d1 format rewards."""
from __future__ import annotations

import itertools
import time
from concurrent.futures import ThreadPoolExecutor
from fractions import Fraction

import pytest

import dare_plugins.rewards as rewards
from dare.plugins import PluginManager
from dare_plugins.rewards import math_reward
from dare_plugins.rewards.countdown_reward import InvalidExpression, evaluate, parse_numbers

NAMES = ["countdown", "format_soft", "format_strict", "format_xmlcount", "int_answer",
         "math_answer", "sudoku"]


def tagged(answer: str, reasoning: str = "some steps") -> str:
    """A completion in the exact layout the Countdown / Sudoku prompts ask for."""
    return f"<reasoning>\n{reasoning}\n</reasoning>\n<answer>\n{answer}\n</answer>\n"


def math(completions, truths):
    return rewards.math_answer(None, completions, ground_truth=truths)


def one_math(completion, truth):
    return math([completion], [truth])[0]


# --- registration ----------------------------------------------------------------------------


def test_registered_through_the_plugin_manager():
    registry = PluginManager(plugins=[rewards], entry_points=False).registry
    assert registry.rewards.names() == NAMES
    for name in NAMES:
        entry = registry.rewards.get(name)
        assert entry.name == name and entry.description
    fn = registry.rewards.get("math_answer").fn
    assert fn(["q"], ["#### 7"], ground_truth=["7"]) == [1.0]


# --- math_answer -----------------------------------------------------------------------------


@pytest.mark.parametrize("completion, truth", [
    ("So the total is \\boxed{18}.", "18"),                          # boxed
    ("48 + 24 = 72\n#### 72", "72"),                                 # GSM8K '####'
    ("<reasoning>\n16-3-4=9, 9*2=18\n</reasoning>\n<answer>\n18\n</answer>\n", "18"),
    ("#### 1,000", "1000"),                                          # thousands separators
    ("<answer>1,234,567</answer>", "1234567"),
    ("\\boxed{10,\\!080}", "10,\\!080"),                             # MATH-style thin space
    ("<answer>\\$18.00</answer>", "18"),                             # dollars
    ("<answer>18 dollars.</answer>", "18"),                          # trailing unit words
    ("\\boxed{\\frac{3}{4}}", "0.75"),                               # fractions / LaTeX
    ("\\boxed{\\dfrac34}", "\\frac{3}{4}"),
    ("<answer>3/4</answer>", "\\frac{3}{4}"),
    ("\\boxed{(3, \\frac{\\pi}{2})}", "\\left( 3, \\frac{\\pi}{2} \\right)"),
    ("\\boxed{\\sqrt{8}}", "2\\sqrt{2}"),
    ("\\boxed{[-2, 7]}", "x \\in [-2,7]"),
    ("\\boxed{\\text{Evelyn}}", "\\text{Evelyn}"),
    ("#### -5", "-5"),
    ("<answer>The answer is \\boxed{7}</answer>", "7"),              # box inside the answer tag
    ("\\boxed{5} was a guess; <answer>7</answer>", "7"),             # the answer tag wins
    ("#### 18\nSome text after with 19", "18"),                      # '####' takes its line
    ("<reasoning>x</reasoning><answer>\n42\n", "42"),                 # unclosed answer tag
])
def test_math_answer_correct(completion, truth):
    assert one_math(completion, truth) == 1.0


@pytest.mark.parametrize("completion, truth", [
    ("\\boxed{17}", "18"),                                           # wrong
    ("#### 5", "-5"),
    ("<answer>1,8</answer>", "18"),
    ("\\boxed{\\frac{1}{3}}", "0.75"),
    ("The answer is 18", "18"),                                      # no box / #### / tag
    ("", "18"),
    ("<answer></answer>", "18"),
    ("####", "18"),
    ("\\boxed{", "18"),                                              # malformed box
    ("\\boxed{\\frac{1}{2", "\\frac{1}{2}"),
    ("<answer>hello world</answer>", "18"),
    ("\\boxed{" + "9" * 20000 + "}", "18"),                          # huge answer: truncated
    ("<answer>" + "1+" * 2000 + "1</answer>", "2001"),
    ("#### 18", None),                                               # no ground truth
    ("#### 18", "\\frac{"),                                          # unparseable ground truth
])
def test_math_answer_wrong_or_malformed(completion, truth):
    assert one_math(completion, truth) == 0.0


def test_math_answer_extraction_rules():
    extract = rewards.extract_answer
    assert extract("a \\boxed{1} b \\boxed{\\frac{2}{3}} c") == "\\frac{2}{3}"   # last box
    assert extract("\\fbox{4}") == "4"
    assert extract("x #### 1 #### 2\nmore") == "2"                              # last ####
    assert extract("<answer> 7 </answer> then <answer>8</answer>") == "8"        # last tag
    assert extract("no anchor 12") is None
    assert len(extract("<answer>" + "x" * 5000)) == math_reward.MAX_ANSWER_CHARS


def test_math_answer_batch_garbage_and_chat_completions():
    completions = [
        None, 17, [{"role": "assistant", "content": "\\boxed{3}"}], {"content": "#### 3"},
        "\x00\x01\\boxed{\\\\}}}{{", "<answer>" * 50, "\\boxed{" * 200,
    ]
    scores = math(completions, ["3"] * len(completions))
    assert scores == [0.0, 0.0, 1.0, 1.0, 0.0, 0.0, 0.0]
    assert all(type(s) is float for s in scores)


def test_math_answer_is_bounded_on_pathological_input(monkeypatch):
    monkeypatch.setattr(math_reward, "PARSE_TIMEOUT", 1)
    monkeypatch.setattr(math_reward, "VERIFY_TIMEOUT", 1)
    nested = "\\boxed{" + "x^{" * 150 + "}" * 150 + "}"
    start = time.perf_counter()
    assert one_math(nested, "1") == 0.0
    assert time.perf_counter() - start < 8


def test_math_answer_off_the_main_thread():
    """math-verify's signal timeouts only work on the main thread; they are switched off."""
    with ThreadPoolExecutor(1) as pool:
        scores = pool.submit(math, ["#### 1,000", "\\boxed{\\frac12}", "#### 2"],
                             ["1000", "0.5", "3"]).result()
    assert scores == [1.0, 1.0, 0.0]


def test_math_answer_columns():
    nested = [{"ground_truth": "4", "style": "rule"}]
    assert rewards.math_answer(None, ["#### 4"], reward_model=nested) == [1.0]
    with pytest.raises(KeyError, match="ground_truth"):
        rewards.math_answer(None, ["#### 4"], answer=["4"])
    with pytest.raises(ValueError, match="one per completion"):
        rewards.math_answer(None, ["#### 4", "#### 4"], ground_truth=["4"])


# --- countdown -------------------------------------------------------------------------------


def countdown(answer_or_completion, target="23", numbers="[30, 100, 93]", wrap=True):
    completion = tagged(answer_or_completion) if wrap else answer_or_completion
    return rewards.countdown(None, [completion], ground_truth=[target], numbers=[numbers])[0]


@pytest.mark.parametrize("answer, target, numbers, expected", [
    ("100 - 93 + 30", "37", "[30, 100, 93]", 1.0),                   # correct
    ("30 - (100 - 93)", "23", "[30, 100, 93]", 1.0),
    ("(30 + 100 - 93)", "37", [30, 100, 93], 1.0),                   # numbers as a list
    ("-30 + 100 - 93 + 46", "23", "[30, 100, 93, 46]", 1.0),         # unary minus (as d1)
    ("100 / 4 - 2", "23", "[100, 4, 2]", 1.0),                       # exact division
    ("(44 + 19) / 35 * 5", "9", "[44, 19, 35, 5]", 1.0),
    ("2 / 3 * 6 / 4", "1", "[2, 3, 6, 4]", 1.0),                     # fractional steps, exact
    ("100 - 93 - 30", "23", "[30, 100, 93]", 0.1),                   # wrong value
    ("100 / 3 + 30", "63", "[100, 3, 30]", 0.1),                     # non-integer result
    ("30 + 30 - 7", "53", "[30, 100, 93]", 0.1),                     # reuses a number
    ("100 - 93 + 16", "23", "[30, 100, 93]", 0.1),                   # number not given
    ("100 - 93", "7", "[30, 100, 93]", 0.1),                         # leaves one out
    ("100 - 93 + 30 - 7", "30", "[30, 100, 93]", 0.1),               # extra number
    ("100 - 93 + 30 = 37", "37", "[30, 100, 93]", 0.1),              # '=' is not allowed
    ("100 - (93 + 30", "-23", "[30, 100, 93]", 0.1),                 # invalid syntax
    ("30 / (100 - 100)", "0", "[30, 100, 100]", 0.1),                # division by zero
    ("30 ** 1 + 100 - 93", "37", "[30, 1, 100, 93]", 0.1),           # ** not allowed
    ("100 // 93 + 30", "31", "[30, 100, 93]", 0.1),                  # // not allowed
    ("__import__('os').getcwd()", "23", "[30, 100, 93]", 0.1),       # code: never evaluated
    ("0x1E + 100 - 93 - 14", "23", "[30, 100, 93]", 0.1),             # hex literal
    ("30.0 + 100 - 93", "37", "[30, 100, 93]", 0.1),                 # float literal
    ("30 × 100 ÷ 93", "23", "[30, 100, 93]", 0.1),
    ("", "23", "[30, 100, 93]", 0.1),                                # empty answer tag
])
def test_countdown_scores(answer, target, numbers, expected):
    assert countdown(answer, target, numbers) == expected


def test_countdown_answer_block_rules():
    assert countdown("no tags: 100 - 93 + 30", "37", wrap=False) == 0.0
    assert countdown("<answer>100 - 93 + 30", "37", wrap=False) == 0.0           # unclosed
    two = "<answer>1 + 2</answer> no wait <answer>\n100 - 93 + 30\n</answer>"
    assert countdown(two, "37", wrap=False) == 1.0                                # last block
    assert countdown("<answer>" + "(" * 5000 + "</answer>", wrap=False) == 0.1    # too deep
    assert countdown("<answer>" + "1+" * 5000 + "1</answer>", wrap=False) == 0.1
    chat = [{"role": "assistant", "content": tagged("100 - 93 + 30")}]
    assert rewards.countdown(None, [chat], ground_truth=["37"], numbers=["[30, 100, 93]"]) == [1.0]


def test_countdown_expression_parser():
    assert evaluate("2 / 3") == (Fraction(2, 3), [2, 3])
    assert evaluate("-(4 - 6) * 3") == (Fraction(6), [4, 6, 3])
    for bad in ["2 ** 3", "abs(2)", "x + 1", "2; 3", "[2, 3]", "2 < 3", "1.5 + 1", "1_000"]:
        with pytest.raises(InvalidExpression):
            evaluate(bad)
    assert parse_numbers("[30, 100, 93]") == [30, 100, 93]
    assert parse_numbers((4, 5)) == [4, 5]


def test_countdown_columns_nested_and_missing():
    row = dict(reward_model=[{"ground_truth": "37"}], extra_info=[{"numbers": "[30, 100, 93]"}])
    assert rewards.countdown(None, [tagged("100 - 93 + 30")], **row) == [1.0]
    with pytest.raises(KeyError, match="numbers"):
        rewards.countdown(None, [tagged("1")], ground_truth=["1"])


# --- sudoku ----------------------------------------------------------------------------------

PUZZLE, SOLUTION = "3102200002100320", "3142243142131324"   # empty: 2 5 6 7 8 11 12 15


def sudoku(completion, puzzle=PUZZLE, solution=SOLUTION):
    return rewards.sudoku(None, [completion], ground_truth=[solution], puzzle=[puzzle])[0]


def test_sudoku_scores():
    assert sudoku(tagged(SOLUTION)) == 1.0
    grid = "\n".join(" ".join(SOLUTION[r * 4:r * 4 + 4]) for r in range(4))
    assert sudoku(tagged(grid)) == 1.0                                     # separators dropped
    assert sudoku(tagged("|3|1|4|2|\n|2|4|3|1|\n|4|2|1|3|\n|1|3|2|4|")) == 1.0
    # partial credit: two of the 8 empty cells (indices 2 and 5) wrong; a wrong given is free
    partial = list(SOLUTION)
    partial[2], partial[5], partial[0] = "1", "1", "4"
    assert sudoku(tagged("".join(partial))) == pytest.approx(6 / 8)
    assert sudoku(tagged(PUZZLE)) == 0.0                                          # copied puzzle
    assert sudoku(tagged(SOLUTION[:6])) == pytest.approx(2 / 8)                   # short: 0-padded
    assert sudoku(tagged(SOLUTION + "1234")) == 1.0                               # long: truncated
    assert sudoku(tagged("no digits")) == 0.0
    assert sudoku(SOLUTION) == 0.0                                                # no answer tag
    assert sudoku(f"<answer>{PUZZLE}</answer> <answer>{SOLUTION}</answer>") == 1.0  # last block
    assert sudoku(tagged(SOLUTION), puzzle=SOLUTION) == 0.0                # nothing empty (d1)
    assert sudoku(None) == 0.0


def test_sudoku_columns_nested():
    row = dict(reward_model=[{"ground_truth": SOLUTION}], extra_info=[{"puzzle": PUZZLE}])
    assert rewards.sudoku(None, [tagged(SOLUTION)], **row) == [1.0]
    with pytest.raises(KeyError, match="puzzle"):
        rewards.sudoku(None, [tagged(SOLUTION)], ground_truth=[SOLUTION])


# --- format rewards --------------------------------------------------------------------------


def test_format_rewards():
    exact = tagged("18", reasoning="line one\nline two")
    no_final_newline = exact[:-1]
    spaced = "<reasoning>r</reasoning>  \n <answer>18</answer> trailing text"
    leading = "  " + exact
    swapped = "<answer>\n18\n</answer>\n<reasoning>\nr\n</reasoning>\n"
    garbage = "just text 18"
    batch = [exact, no_final_newline, spaced, leading, swapped, garbage]
    assert rewards.format_strict(None, batch) == [0.5, 0.0, 0.0, 0.0, 0.0, 0.0]
    assert rewards.format_soft(None, batch) == [0.5, 0.5, 0.5, 0.0, 0.0, 0.0]
    xml = rewards.format_xmlcount(None, batch)
    assert xml[0] == pytest.approx(0.5)
    assert xml[5] == 0.0
    # d1's count_xml: without '\n</answer>\n' the whole text counts as trailing
    assert xml[1] == pytest.approx(0.5 - 0.001 * len(no_final_newline) + 0.001)
    assert rewards.format_xmlcount(None, [exact + "abc"]) == [pytest.approx(0.5 - 0.006)]
    assert rewards.int_answer(None, [exact, tagged("18.5"), tagged("-3"), "42", garbage]) == [
        0.5, 0.0, 0.0, 0.5, 0.0]


# --- real rows: the ground truth written as an answer scores 1.0 ---------------------------


def read_rows(shared, name, limit):
    pq = pytest.importorskip("pyarrow.parquet")
    rows = pq.read_table(shared("data", "rl", "test", name)).to_pylist()
    step = max(1, len(rows) // limit)
    return rows[::step][:limit]


def test_math_rows_from_the_data(shared):
    for name in ("gsm8k.parquet", "math500.parquet"):
        rows = read_rows(shared, name, 12)
        truths = [r["reward_model"]["ground_truth"] for r in rows]
        for template in ("The answer is \\boxed{%s}.", "Steps.\n#### %s", tagged("%s")):
            assert math([template % t for t in truths], truths) == [1.0] * len(rows), template
        shifted = truths[1:] + truths[:1]           # another row's answer: wrong here
        expected = [1.0 if a == b else 0.0 for a, b in zip(shifted, truths)]
        assert math(["\\boxed{%s}" % s for s in shifted], truths) == expected
        # raw rows work as they are (nested reward_model column)
        raw = {"reward_model": [r["reward_model"] for r in rows]}
        hashed = ["#### %s" % t for t in truths]
        assert rewards.math_answer(None, hashed, **raw) == [1.0] * len(rows)


def solve_countdown(numbers, target):
    """An expression over all of ``numbers`` equal to ``target`` (brute force), or None."""
    def search(items):
        if len(items) == 1:
            value, text = items[0]
            if value == target:
                return text
            return None
        for i, j in itertools.permutations(range(len(items)), 2):
            (a, ta), (b, tb) = items[i], items[j]
            rest = [items[k] for k in range(len(items)) if k not in (i, j)]
            options = [(a + b, f"({ta} + {tb})"), (a - b, f"({ta} - {tb})"),
                       (a * b, f"({ta} * {tb})")]
            if b != 0:
                options.append((a / b, f"({ta} / {tb})"))
            for value, text in options:
                found = search(rest + [(value, text)])
                if found:
                    return found
        return None

    return search([(Fraction(n), str(n)) for n in numbers])


def test_countdown_rows_from_the_data(shared):
    rows = read_rows(shared, "countdown.parquet", 8)
    completions, targets, numbers = [], [], []
    for r in rows:
        nums = parse_numbers(r["extra_info"]["numbers"])
        target = r["reward_model"]["ground_truth"]
        expression = solve_countdown(nums, Fraction(target))
        assert expression is not None, (nums, target)
        completions.append(tagged(expression))
        targets.append(target)
        numbers.append(r["extra_info"]["numbers"])
    assert rewards.countdown(None, completions, ground_truth=targets, numbers=numbers) == [1.0] * 8
    # the bare target is well formatted but uses none of the numbers
    bare = [tagged(t) for t in targets]
    assert rewards.countdown(None, bare, ground_truth=targets, numbers=numbers) == [0.1] * 8


def test_sudoku_rows_from_the_data(shared):
    rows = read_rows(shared, "sudoku.parquet", 8)
    solutions = [r["reward_model"]["ground_truth"] for r in rows]
    puzzles = [r["extra_info"]["puzzle"] for r in rows]
    assert rewards.sudoku(None, [tagged(s) for s in solutions], ground_truth=solutions,
                          puzzle=puzzles) == [1.0] * 8
    assert rewards.sudoku(None, [tagged(p) for p in puzzles], ground_truth=solutions,
                          puzzle=puzzles) == [0.0] * 8
