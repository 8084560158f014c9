"""Run records: per-step metrics, recovery events and the run summary."""

from .writer import JsonlWriter, write_json

__all__ = ["JsonlWriter", "write_json"]
