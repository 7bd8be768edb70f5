"""Which tensors a load returns: the ``tensors=`` argument of ``load``.

A tensor-parallel rank loads only its shard, so a selection is checked against
tensor names before any byte is read. ``tensors=`` may be

* ``None``: every tensor;
* a ``str``: one glob pattern (``fnmatch`` syntax, case-sensitive, matched
  against the whole name), e.g. ``"model.layers.*.mlp.*"``;
* any other iterable of ``str``: exact names; a name that no file holds is an
  error (see :func:`check_all_found`), because a typo would otherwise load a
  model with a tensor silently missing;
* a callable ``(name) -> bool``.

Pure functions, no I/O.
"""

from __future__ import annotations

import difflib
import fnmatch
import re
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass
from typing import TypeAlias

__all__ = [
    "Selector",
    "TensorSelection",
    "check_all_found",
    "make_selector",
    "missing_names",
]

TensorSelection: TypeAlias = str | Iterable[str] | Callable[[str], bool] | None

# How many names an error message lists before it says "and N more".
_SHOWN = 5


@dataclass(frozen=True)
class Selector:
    """A ``tensors=`` argument in normal form; call it with a tensor name.

    ``names`` is the set of exact names asked for, or ``None`` when the
    selection is a pattern, a predicate or everything (nothing can then be
    "missing").
    """

    predicate: Callable[[str], bool]
    names: frozenset[str] | None = None

    def __call__(self, name: str) -> bool:
        return bool(self.predicate(name))


def make_selector(spec: TensorSelection | Selector) -> Selector:
    """Normalise a ``tensors=`` argument; iterables are consumed once here.

    Raises :class:`TypeError` for anything that is none of the accepted forms
    (bytes, a collection holding non-strings, ...).
    """
    if isinstance(spec, Selector):
        return spec
    if spec is None:
        return Selector(_everything)
    if isinstance(spec, str):
        # fnmatchcase, not fnmatch: tensor names are case-sensitive on every
        # platform. Compiled once; the predicate runs once per tensor.
        pattern = re.compile(fnmatch.translate(spec))
        return Selector(lambda name: pattern.match(name) is not None)
    if callable(spec):
        return Selector(spec)
    if isinstance(spec, bytes | bytearray | memoryview):
        raise TypeError("tensors= must be str names, not bytes")
    if isinstance(spec, Iterable):
        names = frozenset(spec)
        wrong = sorted({type(name).__name__ for name in names if not isinstance(name, str)})
        if wrong:
            raise TypeError(f"tensors= names must be str, got {', '.join(wrong)}")
        return Selector(names.__contains__, names)
    raise TypeError(
        "tensors= must be None, a glob pattern, a collection of names or a callable, "
        f"not {type(spec).__name__}"
    )


def missing_names(spec: TensorSelection | Selector, seen_names: Iterable[str]) -> list[str]:
    """Exact names asked for that are not among ``seen_names``, sorted.

    Always empty for ``None``, a pattern or a predicate. Pass the
    :class:`Selector` (not a one-shot iterator) when the selection was already
    used to pick tensors.
    """
    names = make_selector(spec).names
    if not names:
        return []
    return sorted(names.difference(seen_names))


def check_all_found(
    spec: TensorSelection | Selector, seen_names: Collection[str], *, where: str = ""
) -> None:
    """Raise if an exact name asked for is in none of the files.

    ``seen_names`` is every tensor name of every file of the model (not only
    the selected ones), so the message can suggest what was probably meant.
    ``where`` names the model in the message.

    Raises :class:`ValueError` (to be mapped to a weightcache error by the
    caller) naming the missing names and a few available ones.
    """
    missing = missing_names(spec, seen_names)
    if not missing:
        return
    available = sorted(seen_names)
    suggestions: list[str] = []
    for name in missing[:_SHOWN]:
        for close in difflib.get_close_matches(name, available, n=2):
            if close not in suggestions:
                suggestions.append(close)
    shown = suggestions or available[:_SHOWN]
    label = "close matches" if suggestions else "available names include"
    prefix = f"{where}: " if where else ""
    raise ValueError(
        f"{prefix}{len(missing)} requested tensor(s) not found: {_listing(missing)}; "
        f"{label}: {_listing(shown) if shown else '(the model has no tensors)'}"
        f" ({len(available)} tensors in all)"
    )


def _listing(names: list[str]) -> str:
    shown = ", ".join(repr(n) for n in names[:_SHOWN])
    if len(names) > _SHOWN:
        shown += f" and {len(names) - _SHOWN} more"
    return shown


def _everything(name: str) -> bool:
    return True
