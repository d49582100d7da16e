"""Only vetted code runs at a hospital: each ClientApp process of ``fadal site`` checks the run's app bundle first.

How Flower 1.42 runs a ClientApp (default ``--isolation subprocess``): the SuperNode starts
``flower-superexec`` by name, which starts ``flwr-clientapp --token ...`` by name, from PATH, for every
message. That process pulls the message, the run and its app bundle (FAB) from the SuperNode, unpacks the
bundle into ``$FLWR_HOME/apps/`` (checking only the hashes the bundle lists for itself), puts that folder
first on ``sys.path`` and imports the ClientApp its pyproject.toml names. So whoever submits a run decides
what code runs at the site, and a bundle carrying a ``fadal/`` package shadows the installed one.

``fadal site`` therefore puts the folder of :func:`write_shims` first on the SuperNode's PATH. Its
``flwr-clientapp`` runs Flower's own ``flwr-clientapp`` in this site's interpreter with one check between
pulling the bundle and unpacking it (:func:`check_bundle`): the bundle is FADAL's own (what
``flower_cli.write_app`` ships: a pyproject.toml naming :data:`FADAL_CLIENTAPP`, and no other file, so
nothing can be imported from it and FADAL comes from this site's installation, imported before Flower
touches ``sys.path``), or its SHA-256 is in the site policy's ``allowed_app_bundles``. Anything else is
refused: one log line here says why, and the coordinator gets the opaque
``FADAL-E-REFUSED-app-bundle-<ref>`` (:mod:`fadal.federated.site_errors`). Installing the bundle's
dependencies at run time stays off whatever the SuperNode is told. The other task executables Flower's
SuperExec may start (``flwr-agentapp``, ...) are refusing stubs in the same folder: a site runs ClientApps only.
"""

from __future__ import annotations

import hashlib
import importlib
import io
import shlex
import sys
import zipfile
from logging import ERROR, INFO
from pathlib import Path

from fadal.errors import FadalInputError, SiteRefusal

#: The ClientApp of FADAL's bundle (``[tool.flwr.app.components] clientapp`` of flower_cli.APP_PYPROJECT).
FADAL_CLIENTAPP = "fadal.federated.client_app:app"
#: Every file of FADAL's bundle: its pyproject.toml and Flower's manifest of the bundle's file hashes.
FADAL_BUNDLE_FILES = ("pyproject.toml", ".info/CONTENT")
#: The executable the SuperExec starts for a ClientApp; the others it knows are refused (:func:`write_shims`).
CLIENTAPP_COMMAND = "flwr-clientapp"
RULE = "app-bundle"


class AppBundleRefused(Exception):
    """Raised inside Flower's ClientApp process; its text, all the coordinator gets, is an opaque code."""


def bundle_hash(content: bytes) -> str:
    """The bundle's SHA-256 (hex), as Flower computes it and as ``allowed_app_bundles`` lists it."""
    return hashlib.sha256(content).hexdigest()


def _refuse(detail: str) -> SiteRefusal:
    return SiteRefusal(RULE, detail)


def _pyproject(zf: zipfile.ZipFile) -> dict:
    try:
        import tomllib
    except ImportError:  # Python 3.10
        import tomli as tomllib
    try:
        return tomllib.loads(zf.read("pyproject.toml").decode("utf-8"))
    except KeyError:
        raise _refuse("the bundle has no pyproject.toml") from None
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as err:
        raise _refuse(f"the bundle's pyproject.toml is not valid TOML ({err})") from None


def check_bundle(content: bytes, allowed: frozenset[str] | set[str] = frozenset(), fab_id: str | None = None,
                 fab_version: str | None = None, fab_hash: str | None = None) -> str:
    """Whether this site runs the bundle ``content``: ``"fadal"`` (FADAL's own), ``"allow-listed"`` (its hash is
    in ``allowed``), else a :class:`~fadal.errors.SiteRefusal` saying why.

    ``fab_id``, ``fab_version``, ``fab_hash``: what the run says about its bundle; Flower loads the ClientApp
    from the folder they name, so they must name this bundle (not another one installed here earlier)."""
    digest = bundle_hash(content)
    if fab_hash is not None and fab_hash != digest:
        raise _refuse(f"the run names bundle {fab_hash} but the bundle it sent is {digest}")
    try:
        zf = zipfile.ZipFile(io.BytesIO(content))
        names = [info.filename for info in zf.infolist()]
    except (zipfile.BadZipFile, OSError, ValueError) as err:
        raise _refuse(f"the bundle is not a readable zip archive ({err})") from None
    with zf:
        config = _pyproject(zf)
    try:
        app = config["tool"]["flwr"]["app"]
        ident = f"{app['publisher']}/{config['project']['name']}"
        version = str(config["project"]["version"])
        clientapp = app["components"].get("clientapp")
    except (KeyError, TypeError, AttributeError):
        raise _refuse("the bundle's pyproject.toml lacks [project] name/version or [tool.flwr.app] "
                      "publisher/components") from None
    if (fab_id is not None and fab_id != ident) or (fab_version is not None and fab_version != version):
        raise _refuse(f"the run names app {fab_id} {fab_version} but its bundle is {ident} {version}")
    if digest in allowed:
        return "allow-listed"
    extra = sorted(set(names) - set(FADAL_BUNDLE_FILES))
    if extra or len(names) != len(set(names)):
        shadow = [n for n in extra if n.split("/", 1)[0].split(".", 1)[0] == "fadal"]
        raise _refuse(f"the bundle carries files besides FADAL's pyproject.toml ({', '.join(extra[:6]) or 'duplicates'}"
                      f"{', ...' if len(extra) > 6 else ''})"
                      + ("; its fadal package would shadow the installed FADAL" if shadow else "")
                      + f"; to run it anyway, add its hash {digest} to the site policy's allowed_app_bundles")
    if clientapp != FADAL_CLIENTAPP:
        raise _refuse(f"the bundle's ClientApp is {clientapp!r}, not FADAL's {FADAL_CLIENTAPP!r}; to run it "
                      f"anyway, add its hash {digest} to the site policy's allowed_app_bundles")
    return "fadal"


def allowed_bundles(node_config: dict) -> frozenset[str]:
    """The bundle hashes this site's policy (``--node-config policy-path``, set by ``fadal site``) allows."""
    from fadal.config import SitePolicy, load_yaml

    path = node_config.get("policy-path")
    if not path:
        return frozenset()
    return frozenset(load_yaml(SitePolicy, str(path)).allowed_app_bundles)


def guard(runtime) -> None:
    """Wrap ``pull_task_input`` and ``install_from_fab`` of Flower's ``flwr.supernode.runtime.run_clientapp``
    (``runtime``) so that no bundle is unpacked, let alone imported, before :func:`check_bundle` passed.

    A refusal raises :class:`AppBundleRefused` inside Flower's ``run_clientapp``, which logs it and replies
    to the message with an error whose reason is the exception's text: the opaque code only."""
    from flwr.supercore import log

    from fadal.federated.site_errors import error_code

    pull, install = runtime.pull_task_input, runtime.install_from_fab
    pulled: dict = {}

    def checked_pull(client):
        message, context, run, fab = pull(client)
        pulled.update(context=context, run=run, fab=fab)
        return message, context, run, fab

    def checked_install(fab_file, *args, **kwargs):
        run, fab, context = pulled.get("run"), pulled.get("fab"), pulled.get("context")
        digest = bundle_hash(fab_file) if isinstance(fab_file, bytes) else "?"
        try:
            if run is None or not isinstance(fab_file, bytes) or fab_file != fab.content:
                raise _refuse("asked to install a bundle this process did not pull with its task")
            verdict = check_bundle(fab_file, allowed_bundles(dict(context.node_config)), run.fab_id,
                                   run.fab_version, fab.hash_str)
            if verdict == "fadal":  # from this site's installation, before Flower puts the bundle first on sys.path
                importlib.import_module(FADAL_CLIENTAPP.split(":")[0])
        except Exception as err:  # noqa: BLE001 - anything else would reach the coordinator as str(err)
            code = error_code(err)
            log(ERROR, "%s: app bundle %s of run %s refused, nothing of it ran (this text stays at the site): %s",
                code, digest, getattr(run, "run_id", "?"), " ".join(str(err).split()))
            raise AppBundleRefused(code) from None
        log(INFO, "app bundle %s of run %s checked: %s", digest[:16], run.run_id,
            "FADAL's own ClientApp, from this site's installation" if verdict == "fadal"
            else "allow-listed by the site policy")
        return install(fab_file, *args, **kwargs)

    runtime.pull_task_input, runtime.install_from_fab = checked_pull, checked_install


def main() -> None:
    """``flwr-clientapp`` of :func:`write_shims`: Flower's own, guarded, never installing dependencies."""
    import flwr.supernode.runtime.run_clientapp as runtime
    from flwr.supernode.cli import flwr_clientapp

    guard(runtime)
    sys.argv = [a for a in sys.argv if a != "--allow-runtime-dependency-installation"]
    flwr_clientapp()


def refuse_task() -> None:
    """Every other executable of :func:`write_shims`: this site runs ClientApps only."""
    from flwr.supercore import log

    log(ERROR, "FADAL-E-REFUSED-%s: %s refused: this site runs FADAL's ClientApp only", RULE, Path(sys.argv[0]).name)
    raise SystemExit(1)


_SHIM = """#!/bin/sh
'''exec' {python} "$0" "$@"
' '''
# Written by `fadal site`: {what} (fadal.federated.app_vetting).
from {module} import {entry}
{entry}()
"""


def write_shims(folder: str | Path, python: str | None = None) -> Path:
    """Write ``flwr-clientapp`` (:func:`main`, warm where it can: :func:`fadal.federated.warm_clientapp.shim`)
    and refusing stubs for Flower's other task executables into
    ``folder`` (the SuperNode's PATH starts there); returns ``folder``.

    They run this site's interpreter (``python``, default this one) on the script itself, so ``sys.path``
    starts with ``folder``, where nothing is importable; a POSIX shell starts them (the shebang line of a
    long interpreter path may not fit)."""
    from flwr.supercore.constant import TASK_TYPE_TO_COMMAND

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    python = shlex.quote(python or sys.executable)
    if "'''" in python:
        raise FadalInputError(f"the interpreter path {python} contains three quotes")
    for command in sorted(set(TASK_TYPE_TO_COMMAND.values()) | {CLIENTAPP_COMMAND}):
        clientapp = command == CLIENTAPP_COMMAND
        path = folder / command
        path.write_text(_SHIM.format(python=python, module="fadal.federated." + ("warm_clientapp" if clientapp
                                                                                 else "app_vetting"),
                                     entry="shim" if clientapp else "refuse_task",
                                     what="Flower's flwr-clientapp after checking the run's app bundle" if clientapp
                                     else f"{command} refused: a site runs ClientApps only"))
        path.chmod(0o755)
    return folder
