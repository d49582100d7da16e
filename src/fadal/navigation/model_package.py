"""A deployable model package (`fadal export`): one folder a hospital copies to its inference machine.

    DIR/manifest.json   records.ModelPackageManifest: schema_version, labels, plan, file hashes, the check
    DIR/model.pt2       the network as a ``torch.export`` program (one sliding window in, its logits out):
                        a serialised graph, loaded without the model's Python classes (TorchScript's successor;
                        ``torch.jit`` is deprecated in this torch)
    DIR/weights.pt      the eager weights as a FADAL checkpoint (a fallback, and for fine-tuning)

At export the graph is run beside the eager model on a test volume large enough for several sliding
windows: every logit must agree to ``tolerance`` (1e-4) and the label maps voxel for voxel, and the result is
written in the manifest. A package whose check failed is not written. Inference from a package needs torch,
MONAI's transforms and this module, not FADAL's training stack (no Flower, no registration).
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from fadal.data.io import atomic_path, read_record, write_json
from fadal.errors import FadalInputError
from fadal.records import GraphCheck, ModelPackageManifest, Plan

MANIFEST = "manifest.json"
GRAPH = "model.pt2"
WEIGHTS = "weights.pt"
#: Largest |graph - eager| accepted for any logit at export.
TOLERANCE = 1e-4


@dataclass
class LoadedModel:
    """A network ready for :func:`fadal.model.infer.predict_image`, from a checkpoint or a package."""

    network: torch.nn.Module
    labels: dict[str, int]
    plan: Plan
    source: Path
    kind: str  # "checkpoint" or "package"


def is_package(path: Path) -> bool:
    path = Path(path)
    return (path.is_dir() and (path / MANIFEST).is_file()) or path.name == MANIFEST


def load_model(path: Path) -> LoadedModel:
    """A FADAL checkpoint (model.pt) or a package folder from `fadal export` (or its manifest.json)."""
    path = Path(path)
    if is_package(path):
        return load_package(path.parent if path.name == MANIFEST else path)
    if path.is_dir():
        raise FadalInputError(f"{path}: a folder without {MANIFEST}; give a model.pt or a folder from `fadal export`")
    from fadal.model.infer import load_checkpoint

    network, labels, plan, _ = load_checkpoint(path)
    return LoadedModel(network, labels, plan, path, "checkpoint")


def read_manifest(folder: Path) -> ModelPackageManifest:
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise FadalInputError(f"{folder}: no {MANIFEST}; not a package from `fadal export`")
    try:
        raw = json.loads(path.read_text())
    except ValueError as err:
        raise FadalInputError(f"{path}: not JSON ({err})") from None
    version = raw.get("schema_version") if isinstance(raw, dict) else None
    if version != ModelPackageManifest.model_fields["schema_version"].default:
        raise FadalInputError(f"{path}: package schema_version {version}, this FADAL reads "
                              f"{ModelPackageManifest.model_fields['schema_version'].default}; export it again")
    return read_record(ModelPackageManifest, path, "package manifest")


def load_package(folder: Path) -> LoadedModel:
    """The package's exported graph with its labels and plan; files checked against their hashes."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    if not manifest.check.passed:
        raise FadalInputError(f"{folder}: the package's export check failed; export it again")
    graph = folder / manifest.graph
    for name, digest in manifest.sha256.items():
        f = folder / name
        if not f.is_file():
            raise FadalInputError(f"{folder}: {name} is missing from the package")
        if _sha256(f) != digest:
            raise FadalInputError(f"{folder}: {name} does not match the manifest's SHA-256 (damaged or edited)")
    return LoadedModel(ExportedNetwork.load(graph), dict(manifest.labels), manifest.plan, folder, "package")


class ExportedNetwork(torch.nn.Module):
    """A ``torch.export`` program as the ``nn.Module`` inference takes: ``.eval()`` is a no-op (an exported
    program is fixed in inference mode; its own ``eval()`` raises) and ``.to(device)`` moves the program."""

    def __init__(self, program) -> None:
        super().__init__()
        object.__setattr__(self, "program", program)  # not a submodule: nn.Module.train() must not reach it
        object.__setattr__(self, "_callable", program.module())
        object.__setattr__(self, "_device", torch.device("cpu"))

    @classmethod
    def load(cls, path: Path) -> "ExportedNetwork":
        try:
            return cls(torch.export.load(str(path)))
        except Exception as err:  # torch raises RuntimeError/ValueError/zip errors for a bad archive
            raise FadalInputError(f"{path}: unreadable exported graph ({type(err).__name__})") from None

    def train(self, mode: bool = True) -> "ExportedNetwork":
        if mode:
            raise FadalInputError("an exported model package is for inference only; train from weights.pt")
        return self

    def to(self, device, *args, **kwargs) -> "ExportedNetwork":  # noqa: D102 (only a device is accepted)
        device = torch.device(device)
        if device != self._device:
            from torch.export.passes import move_to_device_pass

            program = move_to_device_pass(self.program, device)
            object.__setattr__(self, "program", program)
            object.__setattr__(self, "_callable", program.module())
            object.__setattr__(self, "_device", device)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._callable(x)


def export_package(checkpoint: Path, out: Path, check_image: Path | None = None,
                   tolerance: float = TOLERANCE) -> ModelPackageManifest:
    """Write the package for ``checkpoint`` to ``out`` (replaced if it is a package already).

    The check volume is ``check_image`` (a CT, preprocessed as the plan says) or, by default, a synthetic
    body-like volume of 1.5 patches per side in network space (several overlapping windows)."""
    import fadal
    from fadal.model.infer import load_checkpoint

    checkpoint, out = Path(checkpoint), Path(out)
    eager, labels, plan, _ = load_checkpoint(checkpoint)
    eager.eval()
    if out.exists() and not is_package(out) and any(out.iterdir()):
        raise FadalInputError(f"{out}: exists and is not a model package; give an empty or new folder")
    out.mkdir(parents=True, exist_ok=True)
    example = torch.zeros((1, 1, *plan.patch_size))
    with torch.no_grad():
        program = torch.export.export(eager, (example,))
    with atomic_path(out / GRAPH, suffix=".pt2") as tmp:
        torch.export.save(program, str(tmp))
    # The check runs on the graph as a hospital loads it, not on the one in memory.
    check = check_graph(eager, ExportedNetwork.load(out / GRAPH), plan, check_image, tolerance)
    if not check.passed:
        (out / GRAPH).unlink()
        raise FadalInputError(f"{checkpoint}: the exported graph differs from the eager model by "
                              f"{check.max_abs_logit_diff:.3g} (tolerance {tolerance:g}); not exported")
    with atomic_path(out / WEIGHTS, suffix=".pt") as tmp:
        shutil.copyfile(checkpoint, tmp)
    manifest = ModelPackageManifest(
        fadal_version=str(fadal.__version__), torch_version=torch.__version__,
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"), source_checkpoint=checkpoint.name,
        labels=labels, plan=plan, graph=GRAPH, graph_input_shape=tuple(example.shape), weights=WEIGHTS,
        sha256={name: _sha256(out / name) for name in (GRAPH, WEIGHTS)}, check=check)
    write_json(manifest.model_dump(mode="json"), out / MANIFEST)  # last: a package without it is not one
    return manifest


def check_graph(eager: torch.nn.Module, graph: torch.nn.Module, plan: Plan, check_image: Path | None = None,
                tolerance: float = TOLERANCE) -> GraphCheck:
    """Both models' sliding-window logits on one test volume, compared logit by logit and label by label."""
    from fadal.model.infer import network_logits

    x, description = _check_volume(plan, check_image)
    device = torch.device("cpu")  # the same arithmetic for both: a hospital's GPU result is compared at load
    a = network_logits(eager, x, plan, device, amp=False)
    b = network_logits(graph, x, plan, device, amp=False)
    diff = float((a - b).abs().max())
    same_labels = bool(torch.equal(a.argmax(1), b.argmax(1)))
    windows = math.prod(_windows_along(n, p) for n, p in zip(x.shape[2:], plan.patch_size))
    return GraphCheck(volume=description, windows=windows, max_abs_logit_diff=diff, tolerance=tolerance,
                      labels_identical=same_labels, passed=diff <= tolerance and same_labels)


def _windows_along(n: int, patch: int, overlap: float = 0.5) -> int:
    if n <= patch:
        return 1
    step = max(1, int(patch * (1 - overlap)))
    return math.ceil((n - patch) / step) + 1


def _check_volume(plan: Plan, check_image: Path | None) -> tuple[torch.Tensor, str]:
    if check_image is not None:
        from fadal.data.io import read_image
        from fadal.data.preprocess import inference_transforms, to_metatensor

        image = read_image(check_image)
        x = inference_transforms(plan.preprocess)({"image": to_metatensor(image)})["image"].as_tensor()[None]
        return x.float(), f"{Path(check_image).name} preprocessed to {tuple(x.shape[2:])}"
    shape = tuple(int(p * 1.5) for p in plan.patch_size)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij"))
    rng = np.random.default_rng(0)
    body = (grid[0] / 0.9) ** 2 + (grid[1] / 0.7) ** 2 <= 1
    organ = ((grid - np.array([0.3, 0.1, 0.0])[:, None, None, None]) ** 2).sum(0) <= 0.15
    vol = np.where(body, 0.45, 0.0) + 0.2 * organ + rng.normal(0, 0.03, shape)
    return torch.as_tensor(np.clip(vol, 0, 1), dtype=torch.float32)[None, None], \
        f"synthetic body-like volume {shape} (network space)"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
