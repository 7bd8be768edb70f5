"""A marked section of a markdown document, rewritten in place by the load scenarios.

``loadtest/storm.py``, ``loadtest/crash_loop.py`` and ``loadtest/load.py`` each
own one section of docs/benchmarks.md or docs/reliability.md, between
``<!-- name:begin -->`` and ``<!-- name:end -->``; the rest of the file is left
as it is.
"""

from __future__ import annotations

import os
import re
from pathlib import Path


def markers(name: str) -> tuple[str, str]:
    return f"<!-- {name}:begin -->", f"<!-- {name}:end -->"


def put_section(path: Path, name: str, section: str, *, heading: str) -> None:
    """Replace section ``name`` of ``path`` with ``section`` (which carries the markers).

    A file without the section gets it appended; a missing file starts with
    ``heading``. The write is atomic, so a reader never sees half a document.
    """
    begin, end = markers(name)
    section = section.rstrip("\n")
    text = path.read_text() if path.exists() else f"{heading}\n"
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.S)
    if pattern.search(text):
        text = pattern.sub(lambda _: section, text, count=1)
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    tmp.replace(path)
