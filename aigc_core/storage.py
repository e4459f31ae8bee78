"""Object storage: S3-compatible (boto3) in deployment, a local folder by default."""

from __future__ import annotations

import builtins
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Protocol
from urllib.parse import unquote, urlparse

from aigc_core.errors import NotFound, SpecError, StorageError
from aigc_core.s3put import FastPut
from aigc_core.settings import mask_url

if TYPE_CHECKING:
    from mypy_boto3_s3.type_defs import CompletedPartTypeDef

# Presigned download URLs are short-lived: 15 minutes unless asked, never more than a day.
PRESIGN_DEFAULT_S = 900
PRESIGN_MAX_S = 86_400
# put_stream's multipart parts: S3 refuses a part under 5 MiB unless it is the last one.
MIN_PART_BYTES = 5 * 2**20
DEFAULT_PART_BYTES = 8 * 2**20


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    uri: str
    size: int


class ObjectStore(Protocol):
    """Keys are relative, '/'-separated, built only from server ids."""

    def put(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> ObjectInfo: ...
    def put_stream(self, key: str, chunks: Iterable[bytes],
                   content_type: str = "application/octet-stream") -> ObjectInfo: ...
    def get(self, key: str) -> bytes: ...
    def exists(self, key: str) -> bool: ...
    def list(self, prefix: str) -> Iterator[str]: ...
    def folders(self, prefix: str) -> Iterator[str]: ...
    def newest(self, prefix: str) -> datetime | None: ...
    def uri(self, key: str) -> str: ...
    def download(self, key: str, path: Path) -> None: ...
    def upload(self, key: str, path: Path, content_type: str = "application/octet-stream") -> ObjectInfo: ...
    def delete(self, keys: builtins.list[str]) -> None: ...


def check_key(key: str) -> str:
    parts = key.split("/")
    if not key or key.startswith("/") or any(p in ("", ".", "..") for p in parts) or "\\" in key:
        raise SpecError(f"invalid object key {key!r}")
    return key


class LocalStore:
    """A folder as object store: writes are atomic (temporary file, then rename)."""

    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser().resolve()

    def _path(self, key: str) -> Path:
        return self.root / check_key(key)

    def put(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> ObjectInfo:
        path = self._path(key)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        except OSError as e:
            raise StorageError(f"cannot write {path}: {e}") from e
        return ObjectInfo(key, self.uri(key), len(data))

    def put_stream(self, key: str, chunks: Iterable[bytes],
                   content_type: str = "application/octet-stream") -> ObjectInfo:
        """Written as ``chunks`` come, to a temporary file renamed into place at the end: a reader sees
        the whole object or none, and a failure (of the store or of ``chunks``) leaves nothing."""
        path = self._path(key)
        size, tmp = 0, None
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
            with os.fdopen(fd, "wb") as f:
                for chunk in chunks:
                    f.write(chunk)
                    size += len(chunk)
            os.replace(tmp, path)
        except OSError as e:
            raise StorageError(f"cannot write {path}: {e}") from e
        finally:
            if tmp is not None and Path(tmp).exists():
                Path(tmp).unlink(missing_ok=True)
        return ObjectInfo(key, self.uri(key), size)

    def get(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except FileNotFoundError:
            raise NotFound(f"no object {self.uri(key)}") from None
        except OSError as e:
            raise StorageError(f"cannot read {key}: {e}") from e

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def list(self, prefix: str) -> Iterator[str]:
        base = self.root
        # Walk only the folder the prefix names, not the whole store.
        folder = prefix.rsplit("/", 1)[0] if "/" in prefix else ""
        start = base / check_key(folder) if folder else base
        if not start.is_dir():
            return
        for p in sorted(start.rglob("*")):
            if p.is_file() and not p.name.startswith(".tmp-"):
                key = p.relative_to(base).as_posix()
                if key.startswith(prefix):
                    yield key

    def folders(self, prefix: str) -> Iterator[str]:
        """The "folders" right under ``prefix`` (which ends in '/'), as ``prefix + name + '/'``."""
        start = self.root / check_key(prefix.rstrip("/"))
        if start.is_dir():
            for p in sorted(start.iterdir()):
                if p.is_dir():
                    yield f"{prefix}{p.name}/"

    def newest(self, prefix: str) -> datetime | None:
        """When the newest object under ``prefix`` was written; None when there is none."""
        times = [self._path(k).stat().st_mtime for k in self.list(prefix)]
        return datetime.fromtimestamp(max(times), UTC) if times else None

    def uri(self, key: str) -> str:
        return self._path(key).as_uri()

    def download(self, key: str, path: Path) -> None:
        src = self._path(key)
        if not src.is_file():
            raise NotFound(f"no object {key}")
        _atomic_copy(src, path)

    def upload(self, key: str, path: Path, content_type: str = "application/octet-stream") -> ObjectInfo:
        """A file copied in without reading it into memory (model weights, checkpoints, datasets)."""
        dest = self._path(key)
        try:
            _atomic_copy(Path(path), dest)
        except OSError as e:
            raise StorageError(f"upload {key} failed: {e}") from e
        return ObjectInfo(key, self.uri(key), dest.stat().st_size)

    def delete(self, keys: builtins.list[str]) -> None:
        """Remove objects; a key that is already gone is not an error."""
        try:
            for key in keys:
                self._path(key).unlink(missing_ok=True)
        except OSError as e:
            raise StorageError(f"delete failed: {e}") from e


def _atomic_copy(src: Path, dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=".tmp-")
    os.close(fd)
    try:
        shutil.copyfile(src, tmp)
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class S3Store:
    """An S3 bucket (any S3-compatible server); credentials come from the default boto3 chain."""

    def __init__(self, bucket: str, prefix: str = "", endpoint_url: str | None = None, region: str | None = None,
                 *, fast_put: bool = True, part_bytes: int = DEFAULT_PART_BYTES):
        import boto3
        from botocore.config import Config

        if part_bytes < MIN_PART_BYTES:
            raise SpecError(f"multipart part size {part_bytes} bytes: S3 needs at least {MIN_PART_BYTES}")
        self.bucket = bucket
        self.part_bytes = part_bytes
        self.prefix = prefix.strip("/")
        if self.prefix and any(p in ("", ".", "..") for p in self.prefix.split("/")):
            raise SpecError(f"storage prefix {self.prefix!r} has an empty, '.' or '..' part")
        cfg = Config(
            retries={"max_attempts": 5, "mode": "standard"},
            max_pool_connections=32,
            connect_timeout=5,
            read_timeout=60,
            s3={"addressing_style": "path"},
            signature_version="s3v4",  # presigned URLs too: X-Amz-Expires, at most 7 days, the method signed
            # No CRC trailer on every small PUT (botocore's default since 1.36): about 0.13 ms of CPU per
            # object here. Each output's sha256 is recorded in its row and provenance instead.
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        )
        # A session of its own: the default one caches the first credentials it resolved, process-wide.
        session = boto3.session.Session()
        self.client = session.client("s3", endpoint_url=endpoint_url, region_name=region or "us-east-1", config=cfg)
        # Small PUTs (each output and its sidecar) skip botocore's request pipeline: see aigc_core/s3put.py.
        self.fast = FastPut.for_client(self.client, session.get_credentials(), bucket) if fast_put else None

    def _full(self, key: str) -> str:
        check_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def put(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> ObjectInfo:
        fast = self.fast.put(self._full(key), data, content_type) if self.fast is not None else "skipped"
        if fast == "ok":
            return ObjectInfo(key, self.uri(key), len(data))
        try:
            self.client.put_object(Bucket=self.bucket, Key=self._full(key), Body=data, ContentType=content_type)
        except Exception as e:  # botocore raises many unrelated types; all are storage faults here
            raise StorageError(f"put s3://{self.bucket}/{self._full(key)} failed: {e}") from e
        if fast in ("refused", "failed") and self.fast is not None:  # botocore stored what the fast path could not
            self.fast.botocore_stored(fast)
        return ObjectInfo(key, self.uri(key), len(data))

    def put_stream(self, key: str, chunks: Iterable[bytes],
                   content_type: str = "application/octet-stream") -> ObjectInfo:
        """An object of any size with at most about one part in memory: a multipart upload of
        ``part_bytes`` parts, started only once a whole part is read (a smaller object is one PUT).
        The object appears whole at completion; any failure, of S3 or of ``chunks``, aborts the
        upload, so no parts are left behind and nothing (or the old object) is visible."""
        full = self._full(key)
        buf = bytearray()
        size = 0
        upload_id: str | None = None
        parts: builtins.list[CompletedPartTypeDef] = []
        try:
            for chunk in chunks:
                buf += chunk
                size += len(chunk)
                while len(buf) >= self.part_bytes:  # parts of exactly part_bytes; the rest waits
                    if upload_id is None:
                        upload_id = self.client.create_multipart_upload(
                            Bucket=self.bucket, Key=full, ContentType=content_type)["UploadId"]
                    parts.append(self._part(full, upload_id, len(parts) + 1, bytes(buf[:self.part_bytes])))
                    del buf[:self.part_bytes]
            if upload_id is None:  # smaller than one part: a plain PUT
                return self.put(key, bytes(buf), content_type)
            if buf:  # the last part may be under 5 MiB
                parts.append(self._part(full, upload_id, len(parts) + 1, bytes(buf)))
            self.client.complete_multipart_upload(Bucket=self.bucket, Key=full, UploadId=upload_id,
                                                  MultipartUpload={"Parts": parts})
        except BaseException as e:
            if upload_id is not None:
                self._abort(full, upload_id)
            if isinstance(e, StorageError) or not isinstance(e, Exception):
                raise
            raise StorageError(f"put s3://{self.bucket}/{full} failed: {e}") from e
        return ObjectInfo(key, self.uri(key), size)

    def _part(self, full: str, upload_id: str, number: int, data: bytes) -> CompletedPartTypeDef:
        out = self.client.upload_part(Bucket=self.bucket, Key=full, UploadId=upload_id, PartNumber=number, Body=data)
        return {"PartNumber": number, "ETag": out["ETag"]}

    def _abort(self, full: str, upload_id: str) -> None:
        import logging

        try:
            self.client.abort_multipart_upload(Bucket=self.bucket, Key=full, UploadId=upload_id)
        except Exception as e:  # the original failure is what the caller needs; a bucket lifecycle rule cleans up
            logging.getLogger("aigc.storage").warning("could not abort upload %s of s3://%s/%s: %s",
                                                      upload_id, self.bucket, full, e)

    def get(self, key: str) -> bytes:
        from botocore.exceptions import ClientError

        try:
            return self.client.get_object(Bucket=self.bucket, Key=self._full(key))["Body"].read()
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                raise NotFound(f"no object {self.uri(key)}") from None
            raise StorageError(f"get {self.uri(key)} failed: {e}") from e
        except Exception as e:
            raise StorageError(f"get {self.uri(key)} failed: {e}") from e

    def exists(self, key: str) -> bool:
        from botocore.exceptions import ClientError

        try:
            self.client.head_object(Bucket=self.bucket, Key=self._full(key))
            return True
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return False
            raise StorageError(f"head {self.uri(key)} failed: {e}") from e
        except Exception as e:
            raise StorageError(f"head {self.uri(key)} failed: {e}") from e

    def list(self, prefix: str) -> Iterator[str]:
        full = f"{self.prefix}/{prefix}" if self.prefix else prefix
        cut = len(self.prefix) + 1 if self.prefix else 0
        try:
            pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=full)
            for page in pages:
                for obj in page.get("Contents", []):
                    yield obj["Key"][cut:]
        except Exception as e:
            raise StorageError(f"list s3://{self.bucket}/{full} failed: {e}") from e

    def folders(self, prefix: str) -> Iterator[str]:
        """The common prefixes right under ``prefix`` (which ends in '/'): one listing with a delimiter,
        not every key."""
        full = f"{self.prefix}/{prefix}" if self.prefix else prefix
        cut = len(self.prefix) + 1 if self.prefix else 0
        try:
            pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=full,
                                                                          Delimiter="/")
            for page in pages:
                for cp in page.get("CommonPrefixes", []):
                    yield cp["Prefix"][cut:]
        except Exception as e:
            raise StorageError(f"list s3://{self.bucket}/{full} failed: {e}") from e

    def newest(self, prefix: str) -> datetime | None:
        full = f"{self.prefix}/{prefix}" if self.prefix else prefix
        newest: datetime | None = None
        try:
            for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=full):
                for obj in page.get("Contents", []):
                    if newest is None or obj["LastModified"] > newest:
                        newest = obj["LastModified"]
        except Exception as e:
            raise StorageError(f"list s3://{self.bucket}/{full} failed: {e}") from e
        return newest

    def uri(self, key: str) -> str:
        return f"s3://{self.bucket}/{self._full(key)}"

    def delete(self, keys: builtins.list[str]) -> None:
        """Remove objects, a thousand per request (DeleteObjects); a missing key is not an error."""
        full = [self._full(k) for k in keys]
        try:
            for i in range(0, len(full), 1000):
                out = self.client.delete_objects(Bucket=self.bucket, Delete={
                    "Objects": [{"Key": k} for k in full[i : i + 1000]], "Quiet": True})
                if out.get("Errors"):
                    err = out["Errors"][0]
                    raise StorageError(f"delete s3://{self.bucket}/{err.get('Key')} failed: {err.get('Message')}")
        except StorageError:
            raise
        except Exception as e:
            raise StorageError(f"delete in s3://{self.bucket} failed: {e}") from e

    def download(self, key: str, path: Path) -> None:
        """Streamed to disk in parallel ranges (boto3's transfer manager), never whole in memory."""
        from botocore.exceptions import ClientError

        path.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".tmp-{path.name}-")
        os.close(fd)
        tmp = Path(name)
        try:
            self.client.download_file(self.bucket, self._full(key), str(tmp))
            os.replace(tmp, path)
        except ClientError as e:
            tmp.unlink(missing_ok=True)
            if e.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                raise NotFound(f"no object {self.uri(key)}") from None
            raise StorageError(f"download {self.uri(key)} failed: {e}") from e
        except Exception as e:
            tmp.unlink(missing_ok=True)
            raise StorageError(f"download {self.uri(key)} failed: {e}") from e

    def upload(self, key: str, path: Path, content_type: str = "application/octet-stream") -> ObjectInfo:
        """A file streamed from disk; multipart above 64 MiB, so weights past PUT's 5 GB limit go too."""
        from boto3.s3.transfer import TransferConfig

        cfg = TransferConfig(multipart_threshold=64 * 2**20, multipart_chunksize=64 * 2**20)
        try:
            self.client.upload_file(str(path), self.bucket, self._full(key), ExtraArgs={"ContentType": content_type},
                                    Config=cfg)
        except Exception as e:
            raise StorageError(f"upload s3://{self.bucket}/{self._full(key)} failed: {e}") from e
        return ObjectInfo(key, self.uri(key), Path(path).stat().st_size)

    def presign_get(self, key: str, expires_s: int = PRESIGN_DEFAULT_S) -> str:
        """A URL that lets its holder GET this one object (no other method, no other key) for ``expires_s``."""
        if not 1 <= expires_s <= PRESIGN_MAX_S:
            raise SpecError(f"presigned URL expiry {expires_s}s: give 1 to {PRESIGN_MAX_S} seconds")
        return self.client.generate_presigned_url(
            "get_object", Params={"Bucket": self.bucket, "Key": self._full(key)}, ExpiresIn=expires_s
        )


def open_store(url: str, endpoint_url: str | None = None, region: str | None = None, *,
               fast_put: bool = True, part_bytes: int = DEFAULT_PART_BYTES) -> ObjectStore:
    """``file://DIR`` (relative paths allowed: ``file://./aigc-data``) or ``s3://bucket/prefix``."""
    parsed = urlparse(url)
    if parsed.scheme == "file":
        return LocalStore(url.removeprefix("file://") or ".")
    if parsed.scheme == "s3":
        if not parsed.netloc:
            raise SpecError(f"storage URL {mask_url(url)!r} names no bucket")
        if "@" in parsed.netloc:
            raise SpecError(f"storage URL {mask_url(url)!r}: S3 credentials never go in a URL; they come from "
                            "the environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY), a profile or a role")
        return S3Store(parsed.netloc, parsed.path, endpoint_url=endpoint_url, region=region, fast_put=fast_put,
                       part_bytes=part_bytes)
    raise SpecError(f"storage URL {mask_url(url)!r}: use file://DIR or s3://bucket/prefix")


def download_uri(uri: str, dest: Path, *, endpoint_url: str | None = None) -> Path:
    """Fetch ``s3://bucket/key`` or ``file:///path`` to ``dest`` (datasets and other inputs by URI)."""
    parsed = urlparse(uri)
    dest.parent.mkdir(parents=True, exist_ok=True)
    if parsed.scheme == "file":
        src = Path(uri.removeprefix("file://"))
        if not src.is_file():
            raise NotFound(f"no file {src}")
        if src.resolve() != dest.resolve():
            _atomic_copy(src, dest)
        return dest
    if parsed.scheme == "s3":
        store = S3Store(parsed.netloc, endpoint_url=endpoint_url)
        try:
            store.client.download_file(parsed.netloc, parsed.path.lstrip("/"), str(dest))
        except Exception as e:
            if "404" in str(e) or "Not Found" in str(e):
                raise NotFound(f"no object {uri}") from None
            raise StorageError(f"download {uri} failed: {e}") from e
        return dest
    raise SpecError(f"cannot read {uri!r}: use s3://bucket/key or file:///path")


def download_prefix(uri: str, dest: Path, *, endpoint_url: str | None = None, max_bytes: int | None = None) -> Path:
    """Fetch a folder, ``file:///dir`` or every object under ``s3://bucket/prefix/``, into ``dest``
    (image datasets). ``max_bytes``: refuse a prefix larger than that before fetching any of it."""
    parsed = urlparse(uri)
    if parsed.scheme == "file" or "://" not in uri:
        src = Path(unquote(parsed.path) if parsed.scheme == "file" else uri)
        if not src.is_dir():
            raise NotFound(f"no folder {src}")
        if src.resolve() != Path(dest).resolve():
            shutil.rmtree(dest, ignore_errors=True)
            shutil.copytree(src, dest, ignore=shutil.ignore_patterns(".tmp-*"))
        return dest
    if parsed.scheme != "s3" or not parsed.netloc:
        raise SpecError(f"cannot read {uri!r}: use s3://bucket/prefix/ or a folder")
    store = S3Store(parsed.netloc, parsed.path.strip("/"), endpoint_url=endpoint_url)
    try:
        pages = store.client.get_paginator("list_objects_v2").paginate(
            Bucket=store.bucket, Prefix=store.prefix + "/" if store.prefix else "")
        objects = [(o["Key"][len(store.prefix) + 1 if store.prefix else 0:], o["Size"])
                   for page in pages for o in page.get("Contents", []) if not o["Key"].endswith("/")]
    except Exception as e:
        raise StorageError(f"list {uri} failed: {e}") from e
    if not objects:
        raise NotFound(f"nothing under {uri}")
    if max_bytes is not None and (total := sum(size for _, size in objects)) > max_bytes:
        raise SpecError(f"{uri} holds {total} bytes; at most {max_bytes}")
    root = Path(dest).resolve()
    for key, _ in objects:
        path = (root / check_key(key)).resolve()
        if not path.is_relative_to(root):
            raise SpecError(f"object key {key!r} leaves {root}")
        store.download(key, path)
    return dest
