"""Lightning fit-loop internals the NeMo front-end reads and sets (Lightning 2.4).

The NeMo front-end keeps Lightning's ``fit`` in charge of the loop and recovers inside
it; a replacement rank must then stand exactly where its peers stand in Lightning's
loop. Everything that touches Lightning's private surface for that is here:

* :func:`snapshot` / :func:`restore`: the loop's progress counters, every callback's
  plain attributes, the LR schedulers and the callback metrics of one moment;
* :func:`split_closure`: an automatic-optimization closure as (training step, the hooks
  Lightning runs after it), so a redone step does not fire the hooks twice;
* :func:`wrap_validation`: the fit loop's validation run, for a recovery point around it;
* :func:`set_callback_metrics`: what ``trainer.callback_metrics`` returns.

Checked by :func:`check` at start-up (a missing attribute names the Lightning version).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import math
from pathlib import PurePath
from typing import Any, Callable, Iterator

import torch

SUPPORTED = "lightning 2.4"


def check(trainer: Any) -> None:
    """Fail early, naming the supported version, if a probed attribute is missing."""
    loop = trainer.fit_loop
    probes = [(loop, "epoch_loop"), (loop, "epoch_progress"), (loop.epoch_loop, "val_loop"),
              (loop.epoch_loop, "batch_progress"), (loop.epoch_loop, "_batches_that_stepped"),
              (trainer, "_logger_connector"), (trainer._logger_connector, "_callback_metrics")]
    missing = [f"{type(o).__name__}.{a}" for o, a in probes if not hasattr(o, a)]
    if missing:
        raise RuntimeError(f"checkpointless recovery inside Lightning's fit needs {SUPPORTED}"
                           f" (missing: {', '.join(missing)})")


# ---------------------------------------------------------------------- snapshots
_PLAIN = (type(None), bool, int, float, str, bytes, PurePath)


def _plain(value: Any, depth: int = 0) -> bool:
    """Values a callback's state is made of (no references into the trainer or model)."""
    if isinstance(value, _PLAIN):
        return True
    if isinstance(value, torch.Tensor):
        return value.device.type == "cpu" or value.numel() < 64
    if depth < 4 and isinstance(value, (list, tuple)):
        return all(_plain(v, depth + 1) for v in value)
    if depth < 4 and isinstance(value, dict):
        return all(_plain(k, depth + 1) and _plain(v, depth + 1) for k, v in value.items())
    return False


def callback_attributes(callback: Any) -> dict[str, Any]:
    """Every plain attribute of a callback (a superset of ``state_dict()``: ModelCheckpoint
    keeps ``_last_global_step_saved`` and NeMo's ``_last_checkpoint_saved`` outside it)."""
    return {k: copy.deepcopy(v) for k, v in vars(callback).items() if _plain(v)}


def snapshot(trainer: Any) -> dict[str, Any]:
    """Where Lightning's loop stands now, as a picklable dict."""
    return {
        "fit_loop": copy.deepcopy(trainer.fit_loop.state_dict()),
        "callbacks": [callback_attributes(cb) for cb in trainer.callbacks],
        "callback_types": [type(cb).__name__ for cb in trainer.callbacks],
        "lr_schedulers": [copy.deepcopy(c.scheduler.state_dict())
                          for c in trainer.lr_scheduler_configs],
        "callback_metrics": callback_metrics(trainer),
    }


def restore(trainer: Any, snap: dict[str, Any]) -> None:
    """Put Lightning's loop where ``snap`` was taken (the start of an iteration, before
    its hooks), as a loop that is *not* restarting: Lightning's restart path would re-run
    a validation it takes for pending. Callback metrics are set by the caller, after
    Lightning's sanity check has reset them (:func:`set_callback_metrics`)."""
    types = [type(cb).__name__ for cb in trainer.callbacks]
    if types != snap["callback_types"]:
        raise RuntimeError(f"this rank's callbacks {types} differ from its peers' "
                           f"{snap['callback_types']}: every rank must build the same recipe")
    loop = trainer.fit_loop
    loop.load_state_dict(copy.deepcopy(snap["fit_loop"]))
    epoch_loop = loop.epoch_loop
    for progress in (loop.epoch_progress, epoch_loop.batch_progress):
        for tracker in (progress.current, progress.total):
            tracker.ready = tracker.completed
            for name in ("started", "processed"):
                if hasattr(tracker, name):
                    setattr(tracker, name, tracker.completed)
    for sub in (loop, epoch_loop, epoch_loop.val_loop):
        sub._restarting = False
    _stand_in_epoch_at(epoch_loop, snap["fit_loop"])
    for callback, attrs in zip(trainer.callbacks, snap["callbacks"]):
        for name, value in attrs.items():
            setattr(callback, name, copy.deepcopy(value))
    for config, state in zip(trainer.lr_scheduler_configs, snap["lr_schedulers"]):
        config.scheduler.load_state_dict(copy.deepcopy(state))


def _stand_in_epoch_at(epoch_loop: Any, state: dict[str, Any]) -> None:
    """When the epoch loop starts its run (its ``reset``, which for a loop that is not
    restarting zeroes the epoch's ``current`` counters), put every progress counter of the
    epoch loop where the snapshot had it, less the ``ready`` the coming batch adds again.
    The counters are the snapshot's own, not normalised: after Lightning resumed a job
    from a checkpoint saved in ``on_train_batch_end`` its ``ready`` runs ahead of
    ``completed`` by one more, and the validation interval is counted on ``ready``."""
    original = epoch_loop.reset

    def reset() -> None:
        original()
        del epoch_loop.reset  # once
        prefix = "epoch_loop."
        for key, value in state.items():
            if not (key.startswith(prefix) and key.endswith("progress")):
                continue
            target = epoch_loop
            for name in key[len(prefix):].split("."):
                target = getattr(target, name)
            target.load_state_dict(copy.deepcopy(value))
        batches = epoch_loop.batch_progress
        for tracker in (batches.current, batches.total):
            tracker.ready -= 1  # the batch about to be fetched makes it ready again

    epoch_loop.reset = reset


def callback_metrics(trainer: Any) -> dict[str, Any]:
    return {k: (v.detach().cpu().clone() if isinstance(v, torch.Tensor) else copy.deepcopy(v))
            for k, v in trainer.callback_metrics.items()}


def set_callback_metrics(trainer: Any, metrics: dict[str, Any], replace: bool = True) -> None:
    connector = trainer._logger_connector
    if replace:
        connector._callback_metrics = dict(metrics)
    else:
        connector._callback_metrics.update(metrics)


def apply_callback_attributes(trainer: Any, attrs: list[dict[str, Any]]) -> None:
    for callback, values in zip(trainer.callbacks, attrs):
        for name, value in values.items():
            setattr(callback, name, copy.deepcopy(value))


# ---------------------------------------------------------------------- one step
def split_closure(closure: Callable[[], Any]) -> tuple[Callable[[], Any], Callable[[], None]]:
    """``optimizer.step(closure)`` receives Lightning's precision wrapper
    ``partial(Precision._wrap_closure, model, optimizer, inner)``: the inner closure runs
    the training step (NeMo skips Lightning's backward and zero-grad), the wrapper then
    fires ``on_before_optimizer_step`` and Lightning's clipping. Returns (inner, after)."""
    func = getattr(closure, "func", None)
    args = getattr(closure, "args", ())
    if isinstance(closure, functools.partial) and getattr(func, "__name__", "") == \
            "_wrap_closure" and len(args) == 3:
        model, optimizer, inner = args
        owner = func.__self__
        return inner, functools.partial(owner._after_closure, model, optimizer)
    return closure, lambda: None


def hook_name(trainer: Any) -> Any:
    """The Lightning hook the module logs under now (``LightningModule._current_fx_name``)."""
    return getattr(trainer.lightning_module, "_current_fx_name", None)


def set_hook_name(trainer: Any, name: Any) -> None:
    """Lightning restores the hook name after a hook returns, not when it raises: a hook
    run again after a recovery would otherwise log under the failed inner hook's name."""
    trainer.lightning_module._current_fx_name = name


def closure_loss(result: Any) -> float:
    """A float from what the training step returned (NaN when nothing)."""
    value = result.get("loss") if isinstance(result, dict) else result
    if isinstance(value, torch.Tensor):
        return float(value.detach().float().cpu())
    return math.nan if value is None else float(value)


# ---------------------------------------------------------------------- validation
def wrap_validation(trainer: Any, around: Callable[[Callable[[], Any]], Any]) -> None:
    """Route the fit loop's validation runs (at ``val_check_interval`` and the sanity
    check) through ``around(run)``."""
    val_loop = trainer.fit_loop.epoch_loop.val_loop
    if getattr(val_loop, "_ncl_wrapped", False):
        return
    original = val_loop.run

    def run(*args: Any, **kwargs: Any) -> Any:
        return around(lambda: original(*args, **kwargs))

    val_loop.run = run
    val_loop._ncl_wrapped = True


def is_training(trainer: Any) -> bool:
    return bool(getattr(trainer, "training", False))


# ---------------------------------------------------------------------- logging
def logger_versions(trainer: Any) -> list[Any]:
    """Each logger's version (resolved now on rank 0, the one that writes)."""
    versions = []
    for logger in trainer.loggers:
        versions.append(logger.version if trainer.global_rank == 0 else
                        getattr(logger, "_version", None))
    return versions


def set_logger_versions(trainer: Any, versions: list[Any]) -> None:
    """Every rank writes (if it becomes rank 0) where rank 0 writes: CSV and TensorBoard
    loggers otherwise pick the next free ``version_N`` when they first log."""
    for logger, version in zip(trainer.loggers, versions):
        if version is not None and hasattr(logger, "_version"):
            logger._version = version


@contextlib.contextmanager
def recording_logs(module: Any, into: list) -> Iterator[None]:
    """Within the block, every ``module.log(name, value, **kwargs)`` is also appended to
    ``into`` as (name, detached value, kwargs)."""
    original = module.log

    def log(name: str, value: Any, *args: Any, **kwargs: Any) -> Any:
        if args:
            raise TypeError("LightningModule.log called with positional options")
        kept = value.detach().cpu().clone() if isinstance(value, torch.Tensor) else value
        into.append((name, kept, dict(kwargs)))
        return original(name, value, **kwargs)

    had = "log" in vars(module)
    module.log = log
    try:
        yield
    finally:
        if had:
            module.log = original
        else:
            del module.log  # the class's method again
