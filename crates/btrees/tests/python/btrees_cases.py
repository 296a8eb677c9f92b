"""Three-way conflict cases for the BTrees classes, resolved by the real BTrees package.

    python btrees_cases.py generate SEED SCALE DIR
        writes DIR/cases.tsv (one case per line: id, class, expected not-handled
        category or '-', then the old, committed and new records in hex) and
        DIR/python.pickle (Python's outcome for each case).
    python btrees_cases.py check DIR RESULTS
        compares RESULTS (one line per case: id, then `resolved <record hex>`,
        `btrees p1 p2 p3 reason`, `error <message>` or `nothandled <category> <why>`)
        with Python's outcomes. Prints `mismatch <id> <why>` per disagreement, then
        `count ...` lines and `reasons ...`, and exits 1 if anything disagreed.

Records are written as ZODB writes them (one protocol-3 pickler for the class and the
state, so the state's persistent ids fetch the class from the memo). Python's outcome is
that of ZODB's own `tryToResolveConflict` (the resolved record, or ConflictError), and,
to know why Python refused, of the same steps run by hand with the exception kept.

A resolved record from Rust agrees when it loads (class, then state, nothing after) to
exactly the state Python's resolved record loads to: same types, floats bit for bit,
persistent ids as the same data. A refusal agrees when Python refused too, and a
`BTreesConflictError` must carry the same positions and reason, and any other exception
must be matched by an exception other than `BTreesConflictError`. "Not handled" agrees only
on the cases the generator made to be outside the model (labelled with the category Rust
must give) and every labelled case must be not handled.
"""

import datetime
import decimal
import io
import logging
import os
import pickle
import random
import struct
import sys

import BTrees
import BTrees.Length
import persistent.mapping
import zodbpickle.pickle as zpickle
from ZODB.ConflictResolution import PersistentReferenceFactory
from ZODB.ConflictResolution import find_global
from ZODB.ConflictResolution import state as cr_state
from ZODB.ConflictResolution import tryToResolveConflict
from ZODB.POSException import BTreesConflictError
from ZODB.POSException import ConflictError
from ZODB._compat import PersistentUnpickler

# tryToResolveConflict logs every refusal (with a traceback for unexpected errors).
logging.getLogger('ZODB.ConflictResolution').disabled = True

FAMILIES = BTrees._FAMILIES
INT_RANGES = {
    'I': (-2**31, 2**31 - 1),
    'U': (0, 2**32 - 1),
    'L': (-2**63, 2**63 - 1),
    'Q': (0, 2**64 - 1),
}
PM = persistent.mapping.PersistentMapping
OLD, COMMITTED = b'\0' * 7 + b'\1', b'\0' * 7 + b'\2'


class Ref:
    """A persistent object in a generated state: pickled as its persistent id."""
    __slots__ = ('pid',)

    def __init__(self, pid):
        self.pid = pid


class AliasPlaceholder:
    """Pickled as a global, then renamed in the bytes to another spelling of a class."""


def persistent_id(obj):
    return obj.pid if type(obj) is Ref else None


def record(meta, state, protocol=3, alias=None):
    f = io.BytesIO()
    p = zpickle.Pickler(f, protocol)
    p.persistent_id = persistent_id
    p.dump(meta)
    p.dump(state)
    data = f.getvalue()
    if alias is not None:
        data = data.replace(b'c__main__\nAliasPlaceholder\n', alias)
    return data


class Py2Pickler:
    """Writes records as Python 2's ZODB did (cPickle, protocol 1, no PROTO opcode):
    `str` as Python 2 strings (SHORT_BINSTRING/BINSTRING, which Python 3 reads as
    ASCII text or fails on), bools as `I01`, ints beyond 32 bits as INT and LONG text,
    tuples with MARK, classes memoized and fetched again. Enough for generated states.
    """

    def __init__(self):
        self.out = bytearray()
        self.memo = {}
        self.non_ascii = False

    def dump(self, obj):
        self.save(obj)
        self.out += b'.'

    def put(self, obj):
        self.memo[id(obj)] = (len(self.memo), obj)
        self.out += b'q' + bytes([len(self.memo) - 1])

    def string(self, data):
        self.non_ascii |= not data.isascii()
        if len(data) < 256:
            self.out += b'U' + bytes([len(data)]) + data
        else:
            self.out += b'T' + struct.pack('<i', len(data)) + data

    def save(self, obj):
        out = self.out
        if type(obj) is Ref:
            self.save(obj.pid)
            out += b'Q'
        elif obj is None:
            out += b'N'
        elif obj is True or obj is False:
            out += b'I01\n' if obj else b'I00\n'
        elif type(obj) is int:
            if 0 <= obj < 256:
                out += b'K' + bytes([obj])
            elif 0 <= obj < 65536:
                out += b'M' + struct.pack('<H', obj)
            elif -2**31 <= obj < 2**31:
                out += b'J' + struct.pack('<i', obj)
            elif -2**63 <= obj < 2**63:
                out += b'I%d\n' % obj
            else:
                out += b'L%dL\n' % obj
        elif type(obj) is float:
            out += b'G' + struct.pack('>d', obj)
        elif type(obj) is str:
            if obj.isascii():
                self.string(obj.encode('ascii'))
            else:
                data = obj.encode('utf-8')
                out += b'X' + struct.pack('<I', len(data)) + data
        elif type(obj) is bytes:
            self.string(obj)
        elif type(obj) is tuple:
            if not obj:
                out += b')'
            else:
                out += b'('
                for x in obj:
                    self.save(x)
                out += b't'
        elif type(obj) is list:
            out += b']('
            for x in obj:
                self.save(x)
            out += b'e'
        elif type(obj) is dict:
            out += b'}('
            for k, v in obj.items():
                self.save(k)
                self.save(v)
            out += b'u'
        elif isinstance(obj, type):
            if id(obj) in self.memo:
                out += b'h' + bytes([self.memo[id(obj)][0]])
            else:
                out += b'c%s\n%s\n' % (obj.__module__.encode(), obj.__name__.encode())
                self.put(obj)
        else:
            raise TypeError(obj)


def py2_record(meta, state):
    """A Python 2 ZODB record, and whether it holds a non-ASCII Python 2 string (which
    Python 3 cannot read)."""
    p = Py2Pickler()
    p.dump(meta)
    p.dump(state)
    return bytes(p.out), p.non_ascii


def oid(n):
    return struct.pack('>Q', n)


def f32(x):
    return struct.unpack('<f', struct.pack('<f', x))[0]


# -- Generators of keys and values ---------------------------------------------------

def int_pool(rng, kind, size):
    lo, hi = INT_RANGES[kind]
    base = rng.choice([0, lo, hi - 3 * size, rng.randint(lo, hi - 3 * size),
                       -size if lo < 0 else 0])
    pool = {base + rng.randrange(3 * size) for _ in range(size)}
    if rng.random() < 0.2:
        pool |= {lo, hi}
    return sorted(x for x in pool if lo <= x <= hi)


def text(rng):
    return rng.choice(['k', 'key', 'é', '日本', 'z', 'Z', '😀']) + str(rng.randrange(60))


def object_keys(rng, size):
    """A pool of object keys of one of several kinds (some that cannot be ordered, so
    that building a real bucket fails and the states stay as drawn). A list, in the
    order drawn: a set's order would follow Python's randomized string hashes."""
    mode = rng.choice(['str', 'str', 'int', 'numbers', 'tuple', 'bytes', 'big',
                       'mixed', 'none', 'nan', 'refs'])
    if mode == 'str':
        keys = [text(rng) for _ in range(size)]
    elif mode == 'int':
        keys = [rng.randrange(-30, 60) for _ in range(size)]
    elif mode == 'numbers':
        keys = [rng.choice([rng.randrange(20), rng.randrange(40) / 2, True, False,
                            float(rng.randrange(20))]) for _ in range(size)]
    elif mode == 'tuple':
        keys = [rng.choice([(text(rng), rng.randrange(5)), (rng.randrange(5),),
                            ((1, rng.randrange(3)), 'a'), ('a', None)])
                for _ in range(size)]
    elif mode == 'bytes':
        keys = [b'b%d' % rng.randrange(60) for _ in range(size)]
    elif mode == 'big':
        keys = [rng.choice([2**70 + rng.randrange(9), -2**70 - rng.randrange(9),
                            rng.randrange(9), 2**63 + rng.randrange(9)])
                for _ in range(size)]
    elif mode == 'mixed':
        keys = [rng.choice([text(rng), rng.randrange(40)]) for _ in range(size)]
    elif mode == 'none':
        keys = [rng.choice([None, rng.randrange(40)]) for _ in range(size)]
    elif mode == 'refs':
        # Persistent objects as keys (their class must order them; references can only
        # tell equal from different).
        keys = [Ref((oid(0x40 + rng.randrange(6)), PM)) for _ in range(size)]
    else:
        keys = [rng.choice([float('nan'), rng.randrange(40) / 4]) for _ in range(size)]
    return keys


def object_value(rng, refs):
    choice = rng.randrange(14)
    if choice == 0:
        return None
    if choice == 1:
        return rng.randrange(-5, 300)
    if choice == 2:
        return rng.choice([0.5, -1.0, 1e300, float('inf'), float('nan'), 3.0])
    if choice == 3:
        return text(rng)
    if choice == 4:
        return b'v%d' % rng.randrange(9)
    if choice == 5:
        return (text(rng), rng.randrange(3))
    if choice == 6:
        return [rng.randrange(3), text(rng)]
    if choice == 7:
        return rng.choice([{'a': rng.randrange(3), rng.randrange(3): [1]}, {'r': refs()}])
    if choice == 8:
        return rng.choice([True, False])
    if choice == 9:
        return (refs(), rng.randrange(3))
    return refs()


def reference_maker(rng, forms):
    def make():
        n = rng.choice([100, 101, 102, 103, 104, 0x1ff])
        form = rng.choice(forms)
        if form == 'class':
            return Ref((oid(n), PM))
        if form == 'bare':
            return Ref(oid(n))
        if form == 'weak':
            return Ref(['w', (oid(n),)])
        if form == 'xdb':
            return Ref(['m', ('other', oid(n), PM)])
        return Ref(['n', ('other', oid(n))])
    return make


class Flavour:
    """How to draw keys and values of one family."""

    def __init__(self, rng, family):
        self.rng = rng
        self.family = family
        key, value = (family[0], family[1]) if family != 'fs' else ('fs', 'fs')
        size = rng.choice([4, 8, 12, 20])
        self.may_be_unsortable = False
        if key == 'O':
            self.keys = object_keys(rng, size)
            self.may_be_unsortable = True
        elif key == 'fs':
            self.keys = [bytes([rng.randrange(3), rng.randrange(256)]) for _ in range(size)]
        else:
            self.keys = int_pool(rng, key, size)
        self.value_kind = value
        forms = rng.choice([['class'], ['class', 'bare'], ['class', 'weak', 'xdb', 'n'],
                            ['class', 'class', 'bare', 'weak']])
        self.refs = reference_maker(rng, forms)
        self.float_pool = [f32(rng.uniform(-100, 100)) for _ in range(6)]

    def key(self):
        return self.rng.choice(self.keys)

    def value(self):
        rng, kind = self.rng, self.value_kind
        if kind == 'O':
            return object_value(rng, self.refs)
        if kind == 'fs':
            return bytes(rng.randrange(3) for _ in range(6))
        if kind == 'F':
            # Raw states keep ints, bools and doubles, which the C bucket converts.
            return rng.choice(self.float_pool + [float('nan'), float('inf'), -0.0, 0.0,
                                                 rng.randrange(5), 0.1, True, 2**40])
        lo, hi = INT_RANGES[kind]
        return rng.choice([rng.randrange(3), lo, hi, rng.randint(lo, hi), True])


# -- Three-way states ----------------------------------------------------------------

def build(cls, mapping, items, raw, odd=False):
    """The state a real bucket of `cls` gives for `items` (sorted, deduplicated by the
    C code), or, when `raw` or when the keys cannot be ordered, the items as given (with
    a trailing key without value if `odd`)."""
    if not raw:
        try:
            b = cls()
            if mapping:
                for k, v in items:
                    b[k] = v
            else:
                for k in items:
                    b.add(k)
            return b.__getstate__()[0]
        except Exception:
            pass
    if mapping:
        flat = tuple(x for kv in items for x in kv)
        # The C bucket ignores a trailing key without a value.
        return flat + (items[0][0],) if items and odd else flat
    return tuple(items)


def mutate(rng, flavour, items, mapping, hot):
    """A side's version of `items` (a list of keys, or of (key, value) pairs)."""
    items = list(items)
    ops = rng.choice([0, 1, 1, 1, 2, 2, 3, 5])
    for _ in range(ops):
        op = rng.choice(['insert', 'insert', 'insert', 'delete', 'change', 'change',
                         'change', 'first' if rng.random() < 0.5 else 'delete',
                         'clear' if rng.random() < 0.1 else 'insert'])
        keys = [kv[0] if mapping else kv for kv in items]
        if op == 'insert':
            k = rng.choice(hot) if hot and rng.random() < 0.5 else flavour.key()
            if not any(k is x or k == x for x in keys):
                items.append((k, flavour.value()) if mapping else k)
        elif op == 'delete' and items:
            del items[rng.randrange(len(items))]
        elif op == 'first' and items:
            del items[0]
        elif op == 'change' and items and mapping:
            i = rng.randrange(len(items))
            items[i] = (items[i][0], flavour.value())
        elif op == 'clear':
            items = []
    return items


def bucket_case(rng, family, kind, cls):
    mapping = kind in ('Bucket', 'BTree')
    flavour = Flavour(rng, family)
    n = rng.randrange(0 if kind in ('BTree', 'TreeSet') else 1, 9)
    keys = []
    for _ in range(n):
        k = flavour.key()
        if not any(k is x or k == x for x in keys):
            keys.append(k)
    if not flavour.may_be_unsortable:
        keys.sort()
    old = [(k, flavour.value()) for k in keys] if mapping else keys
    hot = [flavour.key() for _ in range(2)]
    committed = mutate(rng, flavour, old, mapping, hot)
    new = mutate(rng, flavour, old, mapping, hot)
    if rng.random() < 0.1 and mapping and old:
        # Both sides give a key the same new value.
        k = old[rng.randrange(len(old))][0]
        v = flavour.value()
        committed = [(x, v if x is k else y) for x, y in committed]
        new = [(x, v if x is k else y) for x, y in new]
    raw = rng.random() < 0.1
    bucket_cls = getattr(BTrees, family + 'BTree').__dict__[
        family + ('Bucket' if mapping else 'Set')]
    states = [build(bucket_cls, mapping, items, raw, raw and rng.random() < 0.1)
              for items in (old, committed, new)]
    return states, flavour


def with_next(rng, family, states, mapping):
    """Buckets of a larger tree have a next bucket; a split changes it."""
    cls = getattr(BTrees, family + 'BTree').__dict__[family + ('Bucket' if mapping else 'Set')]
    nexts = [None, None, None]
    if rng.random() < 0.4:
        nxt = Ref((oid(0x300), cls))
        nexts = [nxt, nxt, nxt]
    if rng.random() < 0.08:
        side = rng.choice([1, 2])
        nexts[side] = rng.choice([None, Ref((oid(0x301), cls)), Ref(oid(0x300))])
    if rng.random() < 0.03:
        # `(items, None)`: the C bucket then holds None as its next bucket.
        nexts = [rng.choice([None, NONE_NEXT]) for _ in range(3)]
    return [(s,) if nx is None else (s, None if nx is NONE_NEXT else nx)
            for s, nx in zip(states, nexts)]


NONE_NEXT = object()


def tree_states(rng, family, kind, states):
    """Tree states around the inline bucket states."""
    shape = rng.choice(['inline'] * 6 + ['empty-old', 'split', 'big', 'emptied', 'malformed'])
    mapping = kind == 'BTree'
    cls = getattr(BTrees, family + 'BTree').__dict__[family + ('Bucket' if mapping else 'Set')]
    out = [(((s,),),) if s else None for s in states]
    if shape == 'empty-old':
        out[0] = None
    elif shape == 'split':
        side = rng.choice([1, 2])
        out[side] = ((Ref((oid(0x310), cls)), states[side][0] if states[side] else 0,
                      Ref((oid(0x311), cls))), Ref((oid(0x310), cls)))
    elif shape == 'big':
        out = [((Ref((oid(0x310), cls)), 1, Ref((oid(0x311), cls))), Ref((oid(0x310), cls)))] * 3
    elif shape == 'emptied':
        out[rng.choice([1, 2])] = None
    elif shape == 'malformed':
        side = rng.randrange(3)
        out[side] = rng.choice([((states[side],),), (((states[side],),),), 5, ()])
    return out


def length_states(rng):
    def value():
        return rng.choice([rng.randrange(1000), rng.randrange(-5, 5), 2**62 + rng.randrange(9),
                           rng.choice([0.5, 2.25, 1e16]), True,
                           rng.choice([None, 'x', (1,)]) if rng.random() < 0.2 else 7])
    return [value(), value(), value()]


# -- Python's outcome ----------------------------------------------------------------

class Store:
    """The two methods of a storage `tryToResolveConflict` uses."""

    def __init__(self, old, committed):
        self.data = {OLD: old, COMMITTED: committed}

    def loadSerial(self, oid, serial):
        return self.data[serial]

    @staticmethod
    def _crs_untransform_record_data(d):
        return d

    _crs_transform_record_data = _crs_untransform_record_data


def python_outcome(old, committed, new):
    """('resolved', record) or ('btrees', p1, p2, p3, reason) or ('error', text)."""
    store = Store(old, committed)
    # Why Python refuses: `tryToResolveConflict`'s steps, keeping the exception.
    try:
        factory = PersistentReferenceFactory()
        unpickler = PersistentUnpickler(find_global, factory.persistent_load,
                                        io.BytesIO(new))
        meta = unpickler.load()
        klass = meta[0] if isinstance(meta, tuple) else meta
        if isinstance(klass, tuple):
            klass = find_global(*klass)
        resolve = klass.__new__(klass)._p_resolveConflict
        newstate = unpickler.load()
        o = cr_state(store, b'oid', OLD, factory, old)
        c = cr_state(store, b'oid', COMMITTED, factory, committed)
        resolve(o, c, newstate)
        why = None
    except BTreesConflictError as e:
        why = ('btrees', e.p1, e.p2, e.p3, e.reason)
    except Exception as e:
        why = ('error', '%s: %s' % (type(e).__name__, e))
    # What ZODB itself does.
    try:
        resolved = tryToResolveConflict(store, b'oid', COMMITTED, OLD, new, committed)
    except ConflictError:
        resolved = None
    if (resolved is None) != (why is not None):
        raise AssertionError('tryToResolveConflict disagrees with its steps: %r' % (why,))
    return ('resolved', resolved) if why is None else why


# -- Generation ----------------------------------------------------------------------

def generate(seed, scale, out):
    rng = random.Random(seed)
    cases = []

    def add(label, expect, old, committed, new):
        cases.append((len(cases), label, expect, old, committed, new))

    per_kind = {'Bucket': 14, 'Set': 9, 'BTree': 5, 'TreeSet': 4}
    for family in FAMILIES:
        module = getattr(BTrees, family + 'BTree')
        for kind, count in per_kind.items():
            cls = module.__dict__[family + kind]
            for _ in range(count * scale):
                states, flavour = bucket_case(rng, family, kind, cls)
                mapping = kind in ('Bucket', 'BTree')
                if kind in ('Bucket', 'Set'):
                    states = with_next(rng, family, states, mapping)
                    if rng.random() < 0.03:
                        states[rng.randrange(3)] = None
                else:
                    states = tree_states(rng, family, kind, states)
                protocol = 3
                if rng.random() < 0.15 and not any(map(has_bytes, states)):
                    protocol = rng.choice([1, 2])
                if rng.random() < 0.1:
                    # Written by Python 2's ZODB; its binary strings cannot be read.
                    py2 = [py2_record(cls, s) for s in states]
                    expect = 'pickle' if any(bad for _, bad in py2) else '-'
                    add(family + kind, expect, *(r for r, _ in py2))
                    continue
                old, committed, new = (record(cls, s, protocol) for s in states)
                add(family + kind, '-', old, committed, new)
    for _ in range(40 * scale):
        old, committed, new = length_states(rng)
        add('Length', '-', *(record(BTrees.Length.Length, s) for s in (old, committed, new)))

    # Outside the model, on purpose: each must come back "not handled".
    for i in range(3 * scale):
        # Other classes (PersistentMapping has no _p_resolveConflict).
        states = [{'data': {'a': i}}, {'data': {'a': i, 'b': 1}}, {'data': {'c': 2}}]
        add('PersistentMapping', 'class', *(record(PM, s) for s in states))
        # Values that are instances of other classes: a date, a set, a Decimal.
        odd = rng.choice([datetime.date(2024, 1, 1 + i % 28), {1, 2}, decimal.Decimal('1.5')])
        cls = BTrees.OOBTree.OOBucket
        base = [('a', 1), ('b', odd)]
        states = [(build(cls, True, base, False),),
                  (build(cls, True, base + [('c', 2)], False),),
                  (build(cls, True, [('a', 2), ('b', odd)], False),)]
        add('OOBucket', 'pickle', *(record(cls, s) for s in states))
        # The next bucket spelled with another module name of the same class: Python
        # imports both to one class, so it is one reference; undecidable here.
        fam = rng.choice(['OO', 'II', 'LO', 'fs'])
        cls = getattr(BTrees, fam + 'BTree').__dict__[fam + 'Bucket']
        alias = b'cBTrees._%sBTree\n%sBucket\n' % (fam.encode(), fam.encode())
        flavour = Flavour(rng, fam)
        items = [(flavour.key(), flavour.value()) for _ in range(4)]
        bucket = build(cls, True, items, False)
        changed = build(cls, True, items + [(flavour.key(), flavour.value())], False)
        old = record(cls, (bucket, Ref((oid(0x300), AliasPlaceholder))), alias=alias)
        committed = record(cls, (bucket, Ref((oid(0x300), cls))))
        new = record(cls, (changed, Ref((oid(0x300), cls))))
        add(fam + 'Bucket', 'undecidable', old, committed, new)

    outcomes = {}
    with open(os.path.join(out, 'cases.tsv'), 'w') as f:
        for (n, label, expect, old, committed, new) in cases:
            outcomes[n] = (label, expect, python_outcome(old, committed, new))
            f.write('%d\t%s\t%s\t%s\t%s\t%s\n' % (
                n, label, expect, old.hex(), committed.hex(), new.hex()))
    with open(os.path.join(out, 'python.pickle'), 'wb') as f:
        pickle.dump(outcomes, f)


def has_bytes(obj):
    if isinstance(obj, (bytes, Ref)):
        return True
    if isinstance(obj, (tuple, list)):
        return any(map(has_bytes, obj))
    if isinstance(obj, dict):
        return any(map(has_bytes, obj.items()))
    return False


# -- Checking ------------------------------------------------------------------------

class Pid:
    """A persistent id as loaded, compared by its data."""

    def __init__(self, data):
        self.data = freeze(data)


def freeze(data):
    if isinstance(data, list):
        return ('list', tuple(freeze(x) for x in data))
    if isinstance(data, tuple):
        return tuple(freeze(x) for x in data)
    return data


def load(data):
    """(meta, state) of a record; raises if anything follows the state."""
    f = io.BytesIO(data)
    u = PersistentUnpickler(find_global, Pid, f)
    meta = u.load()
    state = u.load()
    if f.read():
        raise ValueError('data after the state pickle')
    return meta, state


def same(a, b):
    if type(a) is not type(b):
        return False
    if isinstance(a, float):
        return struct.pack('>d', a) == struct.pack('>d', b)
    if isinstance(a, (tuple, list)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return same(list(a.items()), list(b.items()))
    if isinstance(a, Pid):
        return same(a.data, b.data)
    if isinstance(a, type):
        return a is b
    return a == b


def check(out, results_path):
    with open(os.path.join(out, 'python.pickle'), 'rb') as f:
        outcomes = pickle.load(f)
    results = {}
    with open(results_path) as f:
        for line in f:
            n, kind, rest = (line.rstrip('\n').split('\t', 2) + [''])[:3]
            results[int(n)] = (kind, rest)
    mismatches = 0
    counts = {}
    reasons = {}

    def mismatch(n, why):
        nonlocal mismatches
        mismatches += 1
        print('mismatch %d %s' % (n, why))

    for n, (label, expect, python) in sorted(outcomes.items()):
        kind, rest = results.get(n, ('missing', ''))
        c = counts.setdefault(label, [0, 0, 0])
        if python[0] == 'btrees':
            reasons[python[4]] = reasons.get(python[4], 0) + 1
        if kind == 'nothandled':
            c[2] += 1
            category = rest.split('\t')[0]
            if category != expect:
                mismatch(n, 'not handled (%s) but expected %s; Python: %r'
                         % (rest, expect, python[:1]))
            continue
        if expect != '-':
            mismatch(n, 'expected not handled (%s), got %s' % (expect, kind))
            continue
        if kind == 'resolved':
            c[0] += 1
            if python[0] != 'resolved':
                mismatch(n, 'Rust resolved, Python refused: %r' % (python,))
                continue
            try:
                got = load(bytes.fromhex(rest))
            except Exception as e:
                mismatch(n, 'Rust record does not load: %s: %s' % (type(e).__name__, e))
                continue
            want = load(python[1])
            if not same(got, want):
                mismatch(n, 'states differ: Rust %r, Python %r' % (got, want))
        elif kind == 'btrees':
            c[1] += 1
            got = tuple(int(x) for x in rest.split())
            if python[0] != 'btrees' or python[1:] != got:
                mismatch(n, 'Rust BTreesConflictError%r, Python %r' % (got, python[:5]))
        elif kind == 'error':
            c[1] += 1
            if python[0] != 'error':
                mismatch(n, 'Rust refused (%s), Python: %r' % (rest, python[:5]))
        else:
            mismatch(n, 'no result (%s)' % kind)
    for label, (resolved, refused, not_handled) in sorted(counts.items()):
        print('count %s %d %d %d' % (label, resolved, refused, not_handled))
    print('reasons %s' % ' '.join('%d:%d' % kv for kv in sorted(reasons.items())))
    print('mismatches %d' % mismatches)
    return 1 if mismatches else 0


if __name__ == '__main__':
    if sys.argv[1] == 'generate':
        generate(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
    else:
        sys.exit(check(sys.argv[2], sys.argv[3]))
