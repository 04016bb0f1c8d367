"""Rollout engines: the native torch engine, the registration hook, and an external engine
plugged in without changes to dare."""
import pytest
import torch

import dare
from dare import hookimpl
from dare.plugins import PluginManager, default_manager
from dare.protocol import GenerationOutput, PromptBatch
from dare.recipe import RecipeError, parse, validate
from dare.registry import RolloutEngine
from dare_plugins.torch_engine import TorchEngine

ARGS = {"steps": 4, "gen_length": 4, "block_length": 4, "temperature": 1.0}


def test_torch_engine_is_dare_generate_with_a_seeded_generator(quickstart_model):
    model = dare.load_model(quickstart_model)
    engine = TorchEngine(model)
    prompt = torch.tensor([[1, 7, 8, 9]])
    a = engine.generate(prompt, None, "llada", ARGS, seed=5)
    b = engine.generate(prompt, None, "llada", ARGS, seed=5)
    direct = dare.generate(model, prompt, generator=torch.Generator().manual_seed(5), **ARGS)
    assert torch.equal(a.sequences, b.sequences) and torch.equal(a.sequences, direct.sequences)
    assert a.nfe == direct.nfe == 4


def test_torch_engine_update_weights_and_options(quickstart_model):
    model = dare.load_model(quickstart_model)
    engine = TorchEngine(model, {"model_path": str(quickstart_model)})
    state = {k: torch.zeros_like(v) for k, v in model.state_dict().items()}
    engine.update_weights(state, version=3)
    assert all(float(p.detach().abs().sum()) == 0 for p in model.parameters())
    with pytest.raises(ValueError, match="unknown options: bogus"):
        TorchEngine(model, {"bogus": 1})


class EchoEngine:
    """An 'external' engine: returns the prompt followed by copies of its last token."""

    def __init__(self, model, options):
        self.options, self.versions = options, []

    def generate(self, prompt_ids, attention_mask, sampler, sampler_args, seed=None):
        n = sampler_args["gen_length"]
        tail = prompt_ids[:, -1:].repeat(1, n)
        return GenerationOutput(torch.cat([prompt_ids, tail], 1), torch.zeros_like(tail), nfe=0)

    def update_weights(self, state_dict, version):
        self.versions.append(version)


class ExternalPlugin:
    @hookimpl
    def register_rollout_engines(self, register):
        register(RolloutEngine(name="echo", create=EchoEngine, description="test engine"))


def test_external_engine_registers_through_the_hook():
    pm = PluginManager(plugins=[ExternalPlugin()], entry_points=False)
    assert pm.registry.engines.names() == ["echo"]
    assert pm.registry.engines.owner["echo"] == "ExternalPlugin"


def test_rollout_worker_uses_the_recipe_engine(quickstart_model, monkeypatch):
    from dare.executor.roles import Rollout

    engines = default_manager().registry.engines
    monkeypatch.setitem(engines._entries, "echo", RolloutEngine("echo", EchoEngine))
    monkeypatch.setitem(engines.owner, "echo", "test")
    raw = {"model": {"family": "llada", "path": str(quickstart_model)}, "algorithm": {"name": "sft"},
           "data": {"dataset": "synthetic"}, "run": {"name": "t"},
           "rollout": {"engine": "echo", "engine_options": {"endpoint": "local"}, "sampler_args": {"gen_length": 3}}}
    worker = Rollout(parse(raw).model_dump(mode="json"))
    out = worker.generate(PromptBatch(torch.tensor([[4, 5]]), None), seed=1)
    assert out.sequences.tolist() == [[4, 5, 5, 5, 5]]
    assert worker.engine().options == {"endpoint": "local", "model_path": str(quickstart_model)}
    from dare.protocol import WeightsUpdate
    worker.set_weights(WeightsUpdate(worker.model.state_dict(), 7))
    assert worker.engine().versions == [7]  # the external engine got the weights


def test_unknown_engine_is_a_recipe_error(quickstart_model):
    raw = {"model": {"family": "llada", "path": str(quickstart_model)}, "algorithm": {"name": "sft"},
           "data": {"dataset": "synthetic"}, "run": {"name": "t"}, "rollout": {"engine": "vllm"}}
    with pytest.raises(RecipeError, match="rollout.engine: unknown rollout engine 'vllm'; installed: torch"):
        validate(parse(raw), "r.yaml")
