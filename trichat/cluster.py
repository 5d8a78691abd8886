"""``trichat cluster --size N``: N servers as separate processes on this machine.

Server i (from 0) listens on line 7000+i, web 3000+i, peer 7100+i, keeps its data in
DATA/s<i>, and is told every other server as ``--peer``. Ctrl-C (or SIGTERM) stops them all.
Must never: share state with the servers except through their command lines.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

READY_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 10.0


def server_command(i: int, size: int, host: str, data: str, log_level: str) -> list[str]:
    peers = [f"--peer={host}:{7100 + j}" for j in range(size) if j != i]
    return [
        sys.executable,
        "-m",
        "trichat",
        "--log-level",
        log_level,
        "serve",
        f"--name=s{i}",
        f"--host={host}",
        f"--port={7000 + i}",
        f"--web-port={3000 + i}",
        f"--peer-port={7100 + i}",
        f"--data={os.path.join(data, f's{i}')}",
        *peers,
    ]


def _wait_ready(proc: subprocess.Popen[str], deadline: float) -> str | None:
    assert proc.stdout is not None
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            return None
        if line.startswith("ready"):
            return line.strip()
    return None


def _stop(procs: list[subprocess.Popen[str]]) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + STOP_TIMEOUT_S
    for proc in procs:
        try:
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def run_cluster(size: int, *, host: str, data: str, log_level: str = "info") -> int:
    """Start, report, wait for Ctrl-C, stop; the exit status."""
    if not 1 <= size <= 50:
        print("trichat cluster: --size must be between 1 and 50", file=sys.stderr)
        return 2
    procs: list[subprocess.Popen[str]] = []
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    try:
        for i in range(size):
            proc = subprocess.Popen(
                server_command(i, size, host, data, log_level), stdout=subprocess.PIPE, text=True
            )
            procs.append(proc)
            ready = _wait_ready(proc, time.monotonic() + READY_TIMEOUT_S)
            if ready is None:
                print(f"trichat cluster: server s{i} did not start", file=sys.stderr)
                return 1
            print(f"s{i}: {ready}", flush=True)
        print(f"cluster of {size} running; Ctrl-C stops it", flush=True)
        while all(p.poll() is None for p in procs):
            time.sleep(0.5)
        print("trichat cluster: a server exited; stopping the others", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        _stop(procs)
