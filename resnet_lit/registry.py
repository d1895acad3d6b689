"""Name -> object registries: lookup by name or dotted import path, close-match errors, entry-point plugins.

One `Registry` exists per kind of part (blocks, stems, shortcuts, models, ...), so YAML can name any part and
third-party packages can add parts without touching this package. Each entry records where it came from.
"""

from __future__ import annotations

import difflib
import fnmatch
import importlib
import warnings
from collections.abc import Callable
from importlib.metadata import entry_points
from typing import Generic, TypeVar

from resnet_lit.errors import ResNetLitError

T = TypeVar("T")

BUILTIN = "built-in"
USER = "user"


class RegistryError(ResNetLitError, ValueError):
    """An unknown or conflicting registry name."""


class PluginLoadWarning(UserWarning):
    """A plugin entry point failed to load; it is skipped."""


class PluginCollisionWarning(PluginLoadWarning):
    """A plugin entry point has the name of an existing entry; the existing entry is kept."""


class Registry(Generic[T]):
    """A registry of named objects of one kind, e.g. residual block classes.

    Args:
        kind: what the entries are, used in messages ("block", "model", ...).
        entry_point_group: the `importlib.metadata` entry-point group plugins register under.
    """

    def __init__(self, kind: str, entry_point_group: str | None = None) -> None:
        self.kind = kind
        self.entry_point_group = entry_point_group
        self._entries: dict[str, T] = {}
        self._origins: dict[str, str] = {}
        self._plugins_loaded = entry_point_group is None

    def register(self, name: str | None = None, *, origin: str = USER) -> Callable[[T], T]:
        """Decorator that registers its target under `name` (default: the target's `__name__`).

        Entries registered this way are labelled "user"; the package labels its own with `builtin`.
        """

        def decorator(obj: T) -> T:
            key = name or obj.__name__  # type: ignore[attr-defined]
            existing = self._entries.get(key)
            if existing is not None and existing is not obj:
                raise RegistryError(f"{self.kind} {key!r} is already registered ({self._origins[key]})")
            self._entries[key] = obj
            self._origins[key] = origin
            return obj

        return decorator

    def builtin(self, name: str) -> Callable[[T], T]:
        """Decorator for the package's own entries (origin "built-in")."""
        return self.register(name, origin=BUILTIN)

    def get(self, name: str) -> T:
        """Look up `name`; a dotted path like `my_pkg.blocks.MyBlock` is imported without registration."""
        if name in self._entries:
            return self._entries[name]
        self._load_plugins()
        if name in self._entries:
            return self._entries[name]
        if "." in name:
            return self._import_path(name)
        raise RegistryError(self._unknown_message(name))

    def resolve(self, spec: str | T) -> T:
        """Return `spec` itself if it is already an object, else look the name up."""
        return self.get(spec) if isinstance(spec, str) else spec

    def names(self, pattern: str = "*") -> list[str]:
        """Sorted names matching an fnmatch `pattern`, plugins included."""
        self._load_plugins()
        return sorted(n for n in self._entries if fnmatch.fnmatchcase(n, pattern))

    def origin(self, name: str) -> str:
        """Where `name` came from: "built-in", "user" or "plugin <distribution>"."""
        self.get(name)
        return self._origins.get(name, "import path")

    def __contains__(self, name: object) -> bool:
        self._load_plugins()
        return name in self._entries

    def _unknown_message(self, name: str) -> str:
        choices = sorted(self._entries)
        close = difflib.get_close_matches(name, choices, n=3, cutoff=0.6)
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        return (
            f"Unknown {self.kind} {name!r}.{hint} Valid choices: {', '.join(choices)} "
            f"(or a dotted import path such as 'my_package.module.MyClass')."
        )

    def _import_path(self, path: str) -> T:
        module_name, _, attr = path.rpartition(".")
        try:
            module = importlib.import_module(module_name)
        except ImportError as err:
            raise RegistryError(f"Cannot import {self.kind} {path!r}: {err}. {self._unknown_message(path)}") from err
        try:
            return getattr(module, attr)
        except AttributeError as err:
            raise RegistryError(f"Module {module_name!r} has no {self.kind} named {attr!r}") from err

    def _load_plugins(self) -> None:
        if self._plugins_loaded:
            return
        self._plugins_loaded = True
        for ep in entry_points(group=self.entry_point_group):
            dist = ep.dist.name if ep.dist is not None else ep.value
            try:
                obj = ep.load()
            except Exception as err:
                warnings.warn(
                    f"resnet-lit: skipping {self.kind} plugin {ep.name!r} from {dist!r} "
                    f"(entry point {ep.value!r}): {type(err).__name__}: {err}",
                    PluginLoadWarning,
                    stacklevel=3,
                )
                continue
            self._add_plugin(ep.name, obj, dist)

    def _add_plugin(self, name: str, obj: T, dist: str) -> None:
        origin = f"plugin {dist}"
        existing = self._entries.get(name)
        if existing is None:
            self.register(name, origin=origin)(obj)
        elif existing is obj:  # the plugin's module also registered it with the decorator
            self._origins[name] = origin
        else:
            warnings.warn(
                f"resnet-lit: {self.kind} plugin {name!r} from package {dist} is ignored: {name!r} is already "
                f"registered ({self._origins[name]})",
                PluginCollisionWarning,
                stacklevel=4,
            )
