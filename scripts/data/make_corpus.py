#!/usr/bin/env python
"""Generate the bundled text corpus from the docstrings of the Python standard library.

Provenance of ``nemo_checkpointless/data/assets/corpus.txt``: every public module of the
standard library that imports cleanly is walked (packages recursively), and the docstring
of each module, class, function and method *defined in that module* becomes one document;
so does each language-reference topic of ``pydoc_data.topics`` (the text of ``help("if")``).
Documents are sorted by their fully qualified name, exact duplicates are dropped (first
in sorted order wins), and they are written as::

    <qualified name>
    <blank line>
    <docstring>
    <blank line>
    <|doc|>
    ...

i.e. documents are separated by ``"\\n\\n<|doc|>\\n"`` (see
``nemo_checkpointless.data.corpus.DOC_SEPARATOR``). The output only depends on the Python
build that runs the script (the bundled file was made with CPython 3.11); run it again to
regenerate::

    python scripts/data/make_corpus.py --output nemo_checkpointless/data/assets/corpus.txt
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import inspect
import io
import os
import pkgutil
import re
import sys
import sysconfig
import warnings
from collections.abc import Iterator
from types import ModuleType

# Kept in sync with nemo_checkpointless.data.corpus (this script must run without the package).
DOC_SEPARATOR = "\n\n<|doc|>\n"
SEPARATOR_LINE = "<|doc|>"

# Modules that have side effects on import (open a browser, print, need a display, start
# threads) or that are test suites / demos rather than library documentation.
SKIP_TOP_LEVEL = frozenset(
    {
        "antigravity",
        "this",
        "idlelib",
        "turtledemo",
        "tkinter",
        "turtle",
        "test",
        "lib2to3",
        "ensurepip",
        "venv",
        "pydoc_data",
        "__future__",
        "__hello__",
        "__phello__",
        "sre_compile",
        "sre_constants",
        "sre_parse",
    }
)
SKIP_SUBMODULE_PARTS = frozenset({"test", "tests", "idle_test", "__main__"})
MIN_DOC_CHARS = 60
# Memory addresses (e.g. reprs of default values) would make the corpus non-deterministic.
_ADDRESS_RE = re.compile(r"0x[0-9a-fA-F]{6,}")


def _is_public(name: str) -> bool:
    return not name.startswith("_")


def iter_stdlib_module_names() -> Iterator[str]:
    """Yield the names of the public standard library modules, packages walked recursively."""
    for top in sorted(sys.stdlib_module_names):
        if not _is_public(top) or top in SKIP_TOP_LEVEL:
            continue
        yield top
        module = _import(top)
        if module is None or not hasattr(module, "__path__"):
            continue
        submodules = pkgutil.walk_packages(module.__path__, top + ".", onerror=lambda _: None)
        for info in submodules:
            parts = info.name.split(".")
            if all(_is_public(p) for p in parts) and not SKIP_SUBMODULE_PARTS.intersection(parts):
                yield info.name


def _is_stdlib_file(module: ModuleType) -> bool:
    """True for built-in modules and modules loaded from the standard library directory.

    This excludes shadowing copies from site-packages (setuptools replaces ``distutils``).
    """
    path = getattr(module, "__file__", None)
    if path is None:
        return True
    path = os.path.realpath(path)
    if "site-packages" in path.split(os.sep):
        return False
    roots = {os.path.realpath(sysconfig.get_paths()[key]) for key in ("stdlib", "platstdlib")}
    return any(path.startswith(root + os.sep) for root in roots)


def _import(name: str) -> ModuleType | None:
    """Import a standard library module quietly.

    Returns None if it is unavailable on this platform or shadowed by a non-stdlib module.
    """
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        try:
            module = importlib.import_module(name)
        except BaseException:  # noqa: BLE001 - platform-specific modules raise anything
            return None
    return module if _is_stdlib_file(module) else None


def _clean(doc: object, reject_addresses: bool = True) -> str | None:
    if not isinstance(doc, str):
        return None
    text = inspect.cleandoc(doc).strip()
    if len(text) < MIN_DOC_CHARS or SEPARATOR_LINE in text:
        return None
    if reject_addresses and _ADDRESS_RE.search(text):
        return None
    # Normalise line endings and avoid runs of blank lines that look like separators.
    text = re.sub(r"\n{3,}", "\n\n", text.replace("\r\n", "\n").replace("\r", "\n"))
    return text


def iter_module_docs(module: ModuleType) -> Iterator[tuple[str, str]]:
    """Yield ``(qualified_name, docstring)`` for a module and the objects defined in it."""
    name = module.__name__
    doc = _clean(module.__dict__.get("__doc__"))
    if doc:
        yield name, doc
    for attr, obj in sorted(vars(module).items()):
        if not _is_public(attr) or getattr(obj, "__module__", None) != name:
            continue
        if inspect.isclass(obj):
            doc = _clean(obj.__dict__.get("__doc__"))
            if doc:
                yield f"{name}.{attr}", doc
            for member, value in sorted(vars(obj).items()):
                if not _is_public(member):
                    continue
                if isinstance(value, (staticmethod, classmethod)):
                    value = value.__func__
                if inspect.isroutine(value) or isinstance(value, property):
                    doc = _clean(getattr(value, "__doc__", None))
                    if doc:
                        yield f"{name}.{attr}.{member}", doc
        elif inspect.isroutine(obj):
            doc = _clean(getattr(obj, "__doc__", None))
            if doc:
                yield f"{name}.{attr}", doc


def iter_reference_topics() -> Iterator[tuple[str, str]]:
    """Yield the language-reference help topics that ship with pydoc (``help('assert')``)."""
    topics = _import("pydoc_data.topics")
    if topics is None:
        return
    for topic, text in sorted(topics.topics.items()):
        doc = _clean(text, reject_addresses=False)
        if doc:
            yield f"pydoc_data.topics.{topic}", doc


def collect_documents() -> list[str]:
    """Return the corpus documents, sorted by qualified name and de-duplicated."""
    by_name: dict[str, str] = dict(iter_reference_topics())
    for module_name in iter_stdlib_module_names():
        module = _import(module_name)
        if module is None:
            continue
        for qualname, doc in iter_module_docs(module):
            by_name.setdefault(qualname, doc)
    seen: set[str] = set()
    documents = []
    for qualname in sorted(by_name):
        doc = by_name[qualname]
        if doc in seen:
            continue
        seen.add(doc)
        documents.append(f"{qualname}\n\n{doc}")
    return documents


def main() -> None:
    default_output = os.path.join(
        os.path.dirname(os.path.abspath(__file__)),
        "..",
        "..",
        "nemo_checkpointless",
        "data",
        "assets",
        "corpus.txt",
    )
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", default=os.path.normpath(default_output))
    parser.add_argument(
        "--max-bytes",
        type=int,
        default=3_000_000,
        help="stop adding documents (in sorted order) once the corpus reaches this size",
    )
    args = parser.parse_args()

    documents = collect_documents()
    kept, size = [], 0
    for doc in documents:
        doc_size = len(doc.encode("utf-8")) + len(DOC_SEPARATOR)
        if size + doc_size > args.max_bytes:
            break
        kept.append(doc)
        size += doc_size
    text = DOC_SEPARATOR.join(kept) + "\n"
    tmp = args.output + ".tmp"
    with open(tmp, "w", encoding="utf-8", newline="\n") as f:
        f.write(text)
    os.replace(tmp, args.output)
    print(
        f"wrote {args.output}: {len(kept)} documents (of {len(documents)}), "
        f"{len(text.encode('utf-8'))} bytes, python {sys.version.split()[0]}"
    )


if __name__ == "__main__":
    main()
