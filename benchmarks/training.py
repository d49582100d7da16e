"""The training engine against the plain-MONAI peer, side by side in one run, at one wall-clock budget.

FADAL: pooled training on the official ``train`` cases of OpenKBP (one site view of all of them, partial
labels as drawn), planned from their fingerprint for the budget, trained by the one engine
(``fadal.model.engine``) until the budget is spent, scored on the ``validation`` cases in each case's
own geometry (Dice, HD95 per organ, only where the reference draws the organ). The peer
(``../shared/peers/monai_plain.py``, unchanged) trains on the same cases for the same minutes right
after, on the same machine, and scores the same cases its own way (Dice where drawn).

Data loading and preprocessing are not counted in either budget (the peer loads before its clock
starts too); both are reported.

    python benchmarks/training.py                          # default: 25 + 25 min of training, ~55 min in all
    python benchmarks/training.py --minutes 5 --skip-peer  # the engine alone, shorter
    python benchmarks/training.py --train-data DIR --eval-data DIR --out runs/bench_training
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _openkbp import spread, write_view  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "openkbp"
PEER = ROOT.parent / "shared" / "peers" / "monai_plain.py"


def split_ids(meta: dict, split: str) -> list[str]:
    return sorted(c for c, m in meta.items() if m.get("official_split", m.get("split")) == split)


def run_fadal(view: Path, minutes: float, threads: int, seed: int, balance: str | None = None,
              foreground_fraction: float | None = None) -> dict:
    import torch

    from fadal.config import PlannerConfig, TrainConfig
    from fadal.data.site import load_site
    from fadal.evaluate.evaluate import evaluate_model_on_cases
    from fadal.model.engine import fit, make_sampler, seed_everything
    from fadal.model.net import build_network, pick_device
    from fadal.model.patches import site_training_items
    from fadal.plan.planner import plan_for_sites

    given = {"foreground_balance": balance, "foreground_fraction": foreground_fraction}  # None: TrainConfig's default
    cfg = TrainConfig(seed=seed, num_threads=threads, minutes=minutes, **{k: v for k, v in given.items() if v is not None})
    seed_everything(cfg.seed, cfg.num_threads)
    t0 = time.perf_counter()
    site = load_site(view, validate=False)
    plan = plan_for_sites([site], PlannerConfig(budget_minutes=minutes))
    t_plan = time.perf_counter() - t0
    print(f"plan ({t_plan:.0f} s): spacing {plan.preprocess.spacing_mm}, HU {plan.preprocess.hu_window}, patch "
          f"{plan.patch_size} x {plan.batch_size}, {plan.network.architecture} {plan.network.channels}", flush=True)
    t0 = time.perf_counter()
    items = site_training_items(site)
    sampler = make_sampler(items, plan, cfg, site.num_classes)
    t_load = time.perf_counter() - t0
    print(f"loaded and preprocessed {len(items)} training cases in {t_load:.0f} s", flush=True)
    model = build_network(site.num_classes, plan.network)

    def progress(step: int, _steps: int, loss: float, elapsed: float) -> None:
        if step % 100 == 0:
            print(f"step {step} {elapsed:.0f} s loss {loss:.3f}", flush=True)

    result = fit(model, sampler, plan, cfg, pick_device(), steps=10 ** 9, minutes=minutes, progress=progress)
    from fadal.model.infer import save_checkpoint

    save_checkpoint(model, view.parent / "fadal_model.pt", site.labels, plan, cfg, {"steps": result.steps})
    t0 = time.perf_counter()
    scored = evaluate_model_on_cases(model, site, site.test, plan, pick_device())
    t_eval = time.perf_counter() - t0
    summary = scored["summary"]
    organs = [o for o in site.organs if o in summary]
    return {
        "plan": plan.model_dump(mode="json"), "steps": result.steps, "train_seconds": result.seconds,
        "seconds_per_step": result.seconds / max(result.steps, 1), "plan_seconds": t_plan, "load_seconds": t_load,
        "eval_seconds": t_eval, "predict_seconds_per_case": t_eval / max(len(site.test), 1),
        "train_cases": len(items), "eval_cases": len(site.test), "final_loss": result.loss,
        "checkpoint": str(view.parent / "fadal_model.pt"),
        "dice": {o: summary[o]["dice"] for o in organs}, "hd95_mm": {o: summary[o].get("hd95") for o in organs},
        "n": {o: summary[o].get("n") for o in organs}, "mean_dice": summary["mean"]["dice"],
        "torch_threads": torch.get_num_threads(), "train_config": cfg.model_dump(mode="json"),
    }


def run_peer(train_data: Path, eval_data: Path, train_split: str, eval_split: str, minutes: float, threads: int,
             out: Path) -> dict:
    cmd = [sys.executable, str(PEER), "--data", str(train_data), "--eval-data", str(eval_data),
           "--train-split", train_split, "--eval-split", eval_split, "--minutes", str(minutes),
           "--threads", str(threads), "--out", str(out)]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True)
    res = json.loads(out.read_text())
    res["wall_seconds"] = time.perf_counter() - t0
    res["seconds_per_step"] = res["train_seconds"] / max(res["iterations"], 1)
    return res


def table(fadal: dict | None, peer: dict | None) -> str:
    organs = list((fadal or peer)["dice"])
    rows = ["| organ | FADAL Dice | FADAL HD95 (mm) | peer Dice |", "|---|---|---|---|"]

    def f(v, fmt="{:.3f}"):
        return "-" if v is None else fmt.format(v)

    for o in organs:
        rows.append(f"| {o} | {f(fadal and fadal['dice'].get(o))} | {f(fadal and fadal['hd95_mm'].get(o), '{:.1f}')} "
                    f"| {f(peer and peer['dice'].get(o))} |")
    rows.append(f"| **mean** | **{f(fadal and fadal['mean_dice'])}** | | **{f(peer and peer['mean_dice'])}** |")
    rows.append(f"| steps | {f(fadal and fadal['steps'], '{}')} | | {f(peer and peer['iterations'], '{}')} |")
    rows.append(f"| s / step | {f(fadal and fadal['seconds_per_step'], '{:.2f}')} | | "
                f"{f(peer and peer['seconds_per_step'], '{:.2f}')} |")
    rows.append(f"| training s | {f(fadal and fadal['train_seconds'], '{:.0f}')} | | "
                f"{f(peer and peer['train_seconds'], '{:.0f}')} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--train-data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--eval-data", type=Path, default=None, help="Default: --train-data.")
    ap.add_argument("--train-split", default="train")
    ap.add_argument("--eval-split", default="validation")
    ap.add_argument("--minutes", type=float, default=25.0, help="Training budget of each side.")
    ap.add_argument("--max-train", type=int, default=0, help="Use at most this many training cases (0 = all).")
    ap.add_argument("--max-eval", type=int, default=0, help="Score at most this many evaluation cases (0 = all).")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--balance", choices=("case", "dataset"), default=None,
                    help="Foreground sampling balance (default: TrainConfig's).")
    ap.add_argument("--foreground-fraction", type=float, default=None, help="Default: TrainConfig's.")
    ap.add_argument("--skip-peer", action="store_true")
    ap.add_argument("--skip-fadal", action="store_true")
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "bench_training")
    a = ap.parse_args(argv)
    eval_data = a.eval_data or a.train_data
    train_meta = json.loads((a.train_data / "cases.json").read_text())
    eval_meta = json.loads((eval_data / "cases.json").read_text())
    train_ids, eval_ids = split_ids(train_meta, a.train_split), split_ids(eval_meta, a.eval_split)
    if a.max_train:
        train_ids = spread(train_ids, a.max_train)
    if a.max_eval:
        eval_ids = spread(eval_ids, a.max_eval)
    if not train_ids or not eval_ids:
        raise SystemExit(f"{len(train_ids)} '{a.train_split}' and {len(eval_ids)} '{a.eval_split}' cases: need both")
    a.out.mkdir(parents=True, exist_ok=True)
    view = write_view(a.out / "view", a.train_data, eval_data, train_ids, eval_ids)
    results: dict = {"settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(a).items()},
                     "train_cases": len(train_ids), "eval_cases": len(eval_ids)}
    fadal = None if a.skip_fadal else run_fadal(view, a.minutes, a.threads, a.seed, a.balance,
                                                  a.foreground_fraction)
    results["fadal"] = fadal
    (a.out / "results.json").write_text(json.dumps(results, indent=1))
    peer = None
    if not a.skip_peer:
        if a.max_train or a.max_eval:
            print("note: the peer script always uses every case of its splits (--max-train/--max-eval not applied)")
        peer = run_peer(a.train_data, eval_data, a.train_split, a.eval_split, a.minutes, a.threads,
                        a.out / "peer.json")
    results["peer"] = peer
    results["table"] = table(fadal, peer)
    (a.out / "results.json").write_text(json.dumps(results, indent=1))
    print(results["table"])
    return results


if __name__ == "__main__":
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    main()
