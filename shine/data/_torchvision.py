"""Import torchvision even when its C extension does not match the installed torch.

PyPI's ``torchvision==0.28.0`` wheel is a CUDA build. Next to a CPU-only ``torch`` its C extension
(``torchvision/_C.so``) cannot be loaded, and ``import torchvision`` then fails in
``torchvision/_meta_registrations.py`` with ``RuntimeError: operator torchvision::nms does not
exist`` (upstream pytorch/vision#9085): that module registers fake (meta) kernels for the two
operators ``torchvision::nms`` and ``torchvision::qnms`` unconditionally, while their schemas are
only defined by the C extension.

Datasets and transforms are pure Python. :func:`import_torchvision` therefore

1. returns the module at once if it is already imported;
2. otherwise checks whether the two schemas exist (the C extension was loaded, or someone defined
   them already); if not, tries to load the C extension the way torchvision does;
3. only if that fails, defines the two missing schemas with :func:`torch.library.define` (same
   signatures as torchvision's C++ ``TORCH_LIBRARY`` block), each at most once;
4. imports torchvision.

Where the extension loads (matching CPU or CUDA builds, e.g. on a GPU cluster) nothing is
defined: the function is a plain ``import torchvision``. With the workaround, every pure-Python
part works (datasets, transforms, models); the compiled operators (``torchvision.ops.nms``,
``roi_align``, the image decoders of ``torchvision.io``) are unavailable and raise torchvision's
own "Couldn't load custom C++ ops" error when called.
"""

from __future__ import annotations

import importlib
import importlib.machinery
import importlib.util
import logging
import sys
from pathlib import Path
from types import ModuleType

import torch

logger = logging.getLogger(__name__)

_NAMESPACE = "torchvision"
#: The operators whose fake kernels torchvision registers at import, with their C++ schemas.
_REQUIRED_SCHEMAS = {
    "nms": "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}


def _op_exists(name: str) -> bool:
    """Whether the operator ``torchvision::<name>`` has a schema in the dispatcher."""
    try:
        getattr(getattr(torch.ops, _NAMESPACE), name)
    except (AttributeError, RuntimeError):
        return False
    return True


def _extension_path() -> Path | None:
    """Path of torchvision's ``_C`` extension, found without importing the package."""
    spec = importlib.util.find_spec(_NAMESPACE)
    if spec is None or not spec.submodule_search_locations:
        return None
    loader_details = (
        importlib.machinery.ExtensionFileLoader,
        importlib.machinery.EXTENSION_SUFFIXES,
    )
    for location in spec.submodule_search_locations:
        ext_spec = importlib.machinery.FileFinder(location, loader_details).find_spec("_C")
        if ext_spec is not None and ext_spec.origin is not None:
            return Path(ext_spec.origin)
    return None


def _load_extension() -> bool:
    """Load torchvision's C extension as torchvision itself does; ``True`` on success."""
    path = _extension_path()
    if path is None:
        logger.debug("torchvision C extension not found")
        return False
    try:
        torch.ops.load_library(str(path))
    except (ImportError, OSError) as error:
        logger.debug("torchvision C extension %s cannot be loaded: %s", path, error)
        return False
    logger.debug("torchvision C extension %s loaded", path)
    return True


def _define_missing_schemas() -> list[str]:
    """Define the missing schemas of :data:`_REQUIRED_SCHEMAS`; return the names defined."""
    defined = []
    for name, schema in _REQUIRED_SCHEMAS.items():
        if _op_exists(name):
            continue
        try:
            torch.library.define(f"{_NAMESPACE}::{name}", schema)
        except RuntimeError:
            # defined concurrently by another thread between the check and here
            if not _op_exists(name):
                raise
            continue
        defined.append(name)
    return defined


def import_torchvision() -> ModuleType:
    """Import and return ``torchvision``, working around a C extension that cannot load.

    A no-op wrapper of ``import torchvision`` where the extension loads; otherwise defines the
    schemas of ``torchvision::nms`` and ``torchvision::qnms`` (never twice) before importing.
    What was done is logged at debug level.

    Returns:
        The ``torchvision`` module.

    Raises:
        ImportError: if torchvision is not installed.
    """
    module = sys.modules.get(_NAMESPACE)
    if module is not None and hasattr(module, "__version__"):
        return module
    if all(_op_exists(name) for name in _REQUIRED_SCHEMAS):
        logger.debug("torchvision operator schemas already defined; importing torchvision")
    elif _load_extension() and all(_op_exists(name) for name in _REQUIRED_SCHEMAS):
        logger.debug("importing torchvision with its C extension")
    else:
        defined = _define_missing_schemas()
        logger.debug(
            "torchvision C extension unavailable: defined the schemas of %s so that the "
            "pure-Python parts (datasets, transforms) import; compiled operators are unavailable",
            ", ".join(f"{_NAMESPACE}::{name}" for name in defined) or "no operator",
        )
    module = importlib.import_module(_NAMESPACE)
    logger.debug("imported torchvision %s", getattr(module, "__version__", "?"))
    return module
