"""Name -> plug-in class, for editing methods and controls.

The registries only hold what was registered: the built-in methods register when
:mod:`vidbatch.engine.methods` is imported, the built-in controls when :mod:`vidbatch.engine.controls`
is; :mod:`vidbatch.engine.plugins` imports both and is what the layers above use. A plug-in defined
elsewhere (a test, a user's module) registers the same way and is then a method or control like
the others: a config section, an `edit.method` / `edit.control` value, a bench column.
"""

from __future__ import annotations

from typing import Generic, TypeVar

from vidbatch.core.errors import ConfigError

__all__ = [
    "Registry",
    "control_names",
    "get_control",
    "get_method",
    "method_names",
    "register_control",
    "register_method",
]

T = TypeVar("T", bound=type)


class Registry(Generic[T]):
    """An ordered name -> class mapping; `kind` ("method", "control") words the errors."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, T] = {}

    def register(self, cls: T, *, replace: bool = False) -> T:
        """Add `cls` under ``cls.name``; returns it (usable as a class decorator).

        Raises ValueError on a name already taken, unless `replace` (a test re-registering).
        """
        name = getattr(cls, "name", None)
        if not isinstance(name, str) or not name:
            raise ValueError(f"a {self.kind} class needs a non-empty string `name`, {cls.__name__} has {name!r}")
        if name in self._entries and self._entries[name] is not cls and not replace:
            raise ValueError(f"{self.kind} {name!r} is already registered ({self._entries[name].__name__})")
        self._entries[name] = cls
        return cls

    def unregister(self, name: str) -> None:
        """Remove `name` (tests that register a plug-in take it out again)."""
        self._entries.pop(name, None)

    def get(self, name: str) -> T:
        """The class registered as `name`; ConfigError listing the known names otherwise."""
        try:
            return self._entries[name]
        except KeyError:
            raise ConfigError(f"unknown {self.kind} {name!r}; known: {', '.join(self._entries)}") from None

    def names(self) -> tuple[str, ...]:
        """Registered names, in registration order."""
        return tuple(self._entries)

    def classes(self) -> tuple[T, ...]:
        return tuple(self._entries.values())


METHODS: Registry = Registry("method")
CONTROLS: Registry = Registry("control")


def register_method(cls: T, *, replace: bool = False) -> T:
    """Register a :class:`vidbatch.engine.method.Method` subclass under its `name`."""
    return METHODS.register(cls, replace=replace)


def get_method(name: str) -> type:
    """The Method class called `name`; ConfigError listing the known methods otherwise."""
    return METHODS.get(name)


def method_names() -> tuple[str, ...]:
    """The registered methods' names, in registration order."""
    return METHODS.names()


def register_control(cls: T, *, replace: bool = False) -> T:
    """Register a :class:`vidbatch.engine.control.Control` subclass under its `name`."""
    return CONTROLS.register(cls, replace=replace)


def get_control(name: str) -> type:
    """The Control class called `name`; ConfigError listing the known controls otherwise."""
    return CONTROLS.get(name)


def control_names() -> tuple[str, ...]:
    """The registered controls' names, in registration order."""
    return CONTROLS.names()
