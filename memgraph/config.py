"""Module-level defaults for callers that cannot pass ``options`` (HF ``Trainer``, TRL).

    import memgraph
    memgraph.config.memory_budget = "8GiB"
    with memgraph.config.patch(solver="none"): ...

Only attributes that were assigned count; unassigned ones fall through to ``MEMGRAPH_*`` environment
variables and then to ``memgraph.Options`` defaults.
"""
from __future__ import annotations

import contextlib
import sys
import types
from typing import Any, Iterator

from memgraph.errors import MemgraphError



def _fields() -> tuple[str, ...]:
    from memgraph.options import Options

    return Options.field_names()



class _Config(types.ModuleType):
    def __init__(self, name: str) -> None:
        super().__init__(name, __doc__)
        object.__setattr__(self, "_values", {})

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):  # module attributes (inspect asks for __file__ while memgraph is importing)
            raise AttributeError(name)
        if name in _fields():
            from memgraph.options import Options

            return self._values.get(name, getattr(Options, name))
        raise AttributeError(f"memgraph.config has no setting {name!r}; valid settings are {list(_fields())}")

    def __setattr__(self, name: str, value: Any) -> None:
        if name.startswith("__"):
            object.__setattr__(self, name, value)
            return
        if name not in _fields():
            raise MemgraphError(f"memgraph.config has no setting {name!r}; valid settings are {list(_fields())}")
        from memgraph.options import Options

        Options.from_mapping({**self._values, name: value}, source="memgraph.config")  # validate now
        self._values[name] = value

    def __delattr__(self, name: str) -> None:
        self._values.pop(name, None)

    def settings(self) -> dict[str, Any]:
        """The settings assigned so far."""
        return dict(self._values)

    def reset(self) -> None:
        self._values.clear()

    @contextlib.contextmanager
    def patch(self, **values: Any) -> Iterator[None]:
        saved = dict(self._values)
        try:
            for name, value in values.items():
                setattr(self, name, value)
            yield
        finally:
            self._values.clear()
            self._values.update(saved)


sys.modules[__name__] = _Config(__name__)
