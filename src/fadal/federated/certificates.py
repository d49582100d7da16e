"""Keys and certificates for a hospital federation: a CA, the SuperLink's TLS certificate, SuperNode keys.

Each hospital makes its own SuperNode key pair (:func:`make_site_keys`, ``fadal site-keys``) and sends
the coordinator only the public half; the coordinator never sees a hospital's private key.
:func:`make_certificates` (``fadal certs``) then writes (each folder goes to exactly one party)::

    certs/ca/ca.crt ca.key                                  the CA (ca.key: secret; keep it offline, away from
                                                            the SuperLink; needed only to re-run fadal certs)
    certs/coordinator/ca.crt server.crt server.key          what `fadal server` reads (server.key: secret)
    certs/coordinator/supernodes/<site>.pub                 public keys the SuperLink accepts
    certs/coordinator/control.sha256                        SHA-256 of the operator's token (what the SuperLink checks)
    certs/operator/control.token                            the coordinator operator's token for run submission
                                                            (secret, 0600; `fadal server`, `fadal federate`)
    certs/<site>/ca.crt                                     for hospital <site> (public), beside its supernode.key

A hospital's own folder (``fadal site --certs``)::

    <folder>/supernode.key <site>.pub                       from make_site_keys (supernode.key: secret, 0600)
    <folder>/ca.crt                                         sent by the coordinator

:func:`make_trial_certificates` is for trials on one machine only: it also generates the sites' keys
(in ``certs/<site>/``, as :func:`make_site_keys` would at each hospital), so the coordinator holds them.
Every secret is written 0600 from the start.

The operator's token authenticates every call to the SuperLink's Control API (``flwr run``, ``flwr ls``,
``flwr supernode register``): it is made once and kept on re-runs (delete it and re-run to replace it,
then restart ``fadal server``); the SuperLink's folder holds only its SHA-256, no site folder anything.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
import os
import re
import secrets
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fadal.errors import FadalInputError

#: The coordinator's folder name (no site may take it).
COORDINATOR = "coordinator"
#: The CA's folder name inside the output of :func:`make_certificates` (no site may take it either).
CA = "ca"
#: The coordinator operator's folder inside the output of :func:`make_certificates` (who submits runs).
OPERATOR = "operator"
#: The operator's secret for the SuperLink's Control API, in the operator's folder.
CONTROL_TOKEN = "control.token"
#: Its SHA-256 (hex) in the SuperLink's folder: what ``fadal server`` checks a presented token against.
CONTROL_DIGEST = "control.sha256"
#: Folder names no site may take.
_RESERVED = (COORDINATOR, CA, OPERATOR)
#: What a site may be called: its SuperNode name, a folder name and a value in ``--node-config``.
SITE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,31}$")
#: A hospital's private SuperNode key in its own folder (what ``flower-supernode`` reads).
SITE_KEY = "supernode.key"
#: The comment :func:`make_site_keys` puts in a public key, so that a key filed under another site's name is caught.
_COMMENT = "fadal-site:"
#: The curves Flower accepts for SuperNode keys (``flwr supernode register``).
_NIST = (ec.SECP256R1, ec.SECP384R1, ec.SECP521R1)


def _write_secret(path: Path, data: bytes) -> None:
    """Secrets are created 0600 from the start (never world-readable, not even briefly): written to a new
    0600 file beside ``path`` (mkstemp), which then replaces ``path``; a file there before, whatever its
    mode, is never written into."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp_", dir=path.parent)  # O_EXCL, mode 0600
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _write_public(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def _private_dir(path: Path) -> None:
    """A folder that holds a secret: 0700 when this creates it."""
    if not path.exists():
        path.mkdir(parents=True, mode=0o700)
        os.chmod(path, 0o700)


def _new_key() -> ec.EllipticCurvePrivateKey:
    # P-384: the curve Flower itself uses for SuperNode keys; fine for TLS as well.
    return ec.generate_private_key(ec.SECP384R1())


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _ssh_public(key: ec.EllipticCurvePublicKey, site: str) -> bytes:
    return (key.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
            + f" {_COMMENT}{site}\n".encode())


def _check_site_name(site: str) -> None:
    if not isinstance(site, str) or not SITE_NAME.match(site) or site in _RESERVED:
        raise FadalInputError(f"site names must be 1-32 letters, digits, '_', '-', '.' (starting with a letter or "
                              f"digit) and not {', '.join(map(repr, _RESERVED))}; got {site!r}")


def make_site_keys(folder: str | Path, name: str, force: bool = False) -> dict[str, Path]:
    """At a hospital: its SuperNode key pair, ``folder/supernode.key`` (secret, 0600) and ``folder/<name>.pub``.

    Only the ``.pub`` goes to the coordinator (``fadal certs --site-keys``); the private key never leaves
    ``folder``. Keys are OpenSSH-format ECDSA P-384, what ``flower-supernode --auth-supernode-private-key``
    and ``flwr supernode register`` read. An existing private key is kept (a :class:`FadalInputError`)
    unless ``force``: a new key must be registered at the coordinator again.
    """
    _check_site_name(name)
    folder = Path(folder)
    priv, pub = folder / SITE_KEY, folder / f"{name}.pub"
    if priv.exists() and not force:
        raise FadalInputError(f"{priv} exists already: keeping it (its public half may be registered at the "
                              f"coordinator); use --force to replace it with a new key")
    _private_dir(folder)
    key = _new_key()
    _write_secret(priv, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                          serialization.NoEncryption()))
    _write_public(pub, _ssh_public(key.public_key(), name))
    return {"private_key": priv, "public_key": pub}


def read_public_key(path: str | Path, site: str) -> ec.EllipticCurvePublicKey:
    """Site ``site``'s SuperNode public key from ``path`` (OpenSSH ECDSA on a NIST curve, what Flower takes).

    A :class:`FadalInputError` naming the file for anything else: a missing or unreadable file, a private
    key, another kind of key, or a key :func:`make_site_keys` made for another site."""
    path = Path(path)
    _check_site_name(site)
    try:
        data = path.read_bytes()
    except OSError as err:
        raise FadalInputError(f"{path}: cannot read site {site}'s public key ({err.strerror or err})") from None
    if b"PRIVATE KEY" in data:
        raise FadalInputError(f"{path}: this is a private key, not a public one. Only the .pub may leave a hospital: "
                              f"site {site} should make a new key pair (fadal site-keys --force) and send its .pub")
    try:
        key = serialization.load_ssh_public_key(data)
    except (ValueError, UnsupportedAlgorithm) as err:
        raise FadalInputError(f"{path}: not an OpenSSH public key for site {site} ({err}); expected one line "
                              f"'ecdsa-sha2-nistp384 AAAA...' as written by `fadal site-keys`") from None
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, _NIST):
        kind = (f"ECDSA {key.curve.name}" if isinstance(key, ec.EllipticCurvePublicKey)
                 else type(key).__name__.replace("PublicKey", ""))
        raise FadalInputError(f"{path}: the key is {kind}; a SuperNode key must be ECDSA on P-256, P-384 or P-521 "
                              f"(make one with `fadal site-keys`)")
    fields = data.split()
    comment = fields[2].decode("utf-8", "replace") if len(fields) > 2 else ""
    if comment.startswith(_COMMENT) and comment[len(_COMMENT):] != site:
        raise FadalInputError(f"{path}: this key was made for site {comment[len(_COMMENT):]!r}, not {site!r}")
    return key


def public_keys_in(folder: str | Path) -> dict[str, Path]:
    """The ``<site>.pub`` files in ``folder`` (what the hospitals sent), by site name."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FadalInputError(f"{folder}: not a folder (expected the hospitals' <site>.pub files)")
    keys = {p.name[:-len(".pub")]: p for p in sorted(folder.glob("*.pub"))}
    if not keys:
        raise FadalInputError(f"{folder}: no <site>.pub files (each hospital makes one with `fadal site-keys`)")
    for site, path in keys.items():
        if not SITE_NAME.match(site) or site in _RESERVED:
            raise FadalInputError(f"{path}: the file name must be <site>.pub with a site name of 1-32 letters, "
                                  f"digits, '_', '-', '.' (not {', '.join(map(repr, _RESERVED))})")
    return keys


def control_digest(token: str) -> str:
    """The SHA-256 (hex) of an operator token: what the SuperLink keeps (the token is 256 random bits)."""
    return hashlib.sha256(token.encode()).hexdigest()


def read_operator_token(path: str | Path) -> str:
    """The operator's Control API token from ``path`` (:data:`CONTROL_TOKEN`); refused when others may read it."""
    path = Path(path)
    try:
        mode = path.stat().st_mode & 0o777
        token = path.read_text().strip()
    except (OSError, UnicodeDecodeError) as err:
        raise FadalInputError(f"{path}: cannot read the operator token ({getattr(err, 'strerror', None) or err})") \
            from None
    if os.name == "posix" and mode & 0o077:
        raise FadalInputError(f"{path}: the operator token is readable by others (mode {mode:o}): `chmod 600 {path}`, "
                              f"and replace it (delete it, re-run `fadal certs`, restart `fadal server`) if anyone "
                              f"else may have read it")
    if not re.fullmatch(r"[A-Za-z0-9_-]{32,}", token):
        raise FadalInputError(f"{path}: not an operator token as `fadal certs` writes it (one line of 32 or more "
                              f"letters, digits, '_' or '-')")
    return token


def find_operator_token(certs: str | Path) -> Path:
    """The operator token given ``certs``: the whole ``fadal certs`` output, the operator's folder, or the
    coordinator's folder (then its sibling ``operator/``)."""
    certs = Path(certs)
    candidates = [certs / OPERATOR / CONTROL_TOKEN, certs / CONTROL_TOKEN, certs.parent / OPERATOR / CONTROL_TOKEN]
    for path in candidates:
        if path.is_file():
            return path
    raise FadalInputError(f"no operator token ({OPERATOR}/{CONTROL_TOKEN}) in or beside {certs}: the SuperLink takes "
                          f"runs only from the coordinator's operator. Re-run `fadal certs --out DIR` (it makes "
                          f"DIR/{OPERATOR}/{CONTROL_TOKEN} once; restart `fadal server` after) or give "
                          f"--operator-token FILE")


def _operator_token(out: Path, coord: Path, notes: list[str]) -> Path:
    """The operator's token in ``out/operator/`` (made on the first run, kept after) and its digest in ``coord``."""
    path = out / OPERATOR / CONTROL_TOKEN
    if path.exists():
        token = read_operator_token(path)
    else:
        _private_dir(path.parent)
        token = secrets.token_urlsafe(32)
        _write_secret(path, (token + "\n").encode())
        notes.append(f"made the operator's token for run submission: {path} (secret; stays on the coordinator)")
    _write_public(coord / CONTROL_DIGEST, (control_digest(token) + "\n").encode())
    return path


def _issue(subject: str, key: ec.EllipticCurvePrivateKey, issuer: x509.Certificate | None,
           issuer_key: ec.EllipticCurvePrivateKey, days: int, san: list[x509.GeneralName] | None) -> x509.Certificate:
    now = dt.datetime.now(dt.timezone.utc)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    builder = (x509.CertificateBuilder().subject_name(name)
               .issuer_name(issuer.subject if issuer else name)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days))
               .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False))
    if issuer is None:  # the CA
        builder = (builder.add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                   .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                                content_commitment=False, key_encipherment=False,
                                                data_encipherment=False, key_agreement=False,
                                                encipher_only=False, decipher_only=False), critical=True))
    else:  # the SuperLink's server certificate
        builder = (builder.add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                   .add_extension(x509.SubjectAlternativeName(san or []), critical=False)
                   .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
                   .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()),
                                  critical=False))
    return builder.sign(issuer_key, hashes.SHA384())


def _san(hosts: list[str]) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = []
    for host in dict.fromkeys(hosts):  # ordered, no duplicates
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return names


def _inside(path: Path, folder: Path) -> bool:
    path, folder = path.resolve(), folder.resolve()
    return path == folder or folder in path.parents


def _load_or_make_ca(ca_dir: Path, coord: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey, list[str]]:
    """The CA from ``ca_dir``, made there on the first run; an older layout's ``coordinator/ca.key`` is moved."""
    notes: list[str] = []
    ca_crt, ca_key_path = ca_dir / "ca.crt", ca_dir / "ca.key"
    old_key = coord / "ca.key"  # where versions before the hospital-made keys put it
    if old_key.exists():
        if ca_key_path.exists():
            if ca_key_path.read_bytes() != old_key.read_bytes():
                raise FadalInputError(f"{old_key} and {ca_key_path} are different CA keys: keep the one that signed "
                                      f"{coord / 'ca.crt'} in {ca_dir} and delete the other")
            old_key.unlink()
        else:
            if not (coord / "ca.crt").exists():
                raise FadalInputError(f"{old_key} has no ca.crt beside it: cannot tell which CA it is")
            _private_dir(ca_dir)
            shutil.copyfile(coord / "ca.crt", ca_crt)
            os.replace(old_key, ca_key_path)  # keeps its 0600
            os.chmod(ca_key_path, 0o600)
        notes.append(f"moved the CA key out of the SuperLink's folder: {old_key} -> {ca_key_path}")
    if ca_key_path.exists():
        if not ca_crt.exists():
            raise FadalInputError(f"{ca_key_path} has no ca.crt beside it in {ca_dir}")
        try:
            ca = x509.load_pem_x509_certificate(ca_crt.read_bytes())
            ca_key = serialization.load_pem_private_key(ca_key_path.read_bytes(), None)
        except (ValueError, TypeError) as err:
            raise FadalInputError(f"{ca_dir}: ca.crt or ca.key is not readable PEM ({err})") from None
        if ca.public_key() != ca_key.public_key():
            raise FadalInputError(f"{ca_key_path} is not the key of {ca_crt}")
        return ca, ca_key, notes
    if (coord / "ca.crt").exists():
        raise FadalInputError(f"{coord / 'ca.crt'} exists but there is no CA key in {ca_dir}: pass the folder that "
                              f"holds ca.key (--ca); a new CA would need a new ca.crt at every hospital")
    _private_dir(ca_dir)
    ca_key = _new_key()
    ca = _issue("FADAL federation CA", ca_key, None, ca_key, days=3650, san=None)
    _write_secret(ca_key_path, _pem_key(ca_key))
    _write_public(ca_crt, ca.public_bytes(serialization.Encoding.PEM))
    notes.append(f"made a new CA in {ca_dir}")
    return ca, ca_key, notes


def make_certificates(out_dir: str | Path, site_keys: Mapping[str, str | Path] | None = None,
                      server_host: str = "127.0.0.1", ca_dir: str | Path | None = None) -> dict:
    """At the coordinator: the CA, the SuperLink's TLS certificate, and the hospitals' public keys registered.

    ``site_keys`` maps each site name to the ``.pub`` file it sent (:func:`make_site_keys`;
    :func:`public_keys_in` reads a folder of them); no private key of a site is read or written. The CA
    lives in ``ca_dir`` (default ``out_dir/ca``), which must not be inside the SuperLink's folder
    ``out_dir/coordinator``; it is made on the first run and reused after (pass the same ``ca_dir``).
    Re-running with more sites adds them (sites registered before stay; an empty ``site_keys`` only
    re-issues the server certificate); the server certificate is re-issued so that a changed
    ``server_host`` takes effect. It names ``server_host`` plus ``localhost``, ``127.0.0.1`` and ``::1``:
    the SuperLink's own ServerApp process connects back over loopback. ``out_dir/<site>/ca.crt`` is what
    each hospital gets (public).
    """
    if site_keys is not None and not isinstance(site_keys, Mapping):
        raise TypeError("make_certificates takes the hospitals' public keys as {site: path to <site>.pub}; "
                        "for a trial on one machine, make_trial_certificates(out_dir, sites) also makes their keys")
    out = Path(out_dir)
    coord = out / COORDINATOR
    ca_dir = Path(ca_dir) if ca_dir is not None else out / CA
    if _inside(ca_dir, coord):
        raise FadalInputError(f"{ca_dir}: the CA key must not be inside the SuperLink's folder {coord}")
    given = {site: (Path(path), read_public_key(path, site)) for site, path in (site_keys or {}).items()}

    registered = {p.name[:-len(".pub")]: p for p in sorted((coord / "supernodes").glob("*.pub"))}
    keys = {site: read_public_key(path, site) for site, path in registered.items() if site not in given}
    keys.update({site: key for site, (_, key) in given.items()})
    if not keys:
        raise FadalInputError(f"no site keys given and none registered in {coord / 'supernodes'}: give the "
                              f"hospitals' <site>.pub files (--site-keys DIR; each made with `fadal site-keys`)")
    seen: dict[bytes, str] = {}
    for site, key in keys.items():
        der = key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
        if der in seen:
            where = {s: str(given[s][0]) if s in given else str(registered[s]) for s in (seen[der], site)}
            raise FadalInputError(f"sites {seen[der]} and {site} have the same public key ({where[seen[der]]}, "
                                  f"{where[site]}): each hospital needs its own key")
        seen[der] = site

    ca, ca_key, notes = _load_or_make_ca(ca_dir, coord)
    token = _operator_token(out, coord, notes)
    ca_pem = ca.public_bytes(serialization.Encoding.PEM)
    _write_public(coord / "ca.crt", ca_pem)
    server_key = _new_key()
    server = _issue(server_host, server_key, ca, ca_key, days=825,
                    san=_san([server_host, "localhost", "127.0.0.1", "::1"]))
    _write_secret(coord / "server.key", _pem_key(server_key))
    _write_public(coord / "server.crt", server.public_bytes(serialization.Encoding.PEM))

    for site, key in keys.items():
        if site in given:
            _write_public(coord / "supernodes" / f"{site}.pub", _ssh_public(key, site))
        _write_public(out / site / "ca.crt", ca_pem)
    return {
        "coordinator": coord, "ca_dir": ca_dir, "ca_cert": coord / "ca.crt", "ca_key": ca_dir / "ca.key",
        "server_cert": coord / "server.crt", "server_key": coord / "server.key",
        "sites": {s: out / s for s in keys}, "public_keys": {s: coord / "supernodes" / f"{s}.pub" for s in keys},
        "added": sorted(given), "notes": notes,
        "operator_token": token, "control_digest": coord / CONTROL_DIGEST,
    }


def make_trial_certificates(out_dir: str | Path, sites: list[str], server_host: str = "127.0.0.1",
                            ca_dir: str | Path | None = None) -> dict:
    """For a trial on one machine only: :func:`make_site_keys` for every site in ``out_dir/<site>/``, then
    :func:`make_certificates` with their public keys. Whoever runs this holds every site's private key, so
    it could impersonate any of them: across real hospitals each makes its own key.

    Re-running keeps the sites' existing keys; ``out_dir/<site>/`` is then a complete hospital folder
    (``supernode.key``, ``<site>.pub``, ``ca.crt``)."""
    if not sites:
        raise FadalInputError("no site names given")
    pubs: dict[str, Path] = {}
    for site in sites:
        _check_site_name(site)
        folder = Path(out_dir) / site
        priv, pub = folder / SITE_KEY, folder / f"{site}.pub"
        if priv.exists():
            if not pub.exists():  # an older layout's supernode.pub, or none: derive it from the private key
                key = serialization.load_ssh_private_key(priv.read_bytes(), None)
                _write_public(pub, _ssh_public(key.public_key(), site))
        else:
            make_site_keys(folder, site)
        pubs[site] = pub
    made = make_certificates(out_dir, pubs, server_host, ca_dir=ca_dir)
    made["site_private_keys"] = {s: Path(out_dir) / s / SITE_KEY for s in sites}
    return made
