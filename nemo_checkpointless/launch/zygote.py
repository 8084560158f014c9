"""A warm template process (a "zygote") that the node agent forks ranks and spares from.

Every process ``ncl-launch`` starts runs the same script (``recipes/pretrain.py``), whose
imports (torch, megatron-core, hydra) cost about 3 CPU-seconds each time. The agent
starts one zygote at its own start: an interpreter that imports those modules once, then
only forks on request. A forked child takes the environment, ``sys.argv``, ``sys.path[0]``
and working directory that ``python -u script args`` would have had, and runs the script
as ``__main__``; it exits through the interpreter as that process would (``sys.exit``
codes, tracebacks, ``atexit``, ``os._exit``). A new rank or spare costs a fork plus the
script's own set-up, not the imports.

Protocol: a ``SOCK_SEQPACKET`` socket pair, one JSON object per message.

* agent -> zygote: ``{"argv": [script, *args], "set": {...}, "unset": [...], "cwd": dir}``
  (``cwd`` null: the zygote's, which is the agent's)
  with the child's end of its agent channel attached (``SCM_RIGHTS``); the child finds it
  under ``NCL_AGENT_FD`` (its own fd number there). ``set``/``unset``: how the child's
  environment differs from the one the zygote started with; they are applied to the
  zygote's environment as its imports left it (as the same imports would have in a new
  process: torch sets ``TORCHINDUCTOR_CACHE_DIR``, for one).
* zygote -> agent: ``{"t": "ready", ...}`` once the modules are imported;
  ``{"t": "started", "pid": P}`` or ``{"t": "error", ...}`` per request;
  ``{"t": "exit", "pid": P, "code": C}`` when a child ends (``C < 0``: killed by signal
  ``-C``, as ``subprocess.Popen.returncode``).

Fork safety: the zygote must be single-threaded and must not have touched CUDA when it
forks. It reports its thread count and whether the CUDA driver library is loaded; the
agent refuses such a zygote (and starts its processes with exec instead).

Lifetime: the zygote and its children stay in the agent's process group, so a whole-node
``killpg`` ends them all. The zygote dies with the agent (``PR_SET_PDEATHSIG``, and it exits
when the agent's end of the socket closes); every child dies with the zygote: no rank or
spare outlives its agent. The zygote is a child subreaper: what a dead child leaves
behind (its own helper processes) is adopted and ended when the child's exit is reaped
(``orphans.py``).
"""

from __future__ import annotations

import array
import ctypes
import json
import os
import select
import selectors
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Any, Optional

from .channel import ENV_FD

# what recipes/pretrain.py imports, under the agent, before it says hello (and then trains)
PRELOAD = (
    "torch", "torch.distributed", "numpy",
    "hydra", "hydra.main", "hydra.core.hydra_config", "hydra._internal.utils",
    "hydra._internal.hydra", "hydra._internal.config_loader_impl",
    "hydra._internal.core_plugins.basic_launcher", "hydra._internal.core_plugins.basic_sweeper",
    "hydra._internal.core_plugins.file_config_source",
    "hydra._internal.core_plugins.importlib_resources_config_source",
    "hydra._internal.core_plugins.structured_config_source",
    "hydra._internal.core_plugins.bash_completion",
    "hydra._internal.core_plugins.fish_completion",
    "hydra._internal.core_plugins.zsh_completion", "omegaconf", "omegaconf._impl",
    "antlr4.LL1Analyzer",
    "megatron.core", "megatron.core.models.gpt", "megatron.core.optimizer",
    "megatron.core.datasets.gpt_dataset",
    "nemo_checkpointless.config", "nemo_checkpointless.cpu", "nemo_checkpointless.comm",
    "nemo_checkpointless.runtime", "nemo_checkpointless.train.loop",
    "nemo_checkpointless.train.data", "nemo_checkpointless.recovery.generation",
    "nemo_checkpointless.megatron.model", "nemo_checkpointless.data.dataset",
)
ENV_PRELOAD = "NCL_ZYGOTE_PRELOAD"  # comma-separated module names instead of PRELOAD
_MAX_MESSAGE = 4 << 20  # a spawn request (its environment)
_MAX_REPLY = 64 << 10  # anything the zygote sends


class ZygoteError(RuntimeError):
    """The zygote could not start, is unsafe to fork from, or is gone."""


# ----------------------------------------------------------------------------- agent side
class Zygote:
    """The agent's handle on its zygote: start it, fork children from it, learn their exits."""

    def __init__(self, script: str, env: dict[str, str],
                 preload: Optional[list[str]] = None) -> None:
        if preload is None:
            names = env.get(ENV_PRELOAD)
            preload = names.split(",") if names is not None else list(PRELOAD)
        self.sock, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        cmd = [sys.executable, "-u", "-c",
               "from nemo_checkpointless.launch.zygote import serve; serve()",
               script, str(theirs.fileno()), str(os.getpid()),
               ",".join(p for p in preload if p)]
        self.env = {k: v for k, v in env.items() if k != ENV_FD}
        try:
            self.proc = subprocess.Popen(cmd, env=self.env, pass_fds=(theirs.fileno(),))
        finally:
            theirs.close()
        self.started = time.monotonic()
        self.info: Optional[dict[str, Any]] = None
        self._lock = threading.Lock()
        self._codes: dict[int, int] = {}
        self._children: set[int] = set()
        self._reply: Optional[dict[str, Any]] = None
        self._gone = False

    @property
    def pid(self) -> int:
        return self.proc.pid

    def ready(self, timeout: float = 600.0) -> dict[str, Any]:
        """Wait until the zygote has imported its modules; ZygoteError if it cannot be used."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while self.info is None:
                if self._gone:
                    raise ZygoteError(f"the zygote exited during its imports "
                                      f"(exit code {self.proc.poll()})")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise ZygoteError(f"the zygote was not ready after {timeout:.0f}s")
                self._read(min(left, 1.0))
        info = self.info
        if info["threads"] != 1:
            raise ZygoteError(f"the zygote runs {info['threads']} threads after its imports: "
                              "forking it is unsafe")
        if info["cuda"]:
            raise ZygoteError("the CUDA driver was loaded in the zygote during its imports: "
                              "its children could not use CUDA")
        return info

    def spawn(self, argv: list[str], env: dict[str, str], channel_sock: socket.socket,
              cwd: Optional[str] = None, timeout: float = 60.0) -> "ForkedProcess":
        """Fork a child running ``argv`` (script first) with ``env``; the child gets its own
        copy of ``channel_sock`` (the caller closes its copy, as after Popen)."""
        request = json.dumps({
            "argv": list(argv), "cwd": cwd,
            "set": {k: v for k, v in env.items() if self.env.get(k) != v},
            "unset": [k for k in self.env if k not in env]}).encode()
        if len(request) > _MAX_MESSAGE:
            raise ZygoteError(f"spawn request too large ({len(request)} bytes)")
        fds = array.array("i", [channel_sock.fileno()])
        deadline = time.monotonic() + timeout
        with self._lock:
            if self._gone:
                raise ZygoteError("the zygote is gone")
            self._reply = None
            try:
                self.sock.sendmsg([request], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)])
            except OSError as err:
                raise ZygoteError(f"cannot reach the zygote: {err}") from err
            while self._reply is None:
                if self._gone:
                    raise ZygoteError("the zygote is gone")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise ZygoteError(f"no answer from the zygote within {timeout:.0f}s")
                self._read(min(left, 1.0))
            reply, self._reply = self._reply, None
            if reply.get("t") != "started":
                raise ZygoteError(f"the zygote could not fork: {reply.get('error')}")
            pid = int(reply["pid"])
            self._children.add(pid)
        return ForkedProcess(self, pid, list(argv))

    def exit_code(self, pid: int, timeout: float = 0.0) -> Optional[int]:
        """The child's exit code (negative: the signal), or None while it runs."""
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                self._read(max(0.0, deadline - time.monotonic()))
                code = self._codes.get(pid)
                gone = self._gone
            left = deadline - time.monotonic()
            if code is not None or left <= 0:
                return code
            if gone:  # waiting for an orphan to be killed with the zygote
                time.sleep(min(0.05, left))

    def close(self, timeout: float = 5.0) -> None:
        """Stop the zygote (its remaining children die with it)."""
        with self._lock:
            try:
                self.sock.close()
            except OSError:
                pass
            self._gone = True
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    # ------------------------------------------------------------------ internals
    def _read(self, timeout: float) -> None:
        """Take every message that arrives within ``timeout`` (lock held)."""
        if self._gone:
            self._reap_orphans()
            return
        if timeout > 0 and not select.select([self.sock], [], [], timeout)[0]:
            return
        while True:
            try:
                data = self.sock.recv(_MAX_REPLY, socket.MSG_DONTWAIT)
            except BlockingIOError:
                return
            except OSError:
                data = b""
            if not data:
                self._gone = True
                self._reap_orphans()
                return
            self._handle(json.loads(data))

    def _handle(self, msg: dict[str, Any]) -> None:
        kind = msg.get("t")
        if kind == "exit":
            self._codes[int(msg["pid"])] = int(msg["code"])
        elif kind == "ready":
            self.info = msg
        else:
            self._reply = msg

    def _reap_orphans(self) -> None:
        """The zygote is gone: its children were killed with it (PR_SET_PDEATHSIG)."""
        for pid in self._children:
            if pid not in self._codes and _gone(pid):
                self._codes[pid] = -signal.SIGKILL


class ForkedProcess:
    """A child forked by the zygote, with the part of ``subprocess.Popen`` the agent uses."""

    def __init__(self, zygote: Zygote, pid: int, args: list[str]) -> None:
        self.zygote = zygote
        self.pid = pid
        self.args = args
        self.returncode: Optional[int] = None

    def poll(self) -> Optional[int]:
        if self.returncode is None:
            self.returncode = self.zygote.exit_code(self.pid)
        return self.returncode

    def wait(self, timeout: Optional[float] = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.returncode is None:
            step = 0.2 if deadline is None else min(0.2, deadline - time.monotonic())
            if step <= 0:
                raise subprocess.TimeoutExpired(self.args, timeout)
            self.returncode = self.zygote.exit_code(self.pid, timeout=step)
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            try:
                os.kill(self.pid, sig)
            except ProcessLookupError:
                pass

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)


def _gone(pid: int) -> bool:
    """No such process, or a zombie nobody reaped (an orphan in a container without init)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except (OSError, IndexError):
        return True


# ---------------------------------------------------------------------------- zygote side
def _die_with_parent() -> None:
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _thread_count() -> int:
    try:
        return len(os.listdir("/proc/self/task"))
    except OSError:
        return threading.active_count()


def _cuda_loaded() -> bool:
    try:
        with open("/proc/self/maps") as f:
            return any("libcuda.so" in line for line in f)
    except OSError:
        return False


def _send(sock: socket.socket, msg: dict[str, Any]) -> None:
    sock.send(json.dumps(msg).encode())


def serve() -> None:
    """The zygote's main: ``python -c '...serve()' SCRIPT FD AGENT_PID MODULES``.

    Imports the modules, then forks on request. Returns only in a forked child, after which
    the child runs the script in place of ``python -u SCRIPT ARGS``.
    """
    script, fd, agent_pid, modules = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    _die_with_parent()
    if os.getppid() != agent_pid:  # the agent died before the line above
        os._exit(1)
    from .orphans import adopt_orphans

    adopt_orphans()  # what a dead rank leaves behind becomes ours to end (orphans.py)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a ^C is the agent's to handle
    sys.path[0] = os.path.dirname(os.path.realpath(script))  # as `python SCRIPT` has it
    sock = socket.socket(fileno=fd)
    started = time.monotonic()
    failed = _preload([m for m in modules.split(",") if m])
    from ..heap import freeze

    freeze("zygote", collect=True)  # children's passes skip what they inherit
    _send(sock, {"t": "ready", "pid": os.getpid(), "threads": _thread_count(),
                 "cuda": _cuda_loaded(), "failed": failed[:20], "modules": len(sys.modules),
                 "seconds": round(time.monotonic() - started, 3)})
    request, child_fd = _serve(sock)
    _run_child(request, child_fd)


def _preload(modules: list[str]) -> list[str]:
    import importlib
    import warnings

    failed = []
    with warnings.catch_warnings():  # import-time warnings: each rank shows its own
        warnings.simplefilter("ignore")
        for name in modules:
            try:
                importlib.import_module(name)
            except Exception as err:  # a module this installation lacks: not preloaded
                failed.append(f"{name}: {type(err).__name__}: {err}"[:300])
    return failed


def _serve(sock: socket.socket) -> tuple[dict[str, Any], int]:
    """Fork on every request; report children's exits. Returns in a child only."""
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_r, False)
    os.set_blocking(wake_w, False)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    signal.set_wakeup_fd(wake_w)
    selector = selectors.DefaultSelector()
    selector.register(sock, selectors.EVENT_READ)
    selector.register(wake_r, selectors.EVENT_READ)
    me = os.getpid()
    forked: set[int] = set()
    try:
        while True:
            for key, _ in selector.select():
                if key.fileobj == wake_r:
                    try:
                        os.read(wake_r, 4096)
                    except BlockingIOError:
                        pass
                    _reap(sock, forked)
                    continue
                try:
                    data, ancdata, msg_flags, _ = sock.recvmsg(
                        _MAX_MESSAGE, socket.CMSG_SPACE(array.array("i").itemsize * 4))
                except OSError:
                    data, ancdata, msg_flags = b"", [], 0
                fds = array.array("i")
                for level, kind, payload in ancdata:
                    if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                        fds.frombytes(payload[:len(payload) - len(payload) % fds.itemsize])
                if not data:  # the agent is gone (or closed us): so are we
                    os._exit(0)
                if msg_flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC) or len(fds) != 1:
                    for extra in fds:
                        os.close(extra)
                    _send(sock, {"t": "error", "error": "malformed request"})
                    continue
                request = json.loads(data)
                try:
                    pid = os.fork()
                except OSError as err:
                    os.close(fds[0])
                    _send(sock, {"t": "error", "error": f"fork: {err}"})
                    continue
                if pid == 0:
                    _die_with_parent()
                    if os.getppid() != me:  # the zygote died before the line above
                        os._exit(1)
                    signal.set_wakeup_fd(-1)
                    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
                    signal.signal(signal.SIGINT, signal.default_int_handler)
                    selector.close()
                    sock.close()
                    os.close(wake_r)
                    os.close(wake_w)
                    return request, fds[0]
                os.close(fds[0])
                forked.add(pid)
                _send(sock, {"t": "started", "pid": pid})
    except OSError:
        if os.getpid() != me:  # a child failed to set up: report it as an error (exit 1)
            raise
        os._exit(0)  # the agent is gone


def _reap(sock: socket.socket, forked: set[int]) -> None:
    """Report the exits of the children forked on request; after one, end the orphans it
    left behind (adopted by the zygote, a child subreaper; their own exits are not
    reported)."""
    from .orphans import end_orphans

    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        if pid not in forked:  # an adopted orphan, ended below
            continue
        forked.discard(pid)
        _send(sock, {"t": "exit", "pid": pid, "code": os.waitstatus_to_exitcode(status)})
        ended = end_orphans(forked)
        if ended:
            print(f"ncl-zygote: ended {len(ended)} process(es) that process {pid} left behind:"
                  f" {ended}", file=sys.stderr, flush=True)


def _run_child(request: dict[str, Any], fd: int) -> None:
    """Become ``python -u SCRIPT ARGS`` with the requested environment and directory."""
    import runpy

    argv = request["argv"]
    if request["cwd"] is not None:  # else the zygote's: the agent's, as Popen leaves it
        os.chdir(request["cwd"])
    for key in request["unset"]:
        os.environ.pop(key, None)
    os.environ.update(request["set"])
    os.environ[ENV_FD] = str(fd)
    os.set_inheritable(fd, True)  # as pass_fds leaves it
    sys.argv = list(argv)
    sys.path[0] = os.path.dirname(os.path.realpath(argv[0]))
    np = sys.modules.get("numpy")
    if np is not None:  # a fresh process seeds numpy's global generator from the OS
        np.random.seed()
    try:
        runpy.run_path(argv[0], run_name="__main__")
    except (SystemExit, KeyboardInterrupt):
        raise
    except BaseException as err:  # as the interpreter reports it: from the script's frame on
        tb = err.__traceback__
        while tb is not None and tb.tb_frame.f_code.co_filename != argv[0]:
            tb = tb.tb_next
        err = err.with_traceback(tb or err.__traceback__)  # what the default hook prints
        sys.excepthook(type(err), err, err.__traceback__)
        raise SystemExit(1) from None
