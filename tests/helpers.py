"""Small configs and checks shared by the tests."""

import dataclasses
import fcntl
import io
import os
import pty
import socket
import struct
import subprocess
import termios
from pathlib import Path

import jax
import numpy as np

from moe.config import ModelConfig

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))
# CI=true or CI=1 (GitHub and most runners set one of them): nothing may be skipped there
IN_CI = os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def tiny_model(**overrides) -> ModelConfig:
    base = ModelConfig(
        vocab_size=97,
        d_model=32,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        d_ff=48,
        n_experts=4,
        top_k=2,
        rope_theta=10000.0,
        max_seq_len=64,
        init_std=0.1,
    )
    return dataclasses.replace(base, **overrides)


def processes_with_env(key: str, value: str) -> list[tuple[int, str]]:
    """(pid, command line) of every live process whose environment holds key=value (read
    from /proc: orphans included, which no longer show as anyone's children)."""
    marker = f"{key}={value}".encode()
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            if marker in (proc / "environ").read_bytes().split(b"\0"):
                found.append((int(proc.name), (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()[:200]))
        except OSError:  # gone meanwhile, or not ours to read
            continue
    return found


def kill_group(process) -> None:
    """SIGKILL a process started with start_new_session=True and everything in its group."""
    import signal

    try:
        os.killpg(process.pid, signal.SIGKILL)
    except OSError:  # the group is gone already
        pass
    process.wait()


def spawn(command: list[str], log, env: dict):
    """Start a command in its own process group (see kill_group), its output to the file
    `log`: a pipe would stay open, and a reader blocked, as long as any orphan of it lives."""
    import subprocess

    with open(log, "w") as out:
        return subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def hidden_residuals(vjp_fn, d_model: int, d_ff: int) -> list:
    """The distinct arrays a VJP keeps for its backward pass that are [..., rows, d_ff]
    activations (weights, also gathered per block, end in [d_model, d_ff] and are left out)."""
    distinct = []
    for r in jax.tree_util.tree_leaves(vjp_fn):
        if getattr(r, "ndim", 0) < 2 or r.shape[-1] != d_ff or r.shape[-2] == d_model:
            continue
        r = np.asarray(r)
        if not any(r.shape == d.shape and np.array_equal(r, d) for d in distinct):
            distinct.append(r)
    return distinct


class Terminal(io.StringIO):
    """A stream that says it is a terminal: progress bars draw into it."""

    def isatty(self) -> bool:
        return True


def run_on_terminal(command: list, timeout: float, **kwargs) -> tuple[int, str]:
    """(exit code, everything it wrote) of command run with a pseudo-terminal as its stdin,
    stdout and stderr, as in an interactive shell."""
    main_fd, child_fd = pty.openpty()
    fcntl.ioctl(child_fd, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # rows, columns
    child = subprocess.Popen(command, stdin=child_fd, stdout=child_fd, stderr=child_fd, **kwargs)
    os.close(child_fd)
    chunks = []
    try:
        while True:
            try:
                chunk = os.read(main_fd, 65536)
            except OSError:  # EIO: every holder of the terminal's other end has closed it
                break
            if not chunk:
                break
            chunks.append(chunk)
        return child.wait(timeout=timeout), b"".join(chunks).decode(errors="replace")
    finally:
        os.close(main_fd)
        if child.poll() is None:
            child.kill()


def start_server(source, *flags: str) -> tuple[subprocess.Popen, str]:
    """`moe serve SOURCE FLAGS` on a free port, returned once /health answers: (process, URL)."""
    import sys
    import time

    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = [sys.executable, "-m", "moe", "serve", str(source), "--port", str(port), *flags]
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    for _ in range(240):
        try:
            if httpx.get(f"{url}/health").status_code == 200:
                return process, url
        except httpx.TransportError:
            time.sleep(0.25)
    process.kill()
    raise RuntimeError(f"moe serve did not answer on {url} within a minute")
