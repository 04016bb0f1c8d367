import subprocess
import sys
from pathlib import Path

import pytest

from dare import recipe as recipes
from dare.recipe import RecipeError

ROOT = Path(__file__).resolve().parents[2]
RECIPES = sorted((ROOT / "recipes").rglob("*.yaml"))


@pytest.mark.parametrize("path", RECIPES, ids=[str(p.relative_to(ROOT)) for p in RECIPES])
def test_every_recipe_validates(path, shared, monkeypatch, recipe_overrides):
    shared("fixtures")
    monkeypatch.setenv("DARE_SHARED", str(shared("")))
    rec = recipes.load(path, recipe_overrides(path))
    recipes.validate(rec, str(path))
    first = path.read_text().splitlines()[0]
    assert first.startswith("# dare run "), f"{path} must name the command that runs it on its first line"


def write(tmp_path, text):
    p = tmp_path / "r.yaml"
    p.write_text(text)
    return p


BASE = """
model: {family: llada, path: %s}
algorithm: {name: sft}
data: {dataset: gsm8k}
run: {name: t}
"""


def test_misspelled_key_names_file_key_and_closest(tmp_path):
    p = write(tmp_path, BASE % tmp_path + "learner: {stepz: 3}\n")
    with pytest.raises(RecipeError) as err:
        recipes.load(p)
    msg = str(err.value)
    assert str(p) in msg and "'learner.stepz'" in msg and "did you mean 'learner.steps'" in msg


def test_wrong_type_names_expected_type(tmp_path):
    p = write(tmp_path, BASE % tmp_path + "learner: {workers: many}\n")
    with pytest.raises(RecipeError, match=r"learner.workers: Input should be a valid integer"):
        recipes.load(p)


def test_unknown_plugins_list_installed(tmp_path):
    p = write(tmp_path, BASE.replace("family: llada", "family: lladda").replace("name: sft", "name: ppo")
              % tmp_path)
    with pytest.raises(RecipeError) as err:
        recipes.validate(recipes.load(p), str(p))
    msg = str(err.value)
    assert "unknown model family 'lladda'" in msg and "llada" in msg and "Did you mean 'llada'" in msg
    assert "unknown algorithm 'ppo'; installed: " in msg and "sft" in msg


def test_unknown_algorithm_option_is_rejected(tmp_path):
    p = write(tmp_path, BASE.replace("{name: sft}", "{name: sft, epss: 0.1}") % tmp_path)
    with pytest.raises(RecipeError, match=r"unknown key 'algorithm.epss'; did you mean 'algorithm.eps'"):
        recipes.validate(recipes.load(p), str(p))


def test_batch_sizes_must_divide(tmp_path):
    p = write(tmp_path, BASE % tmp_path + "learner: {workers: 3, global_batch_size: 4}\n")
    with pytest.raises(RecipeError, match="must divide by learner.workers"):
        recipes.validate(recipes.load(p), str(p))


def test_overrides_and_env_expansion(tmp_path, monkeypatch):
    monkeypatch.setenv("MY_MODELS", str(tmp_path))
    p = write(tmp_path, BASE.replace("%s", "\"${MY_MODELS}/m\"").replace("{name: t}", "{name: t, seed: 1}"))
    rec = recipes.load(p, ["learner.steps=7", "run.seed=5", "algorithm.eps=0.01", "ray.address=null"])
    assert rec.learner.steps == 7 and rec.run.seed == 5 and rec.algorithm["eps"] == 0.01
    assert rec.model.path == f"{tmp_path}/m"
    with pytest.raises(RecipeError, match="key.path=value"):
        recipes.load(p, ["learner.steps"])


def test_cli_validate_exits_nonzero_naming_file_and_key(tmp_path):
    p = write(tmp_path, BASE % tmp_path + "evaluator: {evry: 3}\n")
    out = subprocess.run([sys.executable, "-m", "dare.cli", "validate", str(p)], capture_output=True, text=True)
    assert out.returncode == 1
    assert str(p) in out.stderr and "evaluator.evry" in out.stderr and "evaluator.every" in out.stderr
