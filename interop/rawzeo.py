"""A deliberately low-level ZEO client for tests that must misbehave on the wire."""
import socket
import struct

from zodbpickle import pickle


class Raw:
    def __init__(self, addr, timeout=10):
        self.sock = socket.create_connection(addr, timeout=timeout)
        self.buf = b""
        self.hello = self.read_frame()
        self.msgid = 0

    def send_frame(self, payload):
        self.sock.sendall(struct.pack(">I", len(payload)) + payload)

    def read_frame(self):
        while len(self.buf) < 4:
            self._fill()
        (n,) = struct.unpack(">I", self.buf[:4])
        while len(self.buf) < 4 + n:
            self._fill()
        frame, self.buf = self.buf[4 : 4 + n], self.buf[4 + n :]
        return frame

    def _fill(self):
        data = self.sock.recv(65536)
        if not data:
            raise ConnectionError("closed by server")
        self.buf += data

    def handshake(self):
        self.send_frame(b"Z5")

    def send(self, name, *args, oneway=False, msgid=None):
        if msgid is None:
            self.msgid += 1
            msgid = self.msgid
        p = pickle.Pickler.__new__(pickle.Pickler)
        import io

        f = io.BytesIO()
        p = pickle.Pickler(f, 3)
        p.fast = 1
        p.dump((msgid, oneway, name, args))
        self.send_frame(f.getvalue())
        return msgid

    def recv(self):
        """Next message, skipping callbacks."""
        while True:
            msg = pickle.loads(self.read_frame())
            if msg[2] == ".reply":
                return msg

    def call(self, name, *args):
        msgid = self.send(name, *args)
        reply = self.recv()
        assert reply[0] == msgid, reply
        return reply

    def register(self, storage="1", read_only=False):
        self.handshake()
        return self.call("register", storage, read_only)

    def is_closed(self, timeout=5):
        """True if the server closes the connection within `timeout` seconds."""
        self.sock.settimeout(timeout)
        try:
            while True:
                data = self.sock.recv(65536)
                if not data:
                    return True
        except socket.timeout:
            return False
        except OSError:
            return True

    def close(self):
        self.sock.close()
