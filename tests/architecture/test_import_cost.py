"""What each entry point imports: `fadal --help` none of torch, MONAI, Flower or SimpleITK (each command imports
its stage inside the command); a site's ClientApp none of the coordinator's code nor amplification, reports,
plots or navigation (Flower starts a fresh ClientApp process for every message in deployment, so every import
there is paid on every round). Each check runs in a fresh interpreter."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

HEAVY = ("torch", "monai", "flwr", "SimpleITK", "itk", "ray", "matplotlib", "scipy")
#: Packages and modules a ClientApp never needs (the coordinator's side, the other stages).
NOT_IN_CLIENT_APP = ("fadal.federated.server_app", "fadal.federated.rounds", "fadal.federated.planning",
                     "fadal.federated.strategies", "fadal.federated.secure_aggregation", "fadal.federated.simulation",
                     "fadal.federated.processes", "fadal.federated.flower_cli", "fadal.amplify", "fadal.evaluate",
                     "fadal.navigation", "fadal.plan.planner", "fadal.demo", "fadal.cli", "flwr.simulation", "ray")


def _loaded_after(code: str) -> set[str]:
    """The modules a fresh interpreter holds after running ``code``."""
    probe = f"import sys\n{code}\nimport json\nprint(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=True)
    return set(json.loads(out.stdout.strip().splitlines()[-1]))


@pytest.mark.parametrize("argv", [["--help"], ["federate", "--help"], ["site", "--help"], ["predict", "--help"]])
def test_cli_help_imports_no_heavy_package(argv):
    code = ("from fadal.cli import app\n"
            f"try:\n    app({argv!r}, prog_name='fadal')\nexcept SystemExit as e:\n    assert e.code in (0, None), e.code")
    loaded = _loaded_after(code)
    assert not {m.split(".")[0] for m in loaded} & set(HEAVY), sorted(
        m for m in loaded if m.split(".")[0] in HEAVY)[:10]


def test_client_app_imports_only_the_site_side():
    loaded = _loaded_after("import fadal.federated.client_app")
    unwanted = sorted(m for m in loaded if any(m == u or m.startswith(u + ".") for u in NOT_IN_CLIENT_APP))
    assert unwanted == []
    assert "fadal.federated.site_task" in loaded  # the probe did import the app
