"""Typed knob sections resolved once (flag > environment > default), with generated reference tables.

A section is a frozen dataclass whose fields are made with :func:`knob`: each carries its
environment variable, its ``ncl-launch`` flag (if any) and its meaning. :func:`resolve`
builds the section from flags and an environment, :func:`render_markdown` writes the
reference table the docs carry, and :func:`markdown_main` is the ``--markdown`` command
line of a section's module. Used by :mod:`nemo_checkpointless.timeouts` and
:mod:`nemo_checkpointless.launch.limits`; knows nothing of either.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from dataclasses import field
from typing import Any, Callable, Mapping, Optional, TypeVar

T = TypeVar("T")

#: ``parse(value, source, field) -> parsed``: raises with ``source`` (the flag or
#: variable that gave ``value``) named when the value is refused
Parse = Callable[[Any, str, dataclasses.Field], Any]


def knob(default: Any, env: str, meaning: str, flag: Optional[str] = None,
         default_doc: Optional[str] = None, **extra: Any) -> Any:
    """A field of a knob section; ``default_doc`` is what the table shows as the default
    (``default`` formatted by ``:g`` when not given); ``extra`` is kept in the metadata
    for the section's parser."""
    return field(default=default, metadata={
        "env": env, "flag": flag, "meaning": meaning,
        "default_doc": default_doc if default_doc is not None else f"{default:g}", **extra})


def resolve(cls: type[T], parse: Parse, what: str,
            flags: Optional[Mapping[str, Any]] = None,
            env: Mapping[str, str] = os.environ) -> T:
    """``cls`` with each field from ``flags`` (field name -> value; None: not given), else
    from its environment variable (blank: not given), else its default. ``what`` names the
    section in the error for an unknown flag name (a caller's bug, hence TypeError)."""
    flags = flags or {}
    unknown = set(flags) - {f.name for f in dataclasses.fields(cls)}
    if unknown:
        raise TypeError(f"unknown {what}: {', '.join(sorted(unknown))}")
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        meta = f.metadata
        given, source = flags.get(f.name), meta["flag"] or f.name
        if given is None and env.get(meta["env"], "").strip():
            given, source = env[meta["env"]], meta["env"]
        if given is not None:
            values[f.name] = parse(given, source, f)
    return cls(**values)


def render_markdown(cls: type, default_header: str = "default") -> str:
    """The reference table of ``cls``: field, flag, environment variable, default, meaning."""
    rows = [f"| field | `ncl-launch` flag | environment | {default_header} | meaning |",
            "|---|---|---|---|---|"]
    for f in dataclasses.fields(cls):
        meta = f.metadata
        flag = f"`{meta['flag']}`" if meta["flag"] else "-"
        rows.append(f"| `{f.name}` | {flag} | `{meta['env']}` | {meta['default_doc']} | "
                    f"{meta['meaning']} |")
    return "\n".join(rows) + "\n"


def markdown_main(module: str, render: Callable[[], str],
                  argv: Optional[list[str]] = None) -> int:
    """``python -m <module> --markdown``: print the table; anything else is a usage error."""
    argv = sys.argv[1:] if argv is None else argv
    if argv != ["--markdown"]:
        print(f"usage: python -m {module} --markdown", file=sys.stderr)
        return 2
    sys.stdout.write(render())
    return 0
