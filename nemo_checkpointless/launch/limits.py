"""The agent's limits on repeated failures, typed and resolved once: flag > environment > default.

``ncl-launch`` resolves :class:`AgentLimits` from its flags and its environment
(:meth:`AgentLimits.resolve`), as it does :class:`~nemo_checkpointless.timeouts.Timeouts`.
A value that is not a whole number of zero or more is refused with the flag or variable
that gave it.

The reference table in ``docs/launch.md`` ("Limits on repeated failures") is generated from
the fields below: ``python -m nemo_checkpointless.launch.limits --markdown`` (a unit test
keeps the two equal).
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import Any, Mapping, Optional

from .. import knobs


class LimitConfigError(ValueError):
    """A limit given as something other than a whole number of zero or more."""


def _limit(default: int, env: str, flag: str, meaning: str) -> Any:
    return knobs.knob(default, env, meaning, flag=flag)


@dataclass(kw_only=True, frozen=True)
class AgentLimits:
    """Counts (0: no limit) after which the agent stops the job instead of repairing it."""

    max_start_failures: int = _limit(
        3, "NCL_MAX_START_FAILURES", "--max-start-failures",
        "processes in a row of one rank that die before completing a step (a replacement "
        "that crashes or hangs in its start-up or its recovery, a first process before its "
        "first step): the agent then stops the job with exit code 3, naming the rank, the "
        "exit codes and the log, instead of starting another. A completed step starts the "
        "count again: a rank that fails again and again with steps in between is always "
        "replaced")

    @classmethod
    def resolve(cls, flags: Optional[Mapping[str, Any]] = None,
                env: Mapping[str, str] = os.environ) -> "AgentLimits":
        """Each field from ``flags`` (field name -> value; None: not given), else from its
        environment variable, else its default."""
        return knobs.resolve(cls, lambda value, source, _f: _count(value, source), "limits",
                             flags, env)


def _count(value: Any, source: str) -> int:
    text = str(value).strip()
    if not text.isdigit():
        raise LimitConfigError(f"{source}={value!r}: give a whole number of zero or more "
                               f"(0: no limit), e.g. {source}=3")
    return int(text)


def render_markdown() -> str:
    """The reference table (field, flag, environment variable, default, meaning)."""
    return knobs.render_markdown(AgentLimits)


def main(argv: Optional[list[str]] = None) -> int:
    return knobs.markdown_main("nemo_checkpointless.launch.limits", render_markdown, argv)


if __name__ == "__main__":
    sys.exit(main())
