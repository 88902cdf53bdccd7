"""Plugin discovery and the component registry.

Plugins are found through the ``molting`` entry-point group; molting's own
built-in plugins are declared there too and load the same way. Each entry
point loads on its own: one that fails to import is reported and the others
still work. ``MOLTING_DISABLE_PLUGINS=a,b`` keeps plugins from loading.
"""

from __future__ import annotations

import os
import sys
import traceback
from typing import Any, Iterable

import attrs
import importlib_metadata
import pluggy

from molting import hookspecs
from molting.components import COMPONENT_TYPES, KINDS
from molting.errors import PluginError

ENTRY_POINT_GROUP = "molting"
DISABLE_ENV = "MOLTING_DISABLE_PLUGINS"
_REGISTER_HOOKS = {
    "stage": "molting_register_stages",
    "loss": "molting_register_losses",
    "judge": "molting_register_judges",
    "dataset": "molting_register_datasets",
    "advantage": "molting_register_advantages",
    "sampler": "molting_register_samplers",
    "environment": "molting_register_environments",
    "tool_parser": "molting_register_tool_parsers",
}


@attrs.define
class PluginInfo:
    """What is known of one plugin, whether it loaded or not."""

    name: str
    module: str
    distribution: str | None = None
    version: str | None = None
    status: str = "ok"  # "ok", "broken" or "disabled"
    error: str | None = None
    hooks: list[str] = attrs.field(factory=list)
    components: list[str] = attrs.field(factory=list)  # "kind:name"

    @property
    def source(self) -> str:
        """The distribution and version, for messages: ``molting 0.1.0``."""
        if self.distribution is None:
            return f"plugin {self.name!r} (not from a distribution)"
        return f"{self.distribution} {self.version}"

    def to_dict(self) -> dict[str, Any]:
        return attrs.asdict(self)


@attrs.frozen
class Registered:
    """A component together with the plugin that registered it."""

    component: Any
    plugin: PluginInfo


class PluginHost:
    """A pluggy manager, the plugins it loaded, and the components they registered."""

    def __init__(self) -> None:
        self.pm = pluggy.PluginManager(hookspecs.PROJECT_NAME)
        self.pm.add_hookspecs(hookspecs)
        # historic: a plugin registered later still gets the call
        self.pm.hook.molting_add_hookspecs.call_historic(kwargs={"pluginmanager": self.pm})
        self.plugins: dict[str, PluginInfo] = {}
        self.components: dict[str, dict[str, Registered]] = {kind: {} for kind in KINDS}
        self.conflicts: dict[tuple[str, str], list[PluginInfo]] = {}

    @property
    def hook(self) -> Any:
        """The hook relay: ``host.hook.molting_on_log(metrics=..., step=...)``."""
        return self.pm.hook

    # ------------------------------------------------------------------ loading

    def load_entry_points(self, disabled: Iterable[str] = ()) -> None:
        """Load every plugin of the ``molting`` entry-point group, each on its own."""
        disabled = set(disabled)
        for ep in sorted(importlib_metadata.entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
            dist = getattr(ep, "dist", None)
            info = PluginInfo(
                name=ep.name,
                module=ep.value,
                distribution=dist.name if dist else None,
                version=dist.version if dist else None,
            )
            if ep.name in self.plugins:
                other = self.plugins[ep.name]
                info.status = "broken"
                info.error = (
                    f"the plugin name {ep.name!r} is also used by {other.source}; "
                    "uninstall one of the two distributions"
                )
                self._warn(info)
                self.plugins[f"{ep.name} ({info.distribution})"] = info
                continue
            self.plugins[ep.name] = info
            if ep.name in disabled:
                info.status = "disabled"
                info.error = f"blocked by {DISABLE_ENV}"
                continue
            try:
                obj = ep.load()
            except Exception as exc:  # a broken third-party plugin never takes the CLI down
                self._mark_broken(info, exc)
                continue
            self.add_plugin(obj, info)
        self.check_pending()

    def check_pending(self) -> None:
        """Mark broken every plugin that implements a hook no spec defines: a misspelt hook is an error.

        pluggy's ``check_pending``, per plugin and with the closest real hook
        named, run once every plugin has loaded (a plugin may implement a hook
        another plugin adds with ``molting_add_hookspecs``). An implementation
        marked ``optionalhook=True`` is left alone, as pluggy leaves it.
        """
        import difflib

        callers = {name: caller for name, caller in vars(self.pm.hook).items() if hasattr(caller, "get_hookimpls")}
        known = sorted(name for name, caller in callers.items() if caller.spec is not None)
        for name, caller in callers.items():
            if caller.spec is not None:
                continue
            for impl in caller.get_hookimpls():
                info = self.plugins.get(impl.plugin_name)
                if impl.optionalhook or info is None or info.status != "ok":
                    continue
                close = difflib.get_close_matches(name, known, n=1)
                hint = f"; did you mean {close[0]!r}?" if close else "; the hooks are listed in docs/hooks.md"
                self._mark_broken(info, PluginError(f"it implements {name!r}, which is not a molting hook{hint}"))

    def register(self, obj: Any, name: str) -> PluginInfo:
        """Register a plugin object (a module or an instance with hookimpls) by hand."""
        info = PluginInfo(name=name, module=getattr(obj, "__name__", type(obj).__name__))
        self.plugins[name] = info
        self.add_plugin(obj, info)
        return info

    def add_plugin(self, obj: Any, info: PluginInfo) -> None:
        """Register ``obj`` under ``info.name`` and collect the components it provides."""
        try:
            self.pm.register(obj, name=info.name)
        except Exception as exc:  # pluggy validates hookimpl signatures here
            self._mark_broken(info, exc)
            return
        info.hooks = sorted(caller.name for caller in self.pm.get_hookcallers(obj) or [])
        for kind, hook_name in _REGISTER_HOOKS.items():
            impls = [impl for impl in getattr(self.pm.hook, hook_name).get_hookimpls() if impl.plugin is obj]
            for impl in impls:
                try:
                    impl.function(register=self._registrar(kind, info))
                except Exception as exc:
                    self._mark_broken(info, exc)
                    return

    def _registrar(self, kind: str, info: PluginInfo):
        expected = COMPONENT_TYPES[kind]

        def register(component: Any) -> None:
            if not isinstance(component, expected):
                raise TypeError(
                    f"{_REGISTER_HOOKS[kind]} got {type(component).__name__}; "
                    f"expected a molting.{expected.__name__}"
                )
            table = self.components[kind]
            if component.name in table:
                previous = table[component.name].plugin
                self.conflicts.setdefault((kind, component.name), [previous]).append(info)
                print(
                    f"molting: warning: {kind} {component.name!r} is registered by both "
                    f"{previous.source} and {info.source}",
                    file=sys.stderr,
                )
            else:
                table[component.name] = Registered(component, info)
            info.components.append(f"{kind}:{component.name}")

        return register

    def _mark_broken(self, info: PluginInfo, exc: BaseException) -> None:
        info.status = "broken"
        own = isinstance(exc, PluginError)  # molting's own verdict: its message is the whole story
        info.error = str(exc) if own else "".join(traceback.format_exception_only(type(exc), exc)).strip()
        for kind_name in info.components:
            kind, name = kind_name.split(":", 1)
            registered = self.components[kind].get(name)
            if registered is not None and registered.plugin is info:
                del self.components[kind][name]
        info.components = []
        if self.pm.get_plugin(info.name) is not None:
            self.pm.unregister(name=info.name)
        self._warn(info)

    @staticmethod
    def _warn(info: PluginInfo) -> None:
        print(f"molting: warning: plugin {info.name!r} ({info.source}) is broken: {info.error}", file=sys.stderr)

    # ------------------------------------------------------------------ lookup

    def names(self, kind: str) -> list[str]:
        return sorted(self.components[kind])

    def get(self, kind: str, name: str) -> Any:
        """The component ``kind:name``, or a :class:`PluginError` that says what is available."""
        return self.lookup(kind, name).component

    def lookup(self, kind: str, name: str) -> Registered:
        if (kind, name) in self.conflicts:
            sources = " and ".join(p.source for p in self.conflicts[(kind, name)])
            raise PluginError(f"{kind} {name!r} is provided by both {sources}; uninstall or disable one of them")
        if name in self.components[kind]:
            return self.components[kind][name]
        raise PluginError(f"no {kind} named {name!r}. {self._broken_hint(name)}{self.available(kind)}")

    def available(self, kind: str) -> str:
        entries = [f"{n} (from {r.plugin.source})" for n, r in sorted(self.components[kind].items())]
        plural = {"loss": "losses"}.get(kind, f"{kind}s")
        return f"Available {plural}: " + (", ".join(entries) if entries else "none")

    def _broken_hint(self, name: str) -> str:
        """Plugins that failed to load and may have provided ``name`` (the one named ``name`` first)."""
        broken = [p for p in self.plugins.values() if p.status != "ok"]
        broken.sort(key=lambda p: p.name != name)
        if not broken:
            return ""
        listed = "; ".join(f"{p.name} from {p.source} is {p.status}: {p.error}" for p in broken)
        return f"Plugins that did not load and may provide it: {listed}. "


def load_plugins(disabled: Iterable[str] | None = None) -> PluginHost:
    """A :class:`PluginHost` with every installed plugin loaded.

    ``disabled`` defaults to the comma-separated names in ``MOLTING_DISABLE_PLUGINS``.
    """
    if disabled is None:
        disabled = [n.strip() for n in os.environ.get(DISABLE_ENV, "").split(",") if n.strip()]
    host = PluginHost()
    host.load_entry_points(disabled)
    return host
