"""The benchmarks plugin: gsm8k, math500, countdown, sudoku and code on the real files."""
from __future__ import annotations

import pytest

import dare_plugins.benchmarks as benchmarks
from dare.plugins import PluginManager
from dare_plugins.benchmarks import coding, puzzles
from dare_plugins.benchmarks._data import resolve_data_dir

NAMES = ["code", "countdown", "gsm8k", "math500", "sudoku"]
COUNTS = {"gsm8k": 1319, "math500": 500, "countdown": 256, "sudoku": 500, "code": 20}


@pytest.fixture(scope="module")
def registry():
    return PluginManager(plugins=[benchmarks], entry_points=False).registry


@pytest.fixture
def data(shared):
    return str(shared("data"))


def data_for(name, shared):
    """The data folder for a parquet benchmark (skips without ../shared); code ships its own."""
    return None if name == "code" else str(shared("data"))


def bench(registry, name):
    return registry.benchmarks.get(name)


# --- registration and data folder ------------------------------------------------------------


def test_registered_through_the_plugin_manager(registry):
    assert registry.benchmarks.names() == NAMES
    for name in NAMES:
        entry = registry.benchmarks.get(name)
        assert entry.name == name and entry.description
        assert callable(entry.load) and callable(entry.score)


def test_data_folder_resolution(monkeypatch, tmp_path):
    monkeypatch.setenv("DARE_DATA", str(tmp_path))
    assert resolve_data_dir() == tmp_path
    assert resolve_data_dir(tmp_path / "..") == tmp_path / ".."  # explicit wins
    monkeypatch.delenv("DARE_DATA")
    monkeypatch.setenv("DARE_SHARED", str(tmp_path))
    (tmp_path / "data").mkdir()
    assert resolve_data_dir() == tmp_path / "data"


def test_missing_data_folder_names_path_and_variable(monkeypatch, tmp_path, registry):
    missing = tmp_path / "nowhere"
    monkeypatch.setenv("DARE_DATA", str(missing))
    for name in ["gsm8k", "math500", "countdown", "sudoku"]:
        with pytest.raises(FileNotFoundError) as err:
            bench(registry, name).load(limit=1)
        assert str(missing) in str(err.value) and "DARE_DATA" in str(err.value)


def test_bad_options_are_rejected(registry):
    with pytest.raises(TypeError, match="unknown option"):
        bench(registry, "code").load(split="train")
    with pytest.raises(ValueError, match="few_shot"):
        bench(registry, "code").load(few_shot=3)  # two hand-written examples
    with pytest.raises(ValueError, match="limit"):
        bench(registry, "code").load(limit=-1)


# --- loading: counts, ids, limit, few-shot ---------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_row_counts_ids_and_limit(registry, shared, name):
    data = data_for(name, shared)
    rows = bench(registry, name).load(data_dir=data)
    assert len(rows) == COUNTS[name]
    ids = [r["id"] for r in rows]
    assert len(set(ids)) == len(ids)
    first = bench(registry, name).load(limit=3, data_dir=data)
    assert [r["id"] for r in first] == ids[:3]  # stable, and limit keeps the first N
    assert bench(registry, name).load(limit=0, data_dir=data) == []
    for r in rows[:5]:
        assert r["prompt"][-1]["role"] == "user" and r["prompt"][-1]["content"]
        assert len(r["prompt"]) == 1  # no few-shot by default
        assert "ground_truth" in r


@pytest.mark.parametrize("name, shots", [("gsm8k", 3), ("math500", 2), ("countdown", 2),
                                         ("sudoku", 3), ("code", 2)])
def test_few_shot_turns_come_before_the_question(registry, shared, name, shots):
    data = data_for(name, shared)
    plain = bench(registry, name).load(limit=2, data_dir=data)
    shot = bench(registry, name).load(limit=2, few_shot=shots, data_dir=data)
    for p, s in zip(plain, shot):
        assert [m["role"] for m in s["prompt"]] == ["user", "assistant"] * shots + ["user"]
        assert s["prompt"][-1] == p["prompt"][-1] and s["id"] == p["id"]
    examples = shot[0]["prompt"][1:-1:2]
    assert len(examples) == shots and all(m["content"] for m in examples)


def test_gsm8k_few_shot_comes_from_the_sft_train_file(registry, data):
    row = bench(registry, "gsm8k").load(limit=1, few_shot=1, data_dir=data)[0]
    user, assistant, question = row["prompt"]
    assert user["content"].startswith("Natalia sold clips to 48 of her friends")
    assert user["content"].endswith('output the final answer after "####".')
    assert assistant["content"] == ("Natalia sold 48/2 = 24 clips in May.\nNatalia sold 48+24 = "
                                    "72 clips altogether in April and May.\n#### 72")
    assert question["content"].startswith("Janet’s ducks lay 16 eggs per day.")
    assert row["ground_truth"] == "18"


def test_puzzle_few_shot_answers_score_one(registry, data):
    """The few-shot replies are correct answers to the train puzzles they follow."""
    row = bench(registry, "countdown").load(limit=1, few_shot=1, data_dir=data)[0]
    # train row 0 is [44, 19, 35] -> 98
    assert "[44, 19, 35]" in row["prompt"][0]["content"]
    fake = {"ground_truth": "98", "numbers": [44, 19, 35]}
    assert bench(registry, "countdown").score(row["prompt"][1]["content"], fake) == \
        (1.0, "(44 + 19) + 35")
    row = bench(registry, "sudoku").load(limit=1, few_shot=1, data_dir=data)[0]
    fake = {"ground_truth": "4321123434122143", "puzzle": "0321003004002100"}
    assert bench(registry, "sudoku").score(row["prompt"][1]["content"], fake) == \
        (1.0, "4321123434122143")


# --- scoring, hand-checked -------------------------------------------------------------------


def test_gsm8k_scoring(registry, data):
    b = bench(registry, "gsm8k")
    row = b.load(limit=1, data_dir=data)[0]  # Janet's ducks: 16 - 3 - 4 = 9 eggs * $2 = 18
    assert row["ground_truth"] == "18"
    assert b.score("16 - 3 - 4 = 9 eggs, 9 * 2 = 18.\n#### 18", row) == (1.0, "18")
    assert b.score("So she makes \\boxed{18} dollars.", row) == (1.0, "18")
    assert b.score("<reasoning>9*2</reasoning>\n<answer>\n$18.00\n</answer>", row) == (1.0, "18.00")
    assert b.score("She sells 9 eggs, so she makes 18 dollars.", row) == (1.0, "18")  # last number
    assert b.score("#### 18 dollars", row) == (1.0, "18")
    assert b.score("16 - 3 = 13, 13 * 2 = 26\n#### 26", row) == (0.0, "26")
    assert b.score("<answer>18</answer> ... no wait, <answer>20</answer>", row) == (0.0, "20")
    assert b.score("I am not sure how to do this.", row) == (0.0, None)
    assert b.score("", row) == (0.0, None)
    assert b.score("#### 2125", {"ground_truth": "2,125"}) == (1.0, "2125")
    assert b.score("The total is 2,125.", {"ground_truth": "2,125"}) == (1.0, "2125")
    assert b.score("#### -3", {"ground_truth": "-3"}) == (1.0, "-3")


def test_math500_scoring(registry, data):
    b = bench(registry, "math500")
    rows = b.load(limit=2, data_dir=data)
    polar, series = rows
    assert polar["ground_truth"] == "\\left( 3, \\frac{\\pi}{2} \\right)"
    assert b.score("r = 3 and theta = pi/2, so \\boxed{(3, \\frac{\\pi}{2})}", polar) == \
        (1.0, "(3, \\frac{\\pi}{2})")
    assert b.score("\\boxed{\\left(3,\\frac{\\pi}{2}\\right)}", polar)[0] == 1.0
    assert b.score("\\boxed{(3, \\pi)}", polar) == (0.0, "(3, \\pi)")
    assert b.score("The point is three units up.", polar) == (0.0, None)
    assert series["ground_truth"] == "p - q"
    assert b.score("<answer>p - q</answer>", series) == (1.0, "p - q")
    assert b.score("\\boxed{q - p}", series) == (0.0, "q - p")
    assert b.score("\\boxed{\\frac{1}{2}}", {"ground_truth": "0.5"}) == (1.0, "\\frac{1}{2}")


def test_countdown_scoring(registry, data):
    b = bench(registry, "countdown")
    row = b.load(limit=1, data_dir=data)[0]
    assert (row["numbers"], row["target"], row["ground_truth"]) == ([30, 100, 93], 23, "23")
    good = ("<reasoning>\n100 - 93 = 7, 30 - 7 = 23\n</reasoning>\n"
            "<answer>\n30 - (100 - 93)\n</answer>")
    assert b.score(good, row) == (1.0, "30 - (100 - 93)")
    assert b.score("<answer>93 - 100 + 30</answer>", row) == (1.0, "93 - 100 + 30")
    assert b.score("<answer>100 - 93 + 30</answer>", row) == (0.0, "100 - 93 + 30")  # 37
    assert b.score("<answer>30 - 7</answer>", row) == (0.0, "30 - 7")  # not the given numbers
    assert b.score("<answer>30 - (100 - 93) = 23</answer>", row)[0] == 0.0
    assert b.score("30 - (100 - 93)", row) == (0.0, None)  # no answer tags
    assert puzzles.solve_countdown([30, 100, 93], 23) is not None
    assert puzzles.solve_countdown([1, 1, 1], 100) is None


def test_sudoku_scoring(registry, data):
    b = bench(registry, "sudoku")
    row = b.load(limit=1, data_dir=data)[0]
    assert (row["puzzle"], row["ground_truth"]) == ("3102200002100320", "3142243142131324")
    assert b.score("<answer>\n3142243142131324\n</answer>", row) == (1.0, "3142243142131324")
    rows = "<answer>\n3142\n2431\n4213\n1324\n</answer>"  # a grid written row by row
    assert b.score(rows, row) == (1.0, "3142243142131324")
    one_wrong = "<answer>3142243142131342</answer>"  # last two cells swapped
    assert b.score(one_wrong, row) == (0.0, "3142243142131342")
    # 8 empty cells; of the swapped pair cell 14 is a given (not counted), cell 15 is wrong
    assert puzzles.cell_accuracy(one_wrong, row) == 7 / 8
    assert b.score("<answer>3142</answer>", row) == (0.0, "3142")  # incomplete
    assert b.score("3142243142131324", row) == (0.0, None)  # no answer tags
    # another valid grid that keeps the givens counts (puzzles normally have one solution)
    blank = {"puzzle": "0" * 16, "ground_truth": "1234341221434321"}
    assert b.score("<answer>2143432112343412</answer>", blank) == (1.0, "2143432112343412")
    assert b.score("<answer>2143432112343421</answer>", blank)[0] == 0.0  # box broken
    assert puzzles.valid_grid("1234341221434321", "1000000000000000")
    assert not puzzles.valid_grid("2143432112343412", "1000000000000000")  # a given changed


def test_code_problems_are_consistent(registry):
    """Every reference solution passes its tests, and the stub alone fails them."""
    b = bench(registry, "code")
    rows = b.load()
    for row in rows:
        assert row["code_prompt"].rstrip().endswith('"""') and row["tests"]
        assert f"def {row['entry_point']}(" in row["code_prompt"]
        assert f"def {row['entry_point']}(" in row["prompt"][-1]["content"]
        assert b.score(row["ground_truth"], row)[0] == 1.0, row["id"]  # body completion
    assert b.score("    pass\n", rows[0])[0] == 0.0


def test_code_scoring(registry):
    b = bench(registry, "code")
    row = b.load(limit=1, timeout_s=2.0)[0]
    assert row["entry_point"] == "count_vowel_runs"
    good = ("Here you go:\n```python\ndef count_vowel_runs(text: str) -> int:\n"
            "    import re\n    return len(re.findall('[aeiou]+', text.lower()))\n```\n")
    score, prediction = b.score(good, row)
    assert score == 1.0
    assert prediction == ("def count_vowel_runs(text: str) -> int:\n    import re\n"
                          "    return len(re.findall('[aeiou]+', text.lower()))")
    wrong = "```python\ndef count_vowel_runs(text: str) -> int:\n    return text.count('a')\n```"
    assert b.score(wrong, row)[0] == 0.0  # "queueing" gives 0, not 1
    assert b.score("return len(__import__('re').findall('[aeiou]+', text.lower()))", row)[0] == 1.0
    assert b.score("I cannot solve this.", row)[0] == 0.0
    assert b.score("", row) == (0.0, None)
    assert b.score("```python\n", row) == (0.0, None)
    early_exit = ("```python\nimport sys\ndef count_vowel_runs(text):\n    return 0\n"
                  "sys.exit(0)\n```")
    assert b.score(early_exit, row)[0] == 0.0  # exits 0 before the asserts: not a pass
    loop = "```python\ndef count_vowel_runs(text):\n    while True:\n        pass\n```"
    assert b.score(loop + "\ncount_vowel_runs('a')", row)[0] == 0.0
    hostile = ("```python\nimport os\nos.system('echo hi')\n"
               "def count_vowel_runs(t):\n    return 0\n```")
    assert b.score(hostile, row)[0] == 0.0


def test_code_extraction_and_program():
    text = "```python\nprint(1)\n```\nthen\n```py\ndef f(x):\n    return x\n```\n```\nf(2)\n```"
    assert coding.extract_code(text, "f") == "def f(x):\n    return x\n"
    assert coding.extract_code(text, "g") == "f(2)\n"
    unclosed = "```python\ndef f(x):\n    return 1"
    assert coding.extract_code(unclosed, "f") == "def f(x):\n    return 1"
    row = {"code_prompt": 'def f(x):\n    """Doc."""\n', "entry_point": "f",
           "tests": ["assert f(1) == 2"]}
    assert coding.build_program("return x + 1", row) == \
        'def f(x):\n    """Doc."""\n    return x + 1\n\n\nassert f(1) == 2\n'
    assert coding.build_program("def f(x):\n    return x + 1\n", row) == \
        'def f(x):\n    """Doc."""\n\n\ndef f(x):\n    return x + 1\n\n\nassert f(1) == 2\n'
