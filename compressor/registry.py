"""Loading plugins and collecting what they register.

Built-in plugins and third-party ones load through one door: the
``compressor.plugins`` entry-point group. ``COMPRESSOR_PLUGINS`` (a
comma-separated list of distribution names) restricts which external
distributions load; the built-ins always do.
"""

from __future__ import annotations

import functools
import importlib
import os
from importlib.metadata import entry_points

import pluggy

from compressor import hookspecs
from compressor.errors import PluginError, UnknownPluginError
from compressor.method import KINDS, VERBS, Method

GROUP = "compressor.plugins"
OWN_DISTRIBUTION = "compressor"


class Registry:
    """The loaded plugin manager and what the plugins registered."""

    def __init__(self, third_party_only: bool = False):
        """``third_party_only``: load the other distributions' plugins alone (the CLI's
        start-up reads their commands; the built-ins register none, and loading them
        imports every method's module)."""
        self.pm = pluggy.PluginManager("compressor")
        self.pm.add_hookspecs(hookspecs)
        self._load(third_party_only)
        try:
            self.pm.check_pending()
        except pluggy.PluginValidationError as e:
            raise PluginError(f"plugin '{self.pm.get_name(e.plugin)}' is broken: {e}") from None
        # (name, kind) -> method: one family may offer one method per kind under one name
        # (``sketchtune``: apply, then train)
        self.methods: dict[tuple[str, str], Method] = {}
        self.method_plugins: dict[tuple[str, str], str] = {}
        self.readers: list = []
        self._collect()

    def _load(self, third_party_only: bool = False) -> None:
        allowed = os.environ.get("COMPRESSOR_PLUGINS")
        allowed_set = (
            {a.strip() for a in allowed.split(",") if a.strip()} if allowed is not None else None
        )
        eps = sorted(  # built-ins first, so a clash names the newcomer second
            entry_points(group=GROUP),
            key=lambda ep: (ep.dist is None or ep.dist.name != OWN_DISTRIBUTION, ep.name),
        )
        for ep in eps:
            dist = ep.dist.name if ep.dist is not None else None
            if dist != OWN_DISTRIBUTION and allowed_set is not None and dist not in allowed_set:
                continue
            if third_party_only and dist == OWN_DISTRIBUTION:
                continue
            try:
                module = ep.load()
            except Exception as e:  # a broken third-party plugin must say who it is
                raise PluginError(f"plugin '{ep.name}' ({ep.value}) failed to load: {e}") from e
            if self.pm.is_registered(module):
                continue
            self.pm.register(
                module, name=ep.name if dist == OWN_DISTRIBUTION else f"{dist}:{ep.name}"
            )

    def _collect(self) -> None:
        for impl in self.pm.hook.register_methods.get_hookimpls():
            plugin_name = impl.plugin_name

            def register(method, _plugin=plugin_name):
                self._add_method(method, _plugin)

            impl.function(register=register)
        for impl in self.pm.hook.register_sources.get_hookimpls():
            impl.function(register=self.readers.append)
        # specific formats first, in registration order; the built-in catch-alls last
        self.readers.sort(key=lambda r: getattr(r, "catch_all", False))

    def _add_method(self, method: Method, plugin: str) -> None:
        if not isinstance(method, Method) or not method.name:
            raise PluginError(f"plugin '{plugin}' registered something that is not a named Method")
        if method.kind not in KINDS:
            raise PluginError(
                f"method '{method.name}' from plugin '{plugin}' has kind '{method.kind}' "
                f"(allowed: {', '.join(KINDS)})"
            )
        other = next((p for (n, _), p in self.method_plugins.items() if n == method.name), None)
        if (method.name, method.kind) in self.methods or other not in (None, plugin):
            raise PluginError(
                f"two methods are named '{method.name}': one from plugin "
                f"'{other}', one from plugin '{plugin}'"
            )
        self.methods[method.name, method.kind] = method
        self.method_plugins[method.name, method.kind] = plugin

    def named(self, name: str) -> list[Method]:
        """Every method registered under ``name`` (one per kind), in KINDS order."""
        return [self.methods[name, k] for k in KINDS if (name, k) in self.methods]

    def names(self, kind: str | None = None) -> list[str]:
        """The method names, sorted (only those of ``kind`` if given)."""
        return sorted({n for n, k in self.methods if kind in (None, k)})

    def decoder(self, encoding: str) -> Method | None:
        """The method that decodes artifacts of ``encoding`` (its name), if installed."""
        return next((m for m in self.named(encoding) if m.decodes), None)

    def method(self, name: str, kind: str | None = None) -> Method:
        """The method registered under ``name``; with ``kind``, the one of that kind."""
        found = self.named(name)
        if not found:
            names = ", ".join(self.names(kind))
            if not names:
                raise UnknownPluginError(
                    f"unknown plugin '{name}': no installed plugin provides a {kind} method yet"
                )
            raise UnknownPluginError(f"unknown plugin '{name}' (available: {names})")
        if kind is None:
            return found[0]
        method = self.methods.get((name, kind))
        if method is None:
            uses = " or ".join(f"`compress {VERBS[m.kind]} --plugin {name}`" for m in found)
            what = " and ".join(f"a {m.kind}" for m in found)
            raise UnknownPluginError(f"plugin '{name}' is {what} method; use {uses}")
        return method


@functools.lru_cache(maxsize=1)
def get_registry() -> Registry:
    """The process-wide registry, loaded on first use."""
    return Registry()


def reset_registry() -> None:
    """Forget loaded plugins (tests that change COMPRESSOR_PLUGINS or sys.path)."""
    get_registry.cache_clear()
    importlib.invalidate_caches()


def register_plugin_commands(cli) -> None:
    """Add the commands third-party plugins register to ``cli`` (the built-ins have none)."""
    Registry(third_party_only=True).pm.hook.register_commands(cli=cli)
