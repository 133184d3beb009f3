"""Run code right after a module is first imported, without importing it now.

``import slimgpt`` must register the slim model classes with transformers' Auto classes, yet the
command line must answer ``--help`` or a typo in about a second, and importing transformers (with
torch) takes several. :func:`when_imported` defers the registration to the moment transformers is
imported, by whoever imports it; if it already is, the callback runs at once.
"""

from __future__ import annotations

import importlib.abc
import sys
import threading
from collections.abc import Callable, Sequence
from types import ModuleType

_pending: dict[str, list[Callable[[ModuleType], None]]] = {}
_lock = threading.RLock()


def when_imported(name: str, callback: Callable[[ModuleType], None]) -> None:
    """Call ``callback(module)`` once the top-level module ``name`` has finished importing (now, if
    it already is imported)."""
    with _lock:
        module = sys.modules.get(name)
        if module is None:
            _pending.setdefault(name, []).append(callback)
            if not any(isinstance(f, _AfterImport) for f in sys.meta_path):
                sys.meta_path.insert(0, _AfterImport())
            return
    callback(module)


class _AfterImport(importlib.abc.MetaPathFinder):
    """Finds nothing itself: for a watched name it asks the other finders and wraps the loader's
    ``exec_module`` (on the loader instance, so ``__loader__`` and ``__spec__`` stay the real ones)
    to run the callbacks once the module body has run."""

    def find_spec(self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None):
        if fullname not in _pending:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        loader = spec.loader
        if loader is None or not hasattr(loader, "exec_module"):
            return spec
        original = loader.exec_module

        def exec_module(module: ModuleType) -> None:
            try:
                original(module)
            finally:
                try:
                    del loader.exec_module  # back to the class's method
                except AttributeError:
                    pass
            with _lock:
                callbacks = _pending.pop(fullname, [])
            loaded = sys.modules.get(fullname, module)  # transformers swaps in a lazy module
            for callback in callbacks:
                callback(loaded)

        loader.exec_module = exec_module  # type: ignore[method-assign]
        return spec
