"""Communicator start-up, teardown and rebuild."""

from .world import backend_for, init_world, destroy_world

__all__ = ["backend_for", "init_world", "destroy_world"]
