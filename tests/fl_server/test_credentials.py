"""fedrec-admin's keys, certificates, app signature and site registry, checked with `cryptography` and against
Flower's own FAB verification."""

import ipaddress
import json
import stat

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from fl_server.admin import main as admin
from fl_server.certificates import make_ca, make_server_certificate
from fl_server.sites import add_site, json_answer, register_command, registry, remove_site, unregister_command
from shared_model.app_signature import AppSignature, sign_fab, trusted_entities
from shared_model.key_files import check_private_file, key_id, make_signing_keys, make_site_keys


def mode(path):
    return stat.S_IMODE(path.stat().st_mode)


def test_the_ca_signs_a_server_certificate_for_the_given_hosts_and_loopback(tmp_path):
    ca_pem, ca_key = make_ca(tmp_path / "ca")
    cert_pem, cert_key = make_server_certificate(ca_pem, ca_key, tmp_path / "server",
                                                 ["fedrec.example.org", "10.1.2.3", "[fd00::7]"])
    ca, cert = (x509.load_pem_x509_certificate(p.read_bytes()) for p in (ca_pem, cert_pem))
    cert.verify_directly_issued_by(ca)  # raises unless the CA signed it
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["fedrec.example.org", "localhost"]
    assert sans.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address(a) for a in ("10.1.2.3", "fd00::7",
                                                                                          "127.0.0.1", "::1")]
    assert mode(ca_key) == mode(cert_key) == 0o600 and mode(cert_pem) & 0o044  # certificates are public
    server_key = serialization.load_pem_private_key(cert_key.read_bytes(), None)
    assert server_key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.
                                                SubjectPublicKeyInfo) == cert.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    with pytest.raises(FileExistsError, match="never overwritten"):  # a rerun must not replace a key in use
        make_ca(tmp_path / "ca")
    _, other_key = make_ca(tmp_path / "other")
    with pytest.raises(ValueError, match="is not the key of the CA"):
        make_server_certificate(ca_pem, other_key, tmp_path / "mixed", [])
    with pytest.raises(ValueError, match="plain host names"):
        make_server_certificate(ca_pem, ca_key, tmp_path / "wild", ["*.example.org"])


def test_site_keys_are_openssh_p384_with_a_private_half_only_the_owner_reads(tmp_path):
    private, public = make_site_keys(tmp_path, "acme")
    assert mode(private) == 0o600 and public.read_text().startswith("ecdsa-sha2-nistp384 ")
    key = serialization.load_ssh_private_key(private.read_bytes(), None)
    from flwr.cli.supernode.register import try_load_public_key  # what `flwr supernode register` accepts

    assert try_load_public_key(public)
    assert key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH) \
        .decode() == " ".join(public.read_text().split()[:2])
    private.chmod(0o644)
    with pytest.raises(PermissionError, match="chmod 600"):
        check_private_file(private)
    with pytest.raises(ValueError, match="site name"):
        make_site_keys(tmp_path, "../evil")


def test_an_offline_app_signature_passes_flowers_own_fab_verification_and_nothing_else(tmp_path):
    from flwr.supercore.fab import Fab
    from flwr.supernode.start_client_internal import _verify_fab

    private, public = make_signing_keys(tmp_path)
    assert mode(private) == 0o600
    fab = b"PK\x03\x04 any FAB bytes"
    signature = sign_fab(fab, private, public)
    entities = trusted_entities(public)
    assert list(entities) == [key_id(" ".join(public.read_text().split()[:2]))]
    assert _verify_fab(Fab("h", fab, signature.verification_records()), entities)
    assert not _verify_fab(Fab("h", fab + b"x", signature.verification_records()), entities)  # another FAB
    stranger_key, stranger_pub = make_signing_keys(tmp_path, "mallory")
    forged = sign_fab(fab + b"x", stranger_key, stranger_pub)
    assert not _verify_fab(Fab("h", fab + b"x", forged.verification_records()), entities)  # untrusted signer
    loaded = AppSignature.load(signature.save(tmp_path / "app.sig"))
    assert loaded == signature
    with pytest.raises(ValueError, match="the app changed since it was signed"):
        loaded.verify("0" * 64)
    tampered = json.loads((tmp_path / "app.sig").read_text()) | {"signed_at": signature.signed_at + 1}
    (tmp_path / "bad.sig").write_text(json.dumps(tampered))
    with pytest.raises(ValueError, match="does not verify"):
        AppSignature.load(tmp_path / "bad.sig")
    with pytest.raises(ValueError, match="not the public half"):
        sign_fab(fab, private, stranger_pub)


def test_the_registry_holds_one_checked_key_per_site(tmp_path):
    registry_dir = tmp_path / "registry"
    _, acme = make_site_keys(tmp_path / "keys", "acme")
    _, beta = make_site_keys(tmp_path / "keys", "beta")
    _, signing = make_signing_keys(tmp_path / "keys")
    add_site(registry_dir, "acme", acme)
    add_site(registry_dir, "acme", acme)  # the same key again: no change
    add_site(registry_dir, "beta", beta)
    assert list(registry(registry_dir)) == ["acme", "beta"]
    with pytest.raises(ValueError, match="already registered as site 'acme'"):
        add_site(registry_dir, "gamma", acme)
    _, new_acme = make_site_keys(tmp_path / "new", "acme")
    with pytest.raises(FileExistsError, match="already has another key"):  # a key change is remove + add
        add_site(registry_dir, "acme", new_acme)
    with pytest.raises(ValueError, match="not an EC"):  # Flower registers NIST EC keys only
        add_site(registry_dir, "delta", signing)
    remove_site(registry_dir, "beta")
    assert list(registry(registry_dir)) == ["acme"]
    with pytest.raises(FileNotFoundError, match="no site 'beta'"):
        remove_site(registry_dir, "beta")


def test_register_and_unregister_wrap_flwr_supernode_on_fedrecs_connection(tmp_path):
    assert register_command(tmp_path / "acme.pub", "acme") == [
        "supernode", "register", str(tmp_path / "acme.pub"), "fedrec", "--name", "acme", "--format", "json"]
    assert unregister_command(42) == ["supernode", "unregister", "42", "fedrec", "--format", "json"]
    printed = '✅ SuperNode 42 registered successfully.\n{\n  "success": true,\n  "node-id": 42\n}\n'
    assert json_answer(printed, ["supernode"])["node-id"] == 42
    refused = '{\n  "success": false,\n  "error-message": "Public key already in use"\n}\n'
    with pytest.raises(RuntimeError, match="failed: Public key already in use"):
        json_answer(refused, ["supernode"])
    with pytest.raises(RuntimeError, match="no JSON answer"):
        json_answer("error", ["supernode"])


def test_fedrec_admin_makes_everything_and_reports_errors_in_one_line(tmp_path, capsys):
    assert admin(["ca", "--out", str(tmp_path / "ca")]) == 0
    assert admin(["server-cert", "--ca-dir", str(tmp_path / "ca"), "--out", str(tmp_path / "srv"), "--host",
                  "10.0.0.9"]) == 0
    assert admin(["site-keys", "--name", "acme", "--out", str(tmp_path / "acme")]) == 0
    assert admin(["site-add", "--sites", str(tmp_path / "reg"), "--name", "acme", "--public-key",
                  str(tmp_path / "acme" / "acme.pub")]) == 0
    assert admin(["site-list", "--sites", str(tmp_path / "reg")]) == 0
    assert "acme\t" in capsys.readouterr().out
    assert admin(["site-keys", "--name", "acme", "--out", str(tmp_path / "acme")]) == 2
    assert "never overwritten" in capsys.readouterr().err
    assert mode(tmp_path / "srv" / "server.key") == 0o600
