"""A small object's PUT as one SigV4-signed request on a pooled connection,
beside botocore.

botocore spends about 1 ms of CPU on each ``put_object`` (its event hooks, parameter and response
handling). An output and its provenance sidecar are two small PUTs per item, so that was most of the
runner's own cost per item (``bench.overhead``). This path signs with AWS Signature Version 4 (the
body's sha256 is signed, so the server checks the body against it) and sends with urllib3: about
0.37 ms here against 1.0 (``python -m bench.s3put``).

It is a fast path, not a second client: a network or credentials error, or any status but 200,
sends the PUT to botocore's ``put_object``, which retries and reports as always. The path turns itself
off for the store's lifetime when botocore then stores what it could not: at once after a refusal that
says the path does not fit this server (a redirect to another region, a signature or header the
server reads otherwise), or after 8 such misses in a row of any kind. It never runs where it could
not do what botocore does: behind a proxy, with a client certificate, where botocore does not verify
TLS or its CA bundle is unknown, and not with ``AIGC_S3_FAST_PUT=false``.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import logging
import threading
from typing import Any
from urllib.parse import quote, urlsplit

log = logging.getLogger("aigc.storage")

MAX_BYTES = 8 * 2**20  # larger bodies go through botocore: its cost is small next to theirs
# Refusals that mean the path does not fit the server, not a passing state of it.
MISFIT_STATUS = (301, 307, 400, 403)
MAX_MISSES = 8
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
        amz_date = now.astimezone(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
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
    """PUTs small objects itself; where ``put`` does not return ``"ok"`` the caller uses botocore instead."""

    def __init__(self, credentials, endpoint_url: str, region: str, bucket: str, *,
                 connect_timeout: float = 5, read_timeout: float = 60, max_connections: int = 32,
                 ca_certs: str | None = None):
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
        self.misses = 0  # PUTs in a row this path could not store and botocore then did
        self._lock = threading.Lock()
        kw: dict[str, Any] = {}  # PoolManager's **connection_pool_kw
        if u.scheme == "https":  # the CA bundle botocore verifies with
            from botocore.httpsession import get_cert_path

            kw = {"cert_reqs": "CERT_REQUIRED", "ca_certs": ca_certs or get_cert_path(True)}
        # One connection pool for the one origin, asked for the path as given: a PoolManager would
        # normalise dot segments in it, and send another path than the one signed.
        self.http = urllib3.PoolManager(maxsize=max_connections, block=False, retries=False,
                                        timeout=urllib3.Timeout(connect=connect_timeout, read=read_timeout),
                                        **kw).connection_from_url(self.origin)

    @classmethod
    def for_client(cls, client, credentials, bucket: str) -> FastPut | None:
        """The fast path for a botocore S3 client (path-style addressing), or None where it must not
        run: no credentials, a proxy for this endpoint, a client certificate, TLS that botocore does
        not verify or verifies with a CA bundle this cannot see."""
        from botocore.utils import get_environ_proxies

        endpoint, cfg = client.meta.endpoint_url, client.meta.config
        scheme = urlsplit(endpoint).scheme
        if (credentials is None or cfg.proxies or get_environ_proxies(endpoint) or cfg.client_cert
                or scheme not in _DEFAULT_PORTS):
            return None
        ca_certs = None
        if scheme == "https":
            # What botocore verifies with: True (its default bundle), a CA bundle path (AWS_CA_BUNDLE, a
            # profile's ca_bundle, verify=...), or False. Unknown (another botocore) or False: no path.
            verify = getattr(getattr(getattr(client, "_endpoint", None), "http_session", None), "_verify", None)
            if verify is None or verify is False:
                return None
            ca_certs = verify if isinstance(verify, str) else None
        return cls(credentials, endpoint, client.meta.region_name, bucket,
                   connect_timeout=cfg.connect_timeout, read_timeout=cfg.read_timeout,
                   max_connections=cfg.max_pool_connections, ca_certs=ca_certs)

    def put(self, key: str, data: bytes, content_type: str) -> str:
        """``"ok"`` when stored; else why not, and the caller puts it with botocore: ``"skipped"`` (off,
        or too large), ``"failed"`` (network, 5xx), ``"refused"`` (3xx, 4xx)."""
        if not self.enabled or len(data) > MAX_BYTES:
            return "skipped"
        path = object_path(self.endpoint_url, self.bucket, key)
        try:
            creds = self.credentials.get_frozen_credentials()  # a refresh may fail: botocore says why
            headers = self.signer.headers(
                "PUT", self.host, path, hashlib.sha256(data).hexdigest(),
                {"content-type": content_type, "content-length": str(len(data))},
                creds.access_key, creds.secret_key, creds.token, dt.datetime.now(dt.UTC))
            r = self.http.urlopen("PUT", path, body=data, headers=headers, redirect=False)
        except Exception as e:  # credentials, urllib3's network errors: botocore retries the PUT
            log.debug("fast PUT of %s failed (%s); botocore retries it", key, e)
            return "failed"
        if r.status == 200:
            with self._lock:
                self.sent += 1
                self.misses = 0
            return "ok"
        self.last_refusal = f"{r.status} {r.data[:300].decode('utf-8', 'replace')}"
        return "refused" if r.status in MISFIT_STATUS else "failed"

    def botocore_stored(self, why: str) -> None:
        """botocore stored what this path could not (``why``: what the path returned). A misfit
        refusal, or MAX_MISSES misses in a row, turns the path off: botocore does every PUT from now on."""
        with self._lock:
            self.misses += 1
            off = self.enabled and (why == "refused" or self.misses >= MAX_MISSES)
            if off:
                self.enabled = False
        if off:
            log.warning("signed PUTs failed where botocore's put_object then stored the object (last: %s); "
                        "botocore does every PUT from now on", self.last_refusal or why)
