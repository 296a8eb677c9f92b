"""A zc.zrs primary or secondary, run with the zc.zrs virtualenv's Python
(scripts/venv-zrs.sh), driven by interop/test_replication.py over stdin/stdout.

    zrs_node.py primary PATH HOST:PORT     Primary(FileStorage(PATH)) listening there
    zrs_node.py secondary PATH HOST:PORT   Secondary(FileStorage(PATH)) following there

Commands, one per line on stdin; each answers one line on stdout:
    commit N     (primary) commits N transactions through ZODB.DB(primary): a counter,
                 a mapping entry and, every third one, a blob. Answers `last TID`.
    last         answers `last TID` (hex of lastTransaction()).
    quit         closes the storage and exits.
"""
import logging
import sys

import transaction
import ZODB
import ZODB.blob
import ZODB.FileStorage
import zc.zrs.primary
import zc.zrs.secondary
from persistent.mapping import PersistentMapping

logging.basicConfig(level=logging.INFO, stream=sys.stderr)


def main():
    mode, path, addr = sys.argv[1:4]
    host, port = addr.rsplit(":", 1)
    fs = ZODB.FileStorage.FileStorage(path, blob_dir=path + ".blobs")
    db = None
    if mode == "primary":
        storage = zc.zrs.primary.Primary(fs, (host, int(port)))
        db = ZODB.DB(storage)
    else:
        storage = zc.zrs.secondary.Secondary(fs, (host, int(port)), reconnect_delay=1)
    n = 0
    print("ready", flush=True)
    for line in sys.stdin:
        words = line.split()
        if not words:
            continue
        if words[0] == "commit":
            for _ in range(int(words[1])):
                n += 1
                with db.transaction(f"zc.zrs commit {n}") as conn:
                    root = conn.root()
                    if "items" not in root:
                        root["items"] = PersistentMapping()
                    root["counter"] = n
                    root["items"][n] = "x" * (n % 50)
                    if n % 3 == 0:
                        root[f"blob{n}"] = ZODB.blob.Blob(b"blob %d " % n * 1000)
                    conn.transaction_manager.get().setExtendedInfo("n", n)
        elif words[0] == "quit":
            break
        print("last", storage.lastTransaction().hex(), flush=True)
    if db is not None:
        db.close()
    else:
        storage.close()


if __name__ == "__main__":
    main()
