"""NeMo's ModelCheckpoint driven outside its own hooks: the ``-last`` checkpoint of this step, now.

A stop on request (``nemo/stop.py``) ends a NeMo job between two iterations, where no
ModelCheckpoint hook would save. What NeMo's ``AutoResume`` loads is the newest
``*-last`` checkpoint in the log directory's ``checkpoints/``, written by the trainer's
ModelCheckpoint (its naming, context, unfinished marker, the previous ``-last`` pruned). So
the callback itself writes it, exactly as its step-interval save does (``on_train_batch_end``:
``_monitor_candidates`` then ``_save_last_checkpoint``); an asynchronous save is finished
before this returns. Lightning's and NeMo's private names used for that are here only.
"""

from __future__ import annotations

from typing import Any, Optional


class NoResumableCheckpoint(RuntimeError):
    """The trainer has no ModelCheckpoint that writes ``-last`` checkpoints."""


def save_last_now(trainer: Any) -> tuple[str, bool]:
    """The ``-last`` checkpoint of ``trainer.global_step``: its directory, and whether it was
    written now (False: the callback had saved this step already). Collective: every rank
    calls it. Raises :class:`NoResumableCheckpoint` when the recipe writes none."""
    from nemo.lightning.ckpt_utils import ckpt_to_dir

    callback = trainer.checkpoint_callback
    if callback is None or not getattr(callback, "save_last", False):
        raise NoResumableCheckpoint(
            "the trainer has no ModelCheckpoint with save_last (the '-last' checkpoint is "
            "what NeMo's AutoResume loads): set log.ckpt.save_last=True")
    if getattr(callback, "_last_global_step_saved", None) == trainer.global_step:
        return str(ckpt_to_dir(callback.last_model_path)), False
    candidates = callback._monitor_candidates(trainer)
    callback._save_last_checkpoint(trainer, candidates)
    finish_async_saves(trainer)
    return str(ckpt_to_dir(callback.last_model_path)), True


def finish_async_saves(trainer: Any) -> None:
    """Wait for NeMo's asynchronous checkpoint saves (``ckpt_async_save``) to land."""
    if not getattr(trainer.strategy, "async_save", False):
        return
    finalize: Optional[Any] = getattr(trainer.strategy.checkpoint_io,
                                      "maybe_finalize_save_checkpoint", None)
    if finalize is not None:
        finalize(blocking=True)
