"""Keys for a real federation (issue 12, "Keys"): each hospital makes its own SuperNode key pair and sends
only the public half; `fadal certs` never writes a site's private key; the CA key lives in its own folder,
not in the one `fadal server` reads; every secret is mode 0600. No processes are started here (the
deployment fixture in tests/integration/test_deployment.py uses the same keys with Flower's own).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.serialization import load_ssh_private_key, load_ssh_public_key
from typer.testing import CliRunner

from fadal.cli import app
from fadal.errors import FadalInputError
from fadal.federated import certificates

runner = CliRunner()
SECRETS_AT_COORDINATOR = {"coordinator/server.key", "ca/ca.key"}


def invoke(*args: str):
    res = runner.invoke(app, [str(a) for a in args])
    assert "Traceback" not in res.output, res.output
    return res


def mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


def hospital(tmp_path: Path, name: str) -> Path:
    """`fadal site-keys` at hospital ``name``; returns its key folder."""
    folder = tmp_path / "hospitals" / name
    res = invoke("site-keys", "--name", name, "--out", folder)
    assert res.exit_code == 0, res.output
    return folder


def inbox(tmp_path: Path, *folders: Path) -> Path:
    """What the coordinator received: the hospitals' <site>.pub files, nothing else."""
    box = tmp_path / "inbox"
    box.mkdir(exist_ok=True)
    for folder in folders:
        shutil.copy(folder / f"{folder.name}.pub", box)
    return box


@pytest.fixture
def federation(tmp_path):
    """Two hospitals made their keys; the coordinator ran `fadal certs --site-keys` on their .pub files."""
    a, b = hospital(tmp_path, "site_A"), hospital(tmp_path, "site_B")
    res = invoke("certs", "--site-keys", inbox(tmp_path, a, b), "--out", tmp_path / "certs",
                 "--server-host", "coordinator.example.org")
    assert res.exit_code == 0, res.output
    return {"certs": tmp_path / "certs", "site_A": a, "site_B": b, "output": res.output}


def test_site_keys_makes_a_p384_pair_and_says_to_send_only_the_pub(tmp_path):
    res = invoke("site-keys", "--name", "site_A", "--out", tmp_path / "keys")
    assert res.exit_code == 0, res.output
    key = load_ssh_private_key((tmp_path / "keys/supernode.key").read_bytes(), None)  # what flower-supernode reads
    assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp384r1"
    assert load_ssh_public_key((tmp_path / "keys/site_A.pub").read_bytes()) == key.public_key()
    assert mode(tmp_path / "keys/supernode.key") == 0o600
    assert sorted(p.name for p in (tmp_path / "keys").iterdir()) == ["site_A.pub", "supernode.key"]
    send = [line for line in res.output.splitlines() if "send this file" in line]
    assert len(send) == 1 and "site_A.pub" in send[0], res.output


def test_site_keys_keeps_an_existing_private_key_unless_force(tmp_path):
    folder = hospital(tmp_path, "site_A")
    before = (folder / "supernode.key").read_bytes()
    res = invoke("site-keys", "--name", "site_A", "--out", folder)
    assert res.exit_code != 0 and "--force" in res.output and "supernode.key" in res.output
    assert (folder / "supernode.key").read_bytes() == before
    (folder / "supernode.key").chmod(0o644)  # e.g. copied carelessly: a new key is still born 0600
    res = invoke("site-keys", "--name", "site_A", "--out", folder, "--force")
    assert res.exit_code == 0, res.output
    assert (folder / "supernode.key").read_bytes() != before and mode(folder / "supernode.key") == 0o600


def test_coordinator_output_holds_no_site_private_key(federation):
    c = federation["certs"]
    written = [p for p in c.rglob("*") if p.is_file()]
    assert written
    private = {p.relative_to(c).as_posix() for p in written if b"PRIVATE KEY" in p.read_bytes()}
    assert private == SECRETS_AT_COORDINATOR
    for site in ("site_A", "site_B"):
        assert sorted(p.name for p in (c / site).iterdir()) == ["ca.crt"]  # all the hospital gets back
        assert f"{c / site / 'ca.crt'}: send to {site}" in federation["output"].replace("\n", "")


def test_ca_key_is_not_in_the_superlinks_folder(federation):
    c = federation["certs"]
    coordinator = c / "coordinator"
    assert (c / "ca/ca.key").is_file()
    assert not any(p.name == "ca.key" for p in coordinator.rglob("*"))
    assert sorted(p.name for p in coordinator.iterdir()) == ["ca.crt", "control.sha256", "server.crt", "server.key",
                                                             "supernodes"]
    assert coordinator.resolve() not in (c / "ca").resolve().parents
    # `fadal server --certs certs` (the whole output) also reads only the coordinator's folder.
    from fadal.cli_deploy import party_certs

    assert party_certs(c, "coordinator") == coordinator


def test_a_ca_folder_inside_the_coordinators_is_refused(tmp_path):
    pubs = inbox(tmp_path, hospital(tmp_path, "site_A"))
    res = invoke("certs", "--site-keys", pubs, "--out", tmp_path / "c", "--ca", tmp_path / "c/coordinator/ca")
    assert res.exit_code != 0 and "must not be inside" in res.output
    assert not (tmp_path / "c/coordinator/ca/ca.key").exists()


def test_every_secret_is_0600_even_with_a_permissive_umask(tmp_path):
    old = os.umask(0)
    try:
        res = invoke("certs", "--site-keys", inbox(tmp_path, hospital(tmp_path, "site_A")), "--out", tmp_path / "c")
        assert res.exit_code == 0, res.output
        trial = invoke("certs", "--generate-site-keys", "site_T", "--out", tmp_path / "trial")
        assert trial.exit_code == 0, trial.output
    finally:
        os.umask(old)
    secrets = [p for root in (tmp_path / "hospitals", tmp_path / "c", tmp_path / "trial")
               for p in root.rglob("*") if p.is_file() and b"PRIVATE KEY" in p.read_bytes()]
    names = sorted(p.relative_to(tmp_path).as_posix() for p in secrets)
    assert names == ["c/ca/ca.key", "c/coordinator/server.key", "hospitals/site_A/supernode.key",
                     "trial/ca/ca.key", "trial/coordinator/server.key", "trial/site_T/supernode.key"]
    assert {n: mode(tmp_path / n) for n in names} == {n: 0o600 for n in names}
    assert mode(tmp_path / "c/ca") == 0o700 and mode(tmp_path / "hospitals/site_A") == 0o700


def test_registered_key_is_the_hospitals_and_tls_chain_verifies(federation):
    c = federation["certs"]
    for site in ("site_A", "site_B"):
        key = load_ssh_private_key((federation[site] / "supernode.key").read_bytes(), None)
        assert load_ssh_public_key((c / "coordinator/supernodes" / f"{site}.pub").read_bytes()) == key.public_key()
    ca = x509.load_pem_x509_certificate((c / "coordinator/ca.crt").read_bytes())
    server = x509.load_pem_x509_certificate((c / "coordinator/server.crt").read_bytes())
    server.verify_directly_issued_by(ca)
    server_key = serialization.load_pem_private_key((c / "coordinator/server.key").read_bytes(), None)
    assert server_key.public_key() == server.public_key()
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert {"coordinator.example.org", "localhost"} <= set(san.get_values_for_type(x509.DNSName))
    assert "127.0.0.1" in {str(ip) for ip in san.get_values_for_type(x509.IPAddress)}
    ca_key = serialization.load_pem_private_key((c / "ca/ca.key").read_bytes(), None)
    assert ca_key.public_key() == ca.public_key()
    ca_pem = (c / "ca/ca.crt").read_bytes()
    assert ca_pem == (c / "coordinator/ca.crt").read_bytes() == (c / "site_A/ca.crt").read_bytes()


def _ed25519_pub() -> bytes:
    return ed25519.Ed25519PrivateKey.generate().public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)


@pytest.mark.parametrize("case", ["garbage", "private key", "ed25519", "another site's key", "empty"])
def test_a_bad_pub_is_a_clear_error_naming_the_file(tmp_path, case):
    a = hospital(tmp_path, "site_A")
    box = inbox(tmp_path, a)
    bad = box / "site_B.pub"
    bad.write_bytes({"garbage": b"hello, this is my key\n",
                     "private key": (a / "supernode.key").read_bytes(),
                     "ed25519": _ed25519_pub(),
                     "another site's key": (a / "site_A.pub").read_bytes(),
                     "empty": b""}[case])
    res = invoke("certs", "--site-keys", box, "--out", tmp_path / "c")
    assert res.exit_code != 0
    assert str(bad) in res.output.replace("\n", ""), res.output
    assert not (tmp_path / "c").exists()  # checked before anything is written
    with pytest.raises(FadalInputError, match="site_B.pub"):
        certificates.read_public_key(bad, "site_B")


def test_a_bad_site_name_or_empty_folder_is_a_clear_error(tmp_path):
    box = tmp_path / "inbox"
    box.mkdir()
    res = invoke("certs", "--site-keys", box, "--out", tmp_path / "c")
    assert res.exit_code != 0 and "no <site>.pub" in res.output
    shutil.copy(hospital(tmp_path, "site_A") / "site_A.pub", box / "coordinator.pub")
    res = invoke("certs", "--site-keys", box, "--out", tmp_path / "c")
    assert res.exit_code != 0 and "coordinator.pub" in res.output
    res = invoke("site-keys", "--name", "site A!", "--out", tmp_path / "x")
    assert res.exit_code != 0 and "site names" in res.output and not (tmp_path / "x").exists()


def test_rerun_adds_sites_reissues_the_server_cert_and_keeps_the_ca(federation, tmp_path):
    c = federation["certs"]
    ca_before = (c / "ca/ca.crt").read_bytes(), (c / "ca/ca.key").read_bytes()
    server_before = (c / "coordinator/server.crt").read_bytes()
    box = inbox(tmp_path, hospital(tmp_path, "site_C"))  # only the new hospital's .pub
    res = invoke("certs", "--site-keys", box, "--out", c, "--server-host", "fl.example.org")
    assert res.exit_code == 0, res.output
    registered = sorted(p.name for p in (c / "coordinator/supernodes").iterdir())
    assert registered == ["site_A.pub", "site_B.pub", "site_C.pub"]
    assert ((c / "ca/ca.crt").read_bytes(), (c / "ca/ca.key").read_bytes()) == ca_before
    server = x509.load_pem_x509_certificate((c / "coordinator/server.crt").read_bytes())
    assert server.public_bytes(serialization.Encoding.PEM) != server_before
    assert "fl.example.org" in server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value \
        .get_values_for_type(x509.DNSName)
    server.verify_directly_issued_by(x509.load_pem_x509_certificate(ca_before[0]))
    assert (c / "site_C/ca.crt").read_bytes() == ca_before[0]

    # The CA kept offline: without it no new CA is made behind the hospitals' back; with --ca it is reused.
    offline = tmp_path / "usb" / "ca"
    shutil.move(c / "ca", offline)
    res = invoke("certs", "--out", c)
    assert res.exit_code != 0 and "--ca" in res.output and not (c / "ca").exists()
    res = invoke("certs", "--out", c, "--ca", offline)  # no new keys: re-issue the server certificate only
    assert res.exit_code == 0, res.output
    x509.load_pem_x509_certificate((c / "coordinator/server.crt").read_bytes()).verify_directly_issued_by(
        x509.load_pem_x509_certificate(ca_before[0]))
    assert (c / "coordinator/ca.crt").read_bytes() == ca_before[0] and not (c / "ca").exists()


def test_an_older_layouts_ca_key_moves_out_of_the_coordinators_folder(federation):
    c = federation["certs"]
    key = (c / "ca/ca.key").read_bytes()
    # What earlier versions wrote: ca.key beside the SuperLink's files, no ca/ folder.
    shutil.move(c / "ca/ca.key", c / "coordinator/ca.key")
    shutil.rmtree(c / "ca")
    made = certificates.make_certificates(c, {}, "coordinator.example.org")
    assert not (c / "coordinator/ca.key").exists() and (c / "ca/ca.key").read_bytes() == key
    assert mode(c / "ca/ca.key") == 0o600 and any("moved" in n for n in made["notes"])
    assert made["ca_key"] == c / "ca/ca.key" and made["coordinator"] == c / "coordinator"


def test_one_machine_trial_generates_site_keys_only_on_request(tmp_path):
    assert "ONE MACHINE ONLY" in " ".join(invoke("certs", "--help").output.split())
    with pytest.raises(TypeError, match="make_trial_certificates"):
        certificates.make_certificates(tmp_path / "c", ["site_A"])  # the old call: a list of names
    res = invoke("certs", "--generate-site-keys", "site_A,site_B", "--out", tmp_path / "c")
    assert res.exit_code == 0, res.output
    assert "trial only" in res.output
    c = tmp_path / "c"
    for site in ("site_A", "site_B"):
        key = load_ssh_private_key((c / site / "supernode.key").read_bytes(), None)
        assert load_ssh_public_key((c / "coordinator/supernodes" / f"{site}.pub").read_bytes()) == key.public_key()
    before = (c / "site_A/supernode.key").read_bytes(), (c / "ca/ca.crt").read_bytes()
    made = certificates.make_trial_certificates(c, ["site_A", "site_B", "site_C"], "coordinator.example.org")
    assert ((c / "site_A/supernode.key").read_bytes(), (c / "ca/ca.crt").read_bytes()) == before
    assert sorted(made["sites"]) == ["site_A", "site_B", "site_C"]
    assert not (c / "coordinator/ca.key").exists()


@pytest.mark.parametrize("layout", ["own folder", "whole output"])
def test_fadal_site_finds_supernode_key_in_the_hospitals_folder(tmp_path, tiny_site, monkeypatch, layout):
    """`fadal site --certs DIR` hands flower-supernode DIR/supernode.key and DIR/ca.crt (no process starts)."""
    from fadal.federated import processes

    started: list[list[str]] = []
    monkeypatch.setattr(processes, "_popen", lambda cmd, *a, **k: started.append(cmd))
    monkeypatch.setattr(processes, "wait_foreground", lambda procs: 0)
    if layout == "own folder":
        folder = hospital(tmp_path, "site_A")
        res = invoke("certs", "--site-keys", inbox(tmp_path, folder), "--out", tmp_path / "c")
        assert res.exit_code == 0, res.output
        shutil.copy(tmp_path / "c/site_A/ca.crt", folder)  # what the coordinator sent back
        certs_arg = folder
    else:  # a one-machine trial, pointed at the whole output
        res = invoke("certs", "--generate-site-keys", "site_A", "--out", tmp_path / "c")
        assert res.exit_code == 0, res.output
        folder, certs_arg = tmp_path / "c/site_A", tmp_path / "c"
    res = invoke("site", "--data", tiny_site, "--name", "site_A", "--server", "127.0.0.1:1", "--certs", certs_arg,
                 "--home", tmp_path / "flwr", "--restart-after", "0")
    assert res.exit_code == 0, res.output
    (cmd,) = started
    assert cmd[cmd.index("--auth-supernode-private-key") + 1] == str((folder / "supernode.key").resolve())
    assert cmd[cmd.index("--root-certificates") + 1] == str((folder / "ca.crt").resolve())


def test_fadal_site_without_its_key_or_ca_says_what_to_do(tmp_path, tiny_site, monkeypatch):
    from fadal.federated import processes

    monkeypatch.setattr(processes, "_popen", lambda *a, **k: pytest.fail("started a SuperNode without its key"))
    empty = tmp_path / "keys"
    empty.mkdir()
    args = ["site", "--data", tiny_site, "--name", "site_A", "--server", "127.0.0.1:1", "--certs", empty,
            "--home", tmp_path / "flwr", "--restart-after", "0"]
    res = invoke(*args)
    assert res.exit_code != 0 and "supernode.key" in res.output and "fadal site-keys" in res.output
    certificates.make_site_keys(empty, "site_A")
    res = invoke(*args)
    assert res.exit_code != 0 and "ca.crt" in res.output and "coordinator" in res.output


def test_fadal_server_warns_about_a_ca_key_in_its_folder(federation, monkeypatch):
    """A folder still laid out the old way (ca.key beside server.key) is named at start (no process starts)."""
    from fadal.federated import flower_cli, processes

    monkeypatch.setattr(processes, "start_superlink", lambda *a, **k: None)
    monkeypatch.setattr(processes, "wait_for_port", lambda *a, **k: None)
    monkeypatch.setattr(processes, "wait_foreground", lambda procs: 0)
    monkeypatch.setattr(flower_cli, "write_connection", lambda *a, **k: None)
    monkeypatch.setattr(flower_cli, "register_supernodes", lambda *a, **k: ["site_A", "site_B"])
    c = federation["certs"]
    args = ["server", "--certs", c / "coordinator", "--home", c.parent / "flwr"]
    res = invoke(*args)
    assert res.exit_code == 0 and "warning" not in res.output, res.output
    shutil.copy(c / "ca/ca.key", c / "coordinator/ca.key")
    res = invoke(*args)
    assert res.exit_code == 0 and "ca.key" in res.output and "warning" in res.output, res.output


def test_the_operator_token_is_the_coordinators_alone_and_the_superlink_holds_only_its_hash(federation, tmp_path):
    """Run submission (issue 12): `fadal certs` makes the operator's token once, 0600 in its own folder; the
    SuperLink's folder gets its SHA-256; no site folder gets anything of it. Re-runs keep it."""
    import hashlib

    c = federation["certs"]
    token_file = c / "operator" / "control.token"
    token = certificates.read_operator_token(token_file)
    assert mode(token_file) == 0o600 and mode(c / "operator") == 0o700 and len(token) >= 43
    assert sorted(p.name for p in (c / "operator").iterdir()) == ["control.token"]
    digest = (c / "coordinator" / "control.sha256").read_text().strip()
    assert digest == hashlib.sha256(token.encode()).hexdigest() == certificates.control_digest(token)
    everything_else = [p for p in c.rglob("*") if p.is_file() and p != token_file]
    assert not any(token.encode() in p.read_bytes() for p in everything_else)
    assert str(token_file) in federation["output"].replace("\n", "")
    # Found from what `fadal server` / `fadal federate --certs` get: the whole output, the coordinator's or its own.
    for given in (c, c / "coordinator", c / "operator"):
        assert certificates.find_operator_token(given) == token_file
    with pytest.raises(FadalInputError, match="operator token"):
        certificates.find_operator_token(tmp_path)

    made = certificates.make_certificates(c, {}, "coordinator.example.org")  # a re-run keeps it
    assert made["operator_token"] == token_file and certificates.read_operator_token(token_file) == token
    token_file.unlink()  # replacing it: delete and re-run; the digest follows
    certificates.make_certificates(c, {}, "coordinator.example.org")
    new = certificates.read_operator_token(token_file)
    assert new != token and (c / "coordinator/control.sha256").read_text().strip() == certificates.control_digest(new)

    os.chmod(token_file, 0o644)
    with pytest.raises(FadalInputError, match="readable by others"):
        certificates.read_operator_token(token_file)
    with pytest.raises(FadalInputError, match="'operator'"):
        certificates.make_site_keys(tmp_path / "x", "operator")


def test_fadal_server_and_federate_without_the_operator_token_say_what_to_do(federation, monkeypatch):
    """No process starts without it: `fadal server` could not register the sites, `fadal federate` not submit."""
    from fadal.federated import processes

    c = federation["certs"]
    started = []
    monkeypatch.setattr(processes, "start_superlink", lambda *a, **k: started.append(a))
    shutil.move(c / "operator", c.parent / "elsewhere")
    res = invoke("server", "--certs", c / "coordinator", "--home", c.parent / "flwr")
    assert res.exit_code != 0 and "operator token" in res.output and "fadal certs" in res.output and not started
    config = c.parent / "fl.yaml"
    config.write_text("sites: [{name: site_A, data: /nonexistent}]\nlabels: {background: 0, liver: 1}\n")
    res = invoke("federate", "--config", config, "--deployment", "--server", "127.0.0.1:9", "--certs", c,
                 "--home", c.parent / "flwr")
    assert res.exit_code != 0 and "operator token" in res.output and "--operator-token" in res.output


def test_the_superlink_does_not_start_without_the_operators_hash(federation, tmp_path):
    """`fadal server`'s SuperLink never runs with Flower's accept-everyone Control API."""
    import subprocess
    import sys

    from fadal.federated import processes

    (federation["certs"] / "coordinator" / "control.sha256").unlink()
    with pytest.raises(FadalInputError, match="control.sha256"):
        processes.start_superlink(federation["certs"] / "coordinator", 9, tmp_path / "db", tmp_path / "flwr")
    bare = subprocess.run([sys.executable, "-m", "fadal.federated.superlink", "--insecure"], capture_output=True,
                          text=True, timeout=120)
    assert bare.returncode != 0 and "--fadal-control-digest" in bare.stderr


def test_a_site_key_other_users_can_read_is_refused_before_anything_starts(tmp_path):
    from fadal.federated.processes import start_supernode

    keys = tmp_path / "keys"
    certificates.make_site_keys(keys, "site_a")
    args = (keys, "127.0.0.1:1", tmp_path, "site_a", 9094, tmp_path / "home")
    with pytest.raises(FadalInputError, match="no ca.crt"):  # 0600 as made: the key passes, the next check fails
        start_supernode(*args)
    os.chmod(keys / "supernode.key", 0o644)
    with pytest.raises(FadalInputError, match=r"supernode.key: .*readable or writable by other users.*chmod 600"):
        start_supernode(*args)
