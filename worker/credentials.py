"""C2PA content credentials on outputs, in the worker: after generation, before the object is stored.

PNG and WAV carry the manifest inside the file; a text output gets a detached manifest (the pipeline
stores it as "<key>.c2pa" beside the article). The manifest says: made by a trained model (IPTC
``trainedAlgorithmicMedia``), which one (``softwareAgent`` name@version), and this project's provenance
(weights digest, seed, job and item, effective parameters) as a custom assertion. ``c2pa`` is imported
on first use.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from aigc_core import __version__
from aigc_core.credentials import (
    CARRIER,
    EMBEDDED_TYPES,
    PROVENANCE_LABEL,
    TEXT_LABEL,
    TRAINED_ALGORITHMIC_MEDIA,
    SigningMaterial,
    material_from,
    signing_mode,
)
from aigc_core.errors import AigcError

if TYPE_CHECKING:
    from aigc_core.settings import Settings

log = logging.getLogger("aigc.worker")


class SigningFailed(AigcError):
    """Signing is required and this output could not be signed: its item fails with this reason."""


@dataclass(frozen=True)
class Signed:
    data: bytes  # the bytes to store (a PNG/WAV with its manifest inside; text unchanged)
    detached: bytes | None = None  # a text output's detached manifest


def sign_output(settings: Settings, data: bytes, media_type: str, prov: dict[str, Any]) -> Signed:
    """``data`` signed as the settings say (``c2pa_signing``). Under ``required`` a failure raises
    SigningFailed; under ``optional`` the output goes unsigned with a warning. On success ``prov``
    gains a ``c2pa`` entry (it reaches the Artifact row and the sidecar, not the embedded copy)."""
    mode = signing_mode(settings)
    kind = media_type.split(";")[0].strip().lower()
    if mode == "off":
        return Signed(data)
    if not (kind in EMBEDDED_TYPES or kind.startswith("text/")):
        if mode == "required":
            raise SigningFailed(f"C2PA signing is required and {kind} outputs cannot be signed")
        return Signed(data)
    try:
        material = _material(settings)
        signed = sign_bytes(material, data, kind, prov, thumbnail=settings.c2pa_thumbnail)
    except Exception as e:  # c2pa's errors, a bad key, a file it cannot parse: never the key itself
        reason = f"C2PA signing failed: {type(e).__name__}: {e}"
        if mode == "required":
            raise SigningFailed(reason) from e
        log.warning("%s; stored unsigned (AIGC_C2PA_SIGNING=optional)", reason)
        return Signed(data)
    prov["c2pa"] = {"signed": True, "embedded": signed.detached is None, "alg": material.alg}
    return signed


def _material(settings: Settings) -> SigningMaterial:
    key_pem = settings.c2pa_key_pem.get_secret_value() if settings.c2pa_key_pem else None
    return _cached_material(settings.c2pa_cert_file, settings.c2pa_cert_pem, settings.c2pa_key_file, key_pem)


# Read once per process and configuration; a failure is not cached, so a key put in place later is
# found by the next item (a key replaced at the same path is read after a worker restart).
_cached_material = functools.lru_cache(maxsize=4)(material_from)


def manifest(prov: dict[str, Any], *, text_sha256: str | None = None) -> dict[str, Any]:
    """The manifest definition: claim generator, the created action with the model as software agent,
    and the project's provenance (and, for text, the hash that binds the article)."""
    model = prov.get("model") or {}
    agent = f"{model.get('name')}@{model.get('version')}"
    ours = {"job_id": prov.get("job_id"), "item_index": prov.get("item_index"), "custom_id": prov.get("custom_id"),
            "model": {"name": model.get("name"), "version": model.get("version"),
                      "weights_digest": model.get("weights_digest"), "backend": model.get("backend")},
            "seed": prov.get("seed"), "params": prov.get("params"), "param_sources": prov.get("param_sources"),
            "prompt_sha256": prov.get("prompt_sha256"), "created_at": prov.get("created_at")}
    assertions: list[dict[str, Any]] = [
        {"label": "c2pa.actions", "data": {"actions": [
            {"action": "c2pa.created", "digitalSourceType": TRAINED_ALGORITHMIC_MEDIA,
             "softwareAgent": {"name": agent}}]}},
        {"label": PROVENANCE_LABEL, "data": json.loads(json.dumps(ours, default=str))},
    ]
    if text_sha256 is not None:
        assertions.append({"label": TEXT_LABEL, "data": {"sha256": text_sha256}})
    return {"claim_generator": f"aigc-runner/{__version__}",
            "claim_generator_info": [{"name": "aigc-runner", "version": __version__}],
            "title": f"{prov.get('job_id')}/{prov.get('item_index')}", "assertions": assertions}


def sign_bytes(material: SigningMaterial, data: bytes, media_type: str, prov: dict[str, Any], *,
               thumbnail: bool = False) -> Signed:
    """Sign one output (no settings involved: the benchmark and tests call this directly)."""
    import c2pa

    kind = EMBEDDED_TYPES.get(media_type)
    text_sha = None if kind else hashlib.sha256(data).hexdigest()
    info = c2pa.C2paSignerInfo(alg=material.alg.encode(), sign_cert=material.chain, private_key=material.key,
                               ta_url=None)
    ctx = c2pa.Context.from_dict({"builder": {"thumbnail": {"enabled": thumbnail}}})
    with c2pa.Signer.from_info(info) as signer, c2pa.Builder(manifest(prov, text_sha256=text_sha), ctx) as builder:
        if kind is not None:
            dest = io.BytesIO()
            builder.sign(signer, kind, io.BytesIO(data), dest)
            return Signed(dest.getvalue())
        # Text: C2PA binds no plain text format, so the detached manifest is signed over a fixed
        # carrier and binds the article by the sha256 in its signed text assertion.
        builder.set_no_embed()
        return Signed(data, builder.sign(signer, "image/png", io.BytesIO(CARRIER), io.BytesIO()))
