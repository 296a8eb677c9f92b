"""FileStorage benchmark: zeors against Python ZODB on the same Data.fs, in the same run.

Generates (once, cached in the output directory) a Data.fs of at least 1,000,000
persistent objects held in BTrees, with history (revisions) and garbage, using Python
ZODB. Then times, each side by side on that file:

- open with the `.index`        (zeors info / FileStorage(read_only=True))
- open without an index (scan)  (the same, on a hard link without `.index`)
- full iteration                (every transaction and record with its data:
                                 zeors info --iterate / FileIterator)
- dump                          (zeors dump / fsdump, to /dev/null; whole processes)
- pack with GC to now           (zeors pack / FileStorage.pack, on copies)

and writes results.json and results.md (a table of ratios) to the output directory.
Times are wall-clock seconds with a warm page cache (the file fits in memory); the best
of --repeat runs is kept for the opens and the iterations. zeors' pack time includes
fsyncing the new file, which Python's does not do.

Usage: python bench/bench.py [--objects N] [--zeors PATH] [--out DIR] [--repeat N]
"""
import argparse
import json
import os
import platform
import random
import re
import shutil
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def generate(path, objects):
    """Builds the database with Python ZODB; returns a description of it."""
    import transaction
    import ZODB
    import ZODB.FileStorage
    from BTrees.IOBTree import IOBTree
    from BTrees.OOBTree import OOBTree
    from persistent.mapping import PersistentMapping

    for suffix in ("", ".index", ".lock", ".tmp"):
        if os.path.exists(path + suffix):
            os.remove(path + suffix)
    started = time.time()
    db = ZODB.DB(ZODB.FileStorage.FileStorage(path), cache_size=2000)
    conn = db.open()
    root = conn.root()
    root["objects"] = IOBTree()
    root["names"] = OOBTree()
    transaction.commit()
    batch = 20000
    live = int(objects * 0.9)
    for start in range(0, live, batch):
        tree = root["objects"]
        for i in range(start, min(start + batch, live)):
            tree[i] = PersistentMapping({"i": i, "name": "object %d" % i, "tags": ["a", "b"]})
        transaction.commit()
        conn.cacheMinimize()
        if start % 200000 == 0:
            log("  %d objects..." % start)
    # History: revisions of a tenth of the objects.
    rnd = random.Random(42)
    for r in range(20):
        tree = root["objects"]
        for i in rnd.sample(range(live), live // 200):
            tree[i]["rev"] = r
        transaction.commit()
        conn.cacheMinimize()
    # Garbage: a subtree referenced for a while, then dropped.
    junk = OOBTree()
    root["junk"] = junk
    for start in range(0, objects - live, batch):
        for i in range(start, min(start + batch, objects - live)):
            junk["j%08d" % i] = PersistentMapping({"junk": i})
        transaction.commit()
        conn.cacheMinimize()
    del root["junk"]
    transaction.commit()
    db.close()
    return {"objects_created": objects, "seconds": round(time.time() - started, 1)}


def run(cmd, **kw):
    started = time.time()
    r = subprocess.run(cmd, capture_output=True, text=True, **kw)
    elapsed = time.time() - started
    if r.returncode != 0:
        raise RuntimeError("%s failed: %s%s" % (cmd, r.stdout, r.stderr))
    return r.stdout, elapsed


def field(text, name):
    m = re.search(r"^%s: (\S+)" % re.escape(name), text, re.M)
    return float(m.group(1))


PY_OPEN = """
import sys, time
import ZODB.FileStorage
t = time.perf_counter()
fs = ZODB.FileStorage.FileStorage(sys.argv[1], read_only=True)
print(time.perf_counter() - t, bool(fs._used_index), len(fs))
"""

PY_ITERATE = """
import sys, time
import ZODB.FileStorage
t = time.perf_counter()
txns = records = size = 0
it = ZODB.FileStorage.FileIterator(sys.argv[1])
for txn in it:
    txns += 1
    for r in txn:
        records += 1
        size += len(r.data or b'')
print(time.perf_counter() - t, txns, records, size)
"""

PY_PACK = """
import sys, time
import ZODB.FileStorage
from ZODB.serialize import referencesf
fs = ZODB.FileStorage.FileStorage(sys.argv[1])
n = len(fs)
t = time.perf_counter()
fs.pack(float(sys.argv[2]), referencesf)
print(time.perf_counter() - t, n, len(fs))
fs.close()
"""


def best(f, repeat):
    results = [f() for _ in range(repeat)]
    return min(results, key=lambda r: r[0])


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--objects", type=int, default=1_000_000)
    ap.add_argument("--zeors", default=os.path.join(ROOT, "target", "release", "zeors"))
    ap.add_argument("--out", default=os.path.join(HERE, "out"))
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    z = args.zeors
    if not os.path.exists(z):
        sys.exit("no zeors binary at %s: cargo build --release (or pass --zeors)" % z)
    py = sys.executable
    path = os.path.join(args.out, "bench.fs")
    marker = path + ".objects"
    gen = None
    if not (os.path.exists(path) and os.path.exists(marker) and open(marker).read() == str(args.objects)):
        log("generating %d objects with Python ZODB into %s ..." % (args.objects, path))
        gen = generate(path, args.objects)
        with open(marker, "w") as f:
            f.write(str(args.objects))
        log("  done in %.0fs" % gen["seconds"])
    size = os.path.getsize(path)
    # Make sure a valid .index is there (Python writes it when it closes).
    run([py, "-c", "import ZODB.FileStorage as F, sys; F.FileStorage(sys.argv[1]).close()", path])
    results = {"file_bytes": size, "generation": gen, "rows": []}

    def row(name, zeors_s, python_s, note=""):
        results["rows"].append(
            {"what": name, "zeors_s": round(zeors_s, 4), "python_s": round(python_s, 4), "ratio": round(python_s / zeors_s, 1), "note": note}
        )
        log("%-28s zeors %8.3fs  python %8.3fs  x%.1f" % (name, zeors_s, python_s, python_s / zeors_s))

    # Warm the page cache, so both sides read from memory.
    with open(path, "rb") as f:
        while f.read(1 << 24):
            pass

    out, _ = run([z, "info", path])
    objects = int(field(out, "objects"))
    results["objects"] = objects
    assert "index used: yes" in out, out
    zs = best(lambda: (field(run([z, "info", path])[0], "open seconds"),), args.repeat)[0]
    p = best(lambda: tuple(run([py, "-c", PY_OPEN, path])[0].split()), args.repeat)
    assert p[1] == "True", p
    row("open with index", zs, float(p[0]))

    noindex = os.path.join(args.out, "noindex.fs")
    for suffix in ("", ".index"):
        if os.path.exists(noindex + suffix):
            os.remove(noindex + suffix)
    os.link(path, noindex)
    zs = best(lambda: (field(run([z, "info", noindex])[0], "open seconds"),), args.repeat)[0]
    p = best(lambda: tuple(run([py, "-c", PY_OPEN, noindex])[0].split()), args.repeat)
    assert p[1] == "False", p
    row("open without index (scan)", zs, float(p[0]), "%.0f MB/s for zeors" % (size / zs / 1e6))
    os.remove(noindex)

    zout = best(lambda: (lambda o: (field(o, "iterate seconds"), o))(run([z, "info", "--iterate", path])[0]), args.repeat)
    p = best(lambda: tuple(float(x) for x in run([py, "-c", PY_ITERATE, path])[0].split()), args.repeat)
    assert int(field(zout[1], "data records")) == int(p[2]), (zout[1], p)
    row("full iteration", zout[0], p[0], "%d transactions, %d records" % (p[1], p[2]))

    with open(os.devnull, "w") as devnull:
        started = time.time()
        subprocess.run([z, "dump", path], stdout=devnull, check=True)
        zs = time.time() - started
        started = time.time()
        subprocess.run([py, "-m", "ZODB.FileStorage.fsdump", path], stdout=devnull, check=True)
        ps = time.time() - started
    row("dump (whole process)", zs, ps, "zeors dump vs fsdump")

    zcopy, pcopy = os.path.join(args.out, "pack-zeors.fs"), os.path.join(args.out, "pack-python.fs")
    for c in (zcopy, pcopy):
        for suffix in ("", ".index", ".old", ".lock", ".pack"):
            if os.path.exists(c + suffix):
                os.remove(c + suffix)
        shutil.copy(path, c)
        shutil.copy(path + ".index", c + ".index")
    t = time.time()
    out, _ = run([z, "pack", zcopy, "--days", "0"])
    zs = float(re.search(r"in ([0-9.]+)s", out).group(1))
    p = run([py, "-c", PY_PACK, pcopy, repr(t)])[0].split()
    zsize, psize = os.path.getsize(zcopy), os.path.getsize(pcopy)
    assert zsize == psize, (zsize, psize)
    row("pack with GC", zs, float(p[0]), "%s -> %s objects, %d -> %d MB" % (p[1], p[2], size // 10**6, zsize // 10**6))
    for c in (zcopy, pcopy):
        for suffix in ("", ".index", ".old", ".lock"):
            if os.path.exists(c + suffix):
                os.remove(c + suffix)

    results["machine"] = "%s, %d CPUs, Python %s" % (platform.machine(), os.cpu_count(), platform.python_version())
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    lines = [
        "%d objects, %d MB Data.fs (%s); seconds, warm page cache" % (objects, size // 10**6, results["machine"]),
        "",
        "| operation | zeors | Python ZODB | zeors faster by | |",
        "|---|---:|---:|---:|---|",
    ]
    for r in results["rows"]:
        lines.append("| %s | %.3f | %.3f | %.1fx | %s |" % (r["what"], r["zeors_s"], r["python_s"], r["ratio"], r["note"]))
    md = "\n".join(lines) + "\n"
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(md)
    print(md)


if __name__ == "__main__":
    main()
