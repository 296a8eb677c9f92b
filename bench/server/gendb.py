"""Generates the benchmark database with the real ZODB stack (FileStorage, BTrees).

The database holds `--objects` items of about 1 KB (``PersistentMapping`` with a payload
of text) in an ``IOBTree`` under ``root['items']``, plus a few ``BTrees.Length`` counters
under ``root['counters']`` (the hot set of the conflict workload: ``Length`` is the
class ZODB applications use for exactly this, and it resolves its own conflicts).

The payload is prose-like text of made-up words (a seeded vocabulary, Zipf-distributed word
frequencies, sentences), as a CMS stores documents: it compresses about as well as real text
(zstd about 2.6x), where random bytes, which this generator wrote before, do not compress
at all and pickles of a real site compress better still. Links between zeors nodes
compress what they carry, so the payload decides what those figures mean.

Besides ``Data.fs`` (and its ``.index``) it writes ``meta.json``, which is all the Rust
load generator needs to know about the data:

* ``max_oid``: every oid from 0 to it exists (checked here), so random loads can draw
  oids without a list;
* ``item_ranges``: the items' oids (the writers only rewrite items, so the BTree stays
  a valid BTree);
* ``item_template`` / ``payload_offset`` / ``payload_len``: one item's record; a writer
  copies it and fills the payload bytes, which yields a valid pickle of the same size;
* ``counters``: the hot set's oids.

Generation takes a while, so `run.sh` keeps the result and regenerates only when the
parameters or this file change.
"""
import argparse
import itertools
import json
import os
import random

import transaction
import ZODB
import ZODB.FileStorage
from BTrees.IOBTree import IOBTree
from BTrees.Length import Length
from persistent.mapping import PersistentMapping

BATCH = 5000

# Letter frequencies of English text, for the made-up words.
LETTERS = "etaoinshrdlcumwfgypbvkjxqz"
LETTER_WEIGHTS = [12.7, 9.1, 8.2, 7.5, 7.0, 6.7, 6.3, 6.1, 6.0, 4.3, 4.0, 2.8, 2.8, 2.4, 2.4,
                  2.2, 2.0, 2.0, 1.9, 1.5, 1.0, 0.8, 0.15, 0.15, 0.1, 0.07]


class Prose:
    """Deterministic text of made-up words: a 20,000-word vocabulary with lognormal word
    lengths, drawn with Zipf frequencies (the i-th word 1/i), in sentences."""

    def __init__(self, rnd, words=20_000):
        self.rnd = rnd
        vocab = set()
        while len(vocab) < words:
            n = min(max(int(rnd.lognormvariate(1.6, 0.45)), 1), 16)
            vocab.add("".join(rnd.choices(LETTERS, LETTER_WEIGHTS, k=n)))
        self.vocab = sorted(vocab)
        rnd.shuffle(self.vocab)
        self.cum = list(itertools.accumulate(1 / (i + 1) for i in range(words)))

    def text(self, size):
        """`size` bytes of ASCII prose."""
        rnd, out, n = self.rnd, [], 0
        while n < size:
            sentence = rnd.choices(self.vocab, cum_weights=self.cum, k=rnd.randint(4, 20))
            sentence[0] = sentence[0].capitalize()
            if len(sentence) > 8 and rnd.random() < 0.5:
                sentence[len(sentence) // 2] += ","
            s = " ".join(sentence) + ". "
            out.append(s)
            n += len(s)
        return "".join(out).encode("ascii")[:size]


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("directory")
    p.add_argument("--objects", type=int, default=100_000)
    p.add_argument("--payload", type=int, default=960, help="payload bytes per item (the record is ~1 KB)")
    p.add_argument("--counters", type=int, default=4)
    p.add_argument("--seed", type=int, default=1)
    args = p.parse_args()

    os.makedirs(args.directory, exist_ok=True)
    path = os.path.join(args.directory, "Data.fs")
    for suffix in ("", ".index", ".lock", ".tmp"):
        if os.path.exists(path + suffix):
            os.remove(path + suffix)
    rnd = random.Random(args.seed)
    prose = Prose(rnd)

    storage = ZODB.FileStorage.FileStorage(path)
    db = ZODB.DB(storage, cache_size=2 * BATCH)
    conn = db.open()
    root = conn.root()
    root["items"] = items = IOBTree()
    root["counters"] = [Length() for _ in range(args.counters)]
    transaction.commit()

    ranges = []
    for start in range(0, args.objects, BATCH):
        batch = []
        for key in range(start, min(start + BATCH, args.objects)):
            item = PersistentMapping({"key": key, "payload": prose.text(args.payload)})
            # Adding before linking gives the batch's items consecutive oids.
            conn.add(item)
            batch.append(item)
        for item in batch:
            items[item["key"]] = item
        first = int.from_bytes(batch[0]._p_oid, "big")
        last = int.from_bytes(batch[-1]._p_oid, "big")
        assert last - first + 1 == len(batch)
        ranges.append([first, last])
        transaction.commit()
        conn.cacheMinimize()

    counters = [int.from_bytes(c._p_oid, "big") for c in root["counters"]]
    sample = items[0]
    template, _ = storage.load(sample._p_oid)
    payload = sample["payload"]
    offset = template.find(payload)
    assert offset > 0 and template.find(payload, offset + 1) < 0
    conn.close()
    db.close()  # writes Data.fs.index, so both servers start fast

    storage = ZODB.FileStorage.FileStorage(path, read_only=True)
    oids = sorted(int.from_bytes(o, "big") for o in storage._index.keys())
    storage.close()
    assert oids == list(range(len(oids))), "oids are not contiguous"

    meta = {
        "objects": args.objects,
        "max_oid": oids[-1],
        "item_ranges": ranges,
        "counters": counters,
        "item_template": template.hex(),
        "payload_offset": offset,
        "payload_len": len(payload),
        "data_fs_bytes": os.path.getsize(path),
    }
    with open(os.path.join(args.directory, "meta.json"), "w") as f:
        json.dump(meta, f)
    print(f"generated {len(oids)} objects, {meta['data_fs_bytes'] / 1e6:.1f} MB in {path}")


if __name__ == "__main__":
    main()
