"""Load a CLI of ``scripts/`` as a module, from its file (``scripts/`` is not a package).

The analysis code the scripts share is the package :mod:`shine.analysis` (tests import it
directly); this is for the tests of a script's own functions and ``main()``.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def load_script(name: str) -> ModuleType:
    """The module of ``scripts/<name>.py``, loaded once per session (as ``scripts.<name>``)."""
    key = f"scripts.{name}"
    if key in sys.modules:
        return sys.modules[key]
    spec = importlib.util.spec_from_file_location(key, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[key] = module  # before executing: dataclasses look their module up
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[key]
        raise
    return module
