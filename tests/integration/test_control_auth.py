"""Who can submit a run (issue 12): only the coordinator's operator, never a hospital.

Flower 1.42 serves the Control API (``flwr run``, ``flwr ls``, ``flwr supernode register``) on the one port the
hospitals' SuperNodes dial, and open-source Flower accepts every caller there. `fadal server`'s SuperLink
(fadal.federated.superlink) takes only calls that carry the operator's token from `fadal certs`
(operator/control.token). One real SuperLink (Flower's own, through FADAL's wrapper) and Flower's own
``flwr`` CLI; no SuperNodes.
"""

from __future__ import annotations

import json
import re
import secrets
import shutil
import socket
import sys
from pathlib import Path

import pytest

from fadal.federated import certificates, flower_cli, processes

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="process bookkeeping reads /proc")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Link:
    """The coordinator's SuperLink, one hospital's key folder, and a Flower home per caller."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.hospital = root / "hospitals" / "site_A"
        pub = certificates.make_site_keys(self.hospital, "site_A")["public_key"]
        self.certs = certificates.make_certificates(root / "certs", {"site_A": pub})
        shutil.copyfile(self.certs["sites"]["site_A"] / "ca.crt", self.hospital / "ca.crt")
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.app = flower_cli.write_app(root / "app")
        self.proc = processes.start_superlink(self.certs["coordinator"], self.port, root / "superlink.db",
                                              root / "flwr-superlink", host="127.0.0.1", log=root / "superlink.log")

    def home(self, name: str, token: str | None = None, ca: Path | None = None) -> Path:
        """A caller's Flower home: the SuperLink's address, a CA certificate and (maybe) a token."""
        home = self.root / f"flwr-{name}"
        flower_cli.write_connection(home, self.address, ca or self.certs["ca_cert"], token=token)
        return home

    def operator(self) -> Path:
        return self.home("operator", certificates.read_operator_token(self.certs["operator_token"]))

    def flwr(self, home: Path, *args: str):
        res = flower_cli._flwr([str(a) for a in args], home, timeout=60)
        res.output = res.stdout + res.stderr
        return res

    def runs(self) -> list[dict]:
        res = self.flwr(self.operator(), "ls", flower_cli.CONNECTION, "--format", "json")
        assert json.loads(res.stdout)["success"], res.output
        return json.loads(res.stdout)["runs"]

    def log(self) -> str:
        return (self.root / "superlink.log").read_text()[-4000:]


@pytest.fixture(scope="module")
def link(tmp_path_factory):
    fed = Link(tmp_path_factory.mktemp("control"))
    try:
        processes.wait_for_port("127.0.0.1", fed.port, fed.proc, timeout=60)
        yield fed
    finally:
        processes.stop([fed.proc])


def refused(res) -> bool:
    return res.returncode != 0 and "Authentication failed" in res.output and "Successfully started run" not in res.output


def test_what_a_hospital_holds_cannot_submit_list_or_register(link, tmp_path):
    """A hospital holds the CA certificate and its SuperNode key: enough for the Fleet API, not for runs."""
    before = link.runs()
    home = link.home("hospital", ca=link.hospital / "ca.crt")  # the Control API takes no client key: CA only
    assert sorted(p.name for p in link.hospital.iterdir()) == ["ca.crt", "site_A.pub", "supernode.key"]

    ls = link.flwr(home, "ls", flower_cli.CONNECTION)
    assert refused(ls), ls.output
    run = link.flwr(home, "run", link.app, flower_cli.CONNECTION)
    assert refused(run), run.output
    rogue = certificates.make_site_keys(tmp_path / "rogue", "site_R")["public_key"]  # a node of its own making
    register = link.flwr(home, "supernode", "register", rogue, flower_cli.CONNECTION)
    assert refused(register), register.output
    # FADAL's own submission from a hospital's home says what is missing instead of Flower's `flwr login` hint.
    config = tmp_path / "fl.yaml"
    config.write_text("sites: [{name: site_A, data: /nonexistent}]\nlabels: {background: 0, liver: 1}\n")
    with pytest.raises(RuntimeError, match="refused this command.*operator"):
        flower_cli.submit_run(link.app, flower_cli.CONNECTION, config, home, timeout=60)

    assert link.runs() == before, link.log()
    assert "POST /v1/control/start-run HTTP/1.1\" 401" in link.log()


def test_a_wrong_token_is_refused(link):
    """Any other token is refused: a guessed one, and the SHA-256 the SuperLink's own folder holds."""
    before = link.runs()
    digest = link.certs["control_digest"].read_text().strip()
    for name, token in (("guess", secrets.token_urlsafe(32)), ("digest", digest)):
        home = link.home(name, token=token)
        for args in (("ls", flower_cli.CONNECTION), ("run", link.app, flower_cli.CONNECTION)):
            res = link.flwr(home, *args)
            assert refused(res), (name, args, res.output)
    assert link.runs() == before, link.log()


def test_the_operators_token_lists_registers_and_submits(link):
    """`fadal server` and `fadal federate --deployment` use the operator's token: the same calls succeed."""
    home = link.operator()
    before = [r["run-id"] for r in link.runs()]
    assert flower_cli.register_supernodes(link.certs["coordinator"], home) == ["site_A"]
    ls = link.flwr(home, "ls", flower_cli.CONNECTION)
    assert ls.returncode == 0 and "Authentication failed" not in ls.output, ls.output
    run = link.flwr(home, "run", link.app, flower_cli.CONNECTION)  # no SuperNodes: it need not complete
    started = re.search(r"Successfully started run (\d+)", run.output)
    assert run.returncode == 0 and started, run.output + link.log()
    assert [r["run-id"] for r in link.runs()] == [*before, started.group(1)]  # flwr ls: ids as strings
