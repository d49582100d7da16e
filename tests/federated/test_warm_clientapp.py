"""Warm ClientApps: the ``flwr-clientapp`` shim hands its call to the site's preloaded process, which forks it.

A stand-in ``sleep`` plays the SuperNode; the shim is the one ``fadal site`` puts on the SuperNode's PATH, run as
the SuperExec runs it. Real Flower ClientApps running warm, end to end, are tests/integration/test_deployment.py."""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from fadal.federated import processes, warm_clientapp


def start(home: Path, node: list[str]) -> tuple[subprocess.Popen, Path, Path]:
    sock, log = warm_clientapp.socket_path(home), home / "warm.log"
    home.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen([sys.executable, "-m", "fadal.federated.warm_clientapp", "--socket", str(sock), "--",
                             *node], stdout=log.open("ab"), stderr=subprocess.STDOUT)
    return proc, sock, log


def wait_until(condition, timeout: float, what: str) -> None:
    end = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > end:
            pytest.fail(f"not within {timeout:.0f} s: {what}")
        time.sleep(0.1)


def forked_clientapps(supervisor: subprocess.Popen) -> list[int]:
    """The supervisor's children that are forks of it (same command line), not the SuperNode it started."""
    own = Path(f"/proc/{supervisor.pid}/cmdline").read_bytes()
    return [pid for pid, _ in processes.descendants(supervisor.pid)
            if Path(f"/proc/{pid}/cmdline").exists() and Path(f"/proc/{pid}/cmdline").read_bytes() == own]


class SilentRuntimeApi:
    """Accepts the ClientApp's connections and never answers (its first request waits 30 s): a ClientApp
    mid-task. ``close()`` drops them all and refuses new ones, so that whatever Flower does on exit fails fast."""

    def __init__(self) -> None:
        self.server = socket.create_server(("127.0.0.1", 0))
        self.address, self.conns = f"127.0.0.1:{self.server.getsockname()[1]}", []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                self.conns.append(self.server.accept()[0])
            except OSError:
                return

    def close(self) -> None:
        self.server.close()
        for conn in self.conns:
            conn.close()


def clientapp_mid_task(shim: str, env: dict, api: SilentRuntimeApi) -> subprocess.Popen:
    return subprocess.Popen([shim, "--token", "t0ken", "--insecure", "--runtime-api-address", api.address], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


@pytest.fixture(scope="module")
def warm(tmp_path_factory):
    home = tmp_path_factory.mktemp("warm") / "home"
    proc, sock, log = start(home, ["sleep", "600"])
    try:
        wait_until(lambda: "imported in" in log.read_text() or proc.poll() is not None, 180, "the preload")
        assert proc.poll() is None, log.read_text()
        env = processes.supernode_env(home, sock)
        yield proc, env, shutil.which("flwr-clientapp", path=env["PATH"])
    finally:
        processes.stop([proc])


def test_a_clientapp_call_runs_in_a_fork_of_the_warm_process(warm):
    proc, env, shim = warm
    res = subprocess.run([shim, "--help"], env=env, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and "--runtime-api-address" in res.stdout, res.stdout + res.stderr  # Flower's CLI, on
    res = subprocess.run([shim, "--no-such-flag"], env=env, capture_output=True, text=True, timeout=60)  # the shim's
    assert res.returncode == 2 and "is required" in res.stderr, res.stderr  # streams, its exit code

    # A ClientApp mid-task is a fork of the warm process, not a new interpreter; stopping its shim stops it.
    api = SilentRuntimeApi()
    task = clientapp_mid_task(shim, env, api)
    try:
        wait_until(lambda: len(forked_clientapps(proc)) == 1 and api.conns, 30, "a forked ClientApp to connect")
        assert task.poll() is None
        task.send_signal(signal.SIGTERM)  # SuperExec stopping the task: Flower's exit handlers run in the ClientApp
        api.close()
        task.wait(timeout=30)  # Flower's "Task stopped." exit (code 0)
        wait_until(lambda: not forked_clientapps(proc), 10, "the ClientApp to end")
    finally:
        task.kill()
        api.close()


def test_a_clientapp_whose_shim_dies_is_stopped(warm):
    proc, env, shim = warm
    api = SilentRuntimeApi()
    task = clientapp_mid_task(shim, env, api)
    try:
        wait_until(lambda: len(forked_clientapps(proc)) == 1 and api.conns, 30, "a forked ClientApp to connect")
        task.kill()  # SIGKILL: nothing is forwarded, the connection to the warm process just closes
        task.wait()
        api.close()
        wait_until(lambda: not forked_clientapps(proc), warm_clientapp.GRACE_S + 5, "the orphaned ClientApp to end")
        assert proc.poll() is None  # the warm process serves on
    finally:
        api.close()


def test_without_a_warm_process_the_shim_runs_cold(tmp_path):
    env = processes.supernode_env(tmp_path / "home", tmp_path / "nobody-listens.sock")
    res = subprocess.run([shutil.which("flwr-clientapp", path=env["PATH"]), "--help"], env=env,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "--runtime-api-address" in res.stdout, res.stdout + res.stderr


def test_the_supernode_stops_with_its_warm_process(tmp_path):
    """SIGTERM is passed on (the SuperNode's exit code comes back); SIGKILL takes the SuperNode along (Linux)."""
    proc, _, log = start(tmp_path / "a", ["sleep", "600"])
    wait_until(lambda: processes.descendants(proc.pid), 30, "the SuperNode to start")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 128 + signal.SIGTERM, log.read_text()  # the SuperNode's: SIGTERM ended it

    proc, _, _ = start(tmp_path / "b", ["sleep", "600"])
    wait_until(lambda: processes.descendants(proc.pid), 30, "the SuperNode to start")
    node = processes.descendants(proc.pid)[0]
    proc.kill()
    proc.wait()
    wait_until(lambda: not processes.alive(node), 10, "the SuperNode to die with its warm process")
