import importlib.metadata as md
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

import dare
from dare import hookspecs
from dare.plugins import PluginManager
from dare.registry import Algorithm, Dataset, Reward

ROOT = Path(__file__).resolve().parents[2]


class InTestPlugin:
    __name__ = "in_test"

    @dare.hookimpl
    def register_rewards(self, register):
        register(Reward("always_one", lambda prompts, completions, **kw: [1.0] * len(completions)))

    @dare.hookimpl
    def register_datasets(self, register):
        register(Dataset("two_rows", lambda split, **kw: [{"prompt": "a", "response": "b"}] * 2))

    @dare.hookimpl
    def register_algorithms(self, register):
        @dataclass
        class Cfg:
            beta: float = 0.1
        register(Algorithm("noop", Cfg, loss=lambda *a: None))

    @dare.hookimpl
    def validate_recipe(self, recipe, registry):
        return ["in_test says no"] if recipe.run.name == "forbidden" else []


def test_in_test_plugin_registers_into_typed_tables():
    pm = PluginManager(plugins=[InTestPlugin()], entry_points=False)
    reg = pm.registry
    assert reg.rewards.get("always_one").fn([], ["x", "y"]) == [1.0, 1.0]
    assert len(reg.datasets.get("two_rows").load("train")) == 2
    assert reg.algorithms.get("noop").config_type().beta == 0.1
    assert reg.algorithms.owner["noop"] == "in_test"
    with pytest.raises(KeyError, match="unknown reward 'always_on'; installed: always_one. Did you mean"):
        reg.rewards.get("always_on")


def test_validate_recipe_hook_errors_stop_the_run(tmp_path, shared):
    from dare import recipe as recipes
    pm = PluginManager(plugins=[InTestPlugin()])
    rec = recipes.parse({"model": {"family": "llada", "path": str(shared("fixtures", "llada-tiny"))},
                         "algorithm": {"name": "sft"}, "data": {"dataset": "gsm8k"},
                         "run": {"name": "forbidden"}})
    with pytest.raises(recipes.RecipeError, match="in_test says no"):
        recipes.validate(rec, "r.yaml", pm)


def test_duplicate_registration_names_both_plugins():
    class Again(InTestPlugin):
        __name__ = "again"
    pm = PluginManager(plugins=[InTestPlugin(), Again()], entry_points=False)
    assert "registered twice" in " ".join(pm.failures.values())


def test_broken_plugin_is_listed_and_does_not_break_others(monkeypatch):
    real = md.entry_points

    class Broken:
        name, group, value = "broken_plugin", "dare", "no_such_module_xyz"
        dist = None

        def load(self):
            raise ImportError("No module named 'no_such_module_xyz'")

    def fake(**kw):
        eps = list(real(**kw))
        return eps + [Broken()] if kw.get("group") == "dare" else eps

    monkeypatch.setattr(md, "entry_points", fake)
    pm = PluginManager()
    info = {i.name: i for i in pm.info()}
    assert "no_such_module_xyz" in info["broken_plugin"].error
    assert "sft" in pm.registry.algorithms and "gsm8k" in pm.registry.datasets


def test_first_party_plugins_come_from_entry_points():
    names = {ep.name: ep.value for ep in md.entry_points(group="dare")}
    for name in ("llada", "dream", "sdar", "sft", "gsm8k"):
        assert names[name] == f"dare_plugins.{name}"


def test_dare_plugins_command_lists_first_and_third_party():
    out = subprocess.run([sys.executable, "-m", "dare.cli", "plugins"], capture_output=True, text=True, check=True)
    text = out.stdout
    for name in ("llada", "dream", "sdar", "sft", "gsm8k"):
        assert re.search(rf"^{name} \S+ \[ok\]", text, re.M), text
    if "example" not in {ep.name for ep in md.entry_points(group="dare")}:
        pytest.skip("the example plugin is not installed (pip install -e docs/examples/dare-example-plugin)")
    assert re.search(r"^example 0\.2\.0 \[ok\]\n    dataset: arithmetic\n    reward: exact_answer", text, re.M)


def test_every_hook_is_documented():
    docs = (ROOT / "docs" / "plugins.md").read_text()
    hooks = [name for name in dir(hookspecs) if hasattr(getattr(hookspecs, name), "dare_spec")]
    assert len(hooks) >= 8
    for name in hooks:
        assert f"`{name}" in docs, f"hook {name} is not documented in docs/plugins.md"
        assert getattr(hookspecs, name).__doc__, f"hook {name} has no docstring"
