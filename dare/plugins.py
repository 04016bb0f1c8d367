"""The plugin manager: entry points of the ``dare`` group plus explicit registration.

``PluginManager()`` loads every installed plugin; tests build one with
``PluginManager(plugins=[obj, ...], entry_points=False)`` to use in-test plugins only.
A plugin that fails to import is recorded in ``failures`` (name -> error) and skipped,
so commands that do not need it keep working.
"""
from __future__ import annotations

import functools
import importlib.metadata as md
import traceback
from dataclasses import dataclass, field

import pluggy

from dare import hookspecs
from dare.registry import Registry

GROUP = "dare"


@dataclass
class PluginInfo:
    name: str
    version: str
    registers: dict[str, list[str]] = field(default_factory=dict)
    error: str | None = None


class PluginManager:
    def __init__(self, plugins=(), entry_points: bool = True):
        self.pm = pluggy.PluginManager(GROUP)
        self.pm.add_hookspecs(hookspecs)
        self.failures: dict[str, str] = {}
        self.versions: dict[str, str] = {}
        if entry_points:
            self._load_entry_points()
        for plugin in plugins:
            name = getattr(plugin, "__name__", None) or type(plugin).__name__
            self.pm.register(plugin, name=name)
            self.versions.setdefault(name, "in-process")
        self.registry = Registry()
        self._fill_registry()

    def _load_entry_points(self) -> None:
        for ep in md.entry_points(group=GROUP):
            version = ep.dist.version if ep.dist is not None else "?"
            try:
                module = ep.load()
            except Exception as exc:  # a broken plugin must not break dare
                self.failures[ep.name] = f"{type(exc).__name__}: {exc}"
                self.versions[ep.name] = version
                continue
            if self.pm.is_registered(module) or ep.name in self.pm._name2plugin:
                continue
            self.pm.register(module, name=ep.name)
            self.versions[ep.name] = version

    def _fill_registry(self) -> None:
        tables = {
            "register_model_families": self.registry.families,
            "register_samplers": self.registry.samplers,
            "register_algorithms": self.registry.algorithms,
            "register_rewards": self.registry.rewards,
            "register_datasets": self.registry.datasets,
            "register_benchmarks": self.registry.benchmarks,
            "register_rollout_engines": self.registry.engines,
        }
        for hook_name, table in tables.items():
            for impl in getattr(self.pm.hook, hook_name).get_hookimpls():
                plugin = impl.plugin_name

                def register(entry, _table=table, _plugin=plugin):
                    _table.add(entry.name, entry, _plugin)

                try:
                    impl.function(register)
                except Exception as exc:
                    self.failures[plugin] = (
                        f"{hook_name} failed: {type(exc).__name__}: {exc}\n"
                        + traceback.format_exc(limit=3)
                    )

    @property
    def hook(self):
        return self.pm.hook

    def info(self) -> list[PluginInfo]:
        """One entry per plugin (loaded or failed), with what it registers."""
        out: dict[str, PluginInfo] = {}
        for name, plugin in self.pm.list_name_plugin():
            out[name] = PluginInfo(name, self.versions.get(name, "?"))
        tables = [self.registry.families, self.registry.samplers, self.registry.algorithms,
                  self.registry.rewards, self.registry.datasets, self.registry.benchmarks,
                  self.registry.engines]
        for table in tables:
            for entry_name, plugin in table.owner.items():
                info = out.setdefault(plugin, PluginInfo(plugin, self.versions.get(plugin, "?")))
                info.registers.setdefault(table.kind, []).append(entry_name)
        for name, impl_names in self._command_plugins().items():
            out.setdefault(name, PluginInfo(name, self.versions.get(name, "?")))
            out[name].registers.setdefault("hooks", []).extend(impl_names)
        for name, error in self.failures.items():
            info = out.setdefault(name, PluginInfo(name, self.versions.get(name, "?")))
            info.error = error
        return sorted(out.values(), key=lambda i: i.name)

    def _command_plugins(self) -> dict[str, list[str]]:
        found: dict[str, list[str]] = {}
        for hook in ("register_commands", "validate_recipe", "on_step_end"):
            for impl in getattr(self.pm.hook, hook).get_hookimpls():
                found.setdefault(impl.plugin_name, []).append(hook)
        return found


@functools.lru_cache(maxsize=1)
def default_manager() -> PluginManager:
    """The process-wide manager over installed plugins (built on first use)."""
    return PluginManager()


def registry() -> Registry:
    return default_manager().registry
