"""Stand-in modules for optional packages (flash-attn, xformers, apex ...), so the tests
can check detection and dispatch on a machine where those cannot be installed."""
import sys
import types


def fake_module(monkeypatch, name, **attrs):
    """Installs an importable module `name` with `attrs` for the test's duration."""
    module = types.ModuleType(name)
    for key, value in attrs.items():
        setattr(module, key, value)
    monkeypatch.setitem(sys.modules, name, module)
    parent, _, child = name.rpartition(".")
    if parent:
        monkeypatch.setattr(sys.modules[parent], child, module, raising=False)
    return module


def absent(monkeypatch, name):
    """Makes `import name` raise ImportError (a None entry in sys.modules does that)."""
    monkeypatch.setitem(sys.modules, name, None)
