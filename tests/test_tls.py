"""TLS and mTLS end to end: certificates made here (a CA, server and client certificates), every link of the
stack encrypted and the backends requiring client certificates; a client without one, or trusting another CA,
is refused; a rotated certificate is served without a restart."""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from rag.tls import ClientTLS
from rag.types import AskRequest, DecodingOptions
from rag.v1 import gateway_pb2_grpc
from rag_cli.testing.stack import Launcher, address
from tests.conftest import TinyModels, rag


@dataclass
class Authority:
    """A CA that signs certificates for loopback (127.0.0.1, localhost), written as PEM files."""

    directory: Path
    name: str

    def __post_init__(self) -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{self.name} test CA")])
        self.certificate = (
            self._builder(subject, self.key.public_key())
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(self.key, hashes.SHA256())
        )
        self.ca = self._write(f"{self.name}-ca.crt", self.certificate.public_bytes(serialization.Encoding.PEM))

    def _builder(self, subject: x509.Name, public_key: ec.EllipticCurvePublicKey) -> x509.CertificateBuilder:
        now = datetime.datetime.now(datetime.UTC)
        issuer = getattr(self, "certificate", None)
        return (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(issuer.subject if issuer else subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
        )

    def _write(self, name: str, data: bytes) -> Path:
        path = self.directory / name
        path.write_bytes(data)
        return path

    def issue(self, name: str) -> tuple[Path, Path]:
        """A certificate for a server and client on loopback: (certificate file, key file)."""
        key = ec.generate_private_key(ec.SECP256R1())
        certificate = (
            self._builder(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]), key.public_key())
            .add_extension(
                x509.SubjectAlternativeName(
                    [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
                ),
                critical=False,
            )
            .add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                critical=False,
            )
            .sign(self.key, hashes.SHA256())
        )
        key_pem = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        return (
            self._write(f"{name}.crt", certificate.public_bytes(serialization.Encoding.PEM)),
            self._write(f"{name}.key", key_pem),
        )


def ask(gateway: str, tls: ClientTLS) -> str:
    request = AskRequest("Who discovered penicillin?", 2, DecodingOptions(max_new_tokens=3)).to_pb()
    with grpc.secure_channel(gateway, tls.credentials()) as channel:
        return gateway_pb2_grpc.GatewayServiceStub(channel).Ask(request, timeout=60).index_version


def test_mtls_on_every_link_refuses_clients_without_a_certificate_and_reloads_a_rotated_one(
    tmp_path: Path, tiny: TinyModels, index_root: Path, launch: Launcher
) -> None:
    ca, rotated = Authority(tmp_path, "main"), Authority(tmp_path, "rotated")
    (server_cert, server_key), (client_cert, client_key) = ca.issue("services"), ca.issue("client")
    gateway_cert, gateway_key = ca.issue("gateway")
    client_cas = tmp_path / "client-cas.crt"  # both CAs, so that a gateway certificate from either gets in
    client_cas.write_bytes(ca.ca.read_bytes() + rotated.ca.read_bytes())
    # The backends: clients must present a certificate (mTLS).
    mtls = {"tls_cert": str(server_cert), "tls_key": str(server_key), "tls_client_ca": str(client_cas)}
    retriever = launch.retriever(index_root, "tiny", **mtls)
    generator = launch.generator(tiny.rag_checkpoint, **mtls)
    gateway = launch.gateway(
        address(retriever), address(generator), tls_cert=str(gateway_cert), tls_key=str(gateway_key),
        tls_client_ca=str(client_cas), tls_ca=str(ca.ca),
    )  # fmt: skip
    where = address(gateway)

    assert ask(where, ClientTLS(str(ca.ca), str(client_cert), str(client_key))) == "tiny@v1"
    cli = rag("ask", "Who?", "--gateway", where, "--max-new-tokens", "2", "--json",
              "--tls-ca", str(ca.ca), "--tls-cert", str(client_cert), "--tls-key", str(client_key))  # fmt: skip
    assert cli.returncode == 0, cli.stderr

    # Refused: no client certificate; a client trusting another CA; plaintext; the backends called directly.
    for refused in (ClientTLS(str(ca.ca)), ClientTLS(str(Authority(tmp_path, "rogue").ca))):
        with pytest.raises(grpc.RpcError) as err:
            ask(where, refused)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    no_cert = rag("ask", "Who?", "--gateway", where, "--tls-ca", str(ca.ca))
    assert no_cert.returncode == 1 and "UNAVAILABLE" in no_cert.stderr
    plain = rag("ask", "Who?", "--gateway", where)
    assert plain.returncode == 1 and "UNAVAILABLE" in plain.stderr
    with pytest.raises(grpc.FutureTimeoutError), grpc.insecure_channel(address(retriever)) as channel:
        grpc.channel_ready_future(channel).result(timeout=5)

    # Rotation in place (as cert-manager updates a mounted Secret): the gateway's next handshake gets a
    # certificate from another CA, without a restart; clients that trust only the new CA get through.
    new_cert, new_key = rotated.issue("gateway-rotated")
    gateway_key.write_bytes(new_key.read_bytes())
    gateway_cert.write_bytes(new_cert.read_bytes())
    assert ask(where, ClientTLS(str(rotated.ca), str(client_cert), str(client_key))) == "tiny@v1"


def test_the_gateway_presents_a_rotated_client_certificate_without_a_restart(
    tmp_path: Path, tiny: TinyModels, index_root: Path, launch: Launcher
) -> None:
    """The backends trust client certificates of one CA; the gateway starts with one from another CA and is
    refused, until its certificate files are replaced in place (a Secret rotated by cert-manager)."""
    trusted, stale = Authority(tmp_path, "trusted"), Authority(tmp_path, "stale")
    backend_cert, backend_key = trusted.issue("backends")
    backends = {"tls_cert": str(backend_cert), "tls_key": str(backend_key), "tls_client_ca": str(trusted.ca)}
    retriever = launch.retriever(index_root, "tiny", **backends)
    generator = launch.generator(tiny.rag_checkpoint, **backends)
    gateway_cert, gateway_key = stale.issue("gateway")  # its server certificate and its client one
    gateway = launch.gateway(
        address(retriever), address(generator), tls_cert=str(gateway_cert), tls_key=str(gateway_key),
        tls_ca=str(trusted.ca),
    )  # fmt: skip

    with pytest.raises(grpc.RpcError) as refused:
        ask(address(gateway), ClientTLS(str(stale.ca)))
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE  # the backends refused the gateway's certificate

    new_cert, new_key = trusted.issue("gateway-renewed")
    gateway_key.write_bytes(new_key.read_bytes())
    gateway_cert.write_bytes(new_cert.read_bytes())
    assert ask(address(gateway), ClientTLS(str(trusted.ca))) == "tiny@v1"
