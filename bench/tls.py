"""SeaweedFS's S3 over TLS with a self-signed certificate the bench makes (bench rows ``https``).

Over plain http every S3 client signs each payload (SigV4 sha256 of the body); over https
botocore sends ``UNSIGNED-PAYLOAD`` with a checksum trailer instead, as against real S3. The
certificate (``cryptography``, a dev dependency) names 127.0.0.1 and localhost; clients are
pointed at it with ``verify=`` (``client_kwargs`` for s3fs and ckptsync, ``boto3.client``) and
``AWS_CA_BUNDLE`` (children and AWS-chain libraries), never by turning verification off.

The certificate is a leaf signed by the bench's own CA (:func:`make_ca_and_cert`), not a
self-signed certificate that is its own CA (``tests/support/tls.py``): rustls, under obstore,
refuses a CA certificate as a server's (``CaUsedAsEndEntity``). Clients trust the CA
(:attr:`SeaweedFSTLS.ca`); s3torchconnector's CRT reads it from ``SSL_CERT_FILE``.
"""

from __future__ import annotations

import datetime
import ipaddress
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from tests.support.servers import ACCESS_KEY, REGION, SECRET_KEY, SeaweedFS, free_ports


def make_ca_and_cert(directory: Path) -> tuple[Path, Path, Path]:
    """A CA, and a server certificate it signs for 127.0.0.1 and localhost, with its key:
    (ca, cert, key) paths, PEM. Valid for two days."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.timezone.utc)

    def builder(subject: str, issuer: str, public: Any) -> x509.CertificateBuilder:
        return (x509.CertificateBuilder()
                .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
                .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
                .public_key(public).serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(hours=1))
                .not_valid_after(now + datetime.timedelta(days=2)))

    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca = (builder("ckptsync-bench-ca", "ckptsync-bench-ca", ca_key.public_key())
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False,
                                       key_encipherment=False, data_encipherment=False,
                                       key_agreement=False, key_cert_sign=True, crl_sign=True,
                                       encipher_only=False, decipher_only=False), critical=True)
          .sign(ca_key, hashes.SHA256()))
    cert = (builder("127.0.0.1", "ckptsync-bench-ca", key.public_key())
            .add_extension(x509.SubjectAlternativeName([
                x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    directory.mkdir(parents=True, exist_ok=True)
    paths = directory / "ca.pem", directory / "cert.pem", directory / "key.pem"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.TraditionalOpenSSL,
                                           serialization.NoEncryption()))
    return paths


class SeaweedFSTLS(SeaweedFS):
    """``weed mini`` whose S3 gateway also listens with TLS; :attr:`endpoint` is the https one,
    :attr:`ca` the certificate its clients trust."""

    name = "seaweedfs-tls"

    def __init__(self, workdir: Path) -> None:
        super().__init__(workdir)
        self.ca, self.cert, self.key = make_ca_and_cert(Path(workdir) / "tls")

    def _command(self) -> list[str]:
        cmd = super()._command()
        (https,) = free_ports(1)
        self.endpoint = f"https://127.0.0.1:{https}"
        return [*cmd, f"-s3.port.https={https}", f"-s3.cert.file={self.cert}",
                f"-s3.key.file={self.key}"]

    def _ready(self) -> bool:
        import ssl

        ctx = ssl.create_default_context(cafile=str(self.ca))
        try:
            with urllib.request.urlopen(self.endpoint + "/", timeout=1, context=ctx) as r:
                return r.status in (200, 403)
        except urllib.error.HTTPError as e:
            return e.code in (200, 403)
        except OSError:
            return False

    def storage_options(self, key: str = ACCESS_KEY, secret: str = SECRET_KEY) -> dict[str, Any]:
        opts = super().storage_options(key, secret)
        opts["client_kwargs"]["verify"] = str(self.ca)
        return opts

    def boto3_client(self) -> Any:
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=ACCESS_KEY,
                            aws_secret_access_key=SECRET_KEY, region_name=REGION,
                            verify=str(self.ca))
