"""Flower's deployment engine for FADAL: keys, a SuperLink, SuperNodes and runs.

All networking is Flower's own (``flower-superlink``, ``flower-supernode``, ``flwr``); this module
writes the keys and the small config files those executables read, starts them with the flags a
hospital federation needs (TLS, SuperNode authentication, persisted SuperLink state, no runtime
``uv sync``) and reads run status back, because ``flwr run --stream`` exits 0 even when the
ServerApp failed.

Folder written by :func:`make_certificates` (each sub-folder goes to exactly one party)::

    certs/coordinator/ca.crt ca.key server.crt server.key   the coordinator (keys: secret)
    certs/coordinator/supernodes/<site>.pub                 public keys the SuperLink accepts
    certs/<site>/ca.crt supernode.key supernode.pub          hospital <site> (supernode.key: secret)
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fadal.errors import FadalInputError

#: Name of the SuperLink connection in ``$FLWR_HOME/config.toml`` (``flwr run . fadal``).
CONNECTION = "fadal"
COORDINATOR = "coordinator"
_SITE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,31}$")


# --------------------------------------------------------------------------------------------------
# Keys and certificates
# --------------------------------------------------------------------------------------------------

def _write_secret(path: Path, data: bytes) -> None:
    """Private keys are created 0600 from the start (never world-readable, not even briefly)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(path, 0o600)


def _write_public(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def _new_key() -> ec.EllipticCurvePrivateKey:
    # P-384: the curve Flower itself uses for SuperNode keys; fine for TLS as well.
    return ec.generate_private_key(ec.SECP384R1())


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _issue(subject: str, key: ec.EllipticCurvePrivateKey, issuer: x509.Certificate | None,
           issuer_key: ec.EllipticCurvePrivateKey, days: int, san: list[x509.GeneralName] | None) -> x509.Certificate:
    now = dt.datetime.now(dt.timezone.utc)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    builder = (x509.CertificateBuilder().subject_name(name)
               .issuer_name(issuer.subject if issuer else name)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days))
               .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False))
    if issuer is None:  # the CA
        builder = (builder.add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                   .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                                content_commitment=False, key_encipherment=False,
                                                data_encipherment=False, key_agreement=False,
                                                encipher_only=False, decipher_only=False), critical=True))
    else:  # the SuperLink's server certificate
        builder = (builder.add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                   .add_extension(x509.SubjectAlternativeName(san or []), critical=False)
                   .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
                   .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()),
                                  critical=False))
    return builder.sign(issuer_key, hashes.SHA384())


def _san(hosts: list[str]) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = []
    for host in dict.fromkeys(hosts):  # ordered, no duplicates
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return names


def make_certificates(out_dir: str | Path, sites: list[str], server_host: str = "127.0.0.1") -> dict:
    """Write a CA, the SuperLink's TLS certificate and one SuperNode key pair per site.

    Re-running with more sites adds them and keeps the existing CA and site keys (hospitals that are
    already set up need nothing new); the server certificate is re-issued so that a changed
    ``server_host`` takes effect. The server certificate names ``server_host`` plus ``localhost``,
    ``127.0.0.1`` and ``::1``: the SuperLink's own ServerApp process connects back over loopback.
    Site keys are OpenSSH-format ECDSA P-384, what ``flower-supernode --auth-supernode-private-key``
    and ``flwr supernode register`` read.
    """
    out = Path(out_dir)
    bad = [s for s in sites if not _SITE_NAME.match(s) or s == COORDINATOR]
    if bad or not sites:
        raise FadalInputError(f"site names must be 1-32 letters, digits, '_', '-', '.' and not "
                              f"{COORDINATOR!r}; got {bad or sites}")
    coord = out / COORDINATOR
    ca_crt, ca_key_path = coord / "ca.crt", coord / "ca.key"
    if ca_crt.exists() and ca_key_path.exists():
        ca = x509.load_pem_x509_certificate(ca_crt.read_bytes())
        ca_key = serialization.load_pem_private_key(ca_key_path.read_bytes(), None)
    else:
        ca_key = _new_key()
        ca = _issue("FADAL federation CA", ca_key, None, ca_key, days=3650, san=None)
        _write_secret(ca_key_path, _pem_key(ca_key))
        _write_public(ca_crt, ca.public_bytes(serialization.Encoding.PEM))

    server_key = _new_key()
    server = _issue(server_host, server_key, ca, ca_key, days=825,
                    san=_san([server_host, "localhost", "127.0.0.1", "::1"]))
    _write_secret(coord / "server.key", _pem_key(server_key))
    _write_public(coord / "server.crt", server.public_bytes(serialization.Encoding.PEM))

    site_dirs: dict[str, Path] = {}
    for site in sites:
        folder = out / site
        priv, pub = folder / "supernode.key", folder / "supernode.pub"
        if not priv.exists():
            key = _new_key()
            _write_secret(priv, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                                  serialization.NoEncryption()))
            _write_public(pub, key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                             serialization.PublicFormat.OpenSSH) + b"\n")
        shutil.copyfile(ca_crt, folder / "ca.crt")
        _write_public(coord / "supernodes" / f"{site}.pub", pub.read_bytes())
        site_dirs[site] = folder
    return {
        "coordinator": coord, "ca_cert": ca_crt, "ca_key": ca_key_path,
        "server_cert": coord / "server.crt", "server_key": coord / "server.key",
        "sites": site_dirs, "public_keys": {s: coord / "supernodes" / f"{s}.pub" for s in sites},
    }


# --------------------------------------------------------------------------------------------------
# Processes
# --------------------------------------------------------------------------------------------------

def _exe(name: str) -> str:
    """Flower's executables from this interpreter's environment first (a venv need not be on PATH)."""
    local = Path(sys.executable).parent / name
    return str(local) if local.exists() else (shutil.which(name) or name)


def flower_env(flwr_home: str | Path) -> dict[str, str]:
    """Environment for every Flower process: its state in ``flwr_home``, nothing sent home.

    The SuperLink and SuperNodes start helpers (``flower-superexec``, ``flwr-serverapp``,
    ``flwr-clientapp``) by name, so this environment's ``bin`` goes first on ``PATH``.
    """
    home = Path(flwr_home).resolve()
    home.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env.update(FLWR_HOME=str(home), FLWR_TELEMETRY_ENABLED="0", FLWR_DISABLE_UPDATE_CHECK="1",
               UV_CACHE_DIR=str(home / "uv-cache"),
               PATH=os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")]))
    return env


def write_connection(flwr_home: str | Path, address: str, ca_cert: str | Path, name: str = CONNECTION) -> Path:
    """``$FLWR_HOME/config.toml`` naming the SuperLink for ``flwr run/ls/supernode register``."""
    path = Path(flwr_home) / "config.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f'[superlink]\ndefault = "{name}"\n\n[superlink.{name}]\naddress = "{address}"\n'
                    f'root-certificates = "{Path(ca_cert).resolve().as_posix()}"\n')
    return path


def _popen(cmd: list[str], flwr_home: str | Path, log: str | Path | None) -> subprocess.Popen:
    out = open(log, "ab") if log is not None else None  # noqa: SIM115 - handed to the child
    try:
        return subprocess.Popen(cmd, env=flower_env(flwr_home), stdout=out, stderr=subprocess.STDOUT if out else None,
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

    ``certs`` is the coordinator folder of :func:`make_certificates`. One port serves the Fleet API
    (SuperNodes), the Control API (``flwr run``) and the ServerApp runtime. Apps run with the Python
    environment already installed here: no ``uv sync`` of the app's dependencies on every run.
    Registering the sites' public keys is :func:`register_supernodes`, once the port is open.
    """
    c = Path(certs).resolve()
    # Flower's own superlink, with a longer SQLite lock wait (see fadal.federated.superlink).
    cmd = [sys.executable, "-m", "fadal.federated.superlink", "--host", host, "--port", str(port),
           "--ssl-ca-certfile", str(c / "ca.crt"), "--ssl-certfile", str(c / "server.crt"),
           "--ssl-keyfile", str(c / "server.key"), "--enable-supernode-auth",
           "--database", str(Path(database).resolve()), "--disable-runtime-dependency-installation"]
    return _popen(cmd, flwr_home, log)


def _flwr(args: list[str], flwr_home: str | Path, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([_exe("flwr"), *args], env=flower_env(flwr_home), capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)


def register_supernodes(certs: str | Path, flwr_home: str | Path, federation: str = CONNECTION) -> list[str]:
    """Register every ``certs/supernodes/<site>.pub`` with the SuperLink (``flwr supernode register``).

    With ``--enable-supernode-auth`` a SuperNode may connect only with a registered key. Keys
    already registered (a restarted SuperLink keeps them in its database) are fine. Needs the
    SuperLink's port open and :func:`write_connection` in ``flwr_home``.
    """
    keys = sorted((Path(certs) / "supernodes").glob("*.pub"))
    procs = [(k, subprocess.Popen([_exe("flwr"), "supernode", "register", str(k.resolve()), federation,
                                   "--name", k.stem], env=flower_env(flwr_home), stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True, stdin=subprocess.DEVNULL)) for k in keys]
    for key, proc in procs:
        out = proc.communicate(timeout=120)[0]
        if proc.returncode != 0 and "already in use" not in out:
            raise RuntimeError(f"registering {key} failed:\n{out}")
    return [k.stem for k in keys]


def start_supernode(certs: str | Path, superlink: str, data: str | Path, name: str, port: int,
                    flwr_home: str | Path, cache_dir: str | Path | None = None, amplified: str | Path | None = None,
                    log: str | Path | None = None, policy: str | Path | None = None) -> subprocess.Popen:
    """Start ``flower-supernode`` for one hospital; its ClientApp reads only ``data`` (and ``amplified``).

    ``certs`` is the site's folder of :func:`make_certificates` (``ca.crt``, ``supernode.key``);
    ``port`` is the SuperNode's local runtime API (loopback only; one per SuperNode on a machine).
    The paths travel in ``--node-config``: they stay on this machine and are never sent anywhere.
    ``policy``: the site's privacy policy YAML (:class:`fadal.config.SitePolicy`), read by every ClientApp.
    """
    c = Path(certs).resolve()
    paths = {"data-path": Path(data).resolve(), "cache-dir": Path(cache_dir or Path(data) / ".fadal_cache").resolve()}
    if amplified is not None:
        paths["amplified-path"] = Path(amplified).resolve()
    if policy is not None:
        paths["policy-path"] = Path(policy).resolve()
    if any("'" in str(p) for p in paths.values()) or not _SITE_NAME.match(name):
        raise FadalInputError(f"site name {name!r} or a path contains a quote or odd characters: {paths}")
    node_config = " ".join([f"{k}='{p.as_posix()}'" for k, p in paths.items()] + [f"site-name='{name}'"]
                           + (["use-amplified=true"] if amplified is not None else []))
    cmd = [_exe("flower-supernode"), "--superlink", superlink, "--root-certificates", str(c / "ca.crt"),
           "--auth-supernode-private-key", str(c / "supernode.key"), "--host", "127.0.0.1", "--port", str(port),
           "--node-config", node_config]
    return _popen(cmd, flwr_home, log)


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


# --------------------------------------------------------------------------------------------------
# Runs
# --------------------------------------------------------------------------------------------------

#: The Flower app bundle that ``flwr run`` ships: the ``[tool.flwr.app]`` of this repository's
#: pyproject.toml and nothing else. Every machine runs the FADAL installed there (the SuperLink and
#: SuperNodes install no dependencies), so no code needs to travel, and building the bundle from a
#: checkout would walk its whole virtual environment on every submission. A test keeps the two equal.
APP_PYPROJECT = """\
[project]
name = "fadal"
version = "{version}"
description = "FADAL federated 3D CT organ segmentation (app bundle: runs the installed fadal package)"

[tool.flwr.app]
publisher = "fadal"

[tool.flwr.app.components]
serverapp = "fadal.federated.server_app:app"
clientapp = "fadal.federated.client_app:app"

[tool.flwr.app.config]
fadal-config = ""
labels = ""
"""


def write_app(folder: str | Path) -> Path:
    """Write the app bundle's folder (a pyproject.toml only) for ``flwr run``; returns the folder."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        ver = version("fadal")
    except PackageNotFoundError:  # pragma: no cover - running from a bare source tree
        ver = "0.0.0"
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "pyproject.toml").write_text(APP_PYPROJECT.format(version=ver))
    return folder


def run_status(federation: str, run_id: int, flwr_home: str | Path) -> dict:
    """The run as ``flwr ls --format json`` reports it (``status`` e.g. ``finished:completed``)."""
    res = _flwr(["ls", federation, "--run-id", str(run_id), "--format", "json"], flwr_home)
    try:
        return json.loads(res.stdout)["runs"][0]
    except (json.JSONDecodeError, KeyError, IndexError):
        raise RuntimeError(f"cannot read the status of run {run_id}: {res.stdout}{res.stderr}") from None


def submit_run(app_dir: str | Path, federation: str, config_path: str | Path, flwr_home: str | Path,
               labels: dict[str, int] | None = None, timeout: float | None = None,
               echo=None) -> dict:
    """``flwr run APP FEDERATION --stream`` with the federation YAML, then the run's real status.

    The ServerApp runs on the SuperLink's machine and reads ``config_path`` there (the coordinator
    runs both). ``labels`` default to the YAML's ``labels:`` or the first site's ``dataset.json``
    when readable here. ``--stream`` exits 0 even when the ServerApp failed, so the returned dict
    is ``flwr ls``'s record of the run plus ``ok`` (``status == "finished:completed"``) and ``log``.
    """
    from fadal.config import FederationConfig, load_yaml
    from fadal.federated.simulation import federation_labels

    config_path = Path(config_path).resolve()
    cfg = load_yaml(FederationConfig, config_path)
    if labels is None:
        try:
            labels = federation_labels(cfg)
        except FadalInputError as err:
            raise FadalInputError(f"{config_path}: set `labels:` (no site's data here: {err})") from err
    labels_json = json.dumps(labels, separators=(",", ":"))
    if "'" in labels_json + str(config_path):
        raise FadalInputError("label names and the config path must not contain a single quote")
    run_config = f"fadal-config='{config_path.as_posix()}' labels='{labels_json}'"
    cmd = [_exe("flwr"), "run", str(Path(app_dir).resolve()), federation, "--run-config", run_config, "--stream"]
    proc = subprocess.Popen(cmd, env=flower_env(flwr_home), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, stdin=subprocess.DEVNULL)
    lines: list[str] = []
    run_id = None
    timer = threading.Timer(timeout, proc.terminate) if timeout else None
    try:
        if timer is not None:
            timer.start()
        for line in proc.stdout:  # type: ignore[union-attr]
            lines.append(line)
            if echo is not None:
                echo(line.rstrip("\n"))
            if run_id is None and (m := re.search(r"Successfully started run (\d+)", line)):
                run_id = int(m.group(1))
    finally:
        if timer is not None:
            timer.cancel()
        if proc.poll() is None:
            proc.terminate()
        proc.wait()
    if run_id is None:
        raise RuntimeError("flwr run did not start a run:\n" + "".join(lines[-30:]))
    status = run_status(federation, run_id, flwr_home)
    for _ in range(30):  # the stream can end a moment before the status is written
        if status["status"].startswith("finished"):
            break
        time.sleep(1)
        status = run_status(federation, run_id, flwr_home)
    return {**status, "run_id": run_id, "ok": status["status"] == "finished:completed", "log": "".join(lines)}
