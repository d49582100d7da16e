"""The registration cache: content-hash keys and the files an entry is made of.

Re-running an amplification never registers the same pair twice: a pair's key hashes the bytes of
its three files, the settings that change the result and the recipe version, so the same content
under other names or in a moved folder is found again, and any change of content or setting misses.
An entry is ``<key>.nii.gz`` (warped label), ``<key>_image.nii.gz`` (warped atlas scan) and
``<key>.json`` (the result, written last: an entry without it is incomplete and registered again).
"""

from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path

import SimpleITK as sitk

from fadal.amplify.convexadam import RECIPE as CONVEXADAM_RECIPE
from fadal.amplify.elastix import RECIPE_VERSION
from fadal.amplify.result import RegistrationResult
from fadal.config import RegistrationConfig
from fadal.data.io import PRIVATE, write_image, write_json
from fadal.errors import FadalInputError

KEY_CHARS = 24
#: Bump when the layout of ``<key>.json`` changes: older entries are then registered again.
CACHE_SCHEMA = 2
#: Settings that do not change a registration's result, so they are not part of its cache key.
_NOT_IN_KEY = {"workers", "min_body_dice", "min_ncc", "min_ncc_ratio", "min_overlap"}


@functools.lru_cache(maxsize=4096)
def file_digest(path: str, size: int, mtime_ns: int) -> bytes:
    """sha256 of a file's bytes, remembered per (path, size, mtime): a site's scans recur in many pairs."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.digest()


def path_digest(path: Path) -> bytes:
    """:func:`file_digest` of an existing file, or a :class:`FadalInputError` naming a missing one."""
    p = Path(path)
    if not p.is_file():
        raise FadalInputError(f"{p}: file not found")
    st = p.stat()
    return file_digest(str(p.resolve()), st.st_size, st.st_mtime_ns)


def pair_key(fixed_image: Path, atlas_image: Path, atlas_label: Path, cfg: RegistrationConfig) -> str:
    """Content hash of the three input files, the registration settings and the recipe version.

    Settings that change no result (``workers``, the failure thresholds) are left out.
    """
    h = hashlib.sha256()
    for p in (fixed_image, atlas_image, atlas_label):
        h.update(path_digest(p))
    exclude = _NOT_IN_KEY | ({"convexadam"} if cfg.method != "convexadam" else set())  # no other method's result
    h.update(cfg.model_dump_json(exclude=exclude).encode())
    if cfg.method == "convexadam":
        h.update(CONVEXADAM_RECIPE.encode())
    h.update(RECIPE_VERSION.encode())
    return h.hexdigest()[:KEY_CHARS]


def entry_paths(key: str, out_dir: Path) -> tuple[Path, Path, Path]:
    """(result json, warped label, warped atlas scan) of the entry ``key`` in ``out_dir``."""
    out_dir = Path(out_dir)
    return out_dir / f"{key}.json", out_dir / f"{key}.nii.gz", out_dir / f"{key}_image.nii.gz"


def store(res: RegistrationResult, warped_label: sitk.Image, warped_image: sitk.Image, out_dir: Path,
          metadata: dict) -> RegistrationResult:
    """Write the entry ``res.key`` atomically, json last (``metadata``: the settings and recipe that made
    it, stored beside the result); ``res``'s file paths are set to the written files."""
    js, nii, img = entry_paths(res.key, out_dir)
    res.warped_label = write_image(warped_label, nii, mode=PRIVATE)  # the cache: site-local state
    res.warped_image = write_image(warped_image, img, mode=PRIVATE)
    write_json({**metadata, "schema": CACHE_SCHEMA, "result": res.to_json()}, js, mode=PRIVATE)
    return res


def load_cached(key: str, out_dir: Path, fixed: Path, moving: Path, label: Path) -> RegistrationResult | None:
    """The stored result of entry ``key`` (``cached=True``), or ``None`` when the entry is missing,
    incomplete, unreadable or of another :data:`CACHE_SCHEMA` (then the pair is registered again and
    the entry overwritten). A result of this schema that does not parse is a bug, not a cache miss:
    a :class:`FadalInputError` naming the file."""
    js, nii, img = entry_paths(key, out_dir)
    if not (js.is_file() and nii.is_file() and img.is_file()):
        return None
    try:
        stored = json.loads(js.read_text())
    except ValueError:
        return None  # damaged entry: register again (and overwrite it)
    if not isinstance(stored, dict) or stored.get("schema") != CACHE_SCHEMA:
        return None
    try:
        res = RegistrationResult.from_json(stored["result"])
    except (ValueError, TypeError, KeyError) as err:
        raise FadalInputError(f"{js}: not a registration result of cache schema {CACHE_SCHEMA} ({err}); "
                              "delete it to register the pair again") from err
    # Same content may sit under other names or in a moved folder: report what the caller passed.
    res.fixed, res.moving, res.atlas_label, res.warped_label = Path(fixed), Path(moving), Path(label), nii
    res.warped_image = img
    res.cached = True
    return res
