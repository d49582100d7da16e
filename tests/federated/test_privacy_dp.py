"""Privacy: client-side differential privacy (clipping + Gaussian noise, epsilon accounting) and
what a site sends during a simulated federation (every message, recorded by a Flower mod)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from flwr.app import ArrayRecord

from fadal_testing import LABELS, write_site
from fadal.config import FederationConfig, RegistrationConfig, SiteSpec, SynthesisConfig, TrainConfig
from fadal_testing import tiny_plan
from fadal.federated.site_task import ALLOWED_METRICS, privatise_update
from fadal.federated.rounds import train_config_record
from fadal.federated.privacy import (GaussianRdpAccountant, SitePrivacy, composed_epsilon, gaussian_rdp_epsilon,
                                    make_accountant)
from fadal.federated.strategies import build_strategy
from fadal.model.net import build_network, norm_state_keys
from fadal.records import FederationHistory

TINY = TrainConfig(seed=4)
PLAN = tiny_plan((4, 8), spacing_mm=8.0)


def exact_gaussian_epsilon(sigma: float, releases: int, delta: float) -> float:
    """Tight epsilon of ``releases`` Gaussian releases (sensitivity 1, noise sigma): they compose to
    mu-GDP with mu = sqrt(releases)/sigma, whose privacy profile is exact (Balle & Wang 2018;
    Dong, Roth & Su 2019): delta(eps) = Phi(-eps/mu + mu/2) - e^eps Phi(-eps/mu - mu/2)."""
    from scipy.stats import norm

    mu = math.sqrt(releases) / sigma

    def delta_of(eps):
        return norm.cdf(-eps / mu + mu / 2) - math.exp(eps) * norm.cdf(-eps / mu - mu / 2)

    lo, hi = 0.0, 200.0
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if delta_of(mid) > delta else (lo, mid)
    return hi


@pytest.mark.parametrize("sigma,releases", [(0.8, 1), (1.0, 10), (2.0, 50), (5.0, 200)])
def test_rdp_epsilon_is_a_tight_upper_bound_of_the_exact_gaussian_epsilon(sigma, releases):
    delta = 1e-5
    eps, order = gaussian_rdp_epsilon(sigma, releases, delta)
    exact = exact_gaussian_epsilon(sigma, releases, delta)
    assert exact <= eps <= 1.35 * exact + 0.05, (eps, exact)
    assert order > 1
    # More rounds or less noise cost more privacy.
    assert gaussian_rdp_epsilon(sigma, releases + 5, delta)[0] > eps
    assert gaussian_rdp_epsilon(sigma * 1.5, releases, delta)[0] < eps


def test_accountant_follows_flowers_protocol_and_composes():
    acc = make_accountant(num_sites=3, delta=1e-5)
    from flwr.serverapp import GaussianPrivacyEvent

    for _ in range(4):
        acc.compose(GaussianPrivacyEvent(1.2, 1, 3))
    assert acc.num_releases == 4
    spent = acc.get_privacy_spent()
    assert spent.delta == 1e-5
    assert spent.epsilon == pytest.approx(gaussian_rdp_epsilon(1.2, 4, 1e-5)[0], rel=0.05)
    ours = GaussianRdpAccountant(acc.config)
    ours.load_state_dict({"events": [{"noise_multiplier": 1.2, "sample_size": 1, "population_size": 3, "count": 4}]})
    assert ours.get_epsilon(1e-5) == pytest.approx(gaussian_rdp_epsilon(1.2, 4, 1e-5)[0])


def test_closed_form_matches_flowers_rdp_accountant_when_installed():
    """With flwr[dp] (Google's dp-accounting) installed, make_accountant uses Flower's RdpAccountant;
    the closed form used without it must agree."""
    pytest.importorskip("dp_accounting")
    from flwr.serverapp import GaussianPrivacyEvent, RdpAccountant

    for sigma, releases in ((0.8, 1), (1.0, 10), (5.0, 200)):
        acc = make_accountant(num_sites=3, delta=1e-5)
        assert isinstance(acc, RdpAccountant)
        acc.compose(GaussianPrivacyEvent(sigma, 1, 3), releases)
        assert acc.get_epsilon(1e-5) == pytest.approx(gaussian_rdp_epsilon(sigma, releases, 1e-5)[0], rel=1e-3)


def test_privatise_update_clips_to_the_norm_and_adds_calibrated_noise():
    g = torch.Generator().manual_seed(0)
    received = {"w": torch.randn(200, 50, generator=g), "b": torch.randn(50, generator=g)}
    big = {k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in received.items()}  # update norm ~10
    small = {k: v + 1e-4 for k, v in received.items()}
    # Clipping only: a large update is scaled to exactly the clip norm, in its own direction.
    sent, norm = privatise_update(big, received, clip=1.0, noise_multiplier=0.0)
    delta = torch.cat([(sent[k] - received[k]).flatten() for k in received])
    orig = torch.cat([(big[k] - received[k]).flatten() for k in received])
    assert norm > 5 and float(delta.norm()) == pytest.approx(1.0, rel=1e-4)
    assert float(torch.nn.functional.cosine_similarity(delta, orig, dim=0)) > 0.9999
    sent, _ = privatise_update(small, received, clip=1.0, noise_multiplier=0.0)
    for k in received:
        torch.testing.assert_close(sent[k], small[k])
    # Noise: N(0, (noise_multiplier * clip)^2) on every element.
    sent, _ = privatise_update(small, received, clip=0.5, noise_multiplier=2.0, generator=g)
    noise = torch.cat([(sent[k] - small[k]).flatten() for k in received])
    assert float(noise.std()) == pytest.approx(1.0, rel=0.03) and abs(float(noise.mean())) < 0.02
    # Without a generator the noise comes from the OS's entropy: two calls differ.
    a, _ = privatise_update(small, received, clip=0.5, noise_multiplier=2.0)
    b, _ = privatise_update(small, received, clip=0.5, noise_multiplier=2.0)
    assert not torch.equal(a["w"], b["w"])


def test_dp_rounds_report_epsilon_per_site(tmp_path):
    from test_strategies import Sites, drive_round

    from fadal.federated.site_task import SiteRuntime

    paths = [write_site(tmp_path / f"site_{k}", n_labeled=1, n_unlabeled=0, n_test=0) for k in range(2)]
    sites = Sites({11 + k: SiteRuntime(f"s{k}", p, None, False, tmp_path / f"c{k}") for k, p in enumerate(paths)})
    cfg = FederationConfig(sites=[SiteSpec(name=f"s{k}", data=p) for k, p in enumerate(paths)], train=TINY,
                           plan=PLAN, dp_clip=0.5, dp_noise_multiplier=1.5, dp_delta=1e-6, out=tmp_path / "run")
    history = FederationHistory()
    strategy = build_strategy(cfg, 2, history)
    model = build_network(3, PLAN.network)
    arrays = ArrayRecord(model.state_dict())
    record = train_config_record(cfg, LABELS, cfg.plan)
    for rnd in (1, 2, 3):
        before = arrays.to_torch_state_dict()
        _, replies, arrays, _ = drive_round(strategy, rnd, arrays, record, sites)
        eps = history.rounds[-1].epsilon
        # Replace-one adjacency: sensitivity 2 x clip, so the effective noise multiplier is 1.5 / 2.
        assert eps == pytest.approx(gaussian_rdp_epsilon(0.75, rnd, 1e-6)[0], rel=0.05)
    assert history.rounds[0].epsilon < history.rounds[1].epsilon < history.rounds[2].epsilon
    privacy = history.privacy
    assert privacy["clip"] == 0.5 and privacy["noise_multiplier"] == 1.5 and privacy["delta"] == 1e-6
    assert privacy["releases_per_site"] == {"11": 3, "12": 3}
    # The server saves the accounting with its state to resume a run: it must survive pickling.
    restored = SitePrivacy(0.5, 1.5, 1e-6, 2)
    restored.load_state_dict(torch.load(_saved(strategy.privacy.state_dict(), tmp_path), weights_only=True))
    assert restored.epsilon() == pytest.approx(eps)
    # What the server received is noisy: each site's update is far larger than the clip norm
    # (noise std 0.75 per element), i.e. the noise was added at the site, before sending.
    received = replies[0].content["arrays"].to_torch_state_dict()
    update = torch.cat([(received[k] - before[k]).flatten() for k in before])
    assert float(update.std()) == pytest.approx(0.75, rel=0.15)


def _saved(obj, tmp_path):
    path = tmp_path / "state.pt"
    torch.save(obj, path)
    return path


def reference_rdp_epsilon(clip: float, noise_multiplier: float, releases: int, delta: float) -> float:
    """Written here from the definitions, independently of fadal: ``releases`` Gaussian mechanisms
    with noise std ``noise_multiplier * clip`` on an update whose L2 sensitivity is ``2 * clip``
    (replace-one: one site's whole dataset replaced, each clipped update anywhere in the clip ball).
    RDP of order a: a * sensitivity^2 / (2 std^2) per release (Mironov 2017, Prop. 7), summed;
    to (eps, delta) by Balle et al. 2020, Thm 21; minimised over a with scipy."""
    from scipy.optimize import minimize_scalar

    sensitivity, std = 2.0 * clip, noise_multiplier * clip

    def eps(a):
        rdp = releases * a * sensitivity ** 2 / (2.0 * std ** 2)
        return rdp + math.log((a - 1) / a) - (math.log(delta) + math.log(a)) / (a - 1)

    best = min((minimize_scalar(eps, bounds=(lo, hi), method="bounded", options={"xatol": 1e-9})
                for lo, hi in ((1.0 + 1e-6, 2.0), (2.0, 64.0), (64.0, 1e5))), key=lambda r: r.fun)
    return max(float(best.fun), 0.0)


@pytest.mark.parametrize("clip,sigma,releases", [(0.5, 1.5, 3), (1.0, 1.0, 10), (2.0, 4.0, 50), (0.1, 0.8, 1)])
def test_epsilon_matches_a_reference_accountant_for_replace_one_adjacency(clip, sigma, releases):
    delta = 1e-6
    privacy = SitePrivacy(clip, sigma, delta, num_sites=3)
    for _ in range(releases):
        eps = privacy.record([11, 12])
    reference = reference_rdp_epsilon(clip, sigma, releases, delta)
    assert eps == pytest.approx(reference, rel=2e-3)
    # It bounds the exact epsilon of that mechanism (mu-GDP with mu = sqrt(T) * 2C / (sigma C)) from above.
    assert exact_gaussian_epsilon(sigma / 2, releases, delta) <= eps * (1 + 1e-6)
    # A site's ledger accounts its releases the same way, also with mixed settings across runs.
    assert composed_epsilon([sigma] * releases, delta) == pytest.approx(reference, rel=2e-3)
    summary = privacy.summary()
    assert "replace-one" in summary["neighbouring"] and summary["sensitivity"] == pytest.approx(2 * clip)


def _recording_mod(folder):
    """A Flower client mod that writes a description of every message the site sends."""

    def mod(msg, context, call_next):
        out = call_next(msg, context)
        desc = {"type": msg.metadata.message_type, "records": {}}
        for name, rec in out.content.items():
            kind = type(rec).__name__
            entry = {"kind": kind}
            if kind == "ArrayRecord":
                entry["arrays"] = {k: [a.dtype, list(a.shape)] for k, a in rec.items()}
            elif kind == "MetricRecord":
                entry["metrics"] = {k: [type(v).__name__, v] for k, v in rec.items()}
            else:
                entry["repr"] = repr(rec)[:200]
            desc["records"][name] = entry
        folder.mkdir(parents=True, exist_ok=True)
        n = len(list(folder.glob("*.json")))
        (folder / f"{context.node_id}_{n:03d}_{desc['type']}.json").write_text(json.dumps(desc))
        return out

    return mod


def test_every_message_a_site_sends_holds_only_arrays_and_allowed_scalars(tmp_path, monkeypatch):
    """A 2-site, 2-round simulation with every option on (FedBN, float16, DP, ConDistFL): each
    outgoing message of each site is recorded by a Flower mod and checked."""
    import fadal.federated.simulation as simulation
    from flwr.clientapp import ClientApp

    from fadal.federated.site_task import local_evaluate, local_train

    record_dir = tmp_path / "sent"

    def recording_client_app(runtimes):
        app = ClientApp(mods=[_recording_mod(record_dir)])

        @app.train()
        def train(msg, context):
            return local_train(msg, runtimes[int(context.node_config["partition-id"])])

        @app.evaluate()
        def evaluate(msg, context):
            return local_evaluate(msg, runtimes[int(context.node_config["partition-id"])])

        return app

    monkeypatch.setattr(simulation, "build_client_app", recording_client_app)
    paths = [write_site(tmp_path / f"site_{k}", n_labeled=2, n_unlabeled=1, n_test=1) for k in range(2)]
    coarse = RegistrationConfig(resolutions=1, affine_iterations=32, bspline_iterations=32, spatial_samples=512)
    cfg = FederationConfig(sites=[SiteSpec(name=f"site_{k}", data=p) for k, p in enumerate(paths)], rounds=2,
                           train=TINY, plan=PLAN, strategy="fedbn", transfer_dtype="float16", dp_clip=1.0,
                           dp_noise_multiplier=1.0, partial_label_mode="condist", evaluate_every=1,
                           synthesis=SynthesisConfig(registration=coarse, max_targets=1), selftrain_every=1,
                           out=tmp_path / "run")
    history = simulation.simulate(cfg)
    assert history.rounds[-1].epsilon > 0
    # The amplification paths ran at each site (synthetic transforms learned, pseudo-labels refined by
    # the global model in round 2), and stayed there: the checks below cover their messages too.
    for k in range(2):
        cache = cfg.out / "cache" / f"site_{k}"
        assert list((cache / "synthesis").glob("*")), k
        assert [p.name for p in (cache / "selftrain").glob("run*/round_2/provenance/*.json")] == ["case_002.json"], k

    model_keys = set(build_network(3, cfg.plan.network).state_dict())
    norm = set(norm_state_keys(build_network(3, cfg.plan.network)))
    sent = [json.loads(p.read_text()) for p in sorted(record_dir.glob("*.json"))]
    kinds = sorted(d["type"] for d in sent)
    assert kinds.count("train") == 4 and kinds.count("evaluate") == 4  # 2 sites x 2 rounds each
    for desc in sent:
        records = desc["records"]
        expected = {"arrays": "ArrayRecord", "metrics": "MetricRecord"} if desc["type"] == "train" else {"metrics": "MetricRecord"}
        assert {k: v["kind"] for k, v in records.items()} == expected, desc
        for key, (typ, value) in records["metrics"]["metrics"].items():
            assert key in ALLOWED_METRICS or key.startswith("dice-") and key[5:] in LABELS, key
            assert typ in ("int", "float") and math.isfinite(value), (key, typ, value)
        # Under DP no data-dependent scalar leaves: weight 1 for training, nothing for evaluation.
        expected_metrics = {"num-examples": ["int", 1]} if desc["type"] == "train" else {}
        assert records["metrics"]["metrics"] == expected_metrics, desc
        if "arrays" in records:
            arrays = records["arrays"]["arrays"]
            assert set(arrays) == model_keys - norm  # FedBN: norm layers never leave the site
            assert all(dtype == "float16" for dtype, _ in arrays.values())
