"""The tests' own ``redis-server``: a password, TLS or an append-only file as a test needs, on a free
loopback port (the shared Redis on 6379 stays the default for everything else)."""

from __future__ import annotations

import shutil
import signal
import subprocess
from pathlib import Path

from tests.support.s3server import free_port, stop_process, wait_serving


class RedisServer:
    """A throwaway ``redis-server`` on a free loopback port that can be stopped, wiped and started again.

    ``password`` requires AUTH; ``tls`` serves TLS only (a CA and a server certificate for 127.0.0.1);
    ``aof`` appends every write with fsync, so a restart (even after SIGKILL) keeps the queues: the
    fault scenarios restart Redis under running workers.
    """

    def __init__(self, data_dir: Path, *, password: str = "", tls: bool = False, aof: bool = False):
        self.dir, self.password, self.aof = data_dir, password, aof
        self.port = free_port()
        self.proc: subprocess.Popen | None = None
        self.log_path = data_dir / "redis.log"
        self.ca_file: Path | None = None
        self._tls_files: tuple[Path, Path] | None = None
        if tls:
            self.ca_file, cert, key = make_certificates(data_dir / "tls")
            self._tls_files = (cert, key)

    def url(self, password: str | None = None, db: int = 0) -> str:
        """The broker URL; ``password=""`` leaves the password out."""
        pw = self.password if password is None else password
        scheme = "rediss" if self.ca_file else "redis"
        return f"{scheme}://{':' + pw + '@' if pw else ''}127.0.0.1:{self.port}/{db}"

    def client(self, db: int = 0):
        import redis

        return redis.Redis(host="127.0.0.1", port=self.port, db=db, password=self.password or None,
                           socket_timeout=5, ssl=bool(self.ca_file),  # Redis' defaults without TLS
                           ssl_ca_certs=str(self.ca_file) if self.ca_file else None)

    def start(self, timeout: float = 20.0) -> RedisServer:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed")
        self.dir.mkdir(parents=True, exist_ok=True)
        args = [binary, "--bind", "127.0.0.1", "--save", "", "--dir", str(self.dir),
                "--maxmemory-policy", "noeviction", "--logfile", str(self.log_path)]
        args += ["--appendonly", "yes", "--appendfsync", "always"] if self.aof else ["--appendonly", "no"]
        if self.password:
            args += ["--requirepass", self.password]
        if self._tls_files and self.ca_file:
            cert, key = self._tls_files
            args += ["--port", "0", "--tls-port", str(self.port), "--tls-cert-file", str(cert),
                     "--tls-key-file", str(key), "--tls-ca-cert-file", str(self.ca_file), "--tls-auth-clients", "no"]
        else:
            args += ["--port", str(self.port)]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        wait_serving(self, lambda: self.client().ping(), "redis-server", timeout)
        return self

    def ping(self) -> bool:
        try:
            return bool(self.client().ping())
        except Exception:
            return False

    def stop(self, sig: int = signal.SIGTERM) -> None:
        """SIGTERM: Redis fsyncs its AOF and exits; SIGKILL: it just dies (with AOF, nothing is lost)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                stop_process(self.proc)

    def wipe(self) -> None:
        """Forget everything on disk: the next start is an empty Redis."""
        for p in self.dir.iterdir():
            if p.is_dir() and p.name != "tls":
                shutil.rmtree(p)
            elif p.is_file() and p != self.log_path:
                p.unlink()


def make_certificates(d: Path) -> tuple[Path, Path, Path]:
    """(ca.pem, server.pem, server.key): a CA, and a server certificate it signed for 127.0.0.1."""
    d.mkdir(parents=True, exist_ok=True)

    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=d, check=True, capture_output=True, timeout=60)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
        "-subj", "/CN=aigc test CA")
    run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=127.0.0.1")
    (d / "ext.cnf").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    run("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
        "-out", "server.pem", "-days", "2", "-extfile", "ext.cnf")
    return d / "ca.pem", d / "server.pem", d / "server.key"


def start_redis(data_dir: Path, password: str, *, tls: bool = False, timeout: float = 20.0) -> RedisServer:
    return RedisServer(data_dir, password=password, tls=tls).start(timeout)
