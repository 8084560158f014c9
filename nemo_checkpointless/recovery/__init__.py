"""In-process recovery: monitor, abort, commit protocol, re-entry, fault injection."""
