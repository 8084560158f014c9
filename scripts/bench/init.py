"""Time to a ready world plus all megatron groups: Tier 1 start-up vs stock, side by side.

    .venv/bin/python scripts/bench/init.py                # 8, 16, 32 CPU ranks, 3 repeats
    .venv/bin/python scripts/bench/init.py --ranks 8 16 --repeats 5
    .venv/bin/python scripts/bench/init.py --ranks 8 --repeats 1           # quick

Each trial forks N fresh rank processes from one parent that has already imported torch
and megatron (so import time is excluded, identically for both). Every rank waits for a
common start instant T0; its time is T0 -> ``initialize_model_parallel`` returned; a
trial's time is the slowest rank's. Layout TP=2, PP=2, the rest DP, gloo.

* stock: ``init_process_group(init_method="env://")`` (TCPStore served by rank 0) +
  ``initialize_model_parallel``, megatron and torch unchanged.
* ours: one store server per 8 ranks (an "agent" per node, started before T0 as agents
  are) + ``nemo_checkpointless.comm.init()`` + ``initialize_model_parallel``.
* ours_selfhost (extra field): no agents; ranks 0..k-1 serve the k shards themselves
  (``NCL_STORE_SELF_HOST=1``), as under plain torchrun.
* stock_agent_store (extra field): stock, but the TCPStore is served by a process started
  before the ranks (torchrun's agent store) instead of by rank 0.

Stock and ours alternate within each repeat (ABBA) so both see the same machine load;
medians are reported. Stock's time at many ranks depends on this machine's name
resolver (its TCPStore server resolves the address of every connection it accepts): the
script times the lookups before and after the trials and prints them beside the figures
(``dns``). Last line: a JSON object with ``ranks``, ``ours_s``, ``stock_s``,
``max_server_ops_share`` (lists in rank order) and the details.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import signal
import statistics
import sys
import time
import traceback

import torch  # noqa: F401  (imported once here, inherited by every forked rank)
import torch.distributed as dist
from megatron.core import parallel_state as ps

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
from nemo_checkpointless.comm.init import host_shard, init  # noqa: E402
from nemo_checkpointless.comm.store import JobIdentity, connect  # noqa: E402
from nemo_checkpointless.comm.world import free_port  # noqa: E402

RANKS_PER_AGENT = 8
TIMEOUT = datetime.timedelta(seconds=120)


def _rank(mode: str, rank: int, world: int, env: dict, t0: float, tp: int, pp: int,
          out_fd: int) -> None:
    os.environ.update(env, RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE=str(world))
    while time.time() < t0:
        time.sleep(0.0005)
    counter = None
    if mode == "stock":
        dist.init_process_group("gloo", init_method="env://", rank=rank, world_size=world,
                                timeout=TIMEOUT)
    elif mode == "stock_agent":  # torchrun's arrangement: the store was up before the ranks
        tcp = dist.TCPStore(env["MASTER_ADDR"], int(env["MASTER_PORT"]), world,
                            is_master=False, timeout=TIMEOUT)
        dist.init_process_group("gloo", store=tcp, rank=rank, world_size=world, timeout=TIMEOUT)
    elif mode == "stock_count":  # untimed: count stock's store operations
        tcp = dist.TCPStore(env["MASTER_ADDR"], int(env["MASTER_PORT"]), world,
                            is_master=rank == 0, timeout=TIMEOUT)
        counter = _CountingStore(tcp)
        dist.init_process_group("gloo", store=counter, rank=rank, world_size=world,
                                timeout=TIMEOUT)
    else:
        init("gloo", TIMEOUT)
    t_world = time.time()
    ps.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    t_done = time.time()
    ops = counter.ops if counter is not None else 0
    os.write(out_fd, f"{rank} {t_world - t0:.4f} {t_done - t0:.4f} {ops}\n".encode())
    dist.barrier()  # nobody exits while a peer may still be connecting to it


def _tcpstore_server(port: int, world: int) -> int:
    """A stock TCPStore served by a process of its own, started before the ranks."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(r)
            store = dist.TCPStore("127.0.0.1", port, world, is_master=True,
                                  wait_for_workers=False, timeout=TIMEOUT)
            os.write(w, b"ok")
            while store is not None:
                time.sleep(3600)
        finally:
            os._exit(0)
    os.close(w)
    os.read(r, 2)
    os.close(r)
    return pid


class _CountingStore(dist.Store):
    """Stock's TCPStore, counting the operations this rank sends it (untimed trials only)."""

    def __init__(self, inner: dist.Store) -> None:
        super().__init__()
        self.inner, self.ops = inner, 0

    def _count(self, name, *args):
        self.ops += 1
        return getattr(self.inner, name)(*args)

    def set(self, key, value):
        return self._count("set", key, value)

    def get(self, key):
        return self._count("get", key)

    def add(self, key, value):
        return self._count("add", key, value)

    def compare_set(self, key, expected, desired):
        return self._count("compare_set", key, expected, desired)

    def wait(self, keys, timeout=None):
        return self._count("wait", keys) if timeout is None else self._count("wait", keys, timeout)

    def check(self, keys):
        return self._count("check", keys)

    def delete_key(self, key):
        return self._count("delete_key", key)

    def num_keys(self):
        return self._count("num_keys")


def _trial(mode: str, world: int, tp: int, pp: int, limit: float) -> dict:
    port = free_port()
    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1",
           "NCL_STORE_SHARDS": str(max(1, world // RANKS_PER_AGENT))}
    servers: list[int] = []
    identity = JobIdentity.generate("bench")
    if mode == "ours":
        agents = max(1, world // RANKS_PER_AGENT)
        eps = [("127.0.0.1", free_port()) for _ in range(agents)]
        servers = [host_shard(ep, identity) for ep in eps]
        env.update(identity.env(), NCL_STORE_ENDPOINTS=",".join(f"{h}:{p}" for h, p in eps))
    elif mode == "ours_selfhost":  # ranks 0..k-1 serve the shards (free ports, not +1..+k)
        k = max(1, world // RANKS_PER_AGENT)
        env.update(identity.env(), NCL_STORE_SELF_HOST="1", NCL_STORE_ENDPOINTS=",".join(
            f"127.0.0.1:{free_port()}" for _ in range(k)))
    elif mode == "stock_agent":
        servers = [_tcpstore_server(port, world)]
    r, w = os.pipe()
    t0 = time.time() + 0.2 + 0.01 * world
    pids = []
    for rank in range(world):
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                os.close(r)
                _rank(mode, rank, world, env, t0, tp, pp, w)
            except BaseException:
                traceback.print_exc()
                code = 1
            finally:
                os._exit(code)
        pids.append(pid)
    os.close(w)
    deadline = time.time() + limit
    codes = []
    for pid in pids:
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                codes.append(status)
                break
            if time.time() > deadline:
                for p in pids:
                    try:
                        os.kill(p, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
            time.sleep(0.01)
    rows = [line.split() for line in os.read(r, 1 << 20).decode().splitlines()]
    os.close(r)
    result = {"ok": not any(codes) and len(rows) == world}
    if result["ok"]:
        result["s"] = max(float(x[2]) for x in rows)
        result["world_s"] = max(float(x[1]) for x in rows)
        result["client_ops"] = sum(int(x[3]) for x in rows)
    if mode == "ours" and servers:
        client = connect(parse_eps(env["NCL_STORE_ENDPOINTS"]), identity)
        counts = [c.get("total", 0) for c in client.server_op_counts().values()]
        result["server_ops"] = counts
        client.close()
    for pid in servers:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    return result


def _timed(fn) -> tuple[float, str]:
    t0 = time.perf_counter()
    try:
        out = str(fn())
    except OSError as err:  # a failed lookup takes its time too
        out = f"{type(err).__name__}: {err}"
    return time.perf_counter() - t0, out


def dns_probe(burst: int) -> dict:
    """What name lookups cost on this machine, now: one ``getaddrinfo`` and one
    ``gethostbyaddr`` of its hostname, one reverse lookup of the v4-mapped loopback
    address (``getnameinfo``; what stock's TCPStore server makes for each connection it
    accepts, inside its single accept loop: docs/tier1.md), and the slowest of ``burst``
    such reverse lookups at once (a resolver that drops a query of a burst costs glibc's
    5 s timeout)."""
    import socket
    from concurrent.futures import ThreadPoolExecutor

    host = socket.gethostname()
    forward, addrs = _timed(lambda: socket.getaddrinfo(host, None))
    address = socket.gethostbyname(host) if not addrs.startswith(("gaierror", "OSError")) \
        else "127.0.0.1"
    reverse_host, _ = _timed(lambda: socket.gethostbyaddr(address))
    mapped = ("::ffff:127.0.0.1", 0, 0, 0)
    reverse_mapped, _ = _timed(lambda: socket.getnameinfo(mapped, 0))
    with ThreadPoolExecutor(burst) as pool:
        times = list(pool.map(lambda _: _timed(lambda: socket.getnameinfo(mapped, 0))[0],
                              range(burst)))
    return {"hostname": host, "getaddrinfo_s": round(forward, 4),
            "gethostbyaddr_s": round(reverse_host, 4),
            "getnameinfo_v4mapped_loopback_s": round(reverse_mapped, 4),
            "burst": burst, "burst_max_s": round(max(times), 4)}


def dns_text(probe: dict) -> str:
    return (f"{probe['hostname']}: getaddrinfo {1e3 * probe['getaddrinfo_s']:.1f} ms, "
            f"gethostbyaddr {1e3 * probe['gethostbyaddr_s']:.1f} ms, reverse lookup of "
            f"::ffff:127.0.0.1 {1e3 * probe['getnameinfo_v4mapped_loopback_s']:.1f} ms, "
            f"slowest of {probe['burst']} at once {1e3 * probe['burst_max_s']:.1f} ms")


def parse_eps(text: str):
    from nemo_checkpointless.comm.store import parse_endpoints

    return parse_endpoints(text)


def main() -> None:
    ap = argparse.ArgumentParser(
        description="\n\n".join(__doc__.split("\n\n")[:2]),  # title and usage
        formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ranks", type=int, nargs="+", default=[8, 16, 32])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--tp", type=int, default=2)
    ap.add_argument("--pp", type=int, default=2)
    ap.add_argument("--no-selfhost", action="store_true", help="skip the self-hosted variant")
    ap.add_argument("--no-stock-agent", action="store_true",
                    help="skip stock with a pre-started store (torchrun's agent store)")
    ap.add_argument("--limit", type=float, default=180.0, help="seconds before a trial is killed")
    args = ap.parse_args()
    modes = ["stock", "ours"] + ([] if args.no_selfhost else ["ours_selfhost"]) + (
        [] if args.no_stock_agent else ["stock_agent"])
    lists = ["ours_s", "stock_s", "max_server_ops_share", "ours_selfhost_s",
             "stock_agent_store_s", "stock_agent_store_world_s", "agents", "ours_world_s",
             "stock_world_s", "ours_groups_s", "stock_groups_s", "ours_max_server_ops",
             "ours_total_ops", "stock_total_ops"]
    out: dict = {"ranks": args.ranks, **{k: [] for k in lists}, "runs": {},
                 "repeats": args.repeats, "layout": f"TP={args.tp} PP={args.pp} rest DP, gloo",
                 "cpus": os.cpu_count()}
    out["dns"] = [dns_probe(max(args.ranks))]
    for world in args.ranks:
        runs: dict[str, list[dict]] = {m: [] for m in modes}
        for rep in range(args.repeats):
            order = modes if rep % 2 == 0 else modes[::-1]
            for mode in order:
                res = _trial(mode, world, args.tp, args.pp, args.limit)
                runs[mode].append(res)
                print(f"ranks={world} rep={rep} {mode}: {res}", file=sys.stderr, flush=True)

        def med(mode: str, key: str = "s"):
            vals = [r[key] for r in runs[mode] if r.get("ok")]
            return round(statistics.median(vals), 3) if vals else None

        out["stock_s"].append(med("stock"))
        out["ours_s"].append(med("ours"))
        out["stock_world_s"].append(med("stock", "world_s"))
        out["ours_world_s"].append(med("ours", "world_s"))
        for m in ("stock", "ours"):  # megatron's groups alone: T(all groups) - T(world)
            for r in runs[m]:
                if r.get("ok"):
                    r["groups_s"] = r["s"] - r["world_s"]
            out[f"{m}_groups_s"].append(med(m, "groups_s"))
        if "ours_selfhost" in runs:
            out["ours_selfhost_s"].append(med("ours_selfhost"))
        if "stock_agent" in runs:
            out["stock_agent_store_s"].append(med("stock_agent"))
            out["stock_agent_store_world_s"].append(med("stock_agent", "world_s"))
        ops = [r["server_ops"] for r in runs["ours"] if r.get("server_ops")]
        shares = [max(c) / max(1, sum(c)) for c in ops]
        out["agents"].append(max(1, world // RANKS_PER_AGENT))
        out["max_server_ops_share"].append(round(statistics.median(shares), 3) if shares else None)
        out["ours_max_server_ops"].append(
            int(statistics.median([max(c) for c in ops])) if ops else None)
        out["ours_total_ops"].append(int(statistics.median([sum(c) for c in ops])) if ops else None)
        out["runs"][str(world)] = {m: [r.get("s") for r in rs] for m, rs in runs.items()}
        counted = _trial("stock_count", world, args.tp, args.pp, args.limit)
        out["stock_total_ops"].append(counted.get("client_ops"))
        line = (f"ranks={world}: ours {out['ours_s'][-1]} s, stock {out['stock_s'][-1]} s, "
                f"stock with a pre-started store {out['stock_agent_store_s'][-1] if 'stock_agent' in runs else 'not run'} s "
                f"(medians of {args.repeats}; world formed: ours {out['ours_world_s'][-1]} s, "
                f"stock {out['stock_world_s'][-1]} s)")
        print(line, flush=True)
    out["dns"].append(dns_probe(max(args.ranks)))
    for probe, when in zip(out["dns"], ("before", "after")):
        print(f"name lookups {when} the trials on {dns_text(probe)}", flush=True)
    print(f"note: stock's time at {max(args.ranks)} ranks on this machine includes the "
          "reverse-DNS lookups its TCPStore server makes per accepted connection (c10d names "
          "each peer with getnameinfo, c10d::detail::formatSockAddr, inside its one accept "
          "loop; a query the resolver drops stalls that loop for glibc's 5 s timeout): "
          "compare its world-formation time with the lookup times above", flush=True)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
