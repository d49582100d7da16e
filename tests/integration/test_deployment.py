"""Flower's deployment engine on loopback, as the README's "Running across hospitals" sets it up.

One SuperLink and three hospital SuperNodes run as real processes (Flower's own executables) with
TLS and SuperNode authentication; runs are submitted with ``flwr run`` and judged by ``flwr ls``.
The processes are shared by the tests of this module (starting them costs ~20 s on 2 cores); each
test restarts what an earlier one killed, and the fixture's teardown stops every process it
started, and everything those started, and checks that none is left, also when a test fails.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from fadal.federated import certificates, flower_cli, processes
from fadal_testing import tiny_plan

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="process bookkeeping reads /proc")

SITES = ["site_A", "site_B", "site_C"]
REPO = Path(__file__).resolve().parents[2]
#: sitecustomize.py with the test hooks (short heartbeats, slow training) for one SuperNode and its ClientApps.
HOOKS = Path(__file__).resolve().parent / "flower_hooks"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"gave up waiting for {what} after {timeout:.0f} s")
        time.sleep(0.2)


def checkpoint_round(path: Path) -> int | None:
    return torch.load(path, map_location="cpu", weights_only=True)["round"] if path.exists() else None


class Federation:
    """A coordinator and three hospitals on this machine; remembers every process it started."""

    def __init__(self, root: Path) -> None:
        from fadal.data.phantom import make_phantom

        self.root = root
        # As the README's step 1: each hospital makes its key pair in its own folder and sends only its .pub;
        # the coordinator's `fadal certs` registers those and sends back ca.crt.
        hospitals = {name: root / "hospitals" / name for name in SITES}
        pubs = {name: certificates.make_site_keys(folder, name)["public_key"] for name, folder in hospitals.items()}
        self.certs = certificates.make_certificates(root / "certs", pubs, server_host="127.0.0.1")
        for name, folder in hospitals.items():
            shutil.copyfile(self.certs["sites"][name] / "ca.crt", folder / "ca.crt")
        self.certs["sites"] = hospitals  # what each `fadal site --certs` gets: the hospital's own folder
        self.data = dict(zip(SITES, make_phantom(root / "data", sites=3, labeled=1, unlabeled=0, test=1)))
        self.port = free_port()
        self.node_ports = {name: free_port() for name in SITES}
        self.link_home, self.coordinator_home = root / "flwr-superlink", root / "flwr-coordinator"
        # The coordinator's operator token (`fadal certs` made it): the SuperLink takes runs only with it.
        self.token = certificates.read_operator_token(self.certs["operator_token"])
        flower_cli.write_connection(self.coordinator_home, f"127.0.0.1:{self.port}", self.certs["ca_cert"],
                                    token=self.token)
        self.app = flower_cli.write_app(self.coordinator_home / "app")
        self.link = None
        self.nodes: dict[str, object] = {}
        self.started: list = []  # every Popen
        self.descendants: set[processes.ProcessId] = set()  # what those started (ServerApp, ClientApps, ...)

    # -- processes
    def start_link(self) -> None:
        self.link = processes.start_superlink(self.certs["coordinator"], self.port, self.root / "superlink.db",
                                           self.link_home, host="127.0.0.1", log=self.root / "superlink.log")
        self.started.append(self.link)
        processes.wait_for_port("127.0.0.1", self.port, self.link, timeout=90)
        flower_cli.write_connection(self.link_home, f"127.0.0.1:{self.port}", self.certs["ca_cert"], token=self.token)
        assert flower_cli.register_supernodes(self.certs["coordinator"], self.link_home) == SITES

    def start_node(self, name: str) -> object:
        self.nodes[name] = self._supernode(name, self.certs["sites"][name], self.node_ports[name], name)
        return self.nodes[name]

    def _supernode(self, name: str, certs: Path, port: int, label: str, superlink_port: int | None = None) -> object:
        proc = processes.start_supernode(certs, f"127.0.0.1:{superlink_port or self.port}", self.data[name], name, port,
                                      self.root / f"flwr-{label}", cache_dir=self.root / "cache" / label,
                                      log=self.root / f"{label}.log")
        self.started.append(proc)
        return proc

    def restart_node(self, name: str, superlink_port: int | None = None, heartbeat_s: float | None = None,
                     slow_flag: Path | None = None) -> object:
        """Site ``name``'s SuperNode again, with the hooks of flower_hooks/sitecustomize.py (Flower's heartbeat
        interval, slow training while ``slow_flag`` exists), optionally dialling another port (a LinkCut)."""
        self.stop_node(name)
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("PYTHONPATH", os.pathsep.join(p for p in (str(HOOKS), os.environ.get("PYTHONPATH")) if p))
            if heartbeat_s is not None:
                mp.setenv("FADAL_TEST_HEARTBEAT_S", str(heartbeat_s))
            if slow_flag is not None:
                mp.setenv("FADAL_TEST_SLOW_FLAG", str(slow_flag))
            self.nodes[name] = self._supernode(name, self.certs["sites"][name], self.node_ports[name], name,
                                               superlink_port=superlink_port)
        return self.nodes[name]

    def stop_node(self, name: str) -> None:
        """Stop a SuperNode cleanly (Flower deactivates it); ``ensure_running`` starts a plain one again."""
        node = self.nodes.pop(name, None)
        if node is not None and node.poll() is None:
            self.descendants.update(processes.descendants(node.pid))
            processes.stop([node])

    def ensure_running(self) -> None:
        if self.link is None or self.link.poll() is not None:
            self.start_link()
        for name in SITES:
            if name not in self.nodes or self.nodes[name].poll() is not None:
                self.start_node(name)

    def crash(self, proc) -> None:
        """SIGKILL a process and everything it started: that machine lost power."""
        kids = processes.descendants(proc.pid)
        self.descendants.update(kids)
        proc.kill()
        for pid, _ in kids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.wait()

    def close(self) -> list[int]:
        """Stop everything; return the pids still running afterwards (should be none)."""
        for proc in self.started:
            if proc.poll() is None:
                self.descendants.update(processes.descendants(proc.pid))
        processes.stop(self.started)
        end = time.monotonic() + 10
        while (left := [p[0] for p in self.descendants if processes.alive(p)]) and time.monotonic() < end:
            time.sleep(0.2)
        return [p.pid for p in self.started if p.poll() is None] + left

    # -- runs
    def config(self, name: str, **overrides) -> Path:
        cfg = {
            "rounds": 2, "local_steps": 2, "evaluate_every": 0, "out": f"runs/{name}",
            "sites": [{"name": s, "data": str(self.data[s])} for s in SITES],
            "train": {"num_threads": 1, "seed": 0},
            "plan": tiny_plan((4, 8), spacing_mm=8.0).model_dump(mode="json"),
            **overrides,
        }
        path = self.root / f"{name}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        return path

    def out(self, name: str) -> Path:
        return self.root / "runs" / name

    def submit(self, config: Path, timeout: float = 300) -> dict:
        return flower_cli.submit_run(self.app, flower_cli.CONNECTION, config, self.coordinator_home, timeout=timeout)

    def submit_in_background(self, config: Path) -> tuple[threading.Thread, dict]:
        box: dict = {}

        def target() -> None:
            try:
                box["result"] = self.submit(config)
            except Exception as err:  # noqa: BLE001 - inspected by the test
                box["error"] = err

        thread = threading.Thread(target=target, daemon=True)
        thread.start()
        return thread, box

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted(self.root.glob("*.log")))


class LinkCut:
    """A TCP relay between one SuperNode and the SuperLink whose cable a test can pull: ``cut()`` resets the
    open connections (a request under way breaks off) and refuses new ones until ``restore()``. TLS passes
    through untouched."""

    def __init__(self, target_port: int) -> None:
        self.target, self.conns = target_port, []
        self.lock = threading.Lock()
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        threading.Thread(target=self._accept, args=(self.server,), daemon=True).start()

    def _accept(self, server: socket.socket) -> None:
        while True:
            try:
                near, _ = server.accept()
            except OSError:
                return  # closed: cut or done
            try:
                far = socket.create_connection(("127.0.0.1", self.target))
            except OSError:
                near.close()
                continue
            with self.lock:
                self.conns += [near, far]
            for a, b in ((near, far), (far, near)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.close()
                except OSError:
                    pass

    def cut(self) -> None:
        try:  # shutdown first: close() alone does not wake a thread blocked in accept(), which would go on
            self.server.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.server.close()
        with self.lock:
            conns, self.conns = self.conns, []
        for s in conns:
            try:
                s.shutdown(socket.SHUT_RDWR)
                s.close()
            except OSError:
                pass

    def restore(self) -> None:
        self.server = socket.create_server(("127.0.0.1", self.port))
        threading.Thread(target=self._accept, args=(self.server,), daemon=True).start()

    def close(self) -> None:
        self.cut()


@pytest.fixture(scope="module")
def federation(tmp_path_factory):
    fed = None
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OMP_NUM_THREADS", "1")  # inherited by every Flower process and app
        try:
            fed = Federation(tmp_path_factory.mktemp("deploy"))
            fed.ensure_running()
            yield fed
        finally:
            if fed is not None:
                assert fed.close() == [], "processes left running after stop()"


@pytest.fixture
def running(federation):
    federation.ensure_running()
    return federation


# --------------------------------------------------------------------------------------------------
# No processes: the app bundle (keys and certificates: tests/federated/test_certificates.py)
# --------------------------------------------------------------------------------------------------

def test_app_bundle_is_the_repository_flower_app(tmp_path):
    """`flwr run` ships flower_cli.APP_PYPROJECT; it must say what the repository's pyproject says."""
    from flwr.common.config import validate_config

    repo = tomllib.loads((REPO / "pyproject.toml").read_text())
    bundle = tomllib.loads((flower_cli.write_app(tmp_path) / "pyproject.toml").read_text())
    for key in ("publisher", "components", "config"):
        assert bundle["tool"]["flwr"]["app"][key] == repo["tool"]["flwr"]["app"][key], key
    assert set(repo["tool"]["flwr"]["app"]["config"]) == {"fadal-config", "labels"}  # what submit_run sends
    for config in (repo, bundle):
        ok, errors, _ = validate_config(config, check_module=True, project_dir=REPO)
        assert ok, errors


# --------------------------------------------------------------------------------------------------
# Real processes
# --------------------------------------------------------------------------------------------------

def test_unregistered_supernode_is_refused(running, tmp_path):
    """SuperNode authentication is on: a key the coordinator did not register cannot join."""
    rogue = tmp_path / "rogue"
    certificates.make_site_keys(rogue, "site_A")  # same name, a key the coordinator never registered
    (rogue / "ca.crt").write_bytes(running.certs["ca_cert"].read_bytes())  # even with the right CA
    proc = running._supernode("site_A", rogue, free_port(), "rogue")
    try:
        proc.wait(timeout=90)  # a SuperNode that is let in never exits by itself
    except Exception:
        pytest.fail("an unregistered SuperNode was not refused:\n" + running.logs())
    assert "Failed to initialize the connection" in (running.root / "rogue.log").read_text()


def test_three_hospitals_two_rounds_over_tls(running):
    """The coordinator's command, `fadal federate --deployment`, against the running federation."""
    from fadal.cli import app

    # No plan: the sites send their fingerprints through the deployment engine first, then train.
    plain = running.config("plain", plan=None,
                           planner={"channels": [4, 8], "patch_size": [16, 16, 16], "spacing_mm": [8, 8, 8]})
    res = CliRunner().invoke(app, ["federate", "--config", str(plain), "--deployment",
                                   "--server", f"127.0.0.1:{running.port}", "--certs", str(running.root / "certs"),
                                   "--home", str(running.coordinator_home)])
    assert res.exit_code == 0, res.output[-4000:] + running.logs()
    assert "federated rounds" in res.output  # the history table

    out = running.out("plain")
    history = json.loads((out / "history.json").read_text())
    assert [r["round"] for r in history["rounds"]] == [1, 2]
    assert json.loads((out / "plan.json").read_text())["fingerprint"]["sites"] == len(SITES)  # merged at the coordinator
    assert all(r["sites"] == 3 and r["failures"] == 0 and r["bytes_up"] > 0 for r in history["rounds"])
    assert (out / "checkpoints" / "round_001.pt").exists() and (out / "checkpoints" / "round_002.pt").exists()
    assert checkpoint_round(out / "global_model.pt") == 2
    # No federated evaluation in this config (evaluate_every 0) and no data on the coordinator: no report.
    assert "no report" in res.output and not (out / "metrics.json").exists()


#: A ServerApp (runs at the coordinator) that sends one query to every site and writes what comes back.
PROBE_SERVER = """\
import json, time
from pathlib import Path
from flwr.app import Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

app = ServerApp()

@app.main()
def main(grid: Grid, context: Context) -> None:
    deadline = time.monotonic() + 60
    while len(list(grid.get_node_ids())) < 3 and time.monotonic() < deadline:
        time.sleep(0.5)
    msgs = [Message(RecordDict(), dst_node_id=n, message_type="query") for n in grid.get_node_ids()]
    replies = list(grid.send_and_receive(msgs, timeout=120))
    out = [{"error": m.error.reason if m.has_error() else None} for m in replies]
    Path(context.run_config["fadal-config"] + ".replies.json").write_text(json.dumps(out))
"""
#: A ClientApp that would run at the site; it leaves a mark when its module is imported.
PROBE_CLIENT = """\
from pathlib import Path
from flwr.app import Message, RecordDict
from flwr.clientapp import ClientApp

with open({marker!r}, "a") as f:
    f.write("ran\\n")
app = ClientApp()

@app.query()
def query(msg, context):
    return Message(RecordDict(), reply_to=msg)
"""


@pytest.mark.parametrize("bundle", ["shadows-fadal", "other-clientapp"])
def test_a_bundle_that_is_not_fadals_is_refused_at_every_site(running, bundle):
    """Only vetted code runs at a hospital. A run whose bundle carries its own `fadal` package (first on the
    ClientApp's sys.path, it would shadow the installed FADAL) or names another ClientApp is refused by
    every site before anything of it is imported: one line in the site's log says why, the coordinator
    gets an opaque code. (The bundle's ServerApp, at the coordinator, is not the site's business.)"""
    from flwr.cli.build import build_fab_from_disk

    from fadal.federated.app_vetting import FADAL_CLIENTAPP, bundle_hash

    folder, marker = running.root / f"bundle-{bundle}", running.root / f"ran-{bundle}"
    flower_cli.write_app(folder)
    toml = (folder / "pyproject.toml").read_text().replace("fadal.federated.server_app:app", "probe_server:app")
    (folder / "probe_server.py").write_text(PROBE_SERVER)
    if bundle == "shadows-fadal":
        for sub in ("fadal", "fadal/federated"):
            (folder / sub).mkdir()
            (folder / sub / "__init__.py").write_text("")
        (folder / "fadal/federated/client_app.py").write_text(PROBE_CLIENT.format(marker=str(marker)))
    else:
        toml = toml.replace(FADAL_CLIENTAPP, "probe_client:app")
        (folder / "probe_client.py").write_text(PROBE_CLIENT.format(marker=str(marker)))
    (folder / "pyproject.toml").write_text(toml)
    digest = bundle_hash(build_fab_from_disk(folder))  # what `flwr run` sends (deterministic)

    t0 = time.monotonic()
    config = running.config(f"refused-{bundle}")
    result = flower_cli.submit_run(folder, flower_cli.CONNECTION, config, running.coordinator_home, timeout=240)
    assert result["ok"], f"{result['status']} {result.get('status-details')}\n{result['log'][-4000:]}\n{running.logs()}"
    replies = json.loads(Path(f"{config}.replies.json").read_text())
    assert not marker.exists(), "the bundle's ClientApp ran at a site"
    assert len(replies) == len(SITES) and all(r["error"] for r in replies), replies
    for r in replies:  # opaque: a code, no path, no detail
        assert re.search(r"'FADAL-E-REFUSED-app-bundle-[0-9a-f]{4}'", r["error"]), r["error"]
        assert "/" not in r["error"] and "shadow" not in r["error"], r["error"]
    for name in SITES:
        lines = [ln for ln in (running.root / f"{name}.log").read_text().splitlines()
                 if digest in ln and "refused" in ln]
        assert lines, f"{name}'s log does not say why it refused bundle {digest}:\n{running.logs()}"
        assert ("shadow the installed FADAL" if bundle == "shadows-fadal" else "probe_client.py") in lines[-1]
    print(f"{bundle} refused by every site in {time.monotonic() - t0:.0f} s")


def test_a_hospital_crashes_mid_run_and_the_others_finish(running):
    """min_sites=2: site_C's machine dies after round 1; round 2 is aggregated over site_A and site_B.

    Killed with SIGKILL, the SuperNode cannot say goodbye: the SuperLink notices when its heartbeats
    stop (2 missed; site_C's interval is shortened to 10 s from Flower's 30 s, so that takes 20 s, not 60)
    and answers the ServerApp with an error for it."""
    running.restart_node("site_C", heartbeat_s=10)
    config = running.config("dropout", min_sites=2)
    out = running.out("dropout")
    thread, box = running.submit_in_background(config)
    wait_for(lambda: (out / "checkpoints" / "round_001.pt").exists() or not thread.is_alive(), 240, "round 1")
    running.crash(running.nodes["site_C"])
    thread.join(300)
    assert not thread.is_alive() and "error" not in box, box
    result = box["result"]
    assert result["ok"], f"{result['status']} {result.get('status-details')}\n{result['log'][-4000:]}\n{running.logs()}"

    r1, r2 = json.loads((out / "history.json").read_text())["rounds"]
    assert (r1["sites"], r1["failures"]) == (3, 0)
    assert (r2["sampled"], r2["sites"], r2["failures"]) == (3, 2, 1)
    assert len(r2["bytes_up_per_site"]) == 2
    assert checkpoint_round(out / "global_model.pt") == 2


def test_coordinator_crash_then_restart_resumes_from_last_round(running):
    """The SuperLink's machine dies after round 1; restarted on the same database, the hospitals'
    SuperNodes reconnect by themselves, and the same submission continues with round 2 only."""
    config = running.config("resume")
    out = running.out("resume")
    thread, box = running.submit_in_background(config)
    wait_for(lambda: checkpoint_round(out / "global_model.pt") == 1 or not thread.is_alive(), 240, "round 1")
    round1_written = (out / "checkpoints" / "round_001.pt").stat().st_mtime_ns
    running.crash(running.link)
    thread.join(120)
    assert not thread.is_alive()
    assert "error" in box or not box["result"]["ok"]  # the interrupted run did not complete
    assert checkpoint_round(out / "global_model.pt") == 1

    running.start_link()  # same port and database: registrations are kept (registering again is a no-op)
    assert all(node.poll() is None for node in running.nodes.values()), "a SuperNode gave up:\n" + running.logs()
    result = running.submit(config)
    assert result["ok"], f"{result['status']} {result.get('status-details')}\n{result['log'][-4000:]}\n{running.logs()}"

    history = json.loads((out / "history.json").read_text())
    assert [r["round"] for r in history["rounds"]] == [1, 2]
    assert history["resumed_after"] == [1]
    assert all(r["sites"] == 3 for r in history["rounds"])
    assert (out / "checkpoints" / "round_001.pt").stat().st_mtime_ns == round1_written  # round 1 not redone
    assert checkpoint_round(out / "global_model.pt") == 2


# --------------------------------------------------------------------------------------------------
# Long rounds and flaky links (Flower's heartbeats shortened to 10 s for one site, so that outlasting
# them takes seconds: the SuperLink marks a SuperNode offline, and a SuperNode its ClientApp, after 2
# missed heartbeats, i.e. 20 s here and 60 s by default)
# --------------------------------------------------------------------------------------------------

def test_a_round_longer_than_the_heartbeat_limits_still_delivers(running):
    """site_B's local training takes 30 s longer than usual, 1.5 x the 20 s the SuperLink and its SuperNode
    wait for a heartbeat: heartbeats go on while it trains, and its update arrives and is aggregated."""
    flag = running.root / "slow_B"
    flag.write_text("30")
    try:
        running.restart_node("site_B", heartbeat_s=10, slow_flag=flag)
        t0 = time.monotonic()
        result = running.submit(running.config("long_round", rounds=1))
        assert result["ok"], f"{result['status']} {result.get('status-details')}\n{result['log'][-4000:]}\n{running.logs()}"
        (r1,) = json.loads((running.out("long_round") / "history.json").read_text())["rounds"]
        assert (r1["sampled"], r1["sites"], r1["failures"]) == (3, 3, 0)
        assert set(r1["site_status"].values()) == {"answered"}
        assert max(r1["client_seconds_per_site"].values()) >= 30  # the slow site's round did last that long
        print(f"long round: {time.monotonic() - t0:.0f} s")
    finally:
        flag.unlink(missing_ok=True)
        running.stop_node("site_B")


def test_a_site_loses_its_network_mid_round_and_rejoins(running):
    """min_sites=2: site_C's network goes while it trains in round 2 (its reply cannot leave) and stays down
    for 35 s, past its 20 s heartbeat limit: round 2 is aggregated over site_A and site_B. The link comes
    back, the SuperNode reconnects by itself, and the same run resumed for a third round has all three."""
    cable, flag = LinkCut(running.port), running.root / "slow_C"
    try:
        running.restart_node("site_C", superlink_port=cable.port, heartbeat_s=10, slow_flag=flag)
        out = running.out("flaky")
        t0 = time.monotonic()
        thread, box = running.submit_in_background(running.config("flaky", min_sites=2))
        wait_for(lambda: (out / "checkpoints" / "round_001.pt").exists() or not thread.is_alive(), 240, "round 1")
        flag.write_text("15")  # round 2: site_C trains 15 s longer, and the cable goes once it has started
        wait_for(lambda: Path(f"{flag}.started").exists() or not thread.is_alive(), 120, "site_C's round 2")
        cable.cut()
        print(f"cut at {time.monotonic() - t0:.0f} s")
        time.sleep(35)  # its reply is due at 15 s, in the outage; its 20 s heartbeat window passes too
        cable.restore()
        print(f"restored at {time.monotonic() - t0:.0f} s")
        flag.unlink()
        thread.join(300)
        assert not thread.is_alive() and "error" not in box, box
        result = box["result"]
        assert result["ok"], f"{result['status']} {result.get('status-details')}\n{result['log'][-4000:]}\n{running.logs()}"
        r1, r2 = json.loads((out / "history.json").read_text())["rounds"]
        assert (r1["sites"], r1["failures"]) == (3, 0)
        assert (r2["sampled"], r2["sites"], r2["failures"]) == (3, 2, 1)
        assert sorted(r2["site_status"].values()) == ["answered", "answered", sorted(
            set(r2["site_status"].values()) - {"answered"})[0]]
        assert "no reply" in (out / "report.html").read_text() or "failed" in (out / "report.html").read_text()
        print(f"flaky link, 2 rounds: {time.monotonic() - t0:.0f} s")

        # Rejoined: the same run, one round more, with every site (min_sites 0 = all three).
        result = running.submit(running.config("flaky", rounds=3, min_sites=0), timeout=180)
        assert result["ok"], f"{result['status']} {result.get('status-details')}\n{result['log'][-4000:]}\n{running.logs()}"
        rounds = json.loads((out / "history.json").read_text())["rounds"]
        assert [r["round"] for r in rounds] == [1, 2, 3] and rounds[2]["sites"] == 3
        assert running.nodes["site_C"].poll() is None  # the SuperNode rode out the outage
        print(f"flaky link, with the rejoin round: {time.monotonic() - t0:.0f} s")
    finally:
        cable.close()
        flag.unlink(missing_ok=True)
        running.stop_node("site_C")
