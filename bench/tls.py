"""SeaweedFS's S3 over TLS with a self-signed certificate the bench makes (bench rows ``https``).

Over plain http every S3 client signs each payload (SigV4 sha256 of the body); over https
botocore sends ``UNSIGNED-PAYLOAD`` with a checksum trailer instead, as against real S3. The
certificate (``cryptography``, a dev dependency) names 127.0.0.1 and localhost; clients are
pointed at it with ``verify=`` (``client_kwargs`` for s3fs and ckptsync, ``boto3.client``) and
``AWS_CA_BUNDLE`` (children and AWS-chain libraries), never by turning verification off.
"""

from __future__ import annotations

import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from tests.support.servers import ACCESS_KEY, REGION, SECRET_KEY, SeaweedFS, free_ports
from tests.support.tls import make_cert


class SeaweedFSTLS(SeaweedFS):
    """``weed mini`` whose S3 gateway also listens with TLS; :attr:`endpoint` is the https one."""

    name = "seaweedfs-tls"

    def __init__(self, workdir: Path) -> None:
        super().__init__(workdir)
        self.cert, self.key = make_cert(Path(workdir) / "tls")

    def _command(self) -> list[str]:
        cmd = super()._command()
        (https,) = free_ports(1)
        self.endpoint = f"https://127.0.0.1:{https}"
        return [*cmd, f"-s3.port.https={https}", f"-s3.cert.file={self.cert}",
                f"-s3.key.file={self.key}"]

    def _ready(self) -> bool:
        import ssl

        ctx = ssl.create_default_context(cafile=str(self.cert))
        try:
            with urllib.request.urlopen(self.endpoint + "/", timeout=1, context=ctx) as r:
                return r.status in (200, 403)
        except urllib.error.HTTPError as e:
            return e.code in (200, 403)
        except OSError:
            return False

    def storage_options(self, key: str = ACCESS_KEY, secret: str = SECRET_KEY) -> dict[str, Any]:
        opts = super().storage_options(key, secret)
        opts["client_kwargs"]["verify"] = str(self.cert)
        return opts

    def boto3_client(self) -> Any:
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=ACCESS_KEY,
                            aws_secret_access_key=SECRET_KEY, region_name=REGION,
                            verify=str(self.cert))
