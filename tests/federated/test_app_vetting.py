"""Only vetted code runs at a hospital: the check of a run's app bundle (FAB) before Flower unpacks and imports it.

Bundles are built with Flower's own ``build_fab_from_disk`` (what ``flwr run`` sends); the end-to-end refusal
through real SuperNodes is in tests/integration/test_deployment.py."""

from __future__ import annotations

import io
import logging
import re
import shutil
import subprocess
import zipfile
from pathlib import Path
from types import SimpleNamespace

import pytest
from flwr.cli.build import build_fab_from_disk

from fadal.errors import SiteRefusal
from fadal.federated import app_vetting, flower_cli, processes
from fadal.federated.app_vetting import AppBundleRefused, bundle_hash, check_bundle

CODE = re.compile(r"FADAL-E-REFUSED-app-bundle-[0-9a-f]{4}")


def fadal_bundle(folder: Path, extra: dict[str, str] | None = None, clientapp: str | None = None) -> bytes:
    """FADAL's bundle (flower_cli.write_app), optionally with ``extra`` files or another ClientApp, as a FAB."""
    flower_cli.write_app(folder)
    if clientapp is not None:
        toml = folder / "pyproject.toml"
        toml.write_text(toml.read_text().replace(app_vetting.FADAL_CLIENTAPP, clientapp))
    for name, text in (extra or {}).items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text)
    return build_fab_from_disk(folder)


def refused(content: bytes, **kwargs) -> str:
    with pytest.raises(SiteRefusal) as err:
        check_bundle(content, **kwargs)
    assert err.value.rule == "app-bundle"
    return str(err.value)


def test_fadal_own_bundle_is_accepted(tmp_path):
    fab = fadal_bundle(tmp_path)
    assert sorted(zipfile.ZipFile(io.BytesIO(fab)).namelist()) == sorted(app_vetting.FADAL_BUNDLE_FILES)
    assert check_bundle(fab) == "fadal"
    from importlib.metadata import PackageNotFoundError, version
    try:
        ver = version("fadal")
    except PackageNotFoundError:
        ver = "0.0.0"
    assert check_bundle(fab, fab_id="fadal/fadal", fab_version=ver, fab_hash=bundle_hash(fab)) == "fadal"


def test_a_bundle_with_code_is_refused(tmp_path):
    """FADAL's pyproject.toml, but one module more (listed in the bundle's own manifest: Flower accepts it)."""
    why = refused(fadal_bundle(tmp_path, {"helper.py": "import os\n"}))
    assert "helper.py" in why and "allowed_app_bundles" in why


def test_a_file_outside_the_bundle_manifest_is_refused(tmp_path):
    """A file slipped into FADAL's bundle without a manifest line: Flower's install_from_fab checks only the
    files the manifest lists, so it installs it; the site refuses it."""
    from flwr.cli.install import install_from_fab

    buf = io.BytesIO(fadal_bundle(tmp_path / "app"))
    with zipfile.ZipFile(buf, "a") as zf:
        zf.writestr("sitecustomize.py", "print('pwned')\n")
    tampered = buf.getvalue()
    installed = install_from_fab(tampered, install_dir=tmp_path / "home", skip_prompt=True)
    assert (installed / "sitecustomize.py").exists()  # what Flower alone lets through
    assert "sitecustomize.py" in refused(tampered)


def test_a_bundle_shadowing_fadal_is_refused(tmp_path):
    fab = fadal_bundle(tmp_path, {"fadal/__init__.py": "", "fadal/federated/__init__.py": "",
                                  "fadal/federated/client_app.py": "raise SystemExit('not FADAL')\n"})
    assert "shadow the installed FADAL" in refused(fab)


def test_another_clientapp_is_refused(tmp_path):
    """A bundle with no code of its own naming another installed module's object (still code the site did not
    choose to run)."""
    assert "'fadal.cli:app'" in refused(fadal_bundle(tmp_path, clientapp="fadal.cli:app"))


def test_not_a_bundle_is_refused():
    assert "zip" in refused(b"not a zip")


def test_the_run_must_name_the_bundle_it_sent(tmp_path):
    """Flower loads the ClientApp from the folder the run's app id, version and hash name: they must be this
    bundle's, not those of another bundle installed here earlier."""
    fab = fadal_bundle(tmp_path)
    assert "names bundle" in refused(fab, fab_hash="0" * 64)
    assert "names app" in refused(fab, fab_id="other/app")
    assert "names app" in refused(fab, fab_version="99.0")


def test_an_allow_listed_bundle_runs(tmp_path):
    fab = fadal_bundle(tmp_path, {"fadal/__init__.py": ""})
    assert check_bundle(fab, allowed={bundle_hash(fab)}) == "allow-listed"
    refused(fab, allowed={"0" * 64})


# --------------------------------------------------------------------------------------------------
# The hook inside Flower's ClientApp process
# --------------------------------------------------------------------------------------------------

class FakeRuntime(SimpleNamespace):
    """Stands for flwr.supernode.runtime.run_clientapp: the two names guard() wraps."""


def fake_runtime(fab: bytes, node_config: dict, installed: list) -> FakeRuntime:
    run = SimpleNamespace(run_id=7, fab_id="fadal/fadal", fab_version=None, fab_hash=bundle_hash(fab))
    toml = zipfile.ZipFile(io.BytesIO(fab)).read("pyproject.toml").decode()
    run.fab_version = re.search(r'^version = "([^"]+)"', toml, re.M).group(1)
    task = ("message", SimpleNamespace(node_config=node_config), run,
            SimpleNamespace(content=fab, hash_str=bundle_hash(fab)))
    return FakeRuntime(pull_task_input=lambda client: task,
                       install_from_fab=lambda content, **kw: installed.append(content))


@pytest.fixture
def flower_log():
    lines: list[str] = []

    class Handler(logging.Handler):
        def emit(self, record):
            lines.append(record.getMessage())

    handler = Handler(logging.DEBUG)
    logging.getLogger("flwr").addHandler(handler)
    yield lines
    logging.getLogger("flwr").removeHandler(handler)


def test_guard_refuses_before_installing_with_an_opaque_code(tmp_path, flower_log):
    fab = fadal_bundle(tmp_path, {"fadal/__init__.py": ""})
    installed: list = []
    runtime = fake_runtime(fab, {"data-path": str(tmp_path / "secret_site")}, installed)
    app_vetting.guard(runtime)
    runtime.pull_task_input(None)
    with pytest.raises(AppBundleRefused) as err:
        runtime.install_from_fab(fab, skip_prompt=True)
    assert installed == []  # nothing unpacked
    assert CODE.fullmatch(str(err.value)), str(err.value)  # all Flower puts in the reply (with the class name)
    (line,) = [ln for ln in flower_log if "refused" in ln]
    assert str(err.value) in line and "shadow the installed FADAL" in line and bundle_hash(fab) in line


def test_guard_installs_fadal_bundle_and_policy_allow_list(tmp_path, flower_log):
    fab, other = fadal_bundle(tmp_path / "a"), fadal_bundle(tmp_path / "b", {"extra.py": ""})
    installed: list = []
    runtime = fake_runtime(fab, {}, installed)
    app_vetting.guard(runtime)
    runtime.pull_task_input(None)
    runtime.install_from_fab(fab, skip_prompt=True)
    assert installed == [fab]

    policy = tmp_path / "policy.yaml"
    policy.write_text(f"allowed_app_bundles: ['{bundle_hash(other)}']\n")
    runtime = fake_runtime(other, {"policy-path": str(policy)}, installed)
    app_vetting.guard(runtime)
    runtime.pull_task_input(None)
    runtime.install_from_fab(other, skip_prompt=True)
    assert installed == [fab, other]
    assert any("allow-listed" in ln for ln in flower_log)


def test_guard_refuses_a_bundle_it_did_not_pull(tmp_path):
    fab = fadal_bundle(tmp_path)
    runtime = fake_runtime(fab, {}, [])
    app_vetting.guard(runtime)
    with pytest.raises(AppBundleRefused):
        runtime.install_from_fab(fab, skip_prompt=True)  # no task pulled


# --------------------------------------------------------------------------------------------------
# The executables on the SuperNode's PATH
# --------------------------------------------------------------------------------------------------

def test_supernode_path_starts_with_the_checked_clientapp(tmp_path):
    env = processes.supernode_env(tmp_path / "home")
    shim = shutil.which("flwr-clientapp", path=env["PATH"])
    assert shim == str((tmp_path / "home" / "fadal-bin" / "flwr-clientapp").resolve())
    assert "fadal.federated.warm_clientapp import shim" in Path(shim).read_text()  # app_vetting.main, warm or cold
    for other in ("flwr-agentapp", "flwr-serverapp", "flwr-simulation"):
        assert "refuse_task" in Path(shutil.which(other, path=env["PATH"])).read_text()

    res = subprocess.run([shim, "--help"], env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "--runtime-api-address" in res.stdout, res.stdout + res.stderr  # Flower's CLI
    res = subprocess.run([shutil.which("flwr-agentapp", path=env["PATH"]), "--token", "x"], env=env,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 1 and "FADAL-E-REFUSED-app-bundle" in res.stderr, res.stderr
