"""PACS access over DICOMweb (QIDO-RS search, WADO-RS retrieve, STOW-RS store) through ``dicomweb-client``.

Every failure a hospital network can give (PACS unreachable, TLS not trusted, 401/403, a study that is not
there or has no CT, a series with a slice missing) becomes one :class:`FadalInputError` line naming what was
asked for; credentials are never part of a message. TLS certificates are verified unless the user says
otherwise (``verify_tls=False``) or gives the hospital's CA bundle.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from fadal.errors import FadalInputError

#: Environment variables read for credentials (so that no secret has to be typed on a command line).
ENV_USER, ENV_PASSWORD, ENV_TOKEN = "FADAL_DICOMWEB_USER", "FADAL_DICOMWEB_PASSWORD", "FADAL_DICOMWEB_TOKEN"
#: DICOM JSON tags read from QIDO answers.
_STUDY_UID, _SERIES_UID, _SOP_UID = "0020000D", "0020000E", "00080018"
_MODALITY, _N_INSTANCES, _REF_SERIES, _DESCRIPTION = "00080060", "00201209", "00081115", "00081030"


@dataclass(frozen=True)
class PacsAccess:
    """Where the DICOMweb service is and how to authenticate (basic: user + password; or a bearer token)."""

    url: str
    user: str | None = None
    password: str | None = None
    token: str | None = None
    verify_tls: bool = True
    ca_bundle: Path | None = None
    timeout_s: float = 30.0

    @classmethod
    def from_env(cls, url: str, **given) -> "PacsAccess":
        """Options given win; missing credentials come from FADAL_DICOMWEB_USER/_PASSWORD/_TOKEN."""
        given = {k: v for k, v in given.items() if v is not None}
        for field, env in (("user", ENV_USER), ("password", ENV_PASSWORD), ("token", ENV_TOKEN)):
            given.setdefault(field, os.environ.get(env) or None)
        return cls(url=url, **given)

    @property
    def shown_url(self) -> str:
        """The URL without any user:password@ part (for messages and logs)."""
        parts = urlsplit(self.url)
        host = parts.hostname or ""
        netloc = host + (f":{parts.port}" if parts.port else "")
        return urlunsplit((parts.scheme, netloc, parts.path, "", ""))

    def __repr__(self) -> str:  # never the secrets
        return f"PacsAccess({self.shown_url!r}, user={self.user!r}, auth={'token' if self.token else 'basic' if self.password else 'none'})"


def connect(access: PacsAccess):
    """A ``DICOMwebClient`` with the access's authentication and TLS settings (no request is sent yet)."""
    import requests
    from dicomweb_client.api import DICOMwebClient

    if urlsplit(access.url).scheme not in ("http", "https"):
        raise FadalInputError(f"{access.shown_url}: a DICOMweb URL starts with http:// or https://")
    session = requests.Session()
    session.verify = str(access.ca_bundle) if access.ca_bundle else access.verify_tls
    if access.token:
        session.headers["Authorization"] = f"Bearer {access.token}"
    elif access.user:
        session.auth = (access.user, access.password or "")
    client = DICOMwebClient(url=access.url.rstrip("/"), session=session, timeout=access.timeout_s)
    client.set_http_retry_params(retry=False)  # a failure is reported at once; the watch loop retries later
    return client


@contextmanager
def pacs_errors(access: PacsAccess, what: str) -> Iterator[None]:
    """Turn the HTTP client's exceptions into one clear line about ``what`` was being done."""
    import requests

    url = access.shown_url
    try:
        yield
    except requests.exceptions.SSLError:
        raise FadalInputError(f"{url}: TLS certificate not trusted while {what}; give the hospital's CA "
                              "with --ca-bundle (or --no-verify-tls on a test network)") from None
    except (requests.exceptions.ConnectionError, requests.exceptions.Timeout) as err:
        kind = "timed out" if isinstance(err, requests.exceptions.Timeout) else "unreachable"
        raise FadalInputError(f"{url}: PACS {kind} while {what}; check the URL and that its DICOMweb "
                              "service is running") from None
    except requests.exceptions.HTTPError as err:
        status = err.response.status_code if err.response is not None else 0
        if status == 401:
            hint = ("the credentials were refused" if (access.user or access.token) else
                    f"it needs credentials: set {ENV_USER}/{ENV_PASSWORD} or {ENV_TOKEN}")
            raise FadalInputError(f"{url}: HTTP 401 Unauthorized while {what}: {hint}") from None
        if status == 403:
            raise FadalInputError(f"{url}: HTTP 403 Forbidden while {what}: this account may not do that") from None
        reason = err.response.reason if err.response is not None else ""
        raise FadalInputError(f"{url}: HTTP {status} {reason} while {what}".rstrip()) from None


def _value(item: dict, tag: str, default=None):
    values = (item.get(tag) or {}).get("Value") or []
    return values[0] if values else default


@dataclass(frozen=True)
class SeriesRef:
    study_uid: str
    series_uid: str
    modality: str
    n_instances: int | None


def study_series(client, access: PacsAccess, study_uid: str) -> list[SeriesRef]:
    with pacs_errors(access, f"searching study {study_uid}"):
        found = client.search_for_series(study_instance_uid=study_uid)
    return [SeriesRef(study_uid, _value(s, _SERIES_UID), _value(s, _MODALITY, ""),
                      None if _value(s, _N_INSTANCES) is None else int(_value(s, _N_INSTANCES))) for s in found]


def pick_ct_series(client, access: PacsAccess, study_uid: str, series_uid: str | None = None,
                   largest: bool = False) -> SeriesRef:
    """The CT series of a study to segment: ``series_uid``; else the only CT series (or, with ``largest``, the
    one with most instances); a clear error when the study is not there or holds no CT."""
    series = study_series(client, access, study_uid)
    if not series:
        raise FadalInputError(f"{access.shown_url}: study {study_uid} not found (no series)")
    if series_uid is not None:
        match = [s for s in series if s.series_uid == series_uid]
        if not match:
            raise FadalInputError(f"{access.shown_url}: series {series_uid} is not in study {study_uid}")
        if match[0].modality != "CT":
            raise FadalInputError(f"{access.shown_url}: series {series_uid} is {match[0].modality}, FADAL segments CT")
        return match[0]
    ct = [s for s in series if s.modality == "CT"]
    if not ct:
        modalities = ", ".join(sorted({s.modality or "?" for s in series}))
        raise FadalInputError(f"{access.shown_url}: study {study_uid} has no CT series (modalities: {modalities})")
    if len(ct) > 1 and not largest:
        listing = ", ".join(f"{s.series_uid} ({s.n_instances} images)" for s in ct)
        raise FadalInputError(f"{access.shown_url}: study {study_uid} has {len(ct)} CT series; choose one with "
                              f"--series: {listing}")
    return max(ct, key=lambda s: s.n_instances or 0)


def retrieve_series(client, access: PacsAccess, ref: SeriesRef, folder: Path) -> Path:
    """WADO-RS: the series' instances into ``folder`` (one file per SOP instance); its slice geometry is
    checked when the folder is read (:func:`fadal.data.dicom.read_dicom_series`)."""
    with pacs_errors(access, f"retrieving series {ref.series_uid}"):
        # Any transfer syntax: the instances as stored (a PACS may not transcode, e.g. JPEG 2000).
        datasets = client.retrieve_series(study_instance_uid=ref.study_uid, series_instance_uid=ref.series_uid,
                                          media_types=(("application/dicom", "*"),))
    if not datasets:
        raise FadalInputError(f"{access.shown_url}: series {ref.series_uid} returned no images")
    if ref.n_instances is not None and len(datasets) != ref.n_instances:
        raise FadalInputError(f"{access.shown_url}: series {ref.series_uid}: retrieved {len(datasets)} of the "
                              f"{ref.n_instances} images the PACS lists")
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("*.dcm"):
        old.unlink()
    for i, ds in enumerate(datasets):
        ds.save_as(folder / f"{i:05d}.dcm", enforce_file_format=True)
    return folder


def store_instance(client, access: PacsAccess, path: Path) -> None:
    """STOW-RS one DICOM file (the SEG); an error if the PACS refuses it."""
    import pydicom

    ds = pydicom.dcmread(path)
    with pacs_errors(access, f"storing {Path(path).name}"):
        answer = client.store_instances(datasets=[ds])
    failed = answer.get("FailedSOPSequence") if answer is not None else None
    if failed:
        reason = failed[0].get("FailureReason", "?")
        raise FadalInputError(f"{access.shown_url}: the PACS refused {Path(path).name} (failure reason {reason})")


def segmentations_of(client, access: PacsAccess, ref: SeriesRef) -> list[str]:
    """SeriesInstanceUIDs of the SEG series in the study that reference ``ref``'s series."""
    with pacs_errors(access, f"searching segmentations of study {ref.study_uid}"):
        segs = client.search_for_series(study_instance_uid=ref.study_uid, search_filters={"Modality": "SEG"})
        found = []
        for seg in segs:
            uid = _value(seg, _SERIES_UID)
            metadata = client.retrieve_series_metadata(study_instance_uid=ref.study_uid, series_instance_uid=uid)
            refs = [_value(r, _SERIES_UID) for m in metadata[:1] for r in (m.get(_REF_SERIES) or {}).get("Value", [])]
            if ref.series_uid in refs:
                found.append(uid)
    return found


def find_studies(client, access: PacsAccess, filters: dict[str, str], limit: int = 1000) -> list[dict]:
    """QIDO-RS studies matching ``filters`` (DICOM keywords -> values; ``*``/``?`` wildcards, matched here
    without regard to case, since PACSs differ in how they take an encoded ``*``), as ``{"study": uid,
    "description": ...}``."""
    from fnmatch import fnmatchcase

    from pydicom.datadict import tag_for_keyword

    tags = {}
    for keyword in filters:
        tag = tag_for_keyword(keyword)
        if tag is None:
            raise FadalInputError(f"{keyword}: not a DICOM keyword (e.g. StudyDescription, ModalitiesInStudy)")
        tags[keyword] = f"{tag:08X}"
    exact = {k: v for k, v in filters.items() if not any(c in v for c in "*?")}
    with pacs_errors(access, "searching studies"):
        found = client.search_for_studies(search_filters=exact, limit=limit,
                                          fields=sorted({"StudyDescription", *filters}))
    chosen = []
    for s in found:
        if all(any(fnmatchcase(str(v).lower(), pattern.lower()) for v in (s.get(tags[k]) or {}).get("Value", [""]))
               for k, pattern in filters.items() if k not in exact):
            chosen.append({"study": _value(s, _STUDY_UID), "description": _value(s, _DESCRIPTION, "")})
    return chosen
