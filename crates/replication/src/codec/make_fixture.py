# Writes python_stream.hex: a replication stream exactly as zc.zrs's PrimaryProducer
# makes it (pickle protocol 1, fast mode, sized messages, running MD5 seeded with the
# start tid), for the codec's compatibility test. Run with any Python 3.
import hashlib, io, pickle, struct

def dump(d):
    f = io.BytesIO()
    p = pickle.Pickler(f, 1)
    p.fast = 1
    p.dump(d)
    return f.getvalue()

start = bytes.fromhex('03f5945817777777')
tid = bytes.fromhex('03f5945817777788')
md5 = hashlib.md5(start)
out = []

def write(b):
    md5.update(b)
    out.append(struct.pack('>I', len(b)) + b)

write(dump(('T', (tid, ' ', b'/site admin', b'added a file', {'x': 1, 'user_name': 'admin'}))))
write(dump(('S', (b'\0' * 8, tid, '', None)))); write(b'root pickle')
write(dump(('S', (b'\0' * 7 + b'\x02', tid, '', start)))); write(b'old data')
write(dump(('S', (b'\0' * 7 + b'\x03', tid, '', None)))); write(b'')
write(dump(('B', (b'\0' * 7 + b'\x04', tid, '', None, 2)))); write(b'blob pickle')
write(b'ab'); write(b'c')
write(dump(('C', (md5.digest(),))))
tid2 = bytes.fromhex('03f5945817777799')
write(dump(('T', (tid2, 'p', b'', b'', {}))))
write(dump(('C', (md5.digest(),))))
open(__file__.replace('make_fixture.py', 'python_stream.hex'), 'w').write(b''.join(out).hex() + '\n')
