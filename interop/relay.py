"""A TCP relay for tests: counts the bytes crossing it, can delay and throttle them (a slow
WAN link), and can be cut and restored."""
import queue
import socket
import threading
import time


class Relay:
    def __init__(self, target, delay=0.0, bandwidth=None):
        self.target = target
        self.delay = delay  # seconds added one way
        self.bandwidth = bandwidth  # bytes per second, each direction, or None
        self.up = 0  # bytes client -> target
        self.down = 0  # bytes target -> client
        self.lock = threading.Lock()
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(64)
        self.port = self.listener.getsockname()[1]
        self.conns = []
        self.cut_flag = False
        self.closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def addr(self):
        return ("127.0.0.1", self.port)

    def reset_counts(self):
        with self.lock:
            self.up = self.down = 0

    def counts(self):
        with self.lock:
            return self.up, self.down

    def cut(self):
        """Drop every connection and refuse new ones until restore()."""
        self.cut_flag = True
        for s in list(self.conns):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()
        self.conns.clear()

    def restore(self):
        self.cut_flag = False

    def close(self):
        self.closed = True
        self.cut()
        self.listener.close()

    def _send(self, chunks, dst):
        budget_start = time.monotonic()
        sent = 0
        try:
            while True:
                item = chunks.get()
                if item is None:
                    return
                due, data = item
                wait = due - time.monotonic()
                if wait > 0:
                    time.sleep(wait)
                if self.bandwidth:
                    sent += len(data)
                    ahead = sent / self.bandwidth - (time.monotonic() - budget_start)
                    if ahead > 0:
                        time.sleep(ahead)
                dst.sendall(data)
        except OSError:
            pass

    def _accept(self):
        while not self.closed:
            try:
                c, _ = self.listener.accept()
            except OSError:
                return
            if self.cut_flag:
                c.close()
                continue
            try:
                u = socket.create_connection(self.target)
            except OSError:
                c.close()
                continue
            for s in (c, u):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.conns += [c, u]
            threading.Thread(target=self._pump, args=(c, u, "up"), daemon=True).start()
            threading.Thread(target=self._pump, args=(u, c, "down"), daemon=True).start()

    def _pump(self, src, dst, direction):
        # Latency is modelled per chunk: each one leaves `delay` seconds after it arrived,
        # so chunks in flight overlap as on a real link (a sleep per chunk before reading
        # the next would add the delay once per request for pipelined traffic).
        chunks = queue.Queue()
        sender = threading.Thread(target=self._send, args=(chunks, dst), daemon=True)
        sender.start()
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                with self.lock:
                    if direction == "up":
                        self.up += len(data)
                    else:
                        self.down += len(data)
                chunks.put((time.monotonic() + self.delay, data))
        except OSError:
            pass
        finally:
            chunks.put(None)
            sender.join(timeout=5)
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
