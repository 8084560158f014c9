"""Warm spares: a process that has imported everything and waits for a rank to take over.

While it waits, a spare may build the model chunks and DDP a replacement will need (only
where every rank has the same model, i.e. no TP/PP/CP split) in a fake world of the job's
size, with zero-filled weights (peers overwrite them); when the agent assigns it a rank,
the prebuilt chunks are rebound to the real groups. ``checkpointless.spare_prebuild=false``
turns the prebuild off; any failure in it only costs the head start.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any, Callable, Optional

import torch

from ..heap import freeze

log = logging.getLogger(__name__)


class WarmSpare:
    """One spare's head start and its hand-over to a real rank."""

    def __init__(self, world_size: int, build: Optional[Callable[[], Optional[list]]]) -> None:
        """``build()``: the front-end's spare model, called inside the fake world (or None:
        the front-end builds nothing ahead)."""
        self.world_size = world_size
        self._model: Optional[tuple[list[torch.nn.Module], dict[int, str]]] = None
        if build is not None:
            self._model = self._prebuild(build)

    def _prebuild(self, build: Callable[[], Optional[list]]
                  ) -> Optional[tuple[list[torch.nn.Module], dict[int, str]]]:
        from ..comm.abort import forget_all_groups
        from ..comm.world import fake_world
        from ..megatron.rebind import group_roles

        t0 = time.perf_counter()
        try:
            fake_world(self.world_size - 1, self.world_size)
            model = build()
            if model is None:
                return None
            roles = group_roles()
        except Exception as err:  # noqa: BLE001 - the spare builds after assignment instead
            log.warning("warm spare could not prebuild its model (%s): it will build it when "
                        "it takes a rank", err)
            return None
        finally:
            forget_all_groups()
        log.info("warm spare: model and DDP built ahead in %.3fs", time.perf_counter() - t0)
        freeze("warm spare", collect=True)  # while idle: its set-up then walks no more
        return model, roles

    @staticmethod
    def wait_for_assignment(link: Any) -> dict[str, Any]:
        """Block until the agent hands this process a rank; set the rank's environment."""
        msg = link.wait_assignment()
        os.environ.update(RANK=str(msg["rank"]), LOCAL_RANK=str(msg["local_rank"]))
        if msg.get("node_rank") is not None:  # a standby node's process takes a lost node's rank
            os.environ.update(NODE_RANK=str(msg["node_rank"]), GROUP_RANK=str(msg["node_rank"]))
        os.environ.pop("NCL_SPARE", None)
        return msg

    def take_model(self) -> Optional[list[torch.nn.Module]]:
        """The prebuilt chunks, rebound to this world's groups (None: build them now)."""
        from ..megatron.rebind import rebind, refresh_cached_ranks

        if self._model is None:
            return None
        model, roles = self._model
        self._model = None
        try:
            rebind([model], roles)
            refresh_cached_ranks(model)
        except RuntimeError as err:
            log.warning("prebuilt model not usable (%s): building it now", err)
            return None
        return model
