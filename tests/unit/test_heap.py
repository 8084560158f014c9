"""Long-lived objects frozen out of the cyclic collector's full passes (heap.py)."""

from __future__ import annotations


def test_gc_freeze_and_its_switch(monkeypatch):
    """heap.freeze moves live objects out of the collector's passes; NCL_GC_FREEZE=0 skips."""
    import gc

    from nemo_checkpointless.heap import freeze

    monkeypatch.setenv("NCL_GC_FREEZE", "0")
    before = gc.get_freeze_count()
    assert freeze("test") == 0 and gc.get_freeze_count() == before
    monkeypatch.setenv("NCL_GC_FREEZE", "1")
    try:
        assert freeze("test") >= before and gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()  # leave the test process as it was
