"""Real ``celery worker`` (and other ``aigc``) processes for integration tests."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path


@dataclass
class ServiceProc:
    """A process started in a session of its own, with its output in a log file."""

    proc: subprocess.Popen
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Signal the whole process group: the main process and any pool children."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, sig)
            self.proc.wait(30)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.kill()


@dataclass
class WorkerProc(ServiceProc):
    name: str = ""


def start_worker(env: dict[str, str], log_dir: Path, *, queues: str = "text", pool: str = "solo",
                 concurrency: int = 1, timeout: float = 60.0, loglevel: str = "INFO", app: str = "worker.app",
                 extra_args: tuple[str, ...] = ()) -> WorkerProc:
    name = f"w{uuid.uuid4().hex[:6]}@%h"
    log_path = log_dir / f"worker-{name.split('@')[0]}.log"
    args = [sys.executable, "-m", "celery", "-A", app, "worker", "-Q", queues, "--pool", pool,
            "--concurrency", str(concurrency), "--loglevel", loglevel, "-n", name,
            "--without-gossip", "--without-mingle", "--without-heartbeat", *extra_args]
    full_env = {**os.environ, **env, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(args, stdout=log_path.open("wb"), stderr=subprocess.STDOUT, env=full_env,
                            start_new_session=True, cwd=Path(__file__).resolve().parents[2])
    w = WorkerProc(proc, log_path, name)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"celery worker exited {proc.returncode}:\n{w.log()[-3000:]}")
        if " ready." in w.log():
            return w
        time.sleep(0.1)
    w.kill()
    raise RuntimeError(f"celery worker not ready in {timeout}s:\n{w.log()[-3000:]}")
