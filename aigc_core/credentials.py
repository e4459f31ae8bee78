"""C2PA content credentials: the signing material from settings, verification, and a test CA.

Torch-free and shared by both sides: the worker signs (worker/credentials.py), the scheduler verifies
(``aigc verify``, ``Client.verify``). ``c2pa`` and ``cryptography`` are imported only when used. Keys are
read here and never logged, printed or put in an error message (only their source: a path or a
variable name).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from aigc_core.errors import AigcError, NotFound

if TYPE_CHECKING:
    from aigc_core.settings import Settings
    from aigc_core.storage import ObjectStore

Mode = Literal["off", "optional", "required"]

# The IPTC term for media made by a trained model (C2PA's digitalSourceType for generated content).
TRAINED_ALGORITHMIC_MEDIA = "http://cv.iptc.org/newscodes/digitalsourcetype/trainedAlgorithmicMedia"
PROVENANCE_LABEL = "org.aigc-runner.provenance"  # the custom assertion with this project's provenance
TEXT_LABEL = "org.aigc-runner.text"  # a text output's hash, in its detached manifest
DETACHED_SUFFIX = ".c2pa"  # a text output's detached manifest: "<key>.c2pa", beside it
EMBEDDED_TYPES = {"image/png": "image/png", "audio/wav": "audio/wav", "audio/x-wav": "audio/wav",
                  "audio/wave": "audio/wav"}


class CredentialsError(AigcError):
    """Signing material that is missing or unusable, or a file that cannot be signed or read."""


@dataclass(frozen=True)
class SigningMaterial:
    """A certificate chain (PEM, leaf first) and its private key (PEM). ``repr`` never shows the key."""

    chain: bytes
    key: bytes = field(repr=False)
    alg: str = "es256"


def signing_mode(settings: Settings) -> Mode:
    """``auto`` (the default) is ``optional`` when a certificate and key are configured, else ``off``."""
    if settings.c2pa_signing != "auto":
        return settings.c2pa_signing
    has_cert = bool(settings.c2pa_cert_file or settings.c2pa_cert_pem)
    has_key = bool(settings.c2pa_key_file or settings.c2pa_key_pem)
    return "optional" if has_cert and has_key else "off"


def _read_pem(path: str | None, inline: str | None, what: str, env: str) -> bytes:
    if inline:
        return inline.encode()
    if not path:
        raise CredentialsError(f"no C2PA signing {what} configured (set AIGC_{env}_FILE or AIGC_{env}_PEM)")
    try:
        return Path(path).expanduser().read_bytes()
    except OSError as e:
        raise CredentialsError(f"the C2PA signing {what} {path} cannot be read: {e.strerror}") from e


def load_material(settings: Settings) -> SigningMaterial:
    """The chain and key from settings (a PEM in the environment wins over a path); raises
    CredentialsError naming what is missing, never showing a key."""
    key_pem = settings.c2pa_key_pem.get_secret_value() if settings.c2pa_key_pem else None
    return material_from(settings.c2pa_cert_file, settings.c2pa_cert_pem, settings.c2pa_key_file, key_pem)


def material_from(cert_file: str | None, cert_pem: str | None, key_file: str | None,
                  key_pem: str | None) -> SigningMaterial:
    chain = _read_pem(cert_file, cert_pem, "certificate chain", "C2PA_CERT")
    key = _read_pem(key_file, key_pem, "private key", "C2PA_KEY")
    return SigningMaterial(chain, key, _alg_of(key))


def _alg_of(key_pem: bytes) -> str:
    """The C2PA signing algorithm for a key: ES256/ES384/ES512 by curve, PS256 for RSA, Ed25519."""
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    try:
        key = load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError) as e:  # the message of either names no key material
        raise CredentialsError("the C2PA signing key is not an unencrypted PEM private key") from e
    if isinstance(key, ec.EllipticCurvePrivateKey):
        alg = {"secp256r1": "es256", "secp384r1": "es384", "secp521r1": "es512"}.get(key.curve.name)
        if alg:
            return alg
    elif isinstance(key, rsa.RSAPrivateKey):
        return "ps256"
    elif isinstance(key, ed25519.Ed25519PrivateKey):
        return "ed25519"
    raise CredentialsError("the C2PA signing key is of a kind C2PA does not sign with (use P-256, RSA or Ed25519)")


def trust_anchors(settings: Settings) -> str | None:
    """The PEM bundle of trusted roots for verification, from settings; None: signatures are checked,
    trust is not (a good signature reads ``Valid``, not ``Trusted``)."""
    if settings.c2pa_trust_anchors_pem:
        return settings.c2pa_trust_anchors_pem
    if settings.c2pa_trust_anchors_file:
        try:
            return Path(settings.c2pa_trust_anchors_file).expanduser().read_text()
        except OSError as e:
            raise CredentialsError(f"trust anchors {settings.c2pa_trust_anchors_file}: {e.strerror}") from e
    return None


# ---- verification ---------------------------------------------------------------------------------

def sniff(data: bytes) -> str | None:
    """The media type of a file C2PA embeds into, from its first bytes; None for anything else."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png"
    if data[:4] == b"RIFF" and data[8:12] == b"WAVE":
        return "audio/wav"
    return None


def verify(data: bytes, *, anchors: str | None = None, detached: bytes | None = None) -> dict[str, Any]:
    """The active manifest of a signed PNG/WAV (or of text with its ``detached`` manifest) and its
    validation state: ``Trusted`` (signed by a certificate under ``anchors``), ``Valid`` (signature and
    hashes good, signer not trusted), ``Invalid`` (tampered, or a bad signature) or ``Unsigned``."""
    import c2pa

    ctx = c2pa.Context.from_dict({"trust": {"trust_anchors": anchors}} if anchors else {})
    fmt = sniff(data)
    text_hash = None
    if fmt is None:
        if detached is None:
            return {"state": "Unsigned", "reason": "not a PNG or WAV file, and no detached manifest given"}
        fmt, text_hash = "image/png", hashlib.sha256(data).hexdigest()
        data = CARRIER
    try:
        with c2pa.Reader(fmt, io.BytesIO(data), manifest_data=detached, context=ctx) as reader:
            store = json.loads(reader.json())
            state = reader.get_validation_state() or "Invalid"
    except c2pa.C2paError as e:
        if detached is None and "ManifestNotFound" in f"{type(e).__name__} {e}":
            return {"state": "Unsigned", "reason": "no C2PA manifest in the file"}
        return {"state": "Invalid", "reason": f"{type(e).__name__}: {e}"}
    manifest = store.get("manifests", {}).get(store.get("active_manifest") or "", {})
    failures = [r.get("code") for r in (store.get("validation_results", {}).get("activeManifest", {})
                                        .get("failure", []))]
    if text_hash is not None:  # the article itself is bound by the hash in the signed text assertion
        signed: dict[str, Any] = next((a["data"] for a in manifest.get("assertions", [])
                                       if a.get("label") == TEXT_LABEL), {})
        if signed.get("sha256") != text_hash:
            state = "Invalid"
            failures.append("org.aigc-runner.text.hash.mismatch")
    return {"state": state, "failures": failures, "manifest": manifest,
            "validation_results": store.get("validation_results")}


def verify_source(path_or_key: str | Path, settings: Settings, store: ObjectStore | None = None) -> dict[str, Any]:
    """``verify`` on a local file, else on a stored object (an Artifact key) when a store is given, with the
    trust anchors from settings. A text output is checked with its detached manifest, "<name>.c2pa"."""
    local = Path(path_or_key).expanduser()
    if local.is_file():
        data = local.read_bytes()
        side = local.with_name(local.name + DETACHED_SUFFIX)
        detached = side.read_bytes() if sniff(data) is None and side.is_file() else None
    elif store is not None:
        key = str(path_or_key)
        data = store.get(key)  # raises NotFound
        detached = (store.get(key + DETACHED_SUFFIX)
                    if sniff(data) is None and store.exists(key + DETACHED_SUFFIX) else None)
    else:
        raise NotFound(f"no file {path_or_key}")
    return {"source": str(path_or_key), **verify(data, anchors=trust_anchors(settings), detached=detached)}


# A fixed 1x1 PNG: the asset a text output's detached manifest is signed over (the C2PA library binds
# only formats it knows); the article is bound by the sha256 in the manifest's signed text assertion.
CARRIER = bytes.fromhex(
    "89504e470d0a1a0a0000000d49484452000000010000000108000000003a7e9b55"
    "0000000a49444154789c636000000002000148afa4710000000049454e44ae426082")


# ---- a local test CA ------------------------------------------------------------------------------

def init_test_ca(folder: str | Path, *, days: int = 365) -> dict[str, Path]:
    """A self-signed test CA and a signing certificate under it (P-256, ES256; EKU emailProtection, as
    C2PA requires), written to ``folder``: ``ca.pem`` (the trust anchor), ``chain.pem`` (leaf then CA),
    ``signer.key`` (mode 0600). For testing only: no verifier outside this project trusts them."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn),
                          x509.NameAttribute(NameOID.ORGANIZATION_NAME, "aigc-runner TEST ONLY")])

    def usage(*, sign: bool, ca: bool) -> x509.KeyUsage:
        return x509.KeyUsage(digital_signature=sign, content_commitment=False, key_encipherment=False,
                             data_encipherment=False, key_agreement=False, key_cert_sign=ca, crl_sign=ca,
                             encipher_only=False, decipher_only=False)

    now = dt.datetime.now(dt.UTC)
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())

    def builder(subject: str, issuer: x509.Name, public: Any) -> x509.CertificateBuilder:
        return (x509.CertificateBuilder().subject_name(name(subject)).issuer_name(issuer).public_key(public)
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days))
                .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False))

    ca = (builder("aigc-runner test CA", name("aigc-runner test CA"), ca_key.public_key())
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(usage(sign=False, ca=True), critical=True)
          .sign(ca_key, hashes.SHA256()))
    leaf = (builder("aigc-runner test signer", ca.subject, key.public_key())
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(usage(sign=True, ca=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.EMAIL_PROTECTION]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    pem = serialization.Encoding.PEM
    paths = {"ca": folder / "ca.pem", "chain": folder / "chain.pem", "key": folder / "signer.key"}
    paths["ca"].write_bytes(ca.public_bytes(pem))
    paths["chain"].write_bytes(leaf.public_bytes(pem) + ca.public_bytes(pem))
    fd = os.open(paths["key"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    return paths
