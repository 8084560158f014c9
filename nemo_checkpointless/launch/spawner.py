"""How an agent starts its ranks and warm spares: forked from the zygote, or exec'd.

:class:`Spawner` owns the zygote (``zygote.py``) and builds each child's environment
(``environment.py`` plus the per-child settings: rank, generation, store endpoints, the
channel's fd). A :class:`Child` is what the supervisor knows of one process; it takes in
the process's messages (:meth:`Child.take`).
"""

from __future__ import annotations

import logging
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from ..comm.store import format_endpoints
from ..timeouts import Timeouts
from . import protocol
from .channel import ENV_FD, Channel
from .progress import ProgressWatch
from .zygote import Zygote, ZygoteError

log = logging.getLogger("ncl.agent")


@dataclass
class Child:
    """A rank or spare process of this node."""

    proc: Any  # subprocess.Popen, or zygote.ForkedProcess (the same calls)
    channel: Channel
    watch: ProgressWatch
    rank: Optional[int] = None
    local_rank: Optional[int] = None
    recovery: bool = True
    hello: bool = False  # the rank reported its recovery mode: start-up went through
    progress: bool = False  # it reports its steps (Hello): ``steps`` means something
    steps: int = 0  # steps it completed (Step messages) since it took its rank
    done: bool = False  # training finished: teardown may block, no hang checks
    finished: bool = False
    hung_up: bool = False  # its channel closed: it is exiting, watch for the exit code
    fatal: Optional[str] = None  # the reason a rank gave for stopping the job
    fatal_at: float = 0.0
    device_error: Optional[str] = None  # the reason a rank gave for leaving its GPU
    stopped: bool = False  # it stopped, checkpointed, because the job was asked to
    started: float = field(default_factory=time.monotonic)

    def take(self, messages: list[protocol.Message], now: float) -> None:
        """What the rank said: its state and its progress watch follow."""
        last = self.watch.last_heartbeat
        if self.rank is not None and last is not None and now - last > self.watch.minimum:
            # parsed by tests/e2e/test_hangs.py
            log.info("rank %d: heartbeat back after %.1fs of silence (a C call held the GIL, "
                     "or the process was stopped); hangs are judged by progress", self.rank,
                     now - last)
        self.watch.heartbeat(now)  # any message shows the process alive
        for msg in messages:
            if isinstance(msg, protocol.Hello):
                self.hello, self.recovery = True, msg.recovery
                self.progress = msg.reports_progress
                self.watch.hello(msg.reports_progress, now)
            elif isinstance(msg, protocol.Step):
                self.steps += 1
                self.watch.step(msg.step, now)
            elif isinstance(msg, protocol.Pause):
                self.watch.expect_first(now)
            elif isinstance(msg, protocol.Unwound):
                self.watch.unwound(now)
            elif isinstance(msg, protocol.Done):
                self.done = True
                self.watch.stop()
            elif isinstance(msg, protocol.Fatal):
                self.fatal, self.fatal_at = msg.reason, now
                log.error("rank %s reports that the job cannot recover: %s", self.rank,
                          msg.reason)
            elif isinstance(msg, protocol.Stopped):
                self.stopped = True
                self.watch.stop()
                log.info("rank %s stopped after step %d as asked", self.rank, msg.step)
            elif isinstance(msg, protocol.DeviceError):
                self.device_error = msg.reason
                log.error("rank %s reports a device error: %s", self.rank, msg.reason)


@dataclass
class ChildSpec:
    """Where the new child stands in the job (what differs between children)."""

    rank: Optional[int]
    local_rank: Optional[int]
    replacement: bool
    gen: int
    node_rank: Optional[int]
    world_size: int
    nproc: int
    endpoints: list


class Spawner:
    """Starts children with ``script`` and ``script_args``; forks them from a zygote
    while it is usable (``fork``), else execs a new interpreter for each."""

    def __init__(self, script: str, script_args: list[str], base_env: dict[str, str],
                 fork: bool, timeouts: Timeouts, gpu: bool,
                 on_spawn: Callable[[Child], None]) -> None:
        self.script, self.script_args = script, list(script_args)
        self.base_env = base_env
        self.fork = fork  # False once the zygote failed: exec from then on
        self.timeouts, self.gpu = timeouts, gpu
        self.on_spawn = on_spawn
        self.zygote: Optional[Zygote] = None
        self.zygote_checked = False

    def env(self, spec: ChildSpec, child_fd: int) -> dict[str, str]:
        env = dict(self.base_env)
        master_host, master_port = spec.endpoints[0]
        node = spec.node_rank if spec.node_rank is not None else -1
        env.update(
            WORLD_SIZE=str(spec.world_size),
            LOCAL_WORLD_SIZE=str(spec.nproc),
            GROUP_RANK=str(node),
            NODE_RANK=str(node),
            MASTER_ADDR=master_host,
            MASTER_PORT=str(master_port),
            NCL_STORE_ENDPOINTS=format_endpoints(spec.endpoints),
            NCL_GENERATION=str(spec.gen),
            NCL_REPLACEMENT="1" if spec.replacement else "0",
        )
        env[ENV_FD] = str(child_fd)
        if spec.rank is None:
            env["NCL_SPARE"] = "1"
            for key in ("RANK", "LOCAL_RANK"):
                env.pop(key, None)
        else:
            env.pop("NCL_SPARE", None)
            env.update(RANK=str(spec.rank), LOCAL_RANK=str(spec.local_rank))
        return env

    def spawn(self, spec: ChildSpec) -> Child:
        channel, child_sock = Channel.pair()
        env = self.env(spec, child_sock.fileno())
        proc, how = None, "exec"
        zygote = self._ready_zygote()
        if zygote is not None:
            try:  # the child gets its own copy of the socket; NCL_AGENT_FD names that fd
                proc, how = zygote.spawn([self.script, *self.script_args], env,
                                         child_sock), "fork"
            except ZygoteError as err:
                # keep the zygote: the children it forked before live as long as it does
                log.warning("cannot fork from the zygote (%s): starting processes with exec "
                            "from now on", err)
                self.fork = False
        if proc is None:
            cmd = [sys.executable, "-u", self.script, *self.script_args]
            proc = subprocess.Popen(cmd, env=env, pass_fds=(child_sock.fileno(),))
        child_sock.close()
        now = time.monotonic()
        t = self.timeouts
        watch = ProgressWatch(initial=t.hang_initial(self.gpu), minimum=t.hang_min(self.gpu),
                              factor=t.hang_factor, unwind=t.unwind_s, now=now)
        child = Child(proc=proc, channel=channel, watch=watch, rank=spec.rank,
                      local_rank=spec.local_rank)
        self.on_spawn(child)
        # "started rank R (pid P)" is parsed by scripts/bench/goodput.py: keep it first
        log.info("started %s (pid %d)%s",
                 f"rank {spec.rank}" if spec.rank is not None else "a warm spare",
                 proc.pid, " forked from the zygote" if how == "fork" else "")
        return child

    # ------------------------------------------------------------------ zygote
    def start_zygote(self) -> None:
        """Start the template process early: its imports overlap the agent's start-up."""
        if not self.fork:
            return
        try:
            self.zygote = Zygote(self.script, self.base_env)
        except (OSError, ZygoteError) as err:
            log.warning("cannot start the zygote (%s): starting processes with exec", err)
            self.fork = False

    def _ready_zygote(self) -> Optional[Zygote]:
        """The zygote to fork from, once it has imported its modules; None: use exec."""
        if not self.fork or self.zygote is None:
            return None
        if not self.zygote_checked:
            self.zygote_checked = True
            try:
                info = self.zygote.ready()
            except ZygoteError as err:  # nothing was forked from it yet: stop it
                log.warning("%s: starting processes with exec", err)
                self.fork = False
                self.stop_zygote()
                return None
            log.info("zygote (pid %d) ready: %d modules imported in %.1fs; ranks and spares "
                     "are forked from it", info["pid"], info["modules"], info["seconds"])
            for failure in info["failed"]:
                log.debug("zygote: not preloaded: %s", failure)
        return self.zygote

    def stop_zygote(self) -> None:
        if self.zygote is not None:
            zygote, self.zygote = self.zygote, None
            zygote.close()


def kill_all(children: list[Child]) -> None:
    for child in children:
        if child.proc.poll() is None:
            child.proc.kill()


def environment_summary(env: dict[str, str], keys: tuple[str, ...]) -> str:
    return ", ".join(f"{k}={env[k]}" for k in keys if k in env) or "none"

