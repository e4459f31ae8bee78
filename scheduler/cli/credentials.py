"""``aigc credentials init`` (a local test CA and signer) and ``aigc verify FILE`` (C2PA content credentials)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from aigc_core.settings import Settings
from scheduler.cli.ops import err, stdout_console

credentials_app = typer.Typer(no_args_is_help=True, help="C2PA signing credentials for outputs.")
out = stdout_console()


@credentials_app.command("init")
def credentials_init(
    folder: Annotated[Path, typer.Argument(help="where to write ca.pem, chain.pem, signer.key")] = Path(
        "aigc-credentials"),
    days: Annotated[int, typer.Option(help="validity of both certificates")] = 365,
) -> None:
    """Make a self-signed TEST CA and a signing certificate under it. For testing only: no verifier
    outside this project trusts them; use a certificate from a C2PA-trusted CA in production."""
    from aigc_core.credentials import init_test_ca

    paths = init_test_ca(folder, days=days)
    err.print("TEST credentials, for testing only: outputs signed with them verify as Trusted only where "
              f"{paths['ca']} is given as a trust anchor; nobody else trusts this CA.")
    print(f"AIGC_C2PA_CERT_FILE={paths['chain'].resolve()}")
    print(f"AIGC_C2PA_KEY_FILE={paths['key'].resolve()}")
    print(f"AIGC_C2PA_TRUST_ANCHORS_FILE={paths['ca'].resolve()}")


def verify(
    file: Annotated[str, typer.Argument(help="a local file, or an output's key in the object store")],
    as_json: Annotated[bool, typer.Option("--json", help="the whole report as JSON")] = False,
) -> None:
    """Print a file's C2PA manifest and its validation state (Trusted, Valid, Invalid, Unsigned), with the
    trust anchors from settings (AIGC_C2PA_TRUST_ANCHORS_FILE). Exits 1 unless Trusted or Valid."""
    from aigc_core.credentials import verify_source
    from aigc_core.storage import open_store

    s = Settings()
    local = Path(file).expanduser().is_file()
    store = None if local else open_store(s.storage_url, s.s3_endpoint_url, s.s3_region, fast_put=s.s3_fast_put)
    report = verify_source(file, s, store)
    if as_json:
        print(json.dumps(report, indent=1, default=str))
    else:
        _show(report)
    if report["state"] not in ("Trusted", "Valid"):
        raise typer.Exit(1)


def _show(report: dict[str, Any]) -> None:
    out.print(f"{report['source']}: [bold]{report['state']}[/bold]", highlight=False)
    for key in ("reason", "failures"):
        if report.get(key):
            out.print(f"{key}: {report[key]}", highlight=False)
    m = report.get("manifest") or {}
    if not m:
        return
    sig = m.get("signature_info") or {}
    gen = ", ".join(f"{g.get('name')}/{g.get('version')}" for g in m.get("claim_generator_info") or [])
    out.print(f"claim generator: {gen}\nsigned by: {sig.get('common_name')} ({sig.get('issuer')}), "
              f"{sig.get('alg')}", highlight=False)
    for a in m.get("assertions") or []:
        out.print(f"{a.get('label')}: {json.dumps(a.get('data'), sort_keys=True)}", highlight=False, soft_wrap=True)


def register(app: typer.Typer) -> None:
    app.add_typer(credentials_app, name="credentials")
    app.command()(verify)
