"""One log format for every rank: the rank (or ``spare``) is in every line."""

from __future__ import annotations

import logging
import os
import sys
import warnings


def setup_logging(rank: int | str) -> None:
    """Log to stderr with the rank in every line (``NCL_LOG_LEVEL``, default INFO)."""
    logging.basicConfig(
        level=os.environ.get("NCL_LOG_LEVEL", "INFO"),
        format=f"[%(asctime)s] [rank {rank}] %(name)s %(levelname)s: %(message)s",
        stream=sys.stderr,
        force=True,
    )
    for message in (
        "Transformer Engine and Apex are not installed",
        ".*is deprecated. Please use.*",
        ".*Apex is not installed.*",
    ):
        warnings.filterwarnings("ignore", message=message)
