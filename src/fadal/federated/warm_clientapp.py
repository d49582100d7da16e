"""Warm ClientApps: each message's ClientApp forks from one preloaded process per site.

Flower's SuperExec starts a fresh ``flwr-clientapp --token ...`` for every message; a fresh interpreter
spends ~8 CPU-s importing torch, MONAI and FADAL before any work (13 s each when three sites start one
on two cores). ``fadal site`` therefore runs its SuperNode under :func:`supervise`: this process binds a
private Unix socket, starts ``flower-supernode`` as its child, imports once what a ClientApp needs and then
serves the socket. The ``flwr-clientapp`` of :func:`fadal.federated.app_vetting.write_shims` (:func:`shim`)
hands its command line, environment, working folder and standard streams to that socket and waits; the warm
process forks, and the child runs exactly what the shim would have run in its own interpreter (Flower's
``flwr-clientapp`` behind the bundle check of :mod:`fadal.federated.app_vetting`), then exits; the shim exits
with the child's exit code. Flower's protocol is untouched: the child is an ordinary ClientApp process that
talks to the SuperNode's runtime API with its own token, and being a fresh fork each time, no message sees
the memory of another. Without a warm process (or when it does not answer) the shim runs the same code cold.

Only this site's user can connect (a 0700 folder, and the peer's uid is checked); what a connection can ask
for is what running the shim can do: run the checked ClientApp with the token it was given.
"""

from __future__ import annotations

import json
import os
import selectors
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

#: Where the shim finds the warm process of its SuperNode (set by :func:`fadal.federated.processes.supernode_env`).
SOCKET_ENV = "FADAL_WARM_CLIENTAPP"
#: Seconds a ClientApp gets after its shim went away (SIGTERM: Flower reports the task failed) before SIGKILL.
GRACE_S = 10.0
_HEADER = struct.Struct("!I")


def socket_path(flwr_home: str | Path) -> Path:
    """The socket of the SuperNode whose Flower state is ``flwr_home``: inside it when the path fits a Unix
    socket address (108 bytes), else in a fresh private temporary folder."""
    path = Path(flwr_home).resolve() / "fadal-bin" / "warm-clientapp.sock"
    if len(os.fsencode(path)) < 100:
        return path
    return Path(tempfile.mkdtemp(prefix="fadal-warm-")) / "clientapp.sock"


# -- the shim's side ------------------------------------------------------------------------------------

def _hand_over(path: str) -> int | None:
    """Run this ``flwr-clientapp`` call in the warm process at ``path``: its exit code, or ``None`` when no warm
    process took it (then nothing ran, and the caller runs cold)."""
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        conn.connect(path)
        request = json.dumps({"argv": sys.argv, "env": dict(os.environ), "cwd": os.getcwd()}).encode()
        socket.send_fds(conn, [_HEADER.pack(len(request)) + request], [0, 1, 2])
    except OSError:
        conn.close()
        return None

    def forward(signum, _frame) -> None:  # SuperExec stopping the task: stop the ClientApp the same way
        try:
            conn.sendall(b"T")
        except OSError:
            pass

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    reply = b""
    while True:
        try:
            chunk = conn.recv(64)
        except InterruptedError:
            continue
        except OSError:
            chunk = b""
        if not chunk:
            break
        reply += chunk
    conn.close()
    if reply.startswith(b"X"):
        return int(reply[1:].split(b"\n", 1)[0])
    return None if not reply else 1


def shim() -> None:
    """``flwr-clientapp`` of a ``fadal site`` SuperNode: warm when its warm process answers, else cold."""
    path = os.environ.get(SOCKET_ENV)
    code = _hand_over(path) if path else None
    if code is not None:
        raise SystemExit(code)
    from fadal.federated.app_vetting import main

    main()


# -- the warm process ------------------------------------------------------------------------------------

def preload() -> None:
    """Import what every ClientApp of this site needs (torch, MONAI, Flower's runtime, FADAL's ClientApp)."""
    import flwr.supernode.cli.flwr_clientapp  # noqa: F401
    import flwr.supernode.runtime.run_clientapp  # noqa: F401

    import fadal.federated.app_vetting  # noqa: F401
    import fadal.federated.client_app  # noqa: F401
    import fadal.evaluate.evaluate  # noqa: F401 - imported by evaluate messages
    import fadal.plan.fingerprint  # noqa: F401 - imported by query (fingerprint) messages


def _receive(conn: socket.socket) -> tuple[dict, list[int]]:
    conn.settimeout(10)
    data, fds, _, _ = socket.recv_fds(conn, 1 << 20, 3)
    while len(data) < _HEADER.size or len(data) < _HEADER.size + _HEADER.unpack(data[:_HEADER.size])[0]:
        more = conn.recv(1 << 20)
        if not more:
            raise OSError("the shim hung up mid-request")
        data += more
    size = _HEADER.unpack(data[:_HEADER.size])[0]
    return json.loads(data[_HEADER.size:_HEADER.size + size]), list(fds)


def _run_child(request: dict, fds: list[int]) -> int:
    """In the forked child: become the shim's ``flwr-clientapp`` process and run it."""
    for target, fd in enumerate(fds[:3]):
        os.dup2(fd, target)
    for fd in fds:
        if fd > 2:
            os.close(fd)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    sys.argv = list(request["argv"])
    from fadal.federated.app_vetting import main

    try:
        main()
        return 0
    except SystemExit as err:
        return err.code if isinstance(err.code, int) else (0 if err.code is None else 1)
    except BaseException:  # noqa: BLE001 - a ClientApp process reports and exits like Flower's would
        import traceback

        traceback.print_exc()
        return 1
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass


class _Server:
    """Accept shims, fork one ClientApp each, report its exit code back (single-threaded: safe to fork)."""

    def __init__(self, listener: socket.socket) -> None:
        self.listener = listener
        self.selector = selectors.DefaultSelector()
        self.selector.register(listener, selectors.EVENT_READ)
        self.running: dict[int, socket.socket] = {}  # child pid -> its shim's connection
        self.kill_at: dict[int, float] = {}

    def accept(self) -> None:
        conn, _ = self.listener.accept()
        try:
            creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
            if struct.unpack("3i", creds)[1] != os.getuid():
                raise OSError("a process of another user connected")
            request, fds = _receive(conn)
        except (OSError, ValueError, KeyError) as err:
            print(f"fadal warm ClientApp: ignored a connection ({err})", file=sys.stderr, flush=True)
            conn.close()
            return
        pid = os.fork()
        if pid == 0:  # the child: nothing of the server's state is used from here on
            code = 1
            try:
                self.selector.close()
                self.listener.close()
                for other in self.running.values():
                    other.close()
                conn.close()
                for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD):
                    signal.signal(sig, signal.SIG_DFL)
                code = _run_child(request, fds)
            finally:
                os._exit(code)
        for fd in fds:
            os.close(fd)
        conn.setblocking(False)
        self.running[pid] = conn
        self.selector.register(conn, selectors.EVENT_READ, pid)

    def from_shim(self, conn: socket.socket, pid: int) -> None:
        try:
            data = conn.recv(64)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if data:  # the shim was told to stop its ClientApp
            self._send(pid, signal.SIGTERM)
        else:  # the shim is gone: stop the ClientApp, kill it if it does not stop
            self.selector.unregister(conn)
            self._send(pid, signal.SIGTERM)
            self.kill_at.setdefault(pid, time.monotonic() + GRACE_S)

    def _send(self, pid: int, sig: int) -> None:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass

    def reap(self) -> None:
        while self.running:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                break
            conn = self.running.pop(pid, None)
            self.kill_at.pop(pid, None)
            if conn is None:
                continue
            try:
                self.selector.unregister(conn)
            except (KeyError, ValueError):
                pass
            try:
                conn.setblocking(True)
                code = os.waitstatus_to_exitcode(status)
                conn.sendall(b"X%d\n" % (128 - code if code < 0 else code))  # killed by signal N: 128 + N
            except OSError:
                pass
            conn.close()
        now = time.monotonic()
        for pid, when in list(self.kill_at.items()):
            if now >= when:
                self._send(pid, signal.SIGKILL)
                del self.kill_at[pid]

    def step(self, timeout: float) -> None:
        for key, _ in self.selector.select(timeout):
            if key.fileobj is self.listener:
                self.accept()
            else:
                self.from_shim(key.fileobj, key.data)
        self.reap()

    def stop(self) -> None:
        for pid in list(self.running):
            self._send(pid, signal.SIGTERM)
        end = time.monotonic() + GRACE_S
        while self.running and time.monotonic() < end:
            self.reap()
            time.sleep(0.1)
        for pid in list(self.running):
            self._send(pid, signal.SIGKILL)
        self.reap()


def _die_with_parent() -> None:
    """In the SuperNode's child before exec: SIGKILL when this warm process dies (Linux), so no SuperNode
    outlives it and keeps taking tasks no one can run warm."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def supervise(path: str | Path, command: list[str]) -> int:
    """Serve warm ClientApps at ``path`` while ``command`` (the SuperNode) runs; its exit code (128 + N when
    signal N ended it, as a shell reports it).

    SIGTERM / SIGINT go to the SuperNode (Flower deactivates it and stops its ClientApps); then the
    ClientApps still running here get SIGTERM, and SIGKILL after :data:`GRACE_S`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    os.chmod(path.parent, 0o700)
    path.unlink(missing_ok=True)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o077)
    try:
        listener.bind(str(path))  # bound before the SuperNode starts: an early shim waits for the preload
    finally:
        os.umask(old)
    listener.listen(64)
    node = subprocess.Popen(command, preexec_fn=_die_with_parent)  # noqa: PLW1509 - no threads exist yet
    stopping: list[int] = []

    def forward(signum, _frame) -> None:
        stopping.append(signum)
        if node.poll() is None:
            node.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    server = _Server(listener)
    try:
        started = time.monotonic()
        preload()
        print(f"fadal warm ClientApp: torch, MONAI and FADAL imported in {time.monotonic() - started:.1f} s; every "
              f"ClientApp of this SuperNode forks from here ({path})", file=sys.stderr, flush=True)
        while node.poll() is None:
            server.step(0.5)
        return 128 - node.returncode if node.returncode < 0 else node.returncode  # killed by signal N: 128 + N
    finally:
        server.stop()
        listener.close()
        path.unlink(missing_ok=True)


def main(argv: list[str] | None = None) -> None:
    """``python -m fadal.federated.warm_clientapp --socket PATH -- flower-supernode ...``"""
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) < 4 or args[0] != "--socket" or args[2] != "--":
        raise SystemExit("usage: python -m fadal.federated.warm_clientapp --socket PATH -- COMMAND ...")
    raise SystemExit(supervise(args[1], args[3:]))


if __name__ == "__main__":
    main()
