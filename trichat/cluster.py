"""``trichat cluster --size N``: N servers as separate processes on this machine.

Server i (from 0) listens on line 7000+i, web 3000+i, peer 7100+i, keeps its data in
DATA/s<i>, and is told every other server as ``--peer``. Ctrl-C (or SIGTERM) stops them all.
Must never: share state with the servers except through their command lines.
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import threading
import time

READY_TIMEOUT_S = 30.0
SECRET_FILE = "cluster-secret"
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


def _follow(name: str, proc: subprocess.Popen[str], linked: dict[str, int]) -> None:
    """(A thread.) Read a server's stdout: its ``linked`` lines say how many peers it has."""
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.startswith("linked"):
            peers = line.partition("peers=")[2].strip()
            linked[name] = len([p for p in peers.split(",") if p])


def _watch(procs: dict[str, subprocess.Popen[str]], linked: dict[str, int]) -> None:
    """Report the mesh fully linked, and servers that exit, until every server is gone."""
    size = len(procs)
    announced = False
    exited: set[str] = set()
    while len(exited) < size:
        full = all(linked.get(name) == size - 1 for name in procs if name not in exited)
        if full and not announced and not exited:
            print(
                f"mesh linked: {size} servers, every one linked to the {size - 1} others",
                flush=True,
            )
            announced = True
        for name, proc in procs.items():
            if name not in exited and proc.poll() is not None:
                exited.add(name)
                print(
                    f"{name} exited (status {proc.returncode}); the others keep running", flush=True
                )
        time.sleep(0.2)


def _secret_from_file(data: str) -> str:
    path = os.path.join(data, SECRET_FILE)
    if os.path.exists(path):
        with open(path) as f:
            return f.read().strip()
    os.makedirs(data, exist_ok=True)
    secret = secrets.token_hex(16)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secret + "\n")
    print(f"cluster secret written to {path}", flush=True)
    return secret


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def run_cluster(size: int, *, host: str, data: str, log_level: str = "info") -> int:
    """Start, report, wait for Ctrl-C, stop; the exit status.

    The servers share a cluster secret: TRICHAT_CLUSTER_SECRET if set, else the one in
    DATA/cluster-secret (made at random the first time, readable by this user only), so a
    server added by hand can join. It goes through the environment, never a command line.
    """
    if not 1 <= size <= 50:
        print("trichat cluster: --size must be between 1 and 50", file=sys.stderr)
        return 2
    procs: dict[str, subprocess.Popen[str]] = {}
    linked: dict[str, int] = {}
    env = dict(os.environ)
    if not env.get("TRICHAT_CLUSTER_SECRET"):
        env["TRICHAT_CLUSTER_SECRET"] = _secret_from_file(data)
    # Explicit handlers: a shell starts background jobs with SIGINT ignored, and Python
    # keeps it ignored unless told otherwise.
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, _interrupt)
    try:
        for i in range(size):
            name = f"s{i}"
            proc = subprocess.Popen(
                server_command(i, size, host, data, log_level),
                stdout=subprocess.PIPE,
                text=True,
                env=env,
            )
            procs[name] = proc
            ready = _wait_ready(proc, time.monotonic() + READY_TIMEOUT_S)
            if ready is None:
                print(f"trichat cluster: server {name} did not start", file=sys.stderr)
                return 1
            print(f"{name}: {ready}", flush=True)
            threading.Thread(target=_follow, args=(name, proc, linked), daemon=True).start()
        print(f"cluster of {size} running; Ctrl-C stops it", flush=True)
        _watch(procs, linked)
        print("trichat cluster: every server has exited", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        _stop(list(procs.values()))
