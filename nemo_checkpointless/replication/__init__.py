"""Peer-to-peer state replication: who holds a lost rank's state, and the transfer."""
