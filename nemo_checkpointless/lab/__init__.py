"""The lab: what the benchmarks measure the product against, kept out of the runtime path.

* :mod:`.restart`: stock checkpoint-restart (torchrun restarts + DCP), the baseline;
* :mod:`.calibrate`: a raw send of the same bytes right after a peer transfer;
* ``simulate/`` (the scale model) and the goodput accounting (``metrics/goodput.py``).

Nothing under ``recovery/``, ``train/`` or ``comm/`` imports this package; the composition
root (``runtime.py``) plugs a lab piece in only when a benchmark asks for it.
"""
