"""Communicator start-up, teardown and rebuild.

``init()`` is Tier 1: the world formed over a store sharded across the node agents (or the
ranks themselves), with no root; see ``docs/architecture.md`` ("Tier 1").
"""

from .init import Tier1World, init
from .store import JobIdentity, ShardedStore, StoreServer, connect
from .world import backend_for, destroy_world, init_world

__all__ = ["JobIdentity", "ShardedStore", "StoreServer", "Tier1World", "backend_for", "connect",
           "destroy_world", "init", "init_world"]
