"""Servers a fault can be done to: a redis-server of our own (restartable, AOF) and a TCP proxy that cuts."""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

from tests.support.s3server import free_port


class RedisServer:
    """A throwaway ``redis-server`` on a free loopback port; AOF on, so a restart keeps the queues."""

    def __init__(self, data_dir: Path, *, aof: bool = True):
        self.dir, self.aof = data_dir, aof
        self.port = free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 15.0) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        binary = shutil.which("redis-server") or "/usr/bin/redis-server"
        args = [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.dir), "--save", "",
                "--appendonly", "yes" if self.aof else "no", "--appendfsync", "always",
                "--maxmemory-policy", "noeviction", "--logfile", str(self.dir / "redis.log")]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.ping():
                return
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited {self.proc.returncode}")
            time.sleep(0.05)
        raise RuntimeError("redis-server did not answer")

    def ping(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def stop(self, sig: int = signal.SIGTERM) -> None:
        """SIGTERM: Redis fsyncs its AOF and exits; SIGKILL: it just dies (appendfsync always loses nothing)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(15)

    def wipe(self) -> None:
        """Forget everything on disk: the next start is an empty Redis."""
        for p in self.dir.iterdir():
            if p.is_dir():
                shutil.rmtree(p)
            elif p.name != "redis.log":
                p.unlink()


class TcpProxy:
    """Forwards a loopback port to ``upstream``; ``cut()`` refuses new connections and drops live ones."""

    def __init__(self, upstream: tuple[str, int]):
        self.upstream = upstream
        self.port = free_port()
        self._conns: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._listener: socket.socket | None = None
        self._flowing = threading.Event()  # cleared by hold(): requests wait, as in a stalled network
        self._flowing.set()
        self.late_bytes = 0  # what a held request sent, counted as it went through after release()
        self.restore()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def restore(self) -> None:
        lst = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        lst.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        lst.bind(("127.0.0.1", self.port))
        lst.listen(128)
        self._listener = lst
        threading.Thread(target=self._accept, args=(lst,), daemon=True).start()

    def cut(self) -> None:
        lst, self._listener = self._listener, None
        if lst is not None:
            _close(lst)  # shutdown() wakes the thread blocked in accept(); close() alone would not
        with self._lock:
            conns, self._conns = self._conns, set()
        for c in conns:
            _close(c)

    def hold(self) -> None:
        """Connections stay open but what clients send is held back (a PUT hangs mid-request)."""
        self._flowing.clear()

    def release(self) -> None:
        """What was held goes through now, late."""
        self._flowing.set()

    def _accept(self, lst: socket.socket) -> None:
        while True:
            try:
                client, _ = lst.accept()
            except OSError:
                return  # cut
            try:
                server = socket.create_connection(self.upstream, timeout=5)
            except OSError:
                _close(client)
                continue
            server.settimeout(None)
            with self._lock:
                self._conns |= {client, server}
            for a, b, upstream in ((client, server, True), (server, client, False)):
                threading.Thread(target=self._pump, args=(a, b, upstream), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, upstream: bool = False) -> None:
        try:
            while data := src.recv(65536):
                if upstream and not self._flowing.is_set():
                    self._flowing.wait()
                    self.late_bytes += len(data)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                _close(s)
            with self._lock:
                self._conns -= {src, dst}


def _close(s: socket.socket) -> None:
    try:
        s.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    s.close()
