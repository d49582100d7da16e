"""Keys and certificates for a hospital federation: a CA, the SuperLink's TLS certificate, SuperNode keys.

Folder written by :func:`make_certificates` (each sub-folder goes to exactly one party)::

    certs/coordinator/ca.crt ca.key server.crt server.key   the coordinator (keys: secret)
    certs/coordinator/supernodes/<site>.pub                 public keys the SuperLink accepts
    certs/<site>/ca.crt supernode.key supernode.pub          hospital <site> (supernode.key: secret)
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import re
import shutil
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fadal.errors import FadalInputError

#: The coordinator's folder name (no site may take it).
COORDINATOR = "coordinator"
#: What a site may be called: its SuperNode name, a folder name and a value in ``--node-config``.
SITE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,31}$")


def _write_secret(path: Path, data: bytes) -> None:
    """Private keys are created 0600 from the start (never world-readable, not even briefly)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(path, 0o600)


def _write_public(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def _new_key() -> ec.EllipticCurvePrivateKey:
    # P-384: the curve Flower itself uses for SuperNode keys; fine for TLS as well.
    return ec.generate_private_key(ec.SECP384R1())


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


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


def make_certificates(out_dir: str | Path, sites: list[str], server_host: str = "127.0.0.1") -> dict:
    """Write a CA, the SuperLink's TLS certificate and one SuperNode key pair per site.

    Re-running with more sites adds them and keeps the existing CA and site keys (hospitals that are
    already set up need nothing new); the server certificate is re-issued so that a changed
    ``server_host`` takes effect. The server certificate names ``server_host`` plus ``localhost``,
    ``127.0.0.1`` and ``::1``: the SuperLink's own ServerApp process connects back over loopback.
    Site keys are OpenSSH-format ECDSA P-384, what ``flower-supernode --auth-supernode-private-key``
    and ``flwr supernode register`` read.
    """
    out = Path(out_dir)
    bad = [s for s in sites if not SITE_NAME.match(s) or s == COORDINATOR]
    if bad or not sites:
        raise FadalInputError(f"site names must be 1-32 letters, digits, '_', '-', '.' and not "
                              f"{COORDINATOR!r}; got {bad or sites}")
    coord = out / COORDINATOR
    ca_crt, ca_key_path = coord / "ca.crt", coord / "ca.key"
    if ca_crt.exists() and ca_key_path.exists():
        ca = x509.load_pem_x509_certificate(ca_crt.read_bytes())
        ca_key = serialization.load_pem_private_key(ca_key_path.read_bytes(), None)
    else:
        ca_key = _new_key()
        ca = _issue("FADAL federation CA", ca_key, None, ca_key, days=3650, san=None)
        _write_secret(ca_key_path, _pem_key(ca_key))
        _write_public(ca_crt, ca.public_bytes(serialization.Encoding.PEM))

    server_key = _new_key()
    server = _issue(server_host, server_key, ca, ca_key, days=825,
                    san=_san([server_host, "localhost", "127.0.0.1", "::1"]))
    _write_secret(coord / "server.key", _pem_key(server_key))
    _write_public(coord / "server.crt", server.public_bytes(serialization.Encoding.PEM))

    site_dirs: dict[str, Path] = {}
    for site in sites:
        folder = out / site
        priv, pub = folder / "supernode.key", folder / "supernode.pub"
        if not priv.exists():
            key = _new_key()
            _write_secret(priv, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                                  serialization.NoEncryption()))
            _write_public(pub, key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                             serialization.PublicFormat.OpenSSH) + b"\n")
        shutil.copyfile(ca_crt, folder / "ca.crt")
        _write_public(coord / "supernodes" / f"{site}.pub", pub.read_bytes())
        site_dirs[site] = folder
    return {
        "coordinator": coord, "ca_cert": ca_crt, "ca_key": ca_key_path,
        "server_cert": coord / "server.crt", "server_key": coord / "server.key",
        "sites": site_dirs, "public_keys": {s: coord / "supernodes" / f"{s}.pub" for s in sites},
    }
