"""Flower's overhead on a loopback deployment vs its simulation engine, same federation, same data.

Three OpenKBP sites (A/B/C, official 'train' cases; views built as in ``federation.py``) train FedAvg
for a few rounds twice: in Flower's simulation engine, then on the deployment engine over TLS on
127.0.0.1 (a SuperLink with SuperNode authentication and three SuperNodes, each reading only its own
folder: what `fadal server` / `fadal site` / `fadal federate --deployment` start).

Overhead = what is not local work. Per round: the round's wall time (server side, from sending the
model to the checkpoint being written) minus the ClientApp time of the sites on the critical path
(simulation: sites run one after the other, so their sum; deployment: sites run at once, so the
slowest). ClientApp time is measured inside the ClientApp (loading data, training, (de)serialising
the model). What remains is Flower: messaging, process start-up (a deployment SuperNode starts a
fresh ClientApp process per message, which imports torch and MONAI again), aggregation, checkpoints.
The share is overhead / local training seconds (the issue's "time in Flower vs time in local training").

    python benchmarks/deployment.py                  # 3 rounds, the federation benchmark's default model
    python benchmarks/deployment.py --quick          # tiny smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from federation import DEFAULT, DEFAULT_DATA, QUICK, ROOT, build_site_views, federation_config  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _on_path(entry, key: str, concurrent: bool) -> float:
    """Seconds of ``key`` (per site) of a :class:`fadal.records.RoundEntry` on the round's critical path:
    the slowest site when sites work at once (deployment), all of them when they take turns (simulation)."""
    per_site = list((getattr(entry, key) or {}).values())
    return max(per_site, default=0.0) if concurrent else sum(per_site)


def overhead(history, concurrent: bool) -> dict:
    """Flower's share of a finished federation's :class:`fadal.records.FederationHistory`."""
    rounds = [r for r in history.rounds if r.loss is not None]
    wall = sum(r.seconds for r in rounds)
    per_round = [r.seconds - _on_path(r, "client_seconds_per_site", concurrent) for r in rounds]
    critical = wall - sum(per_round)
    train = sum(_on_path(r, "train_seconds_per_site", concurrent) for r in rounds)
    # ClientApp process start-up (Python + torch + MONAI imports) on the critical path.
    start_s = sum(_on_path(r, "startup_seconds_per_site", concurrent) for r in rounds)
    return {"rounds": len(rounds), "rounds_wall_s": round(wall, 1), "client_critical_s": round(critical, 1),
            "train_critical_s": round(train, 1), "overhead_s": round(wall - critical, 1),
            "overhead_share_of_training": round((wall - critical) / train, 3) if train else None,
            "clientapp_startup_s": round(start_s, 1),
            "overhead_without_startup_share": round((wall - critical - start_s) / train, 3) if train else None,
            "per_round_overhead_s": [round(x, 2) for x in per_round]}


def _rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def _role(pid: int, parent_cmdline: bytes | None) -> str:
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return "gone"
    if parent_cmdline is not None and cmd == parent_cmdline:
        return "ClientApp"  # a fork of the warm process
    for needle, role in ((b"fadal.federated.superlink", "SuperLink"), (b"flwr-serverapp", "ServerApp"),
                         (b"fadal.federated.warm_clientapp", "warm process"), (b"flower-supernode", "SuperNode"),
                         (b"flower-superexec", "SuperExec"), (b"flwr-clientapp", "ClientApp")):
        if needle in cmd:
            return role
    return "other"


class MemorySampler:
    """RSS of every long-lived Flower/FADAL process, sampled every ``every`` s with the rounds finished so far
    (``history.json``): shows whether the SuperLink, SuperNodes or the warm processes grow round after round."""

    def __init__(self, handles: list, history: Path, every: float = 2.0) -> None:
        import threading

        self.handles, self.history, self.every = handles, history, every
        self.samples: list[dict] = []
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _rounds(self) -> int:
        try:
            return len(json.loads(self.history.read_text())["rounds"])
        except (OSError, ValueError, KeyError):
            return 0

    def _run(self) -> None:
        from fadal.federated.processes import descendants

        while not self.stopped.wait(self.every):
            sample: dict[str, float] = {}
            for h in list(self.handles):
                if h.poll() is not None:
                    continue
                try:
                    own = Path(f"/proc/{h.pid}/cmdline").read_bytes()
                except OSError:
                    continue
                for pid in [h.pid] + [p for p, _ in descendants(h.pid)]:
                    role = _role(pid, own if pid != h.pid else None)
                    key = f"{role} (max)" if role in ("ClientApp", "ServerApp") else f"{role} (sum)"
                    rss = _rss_mb(pid)
                    sample[key] = max(sample.get(key, 0.0), rss) if "max" in key else sample.get(key, 0.0) + rss
            self.samples.append({"round": self._rounds(), **{k: round(v, 1) for k, v in sample.items()}})

    def stop(self) -> dict:
        """Per process kind: RSS (MB) when round 3 had finished, at the end, and the growth in between."""
        self.stopped.set()
        self.thread.join()
        last = max((s["round"] for s in self.samples), default=0)
        steady = [s for s in self.samples if s["round"] >= 3]
        if last < 4 or not steady:
            return {"rounds_sampled": last, "samples": len(self.samples)}
        first = [s for s in steady if s["round"] == 3]
        final = [s for s in steady if s["round"] == last]
        kinds = sorted({k for s in steady for k in s if k.endswith("(sum)") and "other" not in k and "gone" not in k})
        table = {}
        for kind in kinds:
            a = statistics.median(s.get(kind, 0.0) for s in first)
            b = statistics.median(s.get(kind, 0.0) for s in final)
            table[kind] = {"after_round_3_mb": round(a, 1), f"after_round_{last}_mb": round(b, 1),
                           "growth": round(b / a - 1, 3) if a else None}
        peaks = {k: max(s.get(k, 0.0) for s in self.samples) for k in ("ClientApp (max)", "ServerApp (max)")}
        return {"rounds_sampled": last, "samples": len(self.samples), "rss": table,
                "peak_mb": {k: round(v, 1) for k, v in peaks.items()}}


def run_simulation(cfg, out: Path) -> dict:
    from fadal.federated.simulation import simulate

    t0 = time.perf_counter()
    history = simulate(cfg.model_copy(update={"out": out}))
    return {"wall_s": round(time.perf_counter() - t0, 1), **overhead(history, concurrent=False)}


def run_deployment(cfg, views: dict[str, Path], out: Path) -> dict:
    from fadal.federated import certificates, flower_cli, processes

    root = out.parent / "deployment_processes"
    root.mkdir(parents=True, exist_ok=True)
    names = [f"site_{s}" for s in views]
    # One machine plays every party: the trial path, which also makes the sites' keys (in certs/<site>/).
    certs = certificates.make_trial_certificates(root / "certs", names, server_host="127.0.0.1")
    port = _free_port()
    link_home, coord_home = root / "flwr-superlink", root / "flwr-coordinator"
    started = []
    try:
        t_start = time.perf_counter()
        link = processes.start_superlink(certs["coordinator"], port, root / f"superlink_{port}.db", link_home,
                                      host="127.0.0.1", log=root / "superlink.log")
        started.append(link)
        processes.wait_for_port("127.0.0.1", port, link, timeout=120)
        token = certificates.read_operator_token(certs["operator_token"])  # run submission needs it
        flower_cli.write_connection(link_home, f"127.0.0.1:{port}", certs["ca_cert"], token=token)
        flower_cli.register_supernodes(certs["coordinator"], link_home)
        for name, (site, data) in zip(names, views.items()):
            started.append(processes.start_supernode(certs["sites"][name], f"127.0.0.1:{port}", data, name, _free_port(),
                                                  root / f"flwr-{name}", cache_dir=root / "cache" / name,
                                                  log=root / f"{name}.log"))
        t_up = time.perf_counter() - t_start
        flower_cli.write_connection(coord_home, f"127.0.0.1:{port}", certs["ca_cert"], token=token)
        config = root / "fl.yaml"
        config.write_text(yaml.safe_dump(cfg.model_copy(update={"out": out}).model_dump(mode="json")))
        t0 = time.perf_counter()
        sampler = MemorySampler(started, out / "history.json")
        result = flower_cli.submit_run(flower_cli.write_app(coord_home / "app"), flower_cli.CONNECTION, config, coord_home,
                                   timeout=7200)
        wall = time.perf_counter() - t0
        memory = sampler.stop()
        if not result["ok"]:
            raise RuntimeError(f"deployment run ended {result['status']}; logs in {root}")
    finally:
        processes.stop(started)
    from fadal.federated.rounds import read_history

    history = read_history(out / "history.json")
    return {"wall_s": round(wall, 1), "processes_start_s": round(t_up, 1), **overhead(history, concurrent=True),
            "memory": memory}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--train-data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "bench_deployment")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--train-per-site", type=int, default=None)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per site (sites train at once in deployment)")
    ap.add_argument("--engines", default="simulation,deployment", help="which engines to run (comma-separated)")
    args = ap.parse_args(argv)
    settings = replace(QUICK if args.quick else DEFAULT, rounds=args.rounds, threads=args.threads,
                       eval_per_site=1)
    if args.train_per_site:
        settings = replace(settings, train_per_site=args.train_per_site)
    os.environ.update(FLWR_TELEMETRY_ENABLED="0", FLWR_DISABLE_UPDATE_CHECK="1", OMP_NUM_THREADS=str(args.threads))
    import tempfile

    os.environ.setdefault("RAY_TMPDIR", tempfile.mkdtemp(prefix="fadal_ray_"))
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    views = build_site_views(args.train_data.resolve(), args.train_data.resolve(), out / "sites", settings)
    cfg = federation_config(settings, views, out / "simulation", strategy="fedavg")
    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    results = out / "results.json"
    doc = json.loads(results.read_text()) if results.exists() else {}  # keep the other engine's last result
    doc["settings"] = asdict(settings)
    for engine in engines:
        shutil.rmtree(out / engine, ignore_errors=True)  # a finished run there would just be resumed
        doc[engine] = (run_simulation(cfg, out / "simulation") if engine == "simulation"
                       else run_deployment(cfg, views, out / "deployment"))
        results.write_text(json.dumps(doc, indent=1))

    print(f"\nFlower overhead, FedAvg, {settings.rounds} rounds, {len(views)} OpenKBP sites x {settings.train_per_site} "
          f"training scans, torch threads per site {settings.threads}")
    print(f"{'engine':<12}{'wall s':>8}{'rounds s':>10}{'client s':>10}{'train s':>9}{'overhead s':>12}{'share':>8}"
          f"{'app start s':>13}{'share w/o':>11}")
    for engine in [e for e in ("simulation", "deployment") if e in doc]:
        r = doc[engine]
        print(f"{engine:<12}{r['wall_s']:8.0f}{r['rounds_wall_s']:10.1f}{r['client_critical_s']:10.1f}"
              f"{r['train_critical_s']:9.1f}{r['overhead_s']:12.1f}{r['overhead_share_of_training']:8.2f}"
              f"{r['clientapp_startup_s']:13.1f}{r['overhead_without_startup_share']:11.2f}")
    print("share = overhead / local training seconds; 'w/o' leaves out the ClientApp processes' start-up "
          "(imports of torch and MONAI: a deployment SuperNode starts one process per message).")
    memory = doc.get("deployment", {}).get("memory", {})
    if memory.get("rss"):
        last = memory["rounds_sampled"]
        print(f"\nResident memory (MB, sum over a kind's processes; median of samples) after round 3 and round {last}:")
        for kind, row in memory["rss"].items():
            growth = f"{100 * row['growth']:+.1f} %" if row["growth"] is not None else "-"
            print(f"  {kind:<22}{row['after_round_3_mb']:9.1f}{row[f'after_round_{last}_mb']:9.1f}  {growth}")
        print(f"  peak of one ClientApp {memory['peak_mb']['ClientApp (max)']:.0f} MB, "
              f"ServerApp {memory['peak_mb']['ServerApp (max)']:.0f} MB")
    print(f"(client/train s: sum over sites in simulation (one at a time), slowest site in deployment (at once)); "
          f"results in {out / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
