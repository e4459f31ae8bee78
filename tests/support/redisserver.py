"""A throwaway ``redis-server`` for tests: with a password, and optionally TLS only (a CA and a server
certificate for 127.0.0.1 made with openssl), on a free loopback port."""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from tests.support.s3server import free_port, stop_process, wait_serving


@dataclass
class RedisServer:
    port: int
    password: str
    proc: subprocess.Popen
    log_path: Path
    ca_file: Path | None = None  # set when the server speaks TLS only

    def url(self, password: str | None = None, db: int = 0) -> str:
        """The broker URL; ``password=""`` leaves the password out."""
        pw = self.password if password is None else password
        scheme = "rediss" if self.ca_file else "redis"
        return f"{scheme}://{':' + pw + '@' if pw else ''}127.0.0.1:{self.port}/{db}"

    def client(self, db: int = 0):
        import redis

        kw = {"ssl": True, "ssl_ca_certs": str(self.ca_file)} if self.ca_file else {}
        return redis.Redis(host="127.0.0.1", port=self.port, db=db, password=self.password,
                           socket_timeout=5, **kw)

    def stop(self) -> None:
        stop_process(self.proc)


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
    binary = shutil.which("redis-server")
    if binary is None:
        raise RuntimeError("redis-server is not installed")
    data_dir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    args = [binary, "--bind", "127.0.0.1", "--requirepass", password, "--save", "", "--appendonly", "no",
            "--dir", str(data_dir)]
    ca = None
    if tls:
        ca, cert, key = make_certificates(data_dir / "tls")
        args += ["--port", "0", "--tls-port", str(port), "--tls-cert-file", str(cert), "--tls-key-file", str(key),
                 "--tls-ca-cert-file", str(ca), "--tls-auth-clients", "no"]
    else:
        args += ["--port", str(port)]
    log_path = data_dir / "redis.log"
    proc = subprocess.Popen(args, stdout=log_path.open("wb"), stderr=subprocess.STDOUT, start_new_session=True)
    server = RedisServer(port, password, proc, log_path, ca)
    wait_serving(server, lambda: server.client().ping(), "redis-server", timeout)
    return server
