"""SuperLink and SuperNode processes: started with the flags a hospital federation needs, stopped cleanly.

Flower's own executables (``flower-superlink``, ``flower-supernode``) with TLS, SuperNode authentication,
persisted SuperLink state and no runtime ``uv sync``. Processes are stopped by the ids they were started
with, their descendants (ServerApp, ClientApps) included, so nothing keeps training after its parent stopped.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from fadal.errors import FadalInputError
from fadal.federated.app_vetting import write_shims
from fadal.federated.certificates import CONTROL_DIGEST, SITE_KEY, SITE_NAME
from fadal.federated.flower_cli import executable, flower_env
from fadal.federated.warm_clientapp import SOCKET_ENV, socket_path


def _popen(cmd: list[str], flwr_home: str | Path, log: str | Path | None,
           env: dict[str, str] | None = None) -> subprocess.Popen:
    out = open(log, "ab") if log is not None else None  # noqa: SIM115 - handed to the child
    try:
        return subprocess.Popen(cmd, env=env or flower_env(flwr_home), stdout=out, stderr=subprocess.STDOUT if out else None,
                                stdin=subprocess.DEVNULL)
    finally:
        if out is not None:
            out.close()


def wait_for_port(host: str, port: int, proc: subprocess.Popen | None = None, timeout: float = 60) -> None:
    """Block until something listens on host:port (raise if ``proc`` died first)."""
    host = "127.0.0.1" if host in ("0.0.0.0", "") else ("::1" if host == "::" else host)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            name = Path(proc.args[0]).name
            raise RuntimeError(f"{name} exited with code {proc.returncode} before listening on port {port}")
        try:
            with socket.create_connection((host, port), timeout=1):
                return
        except OSError:
            time.sleep(0.2)
    raise TimeoutError(f"nothing listens on {host}:{port} after {timeout:.0f} s")


def start_superlink(certs: str | Path, port: int, database: str | Path, flwr_home: str | Path,
                    host: str = "0.0.0.0", log: str | Path | None = None) -> subprocess.Popen:
    """Start ``flower-superlink`` (TLS, SuperNode authentication, state persisted in ``database``).

    ``certs`` is the coordinator folder of :func:`fadal.federated.certificates.make_certificates`. One
    port serves the Fleet API (SuperNodes), the Control API (``flwr run``) and the ServerApp runtime.
    Apps run with the Python environment already installed here: no ``uv sync`` of the app's
    dependencies on every run. The Control API takes only calls with the operator's token (whose SHA-256
    is ``certs/control.sha256``; see :mod:`fadal.federated.superlink`). Registering the sites' public keys
    is :func:`fadal.federated.flower_cli.register_supernodes`, once the port is open.
    """
    c = Path(certs).resolve()
    if not (c / CONTROL_DIGEST).is_file():
        raise FadalInputError(f"{c}: no {CONTROL_DIGEST} (the operator token's SHA-256): re-run `fadal certs --out "
                              f"DIR` (with --ca if the CA is elsewhere) to make the operator's token, then start again")
    # Flower's own superlink, with a longer SQLite lock wait and the operator token on its Control API.
    cmd = [sys.executable, "-m", "fadal.federated.superlink", "--fadal-control-digest", str(c / CONTROL_DIGEST),
           "--host", host, "--port", str(port),
           "--ssl-ca-certfile", str(c / "ca.crt"), "--ssl-certfile", str(c / "server.crt"),
           "--ssl-keyfile", str(c / "server.key"), "--enable-supernode-auth",
           "--database", str(Path(database).resolve()), "--disable-runtime-dependency-installation"]
    return _popen(cmd, flwr_home, log)


def start_supernode(certs: str | Path, superlink: str, data: str | Path, name: str, port: int,
                    flwr_home: str | Path, cache_dir: str | Path | None = None, amplified: str | Path | None = None,
                    log: str | Path | None = None, policy: str | Path | None = None,
                    warm: bool = True) -> subprocess.Popen:
    """Start ``flower-supernode`` for one hospital; its ClientApp reads only ``data`` (and ``amplified``).

    ``certs`` is the hospital's key folder: ``supernode.key`` from
    :func:`fadal.federated.certificates.make_site_keys` and the coordinator's ``ca.crt``; ``port`` is the
    SuperNode's local runtime API (loopback only; one per SuperNode on a machine).
    The paths travel in ``--node-config``: they stay on this machine and are never sent anywhere.
    ``policy``: the site's privacy policy YAML (:class:`fadal.config.SitePolicy`), read by every ClientApp.
    The SuperNode's ClientApps start through :func:`fadal.federated.app_vetting.write_shims` (first on its
    PATH): only FADAL's own bundle, or one the policy allow-lists, runs.
    ``warm``: the returned process is :func:`fadal.federated.warm_clientapp.supervise` running the SuperNode,
    and every ClientApp forks from it with torch and MONAI already imported (``False``: each ClientApp is
    a fresh interpreter, Flower's default).
    """
    c = Path(certs).resolve()
    if not (c / SITE_KEY).is_file():
        raise FadalInputError(f"{c}: no {SITE_KEY} (this site's private key); make it here with "
                              f"`fadal site-keys --name {name} --out {certs}` and send the .pub to the coordinator")
    mode = (c / SITE_KEY).stat().st_mode & 0o777
    if mode & 0o077 and os.name == "posix":  # as ssh does: a key others can read may already be someone else's
        raise FadalInputError(f"{c / SITE_KEY}: this site's private key is readable or writable by other users "
                              f"(mode {oct(mode)}); run `chmod 600 {c / SITE_KEY}`, "
                              "and make a new key pair if anyone else may have copied it")
    if not (c / "ca.crt").is_file():
        raise FadalInputError(f"{c}: no ca.crt; put here the ca.crt the coordinator sent (its `fadal certs` "
                              f"output {name}/ca.crt)")
    paths = {"data-path": Path(data).resolve(), "cache-dir": Path(cache_dir or Path(data) / ".fadal_cache").resolve()}
    if amplified is not None:
        paths["amplified-path"] = Path(amplified).resolve()
    if policy is not None:
        paths["policy-path"] = Path(policy).resolve()
    if any("'" in str(p) for p in paths.values()) or not SITE_NAME.match(name):
        raise FadalInputError(f"site name {name!r} or a path contains a quote or odd characters: {paths}")
    node_config = " ".join([f"{k}='{p.as_posix()}'" for k, p in paths.items()] + [f"site-name='{name}'"]
                           + (["use-amplified=true"] if amplified is not None else []))
    cmd = [executable("flower-supernode"), "--superlink", superlink, "--root-certificates", str(c / "ca.crt"),
           "--auth-supernode-private-key", str(c / SITE_KEY), "--host", "127.0.0.1", "--port", str(port),
           "--node-config", node_config, "--isolation", "subprocess"]
    if not warm:
        return _popen(cmd, flwr_home, log, env=supernode_env(flwr_home))
    sock = socket_path(flwr_home)
    cmd = [sys.executable, "-m", "fadal.federated.warm_clientapp", "--socket", str(sock), "--", *cmd]
    return _popen(cmd, flwr_home, log, env=supernode_env(flwr_home, sock))


def supernode_env(flwr_home: str | Path, warm_socket: str | Path | None = None) -> dict[str, str]:
    """:func:`~fadal.federated.flower_cli.flower_env` with ``FLWR_HOME/fadal-bin`` first on PATH: the checked
    ``flwr-clientapp`` of :func:`~fadal.federated.app_vetting.write_shims` (rewritten at every start), which
    hands its work to the warm process at ``warm_socket`` when there is one."""
    env = flower_env(flwr_home)
    shims = write_shims(Path(env["FLWR_HOME"]) / "fadal-bin")
    env["PATH"] = os.pathsep.join([str(shims), env["PATH"]])
    env.pop(SOCKET_ENV, None)
    if warm_socket is not None:
        env[SOCKET_ENV] = str(warm_socket)
    return env


#: A process as (pid, start time): pids are reused quickly on a busy machine (pid_max may be 32768).
ProcessId = tuple[int, int]


def _stat(pid: int) -> list[str] | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def descendants(pid: int) -> list[ProcessId]:
    """Every process ``pid`` started, and those started, ... (Linux /proc; empty elsewhere)."""
    children: dict[int, list[ProcessId]] = {}
    for entry in Path("/proc").glob("[0-9]*"):
        fields = _stat(int(entry.name))
        if fields is not None:  # fields[1]: parent pid, fields[19]: start time
            children.setdefault(int(fields[1]), []).append((int(entry.name), int(fields[19])))
    found: list[ProcessId] = []
    todo = [pid]
    while todo:
        kids = children.get(todo.pop(), [])
        found += kids
        todo += [k for k, _ in kids]
    return found


def alive(proc: ProcessId) -> bool:
    """Still running (not a zombie) and not a newer process that got the same pid."""
    fields = _stat(proc[0])
    return fields is not None and fields[0] != "Z" and int(fields[19]) == proc[1]


def stop(handles: list[subprocess.Popen], timeout: float = 15) -> None:
    """SIGTERM (Flower deactivates SuperNodes and stops its helpers), wait, then SIGKILL what is left.

    Descendants are collected first and killed if they outlive their parent, so that no ServerApp
    or ClientApp keeps running (or writing checkpoints) after its SuperLink or SuperNode stopped.
    """
    kids = [k for h in handles if h.poll() is None for k in descendants(h.pid)]
    for h in handles:
        if h.poll() is None:
            h.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for h in handles:
        try:
            h.wait(max(deadline - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            h.kill()
            h.wait()
    end = time.monotonic() + 5
    while (leftovers := [k for k in kids if alive(k)]) and time.monotonic() < end:
        time.sleep(0.2)
    for pid, _ in leftovers:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def wait_foreground(handles: list[subprocess.Popen]) -> int | None:
    """Wait while the processes run (``fadal server`` / ``fadal site`` in the foreground).

    Returns the exit code of the first one to end (the others are stopped), or ``None`` when
    Ctrl-C or SIGTERM (systemd, docker stop) interrupted: then all are stopped, so no orphaned
    SuperLink keeps the port or SuperNode keeps training.
    """
    def interrupt(*_) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        while True:
            for h in handles:
                if h.poll() is not None:
                    stop(handles)
                    return h.returncode
            time.sleep(0.5)
    except KeyboardInterrupt:
        stop(handles)
        return None
    finally:
        signal.signal(signal.SIGTERM, previous)
