"""Loads through the stock Python client, for realism: random loads, or a traversal.

`--procs` processes each open a ``ZEO.ClientStorage`` with its cache disabled
(``cache_size=0``: no record fits, so every load reaches the server) and call
``loadBefore`` on uniformly random oids in a closed loop, as ZODB does on a cache miss.
Prints one JSON object like ``zeo-bench loads`` does.

``rsloads`` is the same loop without a ZEO server: each process opens RelStorage on the
PostgreSQL database (``--dsn``) without its local cache and calls ``load`` as a ZODB
connection does on a cache miss.

``traverse`` is what a front-end does when it lists a folder or walks a catalog index:
``--procs`` processes each open a ``ZODB.DB`` over a ``ClientStorage`` and load, in key
order, the values of their own consecutive slice of ``--count`` keys of the generated
``IOBTree`` (from key ``--first``), going through the tree's buckets as ZODB does. Prints
``{"objects", "seconds"}`` (from the common start until the last process is done).
"""
import argparse
import json
import multiprocessing as mp
import os
import random
import time


def open_zeo(address):
    """A ClientStorage without a cache, and its load: what ZODB does on a cache miss."""
    from ZEO.ClientStorage import ClientStorage
    from ZODB.utils import maxtid

    host, port = address.rsplit(":", 1)
    storage = ClientStorage((host, int(port)), cache_size=0, read_only=True, wait_timeout=60)
    return storage.close, lambda oid: storage.loadBefore(oid, maxtid) is not None


def open_relstorage(dsn):
    """A RelStorage client of the database itself, without its local cache
    (`cache-local-mb 0`), and its load: a ZODB connection's instance, polled once (a
    snapshot, as a ZODB transaction sees), answering `load` as ZODB calls it on a cache
    miss of an MVCC storage."""
    from relstorage.adapters.postgresql import PostgreSQLAdapter
    from relstorage.options import Options
    from relstorage.storage import RelStorage

    opts = Options(keep_history=True, create_schema=False, read_only=True, cache_local_mb=0)
    storage = RelStorage(PostgreSQLAdapter(dsn=dsn, options=opts), options=opts)
    instance = storage.new_instance()
    instance.poll_invalidations()

    def close():
        instance.release()
        storage.close()

    return close, lambda oid: instance.load(oid)[0] is not None


def worker(target, max_oid, seed, barrier1, barrier2, window, out):
    from ZODB.utils import p64

    opener, where = target
    close, load = opener(where)
    rnd = random.Random(seed)
    barrier1.wait()
    barrier2.wait()
    start, end = window[0], window[1]
    samples = []
    errors = 0
    clock = time.time
    while True:
        oid = p64(rnd.randrange(max_oid + 1))
        sent = clock()
        try:
            ok = load(oid)
        except Exception:
            ok = False
        done = clock()
        if done >= end:
            break
        if done >= start:
            if ok:
                samples.append(done - sent)
            else:
                errors += 1
    close()
    out.put((samples, errors))


def traverse_worker(address, lo, hi, barrier, out):
    import ZODB
    from ZEO.ClientStorage import ClientStorage

    host, port = address.rsplit(":", 1)
    storage = ClientStorage((host, int(port)), cache_size=0, read_only=True, wait_timeout=60)
    db = ZODB.DB(storage, cache_size=1_000_000)
    conn = db.open()
    barrier.wait()
    n = 0
    for _, value in conn.root()["items"].items(lo, hi - 1):
        value._p_activate()
        n += 1
    out.put((n, time.time()))
    conn.close()
    db.close()


def traverse(args):
    ctx = mp.get_context("fork")
    barrier = ctx.Barrier(args.procs + 1)
    out = ctx.Queue()
    share = args.count // args.procs
    procs = [
        ctx.Process(target=traverse_worker,
                    args=(args.address, args.first + i * share, args.first + (i + 1) * share, barrier, out))
        for i in range(args.procs)
    ]
    for proc in procs:
        proc.start()
    barrier.wait()
    start = time.time()
    results = [out.get() for _ in procs]
    for proc in procs:
        proc.join()
    print(json.dumps({"objects": sum(n for n, _ in results),
                      "seconds": max(t for _, t in results) - start}))


def cpu_times(pid):
    """(user, system) CPU seconds of process `pid`, or None."""
    if pid is None:
        return None
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / ticks, int(fields[12]) / ticks


def percentile(sorted_values, p):
    if not sorted_values:
        return 0.0
    rank = max(1, min(len(sorted_values), -(-int(p * len(sorted_values)) // 100)))
    return sorted_values[rank - 1]


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("command", choices=["loads", "rsloads", "traverse"])
    p.add_argument("--address", help="loads, traverse: the ZEO server, HOST:PORT")
    p.add_argument("--dsn", help="rsloads: the RelStorage database on PostgreSQL (libpq DSN)")
    p.add_argument("--meta", required=True)
    p.add_argument("--procs", type=int, default=1)
    p.add_argument("--duration", type=float, default=10.0)
    p.add_argument("--warmup", type=float, default=2.0)
    p.add_argument("--server-pid", type=int)
    p.add_argument("--first", type=int, default=0, help="traverse: the first key")
    p.add_argument("--count", type=int, default=1000, help="traverse: keys in all")
    args = p.parse_args()
    if args.command == "rsloads":
        if not args.dsn:
            p.error("rsloads needs --dsn")
        target, client = (open_relstorage, args.dsn), "RelStorage"
    else:
        if not args.address:
            p.error(f"{args.command} needs --address")
        target, client = (open_zeo, args.address), "ZEO.ClientStorage"
    if args.command == "traverse":
        return traverse(args)
    with open(args.meta) as f:
        max_oid = json.load(f)["max_oid"]

    ctx = mp.get_context("fork")
    barrier1 = ctx.Barrier(args.procs + 1)
    barrier2 = ctx.Barrier(args.procs + 1)
    window = ctx.Array("d", 2)
    out = ctx.Queue()
    procs = [
        ctx.Process(target=worker, args=(target, max_oid, i + 1, barrier1, barrier2, window, out))
        for i in range(args.procs)
    ]
    for proc in procs:
        proc.start()
    barrier1.wait()  # every client connected
    start = time.time() + args.warmup
    window[0], window[1] = start, start + args.duration
    barrier2.wait()
    time.sleep(max(0.0, start - time.time()))
    cpu0 = cpu_times(args.server_pid)
    time.sleep(max(0.0, start + args.duration - time.time()))
    cpu1 = cpu_times(args.server_pid)
    samples, errors = [], 0
    for _ in procs:
        s, e = out.get()
        samples += s
        errors += e
    for proc in procs:
        proc.join()
    samples.sort()
    ms = [s * 1e3 for s in samples]
    server_cpu = None if cpu0 is None else (cpu1[0] - cpu0[0]) + (cpu1[1] - cpu0[1])
    server_sys = None if cpu0 is None else cpu1[1] - cpu0[1]
    report = {
        "client": client,
        "procs": args.procs,
        "seconds": args.duration,
        "loads": len(samples),
        "loads_per_s": len(samples) / args.duration,
        "latency": {
            "count": len(ms),
            "mean_ms": sum(ms) / len(ms) if ms else 0.0,
            "p50_ms": percentile(ms, 50),
            "p90_ms": percentile(ms, 90),
            "p99_ms": percentile(ms, 99),
            "max_ms": ms[-1] if ms else 0.0,
        },
        "errors": errors,
        "server_cpu_s": server_cpu,
        "server_sys_s": server_sys,
        "server_cpu_us_per_load": server_cpu * 1e6 / len(samples) if server_cpu is not None and samples else None,
    }
    print(json.dumps(report))


if __name__ == "__main__":
    main()
