"""Hold a function part way through a race: the patched function runs, then waits (still inside its
caller's transaction) until the test lets it go."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Hold:
    reached: threading.Event = field(default_factory=threading.Event)  # the held call has returned its value
    go: threading.Event = field(default_factory=threading.Event)  # set to let it return


def hold_after(monkeypatch, owner: Any, name: str, *, call: int = 1, timeout: float = 30) -> Hold:
    """Patch ``owner.name`` so that its ``call``-th call, once done, waits for ``hold.go`` before it
    returns (other calls pass through)."""
    real, hold, calls = getattr(owner, name), Hold(), []

    def held(*args, **kwargs):
        out = real(*args, **kwargs)
        calls.append(1)
        if len(calls) == call:
            hold.reached.set()
            if not hold.go.wait(timeout):
                raise TimeoutError(f"{name} was held for {timeout} s and never let go")
        return out

    monkeypatch.setattr(owner, name, held)
    return hold
