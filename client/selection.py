"""Which tensors a load returns: the ``tensors=`` argument of ``load``.

A tensor-parallel rank loads only its shard, so a selection is checked against
tensor names before any byte is read. ``tensors=`` may be

* ``None``: every tensor;
* a ``str``: one glob pattern (``fnmatch`` syntax, case-sensitive, matched
  against the whole name), e.g. ``"model.layers.*.mlp.*"``; a pattern that
  matches no tensor is an error;
* any other iterable of ``str``: exact names; a name that no file holds is an
  error, because a typo would otherwise load a model with a tensor silently
  missing. An empty collection (``tensors=[]``) is the one way to ask for no
  tensors at all: the load then only makes the ref local and checks headers;
* a callable ``(name) -> bool``: used as is; selecting nothing is the
  caller's decision, not an error.

Both errors come from :func:`check_all_found`, with a few names the model does
hold.

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
    selection is a pattern, a predicate or everything (no name can then be
    "missing"). ``pattern`` is the glob, when the selection is one: it must
    match at least one tensor.
    """

    predicate: Callable[[str], bool]
    names: frozenset[str] | None = None
    pattern: str | None = None

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
        return Selector(lambda name: pattern.match(name) is not None, pattern=spec)
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
    """Raise if an exact name asked for is in none of the files, or a glob matches none.

    ``seen_names`` is every tensor name of every file of the model (not only
    the selected ones), so the message can suggest what was probably meant.
    ``where`` names the model in the message.

    Raises :class:`ValueError` (to be mapped to a weightcache error by the
    caller) naming the missing names (or the pattern) and a few available ones.
    """
    selector = make_selector(spec)
    prefix = f"{where}: " if where else ""
    if selector.pattern is not None:
        if any(selector(name) for name in seen_names):
            return
        available = sorted(seen_names)
        # A pattern that would match but for case is the likely slip; else the first names.
        folded = re.compile(fnmatch.translate(selector.pattern), re.IGNORECASE)
        near = [name for name in available if folded.match(name)]
        label = "matching but for case" if near else "available names include"
        shown = near or available
        raise ValueError(
            f"{prefix}tensors={selector.pattern!r} matches no tensor; {label}: "
            f"{_listing(shown) if shown else '(the model has no tensors)'}"
            f" ({len(available)} tensors in all; tensors=[] asks for none)"
        )
    missing = missing_names(selector, seen_names)
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
