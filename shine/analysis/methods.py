"""The one registry of method names: legend label, colour, marker, line style and family.

A method name is the name of a ``configs/method/*.yaml`` file (bi-level: ``task.method_name``;
DEQ: ``task.method_name`` of a training run or a key of ``task.backwards`` of a timing run).
Every figure and table script reads labels and colours here, so a method looks the same
everywhere:

* :data:`METHODS` — ``{name: Method}``, the table itself;
* :func:`method` — the entry of a name; an unknown name gets its name as label, a neutral grey
  and itself as family (never a ``KeyError``);
* :func:`label` — the label of a name in one half of the paper (:data:`BILEVEL` or
  :data:`DEQ`): the bi-level figures mark the paper's methods "(ours)" and call SHINE-OPA by its
  bi-level name;
* :func:`family_of` — the family of a name: the DEQ figures draw the refine / limited variants
  of a method as points of its family's curve (``shine_refine`` -> ``shine``,
  ``original_limited`` -> ``original``), in the family's colour;
* :data:`DEQ_FAMILIES` — the DEQ families in figure / table order.

Colours are the Okabe-Ito palette (colour-blind safe).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

#: the two halves of the paper, whose figures label some methods differently
BILEVEL, DEQ = "bilevel", "deq"
#: colour of a method the registry does not know
NEUTRAL_COLOR = "0.5"
#: marker of a method the registry does not know
NEUTRAL_MARKER = "."


@dataclass(frozen=True)
class Method:
    """How one method is shown.

    Args:
        label: legend / table label (the DEQ figures' and tables' one).
        color: matplotlib colour of its curves and markers.
        family: the family it belongs to (its own name for a base method).
        marker: marker of its curves (bi-level figures; the DEQ figures mark the iterations).
        linestyle: line style of its curves.
        labels: per-half labels where a half shows another one, ``{BILEVEL: "SHINE (ours)"}``.
    """

    label: str
    color: str
    family: str
    marker: str = NEUTRAL_MARKER
    linestyle: str = "-"
    labels: Mapping[str, str] = field(default_factory=dict)

    def label_in(self, half: str | None = None) -> str:
        """The label shown in ``half`` (:data:`BILEVEL` or :data:`DEQ`; ``None``: the default)."""
        return self.labels.get(half, self.label) if half is not None else self.label


_METHODS = {
    # bi-level (§3.1, Figures 1, 2, E.1, E.2)
    "hoag": Method("HOAG", "#000000", "hoag", "o"),
    "hoag_limited": Method("HOAG limited backward", "#000000", "hoag", "v", "--"),
    "grid_search": Method("Grid search", "#009E73", "grid_search", "x", ":"),
    "random_search": Method("Random search", "#56B4E9", "random_search", "+", ":"),
    # both halves
    "shine": Method("SHINE", "#D55E00", "shine", "s", labels={BILEVEL: "SHINE (ours)"}),
    "shine_refine": Method(
        "SHINE refine", "#E69F00", "shine", "D", labels={BILEVEL: "SHINE refine (ours)"}
    ),
    "shine_opa": Method(
        "SHINE (adj. Broyden/OPA)",
        "#CC79A7",
        "shine_opa",
        "^",
        labels={BILEVEL: "SHINE-OPA (ours)"},
    ),
    "jacobian_free": Method("Jacobian-Free", "#0072B2", "jacobian_free", "P"),
    # DEQ (§3.2, Figures 3, E.3, Tables E.1-E.3)
    "original": Method("Original", "#000000", "original"),
    "original_limited": Method("Original limited", "#000000", "original"),
    "jacobian_free_refine": Method("Jacobian-Free refine", "#0072B2", "jacobian_free"),
    "shine_fallback": Method("SHINE (fallback)", "#E69F00", "shine_fallback"),
    "shine_adjoint_broyden": Method(
        "SHINE (adj. Broyden)", "#009E73", "shine_adjoint_broyden", "^"
    ),
    # inverse estimates of Fig. E.3 (``method`` of the DEQ inversion rows)
    "shine_broyden": Method("SHINE (Broyden)", "#D55E00", "shine", "s"),
    "shine_adjoint_broyden_opa": Method("SHINE (adj. Broyden, OPA)", "#CC79A7", "shine_opa", "o"),
}
#: ``{name: Method}`` for every method name of the paper used in this repository (read-only)
METHODS: Mapping[str, Method] = MappingProxyType(_METHODS)

#: the DEQ families, in the order of the figures' legends and of the tables
DEQ_FAMILIES: tuple[str, ...] = (
    "original",
    "jacobian_free",
    "shine",
    "shine_fallback",
    "shine_adjoint_broyden",
    "shine_opa",
)
#: the suffixes of a variant's name that its family's name lacks
VARIANT_SUFFIXES = ("_refine", "_limited")


def method(name: str) -> Method:
    """The registry entry of ``name``; an unknown name gets a neutral entry (its name as label)."""
    entry = METHODS.get(name)
    if entry is not None:
        return entry
    return Method(name, NEUTRAL_COLOR, family_of(name))


def label(name: str, half: str | None = None) -> str:
    """The label of ``name`` in ``half`` (:data:`BILEVEL`, :data:`DEQ` or ``None``)."""
    return method(name).label_in(half)


def color(name: str) -> str:
    """The colour of ``name`` (:data:`NEUTRAL_COLOR` when unknown)."""
    return method(name).color


def family_of(name: str) -> str:
    """The family of ``name``: ``shine_refine`` -> ``shine``, ``original_limited`` -> ``original``.

    A name the registry does not know loses a ``_refine`` / ``_limited`` suffix.
    """
    entry = METHODS.get(name)
    if entry is not None:
        return entry.family
    for suffix in VARIANT_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


__all__ = [
    "BILEVEL",
    "DEQ",
    "DEQ_FAMILIES",
    "METHODS",
    "NEUTRAL_COLOR",
    "NEUTRAL_MARKER",
    "Method",
    "color",
    "family_of",
    "label",
    "method",
]
