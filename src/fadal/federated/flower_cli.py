"""Flower's command line (``flwr``) for a FADAL federation: the environment, connection, app bundle, runs.

All networking is Flower's own; this module writes the small files ``flwr`` reads (``$FLWR_HOME/config.toml``,
the app bundle's pyproject.toml), registers the sites' keys and submits runs, then reads the run's status
back, because ``flwr run --stream`` exits 0 even when the ServerApp failed.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

from fadal.errors import FadalInputError

#: Name of the SuperLink connection in ``$FLWR_HOME/config.toml`` (``flwr run . fadal``).
CONNECTION = "fadal"


def executable(name: str) -> str:
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


def write_connection(flwr_home: str | Path, address: str, ca_cert: str | Path, name: str = CONNECTION,
                     token: str | None = None) -> Path:
    """``$FLWR_HOME/config.toml`` naming the SuperLink for ``flwr run/ls/supernode register``.

    ``token``: the operator's Control API token (:func:`fadal.federated.certificates.read_operator_token`),
    stored where Flower's own ``flwr`` CLI reads account credentials (``$FLWR_HOME/credentials.yaml``,
    mode 0600, as ``flwr login`` would store an OIDC token for ``address``), so that every ``flwr``
    command sends it as ``Authorization: Bearer``. Without one, a token stored for ``address`` before is
    removed (the SuperLink of ``fadal server`` then refuses this home's Control API calls).
    """
    from flwr.cli.constant import ACCESS_TOKEN_STORE_KEY, AUTHN_TYPE_STORE_KEY, REFRESH_TOKEN_STORE_KEY
    from flwr.common.constant import AuthnType
    from flwr.supercore.credential_store import FileCredentialStore

    home = Path(flwr_home)
    path = home / "config.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f'[superlink]\ndefault = "{name}"\n\n[superlink.{name}]\naddress = "{address}"\n'
                    f'root-certificates = "{Path(ca_cert).resolve().as_posix()}"\n')
    store = FileCredentialStore(home / "credentials.yaml")  # Flower writes it 0600 (a mkstemp file replaced)
    keys = (AUTHN_TYPE_STORE_KEY % address, ACCESS_TOKEN_STORE_KEY % address, REFRESH_TOKEN_STORE_KEY % address)
    if token is None:
        for key in keys:
            store.delete(key)
    else:
        # The OIDC slots of Flower's CLI: it sends the access token on every call and, after a 401, asks once
        # to refresh with the refresh token (the same token: refused again, so the call fails).
        for key, value in zip(keys, (AuthnType.OIDC, token, token)):
            store.set(key, value.encode())
    return path


#: What ``flwr`` prints when the SuperLink's Control API refused its token (or the lack of one).
_REFUSED = "Authentication failed"


def _check_refused(output: str, what: str) -> None:
    """A clear error instead of Flower's hint to ``flwr login`` (which a FADAL SuperLink has no use for)."""
    if _REFUSED in output:
        raise RuntimeError(f"{what}: the SuperLink refused this command (HTTP 401: no operator token, or not the "
                           f"one `fadal certs` made for it). Give the operator's token: `--certs` with "
                           f"operator/control.token, or --operator-token FILE. Flower said:\n{output.strip()}")


def _flwr(args: list[str], flwr_home: str | Path, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([executable("flwr"), *args], env=flower_env(flwr_home), capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)


def register_supernodes(certs: str | Path, flwr_home: str | Path, federation: str = CONNECTION) -> list[str]:
    """Register every ``certs/supernodes/<site>.pub`` with the SuperLink (``flwr supernode register``).

    With ``--enable-supernode-auth`` a SuperNode may connect only with a registered key. Keys
    already registered (a restarted SuperLink keeps them in its database) are fine. Needs the
    SuperLink's port open and :func:`write_connection` in ``flwr_home``.
    """
    keys = sorted((Path(certs) / "supernodes").glob("*.pub"))
    procs = [(k, subprocess.Popen([executable("flwr"), "supernode", "register", str(k.resolve()), federation,
                                   "--name", k.stem], env=flower_env(flwr_home), stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True, stdin=subprocess.DEVNULL)) for k in keys]
    for key, proc in procs:
        out = proc.communicate(timeout=120)[0]
        _check_refused(out, f"registering {key}")
        if proc.returncode != 0 and "already in use" not in out:
            raise RuntimeError(f"registering {key} failed:\n{out}")
    return [k.stem for k in keys]


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
    _check_refused(res.stdout + res.stderr, f"reading the status of run {run_id}")
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
    cmd = [executable("flwr"), "run", str(Path(app_dir).resolve()), federation, "--run-config", run_config, "--stream"]
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
        _check_refused("".join(lines[-30:]), "flwr run did not start a run")
        raise RuntimeError("flwr run did not start a run:\n" + "".join(lines[-30:]))
    status = run_status(federation, run_id, flwr_home)
    for _ in range(30):  # the stream can end a moment before the status is written
        if status["status"].startswith("finished"):
            break
        time.sleep(1)
        status = run_status(federation, run_id, flwr_home)
    return {**status, "run_id": run_id, "ok": status["status"] == "finished:completed", "log": "".join(lines)}
