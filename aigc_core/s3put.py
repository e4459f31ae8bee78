"""A small object's PUT as one SigV4-signed request on a pooled connection, beside botocore.

botocore spends about 1 ms of CPU on each ``put_object`` (its event hooks, parameter and response
handling). An output and its provenance sidecar are two small PUTs per item, so that was most of the
runner's own cost per item (``bench.overhead``). This path signs with AWS Signature Version 4 (the
body's sha256 is signed, so the server checks the body against it) and sends with urllib3: about
0.4 ms here (``bench.s3put``).

It is a fast path, not a second client: a network error or any status but 200 sends the PUT to
botocore's ``put_object``, which retries and reports as always. When botocore then stores an object
this path could not (a 3xx or 4xx: a redirect to another region, a signing rule the server wants
otherwise), the path turns itself off for the store's lifetime. It is off where botocore would use a
proxy for the endpoint, and with ``AIGC_S3_FAST_PUT=false``.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import logging
import os
import threading
from urllib.parse import quote, urlsplit

log = logging.getLogger("aigc.storage")

MAX_BYTES = 8 * 2**20  # larger bodies go through botocore: its cost is small next to theirs
_DEFAULT_PORTS = {"http": "80", "https": "443"}


def canonical_host(endpoint_url: str) -> str:
    """The Host header SigV4 signs: the endpoint's host, its port only when not the scheme's default."""
    u = urlsplit(endpoint_url)
    host = u.hostname or ""
    if ":" in host:  # an IPv6 literal keeps its brackets
        host = f"[{host}]"
    if u.port is not None and str(u.port) != _DEFAULT_PORTS.get(u.scheme):
        host = f"{host}:{u.port}"
    return host


class SigV4Signer:
    """AWS Signature Version 4 for S3 requests with the payload's sha256 in ``x-amz-content-sha256``."""

    def __init__(self, region: str, service: str = "s3"):
        self.region = region
        self.service = service
        self._keys: dict[tuple[str, str], bytes] = {}  # (secret, date) -> signing key: one per day

    def _signing_key(self, secret: str, date: str) -> bytes:
        k = self._keys.get((secret, date))
        if k is None:
            k = ("AWS4" + secret).encode()
            for part in (date, self.region, self.service, "aws4_request"):
                k = hmac.new(k, part.encode(), hashlib.sha256).digest()
            self._keys = {(secret, date): k}  # credentials rotate and days pass: keep only the newest
        return k

    def headers(self, method: str, host: str, path: str, payload_sha256: str, extra: dict[str, str],
                access_key: str, secret_key: str, token: str | None, now: dt.datetime) -> dict[str, str]:
        """All headers to send, ``Authorization`` included. ``path`` is already URI-encoded (S3 does not
        encode it twice); every header given is signed."""
        amz_date = now.astimezone(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        headers = {k.lower(): " ".join(str(v).split()) for k, v in extra.items()}
        headers.update({"host": host, "x-amz-content-sha256": payload_sha256, "x-amz-date": amz_date})
        if token:
            headers["x-amz-security-token"] = token
        names = sorted(headers)
        signed = ";".join(names)
        canonical = "\n".join([method, path, "", "".join(f"{n}:{headers[n]}\n" for n in names), signed,
                               payload_sha256])
        scope = f"{amz_date[:8]}/{self.region}/{self.service}/aws4_request"
        to_sign = "\n".join(["AWS4-HMAC-SHA256", amz_date, scope, hashlib.sha256(canonical.encode()).hexdigest()])
        sig = hmac.new(self._signing_key(secret_key, amz_date[:8]), to_sign.encode(), hashlib.sha256).hexdigest()
        headers["authorization"] = (f"AWS4-HMAC-SHA256 Credential={access_key}/{scope}, "
                                    f"SignedHeaders={signed}, Signature={sig}")
        return headers


def object_path(endpoint_url: str, bucket: str, key: str) -> str:
    """Path-style request path, encoded as botocore encodes S3 keys."""
    base = urlsplit(endpoint_url).path.rstrip("/")
    return f"{base}/{quote(bucket, safe='')}/{quote(key, safe='/~')}"


class FastPut:
    """PUTs small objects itself; ``put`` returns False where the caller should use botocore instead."""

    def __init__(self, credentials, endpoint_url: str, region: str, bucket: str, *,
                 connect_timeout: float = 5, read_timeout: float = 60, max_connections: int = 32):
        import urllib3

        u = urlsplit(endpoint_url)
        self.origin = f"{u.scheme}://{u.netloc}"
        self.endpoint_url = endpoint_url
        self.host = canonical_host(endpoint_url)
        self.bucket = bucket
        self.credentials = credentials  # botocore's: refreshable ones renew themselves
        self.signer = SigV4Signer(region)
        self.enabled = True
        self.last_refusal = ""
        self.sent = 0  # PUTs this path stored (tests and benchmarks read it)
        self._lock = threading.Lock()
        kw = {}
        if u.scheme == "https":  # the CA bundle botocore would use
            from botocore.httpsession import get_cert_path

            kw = {"cert_reqs": "CERT_REQUIRED", "ca_certs": os.environ.get("AWS_CA_BUNDLE") or get_cert_path(True)}
        self.http = urllib3.PoolManager(maxsize=max_connections, block=False, retries=False,
                                        timeout=urllib3.Timeout(connect=connect_timeout, read=read_timeout), **kw)

    @classmethod
    def for_client(cls, client, credentials, bucket: str) -> FastPut | None:
        """The fast path for a botocore S3 client (path-style addressing), or None where it must not
        run: no credentials, a proxy for this endpoint."""
        from botocore.utils import get_environ_proxies

        endpoint = client.meta.endpoint_url
        if (credentials is None or client.meta.config.proxies
                or get_environ_proxies(endpoint) or urlsplit(endpoint).scheme not in _DEFAULT_PORTS):
            return None
        cfg = client.meta.config
        return cls(credentials, endpoint, client.meta.region_name, bucket,
                   connect_timeout=cfg.connect_timeout, read_timeout=cfg.read_timeout,
                   max_connections=cfg.max_pool_connections)

    def put(self, key: str, data: bytes, content_type: str) -> str:
        """``"ok"`` when stored; else why not, and the caller puts it with botocore: ``"skipped"`` (off,
        or too large), ``"failed"`` (network, 5xx), ``"refused"`` (3xx, 4xx)."""
        if not self.enabled or len(data) > MAX_BYTES:
            return "skipped"
        creds = self.credentials.get_frozen_credentials()
        path = object_path(self.endpoint_url, self.bucket, key)
        headers = self.signer.headers(
            "PUT", self.host, path, hashlib.sha256(data).hexdigest(),
            {"content-type": content_type, "content-length": str(len(data))},
            creds.access_key, creds.secret_key, creds.token, dt.datetime.now(dt.timezone.utc))
        try:
            r = self.http.urlopen("PUT", self.origin + path, body=data, headers=headers, redirect=False)
        except Exception as e:  # urllib3's network errors: botocore retries the PUT
            log.debug("fast PUT of %s failed (%s); botocore retries it", key, e)
            return "failed"
        if r.status == 200:
            with self._lock:
                self.sent += 1
            return "ok"
        self.last_refusal = f"{r.status} {r.data[:300].decode('utf-8', 'replace')}"
        return "refused" if 300 <= r.status < 500 else "failed"

    def disable(self) -> None:
        """botocore stored what this path could not: it does every PUT from now on."""
        if self.enabled:
            self.enabled = False
            log.warning("the S3 server refused a signed PUT that botocore's put_object then stored (%s); "
                        "botocore does every PUT from now on", self.last_refusal)
