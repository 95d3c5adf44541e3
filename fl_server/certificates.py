"""The consortium's own TLS: a local certificate authority and the SuperLink's server certificate.

Every site gets `ca.pem` (to check it talks to the real server); only the operator keeps `ca.key` and `server.key`.
"""

from __future__ import annotations

import datetime
import ipaddress
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from shared_model.key_files import check_private_file, write_private, write_public

# fedrec-server's own processes (the `flwr` CLI, Flower's SuperExec) reach the SuperLink over loopback, so the
# server certificate always names these too.
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")


def make_ca(out_dir: Path, name: str = "fedrec consortium CA", days: int = 3650) -> tuple[Path, Path]:
    """A self-signed CA: `ca.pem` (give it to every site) and `ca.key` (0600, keep it offline)."""
    key = ec.generate_private_key(ec.SECP384R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                         crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA384()))
    key_path = write_private(out_dir / "ca.key", _private_pem(key))
    return write_public(out_dir / "ca.pem", cert.public_bytes(serialization.Encoding.PEM)), key_path


def subject_alternative_names(hosts: list[str]) -> list[x509.GeneralName]:
    """DNS names and IP addresses for the certificate: `hosts` plus loopback, each once, in order."""
    names: list[x509.GeneralName] = []
    for host in [*hosts, *LOOPBACK_NAMES]:
        host = host.strip().strip("[]")
        if not host:
            continue
        try:
            name: x509.GeneralName = x509.IPAddress(ipaddress.ip_address(host))
        except ValueError:
            if "*" in host or "/" in host or " " in host:
                raise ValueError(f"--host {host!r}: give plain host names or IP addresses") from None
            name = x509.DNSName(host.lower())
        if name not in names:
            names.append(name)
    return names


def make_server_certificate(ca_cert_path: Path, ca_key_path: Path, out_dir: Path, hosts: list[str],
                            days: int = 825) -> tuple[Path, Path]:
    """`server.pem` signed by the CA, valid for `hosts` (the names and addresses sites dial) and loopback, and
    `server.key` (0600)."""
    ca_cert = x509.load_pem_x509_certificate(ca_cert_path.read_bytes())
    ca_key = serialization.load_pem_private_key(check_private_file(ca_key_path).read_bytes(), password=None)
    spki = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey) or \
            ca_key.public_key().public_bytes(*spki) != ca_cert.public_key().public_bytes(*spki):
        raise ValueError(f"{ca_key_path} is not the key of the CA in {ca_cert_path}")
    key = ec.generate_private_key(ec.SECP256R1())
    sans = subject_alternative_names(hosts)
    common = str(sans[0].value)
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)]))
            .issuer_name(ca_cert.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=True, key_cert_sign=False,
                                         crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA384()))
    key_path = write_private(out_dir / "server.key", _private_pem(key))
    return write_public(out_dir / "server.pem", cert.public_bytes(serialization.Encoding.PEM)), key_path


def _private_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    """An unencrypted PKCS#8 PEM (the SuperLink reads it unattended; the file's 0600 mode protects it)."""
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())
