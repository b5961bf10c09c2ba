"""Short names for swappable components: one registry per kind (DPO loss, policy objective, advantage estimator, ...).

A researcher selects a component in YAML either by a registered short name (``loss: ipo``) or, without touching this
package, by ``class_path`` to their own code (``loss: {class_path: mylab.losses.MyLoss, init_args: {tau: 0.5}}``),
which jsonargparse instantiates before the module sees it. :meth:`Registry.resolve` accepts both: a name becomes the
registered component built with its defaults (or with keyword arguments the caller passes), anything else is taken
as the component itself. A name may also be the dotted path to a component of one's own (``mylab.cf.all_answered``),
imported on the spot: the way to name a plain function, which has no ``class_path``.

    DPO_LOSSES = Registry("DPO loss")

    @DPO_LOSSES.register("ipo")
    class IPO(DPOLoss): ...

    DPO_LOSSES.resolve("ipo")        # -> IPO()
    DPO_LOSSES.resolve(IPO(beta=1))  # -> that instance
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator
from typing import Any, Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """Names -> components of one kind. Duplicate names are refused; an unknown name lists the known ones."""

    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator: make a class or function selectable as ``name``."""

        def decorator(component: T) -> T:
            if name in self._entries:
                taken = getattr(self._entries[name], "__qualname__", repr(self._entries[name]))
                raise ValueError(f"a {self.kind} named {name!r} is already registered ({taken}); pick another name")
            self._entries[name] = component
            return component

        return decorator

    def unregister(self, name: str) -> None:
        """Undo :meth:`register` (a test's component, a notebook cell run again)."""
        del self._entries[name]

    def get(self, name: str) -> T:
        """The component registered as ``name``, or the one at the dotted path ``name`` (``mylab.cf.all_answered``)."""
        if name in self._entries:
            return self._entries[name]
        module, dot, attribute = name.rpartition(".")
        if not dot:
            raise ValueError(
                f"unknown {self.kind} {name!r}: registered ones are {sorted(self._entries)}; or give a class_path "
                "or the dotted path to your own (docs/EXTENDING.md)"
            )
        try:
            return getattr(importlib.import_module(module), attribute)
        except (ImportError, AttributeError) as error:
            raise ValueError(
                f"{self.kind} {name!r}: cannot import it ({error}); check the path and PYTHONPATH"
            ) from None

    def resolve(self, spec: str | Any, **kwargs: Any) -> Any:
        """A name -> the registered class instantiated with ``kwargs`` (a registered function is returned as it is);
        anything else (an instance jsonargparse built from ``class_path``, a callable) -> ``spec`` itself."""
        if not isinstance(spec, str):
            return spec
        component = self.get(spec)
        return component(**kwargs) if isinstance(component, type) else component

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._entries))

    def __len__(self) -> int:
        return len(self._entries)
