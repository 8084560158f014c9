"""The one place that touches torch, megatron-core and Lightning internals.

Each module here wraps one foreign library's private or version-dependent surface, found
by feature detection rather than version numbers, so that the rest of the package calls
stable names. ``check_versions()`` (in :mod:`.versions`) runs once at start-up and names
the supported versions when a probe fails.
"""
