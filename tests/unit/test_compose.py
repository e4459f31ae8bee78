"""docker-compose.yml, the Dockerfile, .env.example and deploy/prometheus.yml, checked without Docker.

``compose_problems`` lists what would break at ``docker compose up``: commands the ``aigc`` CLI
does not have, AIGC_* variables Settings ignores, missing build paths, a lossy Redis, an open
Flower, a GPU worker that does not reserve a GPU, secrets with defaults or on command lines,
services without a healthcheck that probes what they serve, metrics Prometheus does not scrape,
a CPU image built on CUDA torch. It reads the file as ``docker compose config`` does: variables
are interpolated from an environment (by default .env.example with its blanks filled in). The last
tests feed it broken files to show that each check can fail.
"""

from __future__ import annotations

import copy
import fnmatch
import functools
import importlib.util
import json
import re
import shlex
import tomllib
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
import typer
import yaml
from packaging.requirements import Requirement
from typer.testing import CliRunner

from aigc_core.errors import SpecError
from aigc_core.settings import Limits, Settings

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "docker-compose.yml"
PROJECT_SERVICES = {"migrate", "worker-cpu", "worker-gpu", "scheduler", "flower", "api"}
AFTER_MIGRATE = {"worker-cpu", "worker-gpu", "scheduler", "api"}
# What a project service needs set, where it is not the database, the broker, the store and the cache.
NEEDS = {"flower": ("AIGC_BROKER_URL",)}
HEALTHCHECKED = {"worker-cpu", "worker-gpu", "scheduler", "flower", "prometheus", "api"}
README_SECTIONS = ("Running against Redis, PostgreSQL and S3", "Monitoring", "Security")
CPU_TORCH_INDEX = "https://download.pytorch.org/whl/cpu"
CUDA_TORCH_INDEX = re.compile(r"https://download\.pytorch\.org/whl/cu\d+")
# What python:3.11-slim plus `pip install .` has to run a healthcheck with (no curl, no wget).
IMAGE_TOOLS = {"python", "python3", "celery", "aigc"}

KNOWN_AIGC_VARS = {f"AIGC_{name.upper()}" for name in Settings.model_fields if name != "limits"} | {
    f"AIGC_LIMIT_{name.upper()}" for name in Limits.model_fields
}

# A variable or key that holds a secret: it gets no default and never lands on a command line.
SECRET_NAME = re.compile(r"PASSWORD|SECRET|ACCESS_KEY|API_KEY|PRIVATE_KEY|AUTH|TOKEN|CREDENTIAL", re.I)
# Secrets that may be unset for compose as a whole, because only one service needs them and that
# service refuses to start without them (tested below); every other secret is ${VAR:?...}.
CHECKED_BY_THEIR_SERVICE = {"AIGC_FLOWER_BASIC_AUTH": "flower"}

_VAR = re.compile(r"\$\$|\$\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?])(?P<default>[^}]*))?\}"
                  r"|\$(?P<bare>[A-Za-z_][A-Za-z0-9_]*)")
_URL_PASSWORD = re.compile(r"://[^:/@\s]*:([^@\s]*)@")


# ---- reading the file as `docker compose config` does ---------------------------------------------

def interpolate(value: Any, env: dict[str, str] | None = None, errors: list[str] | None = None) -> Any:
    """Compose's ``${VAR}``, ``${VAR:-default}``, ``${VAR-default}``, ``${VAR:?message}``, ``${VAR?message}``
    and ``$$`` against ``env``; with no env, as it reads with nothing set (a required variable reads as
    empty). A required variable that is missing is added to ``errors``, as compose refuses the file."""
    if not isinstance(value, str):
        return value

    def sub(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        name, op, arg = m.group("braced") or m.group("bare"), m.group("op"), m.group("default") or ""
        if env is None:
            return arg if op in (":-", "-") else ""
        val = env.get(name)
        if op == ":-":
            return val or arg
        if op == "-":
            return arg if val is None else val
        if op in (":?", "?") and (val is None or (op == ":?" and not val)):
            if errors is not None:
                errors.append(f"required variable {name} is missing a value: {arg}")
            return ""
        return val or ""

    return _VAR.sub(sub, value)


def resolve(node: Any, env: dict[str, str], errors: list[str]) -> Any:
    """The whole file interpolated, values only (compose does not interpolate keys)."""
    if isinstance(node, dict):
        return {k: resolve(v, env, errors) for k, v in node.items()}
    if isinstance(node, list):
        return [resolve(v, env, errors) for v in node]
    return interpolate(node, env, errors)


def strings(node: Any, path: str = "") -> list[tuple[str, str]]:
    """Every string value in the tree with where it is (``services.flower.command[3]``)."""
    if isinstance(node, dict):
        return [s for k, v in node.items() for s in strings(v, f"{path}.{k}" if path else str(k))]
    if isinstance(node, list):
        return [s for i, v in enumerate(node) for s in strings(v, f"{path}[{i}]")]
    return [(path, node)] if isinstance(node, str) else []


def references(compose: dict[str, Any]) -> list[tuple[str, str, str | None, str]]:
    """(where, name, op, default-or-message) for every ``${VAR...}`` in the file."""
    refs = []
    for where, s in strings(compose):
        for m in _VAR.finditer(s):
            if m.group("braced") or m.group("bare"):
                refs.append((where, m.group("braced") or m.group("bare"), m.group("op"), m.group("default")))
    return refs


def read_env_file(path: Path) -> dict[str, str]:
    """``NAME=value`` lines of a .env file (no quoting, as .env.example writes them)."""
    env = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            name, sep, value = line.partition("=")
            if sep:
                env[name.strip()] = value.strip()
    return env


def sample_value(name: str) -> str:
    """A value a user would put in .env, recognisable wherever it leaks."""
    return f"ops:sample-{name.lower()}" if name.endswith("BASIC_AUTH") else f"sample-{name.lower()}"


def sample_env(root: Path = ROOT) -> dict[str, str]:
    """.env.example as a user fills it in: every blank gets a sample value."""
    example = root / ".env.example"
    env = read_env_file(example) if example.is_file() else {}
    return {name: value or sample_value(name) for name, value in env.items()}


def words(command: Any) -> list[str]:
    if command is None:
        return []
    if isinstance(command, str):
        return shlex.split(command)
    return [str(w) for w in command]


def environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.partition("=")[::2] for item in env)
    return {str(k): "" if v is None else str(v) for k, v in env.items()}


def is_project_service(service: dict[str, Any]) -> bool:
    return "build" in service


def reserves_gpu(service: dict[str, Any]) -> bool:
    return bool((((service.get("deploy") or {}).get("resources") or {}).get("reservations") or {}).get("devices"))


# ---- the checks on the resolved file ----------------------------------------------------------

def _aigc_app() -> typer.Typer:
    from scheduler.cli import app

    return app


@functools.cache
def _aigc_cli():
    return typer.main.get_command(_aigc_app())


def aigc_context(args: list[str]):
    """The click context ``aigc ARGS`` parses to (its params, defaults filled in), or an error string."""
    cmd, path = _aigc_cli(), ["aigc"]
    while hasattr(cmd, "commands"):  # a group: the next word must name a subcommand
        if not args:
            return f"`{' '.join(path)}` is a group, not a command (has {sorted(cmd.commands)})"
        name, args = args[0], args[1:]
        if name not in cmd.commands:
            return f"`{' '.join(path)}` has no command {name!r} (has {sorted(cmd.commands)})"
        cmd, path = cmd.commands[name], [*path, name]
    try:
        return cmd.make_context(" ".join(path), list(args))
    except typer.TyperException as e:  # typer's click: usage errors, bad values, unknown options
        return f"`{' '.join(path)}`: {e}"


def check_aigc_command(args: list[str]) -> str | None:
    """None if ``aigc ARGS`` names a real command (nested groups too) and its options parse."""
    ctx = aigc_context(args)
    return ctx if isinstance(ctx, str) else None


def _image_installs(root: Path, package: str) -> bool:
    deps = tomllib.loads((root / "pyproject.toml").read_text())["project"]["dependencies"]
    if any(re.match(rf"{package}\b", d) for d in deps):
        return True
    dockerfile = root / "Dockerfile"
    return dockerfile.exists() and re.search(rf"pip install[^\n]*\b{package}\b", dockerfile.read_text()) is not None


def _importable(module: str) -> bool:
    try:
        return bool(module) and importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a missing parent package raises instead of returning None
        return False


def check_commands(compose: dict[str, Any], root: Path) -> list[str]:
    problems = []
    services = compose.get("services", {})
    for name in sorted(PROJECT_SERVICES - {n for n, s in services.items() if is_project_service(s)}):
        problems.append(f"{name}: missing or not built from the project image")
    for name, svc in services.items():
        if not is_project_service(svc):
            continue
        entrypoint, args = words(svc.get("entrypoint")), words(svc.get("command"))
        if not entrypoint or entrypoint == ["aigc"]:
            if not args:
                problems.append(f"{name}: no command (the image default is not what a service should run)")
            elif (err := check_aigc_command(args)) is not None:
                problems.append(f"{name}: {err}")
        elif entrypoint == ["celery"]:
            app = next((a.split("=", 1)[1] for a in args if a.startswith("--app=")), None)
            for flag in ("-A", "--app"):
                if flag in args[:-1]:
                    app = args[args.index(flag) + 1]
            module = (app or "").split(":")[0]
            if not _importable(module):
                problems.append(f"{name}: celery app {app!r} is not an importable module")
            if "flower" in args and not _image_installs(root, "flower"):
                problems.append(f"{name}: runs flower but the image does not install it")
        else:
            problems.append(f"{name}: unexpected entrypoint {entrypoint}")
    return problems


def check_environment(compose: dict[str, Any]) -> list[str]:
    """Every AIGC_* variable set anywhere is a Settings/Limits field, with a value it accepts."""
    problems = []
    envs = {f"service {n}": environment(s) for n, s in compose.get("services", {}).items()}
    envs |= {k: environment({"environment": v}) for k, v in compose.items()
             if k.startswith("x-") and k.endswith("-env") and isinstance(v, dict)}
    for where, env in envs.items():
        for var, value in env.items():
            if not var.startswith("AIGC_"):
                continue
            if var not in KNOWN_AIGC_VARS:
                problems.append(f"{where}: {var} is not a setting (Settings/Limits have no such field)")
                continue
            model, prefix = (Limits, "AIGC_LIMIT_") if var.startswith("AIGC_LIMIT_") else (Settings, "AIGC_")
            try:
                model.model_validate({var.removeprefix(prefix).lower(): value})
            except ValueError as e:
                problems.append(f"{where}: {var}={value!r} is not valid: {str(e).splitlines()[-1]}")
    for name, svc in compose.get("services", {}).items():
        if not is_project_service(svc):
            continue
        env = environment(svc)
        for var in NEEDS.get(name, ("AIGC_DATABASE_URL", "AIGC_BROKER_URL", "AIGC_STORAGE_URL", "AIGC_CACHE_DIR")):
            if not env.get(var):
                problems.append(f"{name}: {var} is not set (the embedded default is not for a deployment)")
        if env.get("AIGC_STORAGE_URL", "").startswith("s3://"):
            for var in ("AIGC_S3_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
                if not env.get(var):
                    problems.append(f"{name}: S3 storage but {var} is not set")
    return problems


def check_build(compose: dict[str, Any], root: Path) -> list[str]:
    problems = []
    for name, svc in compose.get("services", {}).items():
        if not is_project_service(svc):
            continue
        build = svc["build"]
        build = {"context": build} if isinstance(build, str) else build
        context = root / build.get("context", ".")
        dockerfile = context / build.get("dockerfile", "Dockerfile")
        if not context.is_dir():
            problems.append(f"{name}: build context {context} does not exist")
        elif not dockerfile.is_file():
            problems.append(f"{name}: dockerfile {dockerfile} does not exist")
        else:
            entry = re.search(r"^ENTRYPOINT\s+(\[.*\])\s*$", dockerfile.read_text(), re.M)
            if entry is None or json.loads(entry.group(1)) != ["aigc"]:
                problems.append(f"{name}: {dockerfile.name} has no ENTRYPOINT [\"aigc\"]")
        volumes = [str(v) for v in svc.get("volumes", [])]
        cache = environment(svc).get("AIGC_CACHE_DIR")
        if cache and not any(v.split(":")[1:2] == [cache] for v in volumes):
            problems.append(f"{name}: AIGC_CACHE_DIR={cache} is not on a volume (models re-download)")
    return problems


def check_depends_on(compose: dict[str, Any]) -> list[str]:
    problems = []
    services = compose.get("services", {})
    for name, svc in services.items():
        deps = svc.get("depends_on") or {}
        deps = {d: {"condition": "service_started"} for d in deps} if isinstance(deps, list) else deps
        for dep, spec in deps.items():
            if dep not in services:
                problems.append(f"{name}: depends on unknown service {dep}")
            elif spec.get("condition") == "service_healthy" and "healthcheck" not in services[dep]:
                problems.append(f"{name}: waits for {dep} healthy but {dep} has no healthcheck")
        if name in AFTER_MIGRATE:
            wanted = {"migrate": "service_completed_successfully", "redis": "service_healthy",
                      "postgres": "service_healthy"}
            for dep, condition in wanted.items():
                if deps.get(dep, {}).get("condition") != condition:
                    problems.append(f"{name}: must depend on {dep} with condition {condition}")
    return problems


def _flag_value(args: list[str], flag: str) -> str | None:
    for i, a in enumerate(args):
        if a.startswith(flag + "="):
            return a.split("=", 1)[1]
        if a == flag and i + 1 < len(args):
            return args[i + 1]
    return None


def check_redis(compose: dict[str, Any]) -> list[str]:
    redis = compose.get("services", {}).get("redis")
    if redis is None:
        return ["redis: no such service"]
    args, problems = words(redis.get("command")), []
    if _flag_value(args, "--appendonly") != "yes":
        problems.append("redis: not run with --appendonly yes (queued chunks lost on restart)")
    if _flag_value(args, "--maxmemory-policy") != "noeviction":
        problems.append("redis: not run with --maxmemory-policy noeviction (messages could be evicted)")
    return problems


def check_flower(compose: dict[str, Any]) -> list[str]:
    """Flower's password reaches it through its environment, never argv, and it never runs open.

    `aigc flower` takes AIGC_FLOWER_BASIC_AUTH and refuses to start without it; a bare
    `celery flower` runs open when FLOWER_BASIC_AUTH is empty, so there compose must require it.
    """
    flower = compose.get("services", {}).get("flower")
    if flower is None:
        return ["flower: no such service"]
    entrypoint, args = words(flower.get("entrypoint")), words(flower.get("command"))
    problems = []
    if any(a.startswith("--basic-auth") for a in [*entrypoint, *args]):
        problems.append("flower: --basic-auth on its command line (the password shows in `ps` and "
                        "`docker compose config`): pass it through the environment")
    env = environment(flower)
    if entrypoint == ["celery"]:
        if "flower" not in args:
            problems.append("flower: command does not run flower")
        auth_var = "FLOWER_BASIC_AUTH"
    else:
        if args[:1] != ["flower"]:
            problems.append("flower: command does not run flower")
        if "--unauthenticated" in args:
            problems.append("flower: runs `aigc flower --unauthenticated` (its API would be open)")
        auth_var = "AIGC_FLOWER_BASIC_AUTH"
    if not env.get(auth_var) and not (entrypoint == ["celery"] and env.get("AIGC_FLOWER_BASIC_AUTH")):
        problems.append(f"flower: no basic auth: {auth_var} is not in its environment (its API would be open)")
    for var in ("AIGC_DATABASE_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        if var in env:
            problems.append(f"flower: gets {var}, which Flower never uses (the web UI should hold no "
                            f"database or S3 secret)")
    return problems


def check_gpu_worker(compose: dict[str, Any]) -> list[str]:
    services = compose.get("services", {})
    problems = []
    for name, svc in services.items():  # plain `docker compose up` must work on a machine without GPUs
        if reserves_gpu(svc) and not svc.get("profiles"):
            problems.append(f"{name}: reserves a device but is not behind a profile")
    gpu = services.get("worker-gpu")
    if gpu is None:
        return [*problems, "worker-gpu: no such service"]
    devices = (((gpu.get("deploy") or {}).get("resources") or {}).get("reservations") or {}).get("devices") or []
    one_gpu = [d for d in devices if d.get("driver") == "nvidia" and "gpu" in (d.get("capabilities") or [])
               and (str(d.get("count")) == "1" or len(d.get("device_ids") or []) == 1)]
    if not one_gpu:
        problems.append("worker-gpu: does not reserve one nvidia gpu")
    if "gpu" not in (gpu.get("profiles") or []):
        problems.append("worker-gpu: not in the gpu profile")
    args = words(gpu.get("command"))
    if args[:1] != ["worker"] or _flag_value(args, "--pool") != "solo":
        problems.append("worker-gpu: must run `worker --pool solo` (one process per GPU)")
    if environment(gpu).get("AIGC_DEVICE") != "cuda":
        problems.append("worker-gpu: AIGC_DEVICE is not cuda")
    return problems


def check_secrets_stay_off_command_lines(compose: dict[str, Any], secrets: dict[str, str]) -> list[str]:
    """No secret's value in any command, entrypoint or healthcheck (`ps`, `docker inspect` show them)."""
    problems = []
    for name, svc in compose.get("services", {}).items():
        for field in ("entrypoint", "command", "healthcheck"):
            text = json.dumps(svc.get(field))
            for var, value in secrets.items():
                if value and value in text:
                    problems.append(f"{name}: the value of {var} is in its {field}")
    return problems


# -- what each service serves, from the CLI itself

def celery_argv(args: list[str]) -> list[str] | str:
    """The argv `aigc ARGS` hands Celery's worker_main (a worker), or why there is none."""
    return _celery_argv(tuple(args))


@functools.cache
def _celery_argv(args: tuple[str, ...]) -> list[str] | str:
    import worker.app

    seen: list[list[str]] = []
    with mock.patch.object(worker.app.app, "worker_main", lambda argv: seen.append(list(argv))):
        result = CliRunner().invoke(_aigc_app(), list(args), env={"AIGC_BROKER_URL": "redis://127.0.0.1:1/0"})
    if not seen:
        return f"`aigc {' '.join(args)}` starts no Celery worker ({result.exception or result.output.strip()})"
    return seen[0]


def worker_metrics_ports(svc: dict[str, Any]) -> range | str:
    """The ports a worker service's processes serve metrics on: one per pool process, from
    AIGC_WORKER_METRICS_PORT up (worker/metrics.py); a prefork parent serves none."""
    argv = celery_argv(words(svc.get("command")))
    if isinstance(argv, str):
        return argv
    port = environment(svc).get("AIGC_WORKER_METRICS_PORT")
    if not port:
        return "AIGC_WORKER_METRICS_PORT is not set: its processes serve no metrics"
    pool = _flag_value(argv, "--pool") or _flag_value(argv, "-P") or "prefork"
    processes = int(_flag_value(argv, "--concurrency") or _flag_value(argv, "-c") or 1) if pool == "prefork" else 1
    return range(int(port), int(port) + processes)


def worker_node_name(svc: dict[str, Any]) -> str:
    """The Celery node name `aigc worker` gives, with the container's hostname as $HOSTNAME."""
    argv = celery_argv(words(svc.get("command")))
    name = (_flag_value(argv, "-n") or _flag_value(argv, "--hostname")) if isinstance(argv, list) else None
    return (name or "celery@%h").replace("%h", "$HOSTNAME")


def flower_port(svc: dict[str, Any]) -> int:
    args = words(svc.get("command"))
    if words(svc.get("entrypoint")) == ["celery"]:
        return int(_flag_value(args, "--port") or 5555)
    ctx = aigc_context(args)
    return int(ctx.params["port"]) if not isinstance(ctx, str) else 5555


def api_port(svc: dict[str, Any]) -> int:
    """The port `aigc serve` listens on in the api service (its --port, else serve's default)."""
    ctx = aigc_context(words(svc.get("command")))
    return int(ctx.params["port"]) if not isinstance(ctx, str) else 8000


def check_api(compose: dict[str, Any]) -> list[str]:
    """`aigc serve` with its keys: never --no-auth (every caller would see every file and batch), and
    listening on all of the container's addresses so the published port reaches it."""
    api = compose.get("services", {}).get("api")
    if api is None:
        return ["api: no such service"]
    args = words(api.get("command"))
    problems = []
    if args[:1] != ["serve"]:
        problems.append("api: command does not run `aigc serve`")
    if "--no-auth" in args:
        problems.append("api: runs `aigc serve --no-auth` (every caller would see every file and batch)")
    ctx = aigc_context(args)
    if not isinstance(ctx, str) and ctx.params.get("host") in ("127.0.0.1", "localhost"):
        problems.append("api: serves on the container's loopback only: the published port cannot reach it")
    return problems


def is_aigc_worker(svc: dict[str, Any]) -> bool:
    return is_project_service(svc) and words(svc.get("entrypoint")) in ([], ["aigc"]) \
        and words(svc.get("command"))[:1] == ["worker"]


def _healthcheck_text(svc: dict[str, Any]) -> tuple[list[str], str] | None:
    hc = svc.get("healthcheck") or {}
    test = hc.get("test")
    if hc.get("disable") or not test or test in (["NONE"], "NONE"):
        return None
    if isinstance(test, str):
        return shlex.split(test), test
    if test[0] == "CMD-SHELL":
        return shlex.split(test[1]), test[1]
    argv = [str(w) for w in (test[1:] if test[0] == "CMD" else test)]
    return argv, " ".join(argv)


def _probed(text: str) -> set[tuple[int, str]]:
    """(port, path) of every http://127.0.0.1 or localhost URL the healthcheck requests."""
    return {(int(port), path or "/") for port, path in
            re.findall(r"https?://(?:127\.0\.0\.1|localhost):(\d+)(/[^\s'\")]*)?", text)}


def check_healthchecks(compose: dict[str, Any]) -> list[str]:
    """Each long-running service has a healthcheck that probes what that service serves."""
    problems = []
    services = compose.get("services", {})
    for name in sorted(HEALTHCHECKED & set(services)):
        svc = services[name]
        hc = _healthcheck_text(svc)
        if hc is None:
            problems.append(f"{name}: no healthcheck")
            continue
        argv, text = hc
        if is_project_service(svc) and argv[:1] and argv[0] not in IMAGE_TOOLS:
            problems.append(f"{name}: healthcheck runs {argv[0]!r}, which the image does not have "
                            f"(it has {sorted(IMAGE_TOOLS)})")
        probed = _probed(text)
        ping = re.search(r"\binspect\s+ping\b.*?(?:-d|--destination)[ =](\S+)", text)
        if is_aigc_worker(svc):
            ports = worker_metrics_ports(svc)
            argv_celery = celery_argv(words(svc.get("command")))
            solo = isinstance(argv_celery, list) and _flag_value(argv_celery, "--pool") == "solo"
            if ping and solo:
                problems.append(f"{name}: a solo worker answers `inspect ping` only between chunks; "
                                f"a long chunk would mark it unhealthy: probe its metrics port")
            elif ping and ping.group(1) != worker_node_name(svc):
                problems.append(f"{name}: healthcheck pings {ping.group(1)}, but the worker is "
                                f"{worker_node_name(svc)}")
            elif not ping and not (isinstance(ports, range) and {p for p, _ in probed} & set(ports)):
                problems.append(f"{name}: healthcheck neither pings the worker nor probes its metrics "
                                f"ports ({ports})")
        elif name == "scheduler":
            port = environment(svc).get("AIGC_METRICS_PORT")
            if not port or int(port) not in {p for p, _ in probed}:
                problems.append(f"{name}: healthcheck does not probe its metrics endpoint "
                                f"(AIGC_METRICS_PORT={port})")
        elif name == "flower":
            if (flower_port(svc), "/healthcheck") not in probed:
                problems.append(f"{name}: healthcheck does not request :{flower_port(svc)}/healthcheck")
        elif name == "api":
            if (api_port(svc), "/healthz") not in probed:
                problems.append(f"{name}: healthcheck does not request :{api_port(svc)}/healthz (needs no key)")
        elif name == "prometheus" and not {path for _, path in probed} & {"/-/healthy", "/-/ready"}:
            problems.append(f"{name}: healthcheck does not request /-/healthy or /-/ready")
    return problems


# -- Prometheus

def scrape_targets(config: dict[str, Any]) -> set[tuple[str, int, str]]:
    """(host, port, path) Prometheus scrapes: static targets and DNS A/AAAA names (every replica)."""
    targets = set()
    for job in config.get("scrape_configs") or []:
        path = job.get("metrics_path", "/metrics")
        for sc in job.get("static_configs") or []:
            for t in sc.get("targets") or []:
                host, _, port = str(t).rpartition(":")
                targets.add((host, int(port), path))
        for sd in job.get("dns_sd_configs") or []:
            if sd.get("type") in ("A", "AAAA") and sd.get("port"):
                targets |= {(n, int(sd["port"]), path) for n in sd.get("names") or []}
    return targets


def check_prometheus(compose: dict[str, Any], root: Path) -> list[str]:
    services = compose.get("services", {})
    prom = services.get("prometheus")
    if prom is None:
        return ["prometheus: no such service"]
    problems = []
    image = str(prom.get("image", ""))
    tag = image.rpartition(":")[2] if ":" in image.rpartition("/")[2] else ""
    if not re.fullmatch(r"v?\d+\.\d+\.\d+", tag):
        problems.append(f"prometheus: image {image!r} is not pinned to a release tag")
    config_file = _flag_value(words(prom.get("command")), "--config.file") or "/etc/prometheus/prometheus.yml"
    mounts = [str(v).split(":") for v in prom.get("volumes") or []]
    mount = next((m for m in mounts if m[1:2] == [config_file]), None)
    if mount is None:
        return [*problems, f"prometheus: nothing mounted at {config_file} (--config.file)"]
    if "ro" not in mount[2:]:
        problems.append(f"prometheus: {config_file} is not mounted read-only")
    source = root / mount[0]
    if not mount[0].startswith("./") or not source.is_file():
        return [*problems, f"prometheus: scrape config {mount[0]} is not a file shipped in this repository"]
    config = yaml.safe_load(source.read_text(encoding="utf-8")) or {}
    targets = scrape_targets(config)
    wanted: list[tuple[str, int, str, str]] = []
    scheduler = services.get("scheduler", {})
    if port := environment(scheduler).get("AIGC_METRICS_PORT"):
        wanted.append(("scheduler", int(port), "/metrics", "aigc metrics in the scheduler"))
    else:
        problems.append("scheduler: AIGC_METRICS_PORT is not set: no queue and job gauges for Prometheus")
    for name, svc in services.items():
        if is_aigc_worker(svc):
            ports = worker_metrics_ports(svc)
            if isinstance(ports, str):
                problems.append(f"{name}: {ports}")
            else:
                wanted += [(name, p, "/metrics", "a worker process") for p in ports]
    if "flower" in services:
        wanted.append(("flower", flower_port(services["flower"]), "/metrics", "Flower's task counters"))
    for host, scraped_port, path, what in wanted:
        if (host, scraped_port, path) not in targets:
            problems.append(f"prometheus: does not scrape {host}:{scraped_port}{path} ({what})")
    return problems


# -- torch in the image

def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    lines = [ln for ln in text.splitlines() if not ln.lstrip().startswith("#")]
    joined = re.sub(r"\\\n", " ", "\n".join(lines))
    return [(m.group(1).upper(), m.group(2).strip()) for m in re.finditer(r"^\s*(\w+)\s+(.*)$", joined, re.M)]


def _expand(text: str, args: dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)(?::-([^}]*))?\}|\$(\w+)",
                  lambda m: args.get(m.group(1) or m.group(3)) or (m.group(2) or ""), text)


def torch_pin(root: Path) -> Requirement:
    deps = tomllib.loads((root / "pyproject.toml").read_text())["project"]["dependencies"]
    return next(Requirement(d) for d in deps if Requirement(d).name == "torch")


def build_args(svc: dict[str, Any]) -> dict[str, str]:
    build = svc.get("build")
    args = (build.get("args") if isinstance(build, dict) else None) or {}
    if isinstance(args, list):
        args = dict(a.partition("=")[::2] for a in args)
    return {str(k): str(v) for k, v in args.items()}


def check_torch_build(compose: dict[str, Any], root: Path) -> list[str]:
    """torch comes from PyTorch's own index, before `pip install .`: the CPU build for every service
    but GPU workers, a CUDA build for those; each build under its own image name."""
    dockerfile = root / "Dockerfile"
    if not dockerfile.is_file():
        return ["Dockerfile: missing"]
    instructions = dockerfile_instructions(dockerfile.read_text(encoding="utf-8"))
    defaults = {}
    for ins, rest in instructions:
        if ins == "ARG":
            name, _, value = rest.partition("=")
            defaults[name.strip()] = value.strip().strip('"')
    runs = [(i, rest) for i, (ins, rest) in enumerate(instructions) if ins == "RUN"]
    torch_run = next(((i, r) for i, r in runs if re.search(r"pip install\b[^&;|]*\btorch==", r)), None)
    project_run = next((i for i, r in runs if re.search(r"pip install\b[^&;|]*\s\.(\s|$)", r)), None)
    if torch_run is None or (project_run is not None and torch_run[0] > project_run):
        return ["Dockerfile: torch is not installed on its own before `pip install .` "
                "(pip would take PyPI's torch, the CUDA build)"]
    found = re.search(r"pip install\b[^&;|]*", torch_run[1])
    assert found is not None  # torch_run was picked by a pattern that starts the same way
    command = found.group(0)
    problems = []
    if "--extra-index-url" in command or not re.search(r"--index-url[ =]", command):
        problems.append("Dockerfile: torch is not installed from PyTorch's index alone (--index-url; "
                        "with --extra-index-url pip may still take PyPI's CUDA build)")
    pin = torch_pin(root)
    images: dict[str, set[str]] = {}
    for name, svc in compose.get("services", {}).items():
        if not is_project_service(svc):
            continue
        args = defaults | build_args(svc)
        expanded = _expand(command, args)
        index_m = re.search(r"--index-url[ =]\"?([^\s\"]+)", expanded)
        version_m = re.search(r"torch==\"?([^\s\"]+)", expanded)
        index, version = index_m.group(1) if index_m else "", version_m.group(1) if version_m else ""
        variant = index.rstrip("/").rpartition("/")[2]
        if reserves_gpu(svc):
            if not CUDA_TORCH_INDEX.fullmatch(index):
                problems.append(f"{name}: reserves a GPU but its image takes torch from {index!r}, not a "
                                f"CUDA build")
        elif index != CPU_TORCH_INDEX:
            problems.append(f"{name}: runs on CPU but its image takes torch from {index!r}, not the CPU "
                            f"wheels ({CPU_TORCH_INDEX})")
        if not pin.specifier.contains(f"{version}+{variant}", prereleases=True):
            problems.append(f"{name}: the image installs torch {version}+{variant}, which does not satisfy "
                            f"pyproject's {pin}: `pip install .` would replace it from PyPI")
        images.setdefault(str(svc.get("image", f"<{name}>")), set()).add(f"{version}+{variant}")
    for image, builds in images.items():
        if len(builds) > 1:
            problems.append(f"image {image}: built with torch {sorted(builds)}: one build overwrites the other")
    return problems


def compose_problems(compose: dict[str, Any], root: Path = ROOT, env: dict[str, str] | None = None) -> list[str]:
    """Everything wrong with a compose file, read with ``env`` (default: .env.example filled in)."""
    env = sample_env(root) if env is None else env
    errors: list[str] = []
    resolved = resolve(compose, env, errors)
    secrets = {k: v for k, v in env.items() if SECRET_NAME.search(k)}
    return [*errors, *check_secret_references(compose), *check_commands(resolved, root),
            *check_environment(resolved), *check_build(resolved, root), *check_depends_on(resolved),
            *check_redis(resolved), *check_flower(resolved), *check_gpu_worker(resolved), *check_api(resolved),
            *check_secrets_stay_off_command_lines(resolved, secrets), *check_healthchecks(resolved),
            *check_prometheus(resolved, root), *check_torch_build(resolved, root)]


# ---- the checks on the file as written ----------------------------------------------------------

def _is_bare_reference(value: str) -> bool:
    """``${VAR}``, ``${VAR:?message}`` or ``${VAR?message}``: a value from .env, with no default."""
    m = _VAR.fullmatch(value.strip())
    return bool(m and m.group("braced") and m.group("op") in (None, ":?", "?"))


def check_secret_references(compose: dict[str, Any]) -> list[str]:
    """No secret has a literal value or a default anywhere in the file; a required one says how to fix it."""
    problems = []
    for where, name, op, arg in references(compose):
        if op in (":?", "?") and ".env.example" not in (arg or ""):
            problems.append(f"{where}: the message for a missing {name} does not say to copy .env.example")
        if not SECRET_NAME.search(name):
            continue
        if op in (":-", "-") and arg:
            problems.append(f"{where}: secret {name} has a default ({arg!r}): a deployment would silently "
                            f"run on a published value")
        elif op not in (":?", "?") and CHECKED_BY_THEIR_SERVICE.get(name) is None:
            problems.append(f"{where}: secret {name} may be unset: use ${{{name}:?... copy .env.example ...}}")
    for where, value in strings(compose):
        parts = re.split(r"[.\[]", where)
        key = parts[-1]
        if "environment" in parts[:-1] or parts[0].endswith("-env"):
            if key.endswith("]"):  # environment as a list of KEY=VALUE
                key, _, value = value.partition("=")
            if SECRET_NAME.search(key) and not _is_bare_reference(value):
                problems.append(f"{where}: a literal secret, not a ${{VAR}} from .env")
        for password in _URL_PASSWORD.findall(value):
            if not _is_bare_reference(password):
                problems.append(f"{where}: a literal password in a URL ({password!r}), not a ${{VAR}} from .env")
        if where.startswith("configs.") and where.endswith(".content"):
            for k, v in re.findall(r'"(\w+)"\s*:\s*"([^"]*)"', value):
                if (SECRET_NAME.search(k) or k.lower() in ("secretkey", "accesskey")) and not _is_bare_reference(v):
                    problems.append(f"{where}: {k} is a literal ({v!r}), not a ${{VAR}} from .env")
    return problems


def check_env_example(compose: dict[str, Any], root: Path) -> list[str]:
    """.env.example names every variable a deployment must set, each with a comment, secrets blank."""
    path = root / ".env.example"
    if not path.is_file():
        return [".env.example: missing (README tells you to copy it to .env)"]
    lines = path.read_text(encoding="utf-8").splitlines()
    env = read_env_file(path)
    problems = []
    for i, line in enumerate(lines):
        if (line.strip() and not line.lstrip().startswith("#") and "=" in line
                and (i == 0 or not lines[i - 1].lstrip().startswith("#"))):
            problems.append(f".env.example: {line.partition('=')[0]} has no comment above it")
    used = {name: op for _, name, op, _ in references(compose)}
    for name, op in sorted(used.items()):
        if (op in (":?", "?") or SECRET_NAME.search(name)) and name not in env:
            problems.append(f".env.example: {name} is missing (docker-compose.yml needs it)")
    for name, value in env.items():
        if name not in used:
            problems.append(f".env.example: {name} is not used by docker-compose.yml")
        if SECRET_NAME.search(name) and value:
            problems.append(f".env.example: {name} has a value: a copied file would run on a published secret")
    return problems


def _sections(text: str, titles: tuple[str, ...]) -> str:
    parts = re.split(r"^## ", text, flags=re.M)
    return "\n".join(p for p in parts if p.split("\n", 1)[0].strip() in titles)


_COMPOSE_OPTS_WITH_VALUE = {"-f", "--file", "-p", "--project-name", "--profile", "-v", "--volume", "-e", "--env",
                            "--name", "-w", "--workdir", "-u", "--user", "--entrypoint", "--scale", "--publish"}


def check_readme(compose: dict[str, Any], root: Path) -> list[str]:
    """README's deployment sections and the file's header: their `docker compose` commands name real
    profiles and services, and they tell you to make .env from .env.example."""
    readme = _sections((root / "README.md").read_text(encoding="utf-8"), README_SECTIONS)
    header = "\n".join(ln for ln in (root / "docker-compose.yml").read_text().splitlines() if ln.startswith("#"))
    problems = []
    services = compose.get("services", {})
    profiles = {p for s in services.values() for p in s.get("profiles") or []}
    for where, text in (("README", readme), ("docker-compose.yml header", header)):
        if "cp .env.example .env" not in text:
            problems.append(f"{where}: does not say `cp .env.example .env`")
        for cmd in re.findall(r"docker compose [^`\n#]*", text):
            args = shlex.split(cmd.replace("$PWD", "PWD"))[2:]
            i, sub = 0, None
            while i < len(args):
                a = args[i]
                if a == "--profile" and i + 1 < len(args) and args[i + 1] not in profiles:
                    problems.append(f"{where}: `{cmd.strip()}` names profile {args[i + 1]!r}, which has no service")
                if a == "--scale" and i + 1 < len(args) and args[i + 1].partition("=")[0] not in services:
                    problems.append(f"{where}: `{cmd.strip()}` scales unknown service {args[i + 1]}")
                if a in _COMPOSE_OPTS_WITH_VALUE:
                    i += 2
                    continue
                if not a.startswith("-"):
                    if sub is None:
                        sub = a
                    elif sub in ("run", "exec", "logs", "restart", "stop", "start", "up") and a not in services:
                        problems.append(f"{where}: `{cmd.strip()}` names unknown service {a!r}")
                        break
                    elif sub in ("run", "exec"):
                        break  # the rest is the command run in the service
                i += 1
    example = root / ".env.example"
    for name in read_env_file(example) if example.is_file() else {}:
        if name not in readme:
            problems.append(f"README: {name} (in .env.example) is not explained")
    return problems


def check_dockerignore(root: Path) -> list[str]:
    """`COPY . .` must not bake .env (the deployment's secrets) into the image."""
    patterns = [p.strip() for p in (root / ".dockerignore").read_text().splitlines() if p.strip() and p[0] != "#"]
    excluded = False
    for p in patterns:
        negated, p = p.startswith("!"), p.lstrip("!")
        if fnmatch.fnmatch(".env", p) or fnmatch.fnmatch(".env", p.removeprefix("**/")):
            excluded = not negated
    return [] if excluded else [".dockerignore: .env is not excluded: `COPY . .` would put its secrets in the image"]


def file_problems(compose: dict[str, Any], root: Path = ROOT) -> list[str]:
    return [*check_env_example(compose, root), *check_readme(compose, root), *check_dockerignore(root)]


# ---- the real files -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE_FILE.read_text(encoding="utf-8"))
    assert isinstance(data, dict) and isinstance(data.get("services"), dict)
    return data


@pytest.fixture(scope="module")
def resolved(compose) -> dict[str, Any]:
    errors: list[str] = []
    data = resolve(compose, sample_env(), errors)
    if errors:
        pytest.fail(f"docker-compose.yml does not resolve with .env.example filled in: {errors}")
    return data


def test_compose_parses_with_the_expected_services(compose):
    assert {"redis", "postgres", "s3", "s3-init", "prometheus", *PROJECT_SERVICES} <= set(compose["services"])


def test_project_services_run_real_commands(resolved):
    assert check_commands(resolved, ROOT) == []


def test_aigc_environment_variables_are_settings(resolved):
    assert check_environment(resolved) == []


def test_dockerfile_and_build_paths_exist(resolved):
    assert (ROOT / "Dockerfile").is_file()
    assert (ROOT / ".dockerignore").is_file()
    assert check_build(resolved, ROOT) == []


def test_services_start_in_order(resolved):
    assert check_depends_on(resolved) == []


def test_redis_keeps_messages(resolved):
    assert check_redis(resolved) == []


def test_flower_has_basic_auth_through_its_environment(resolved):
    assert check_flower(resolved) == []


def test_gpu_worker_reserves_a_gpu_and_runs_solo(resolved):
    assert check_gpu_worker(resolved) == []


def test_no_secret_has_a_literal_value_or_a_default(compose):
    assert check_secret_references(compose) == []


def test_no_secret_value_on_any_command_line(resolved):
    secrets = {k: v for k, v in sample_env().items() if SECRET_NAME.search(k)}
    assert secrets, "no secrets in .env.example to look for"
    assert check_secrets_stay_off_command_lines(resolved, secrets) == []


def test_file_resolves_without_flower_auth_but_not_without_the_other_secrets(compose):
    """`docker compose config` / `run migrate` must not need Flower's password; a blank database or S3
    secret stops the whole file, with a message that says to copy .env.example."""
    env = sample_env()
    errors: list[str] = []
    resolve(compose, {k: v for k, v in env.items() if k != "AIGC_FLOWER_BASIC_AUTH"}, errors)
    assert errors == []
    errors = []
    resolve(compose, read_env_file(ROOT / ".env.example"), errors)  # copied, not filled in
    missing = {e.split()[2] for e in errors}
    assert {"AIGC_POSTGRES_PASSWORD", "AIGC_S3_ACCESS_KEY", "AIGC_S3_SECRET_KEY"} <= missing
    assert all(".env.example" in e for e in errors)


class _Exec(Exception):
    def __init__(self, argv, env):
        self.argv, self.env = argv, env


def _start_flower(service: dict[str, Any], monkeypatch) -> _Exec | BaseException | None:
    """Run the flower service's command through the real CLI, stopping at the exec of Flower."""
    def fake_execve(path, argv, env):
        raise _Exec(list(argv), dict(env))

    monkeypatch.setattr("os.execve", fake_execve)
    assert words(service.get("entrypoint")) in ([], ["aigc"]), "flower should run through `aigc flower`"
    result = CliRunner().invoke(_aigc_app(), words(service["command"]), env=environment(service))
    return result.exception


def test_flower_service_passes_its_password_in_the_environment_not_argv(resolved, monkeypatch):
    password = sample_env()["AIGC_FLOWER_BASIC_AUTH"]
    started = _start_flower(resolved["services"]["flower"], monkeypatch)
    assert isinstance(started, _Exec), started
    assert started.env.get("FLOWER_BASIC_AUTH") == password
    assert not any(password in a or "basic" in a for a in started.argv), started.argv


@pytest.mark.parametrize("value", [None, ""])
def test_flower_service_refuses_to_start_open_without_a_password(compose, monkeypatch, value):
    env = {k: v for k, v in sample_env().items() if k != "AIGC_FLOWER_BASIC_AUTH"}
    if value is not None:
        env["AIGC_FLOWER_BASIC_AUTH"] = value
    errors: list[str] = []
    flower = resolve(compose, env, errors)["services"]["flower"]
    assert errors == []
    started = _start_flower(flower, monkeypatch)
    assert isinstance(started, SpecError) and "AIGC_FLOWER_BASIC_AUTH" in str(started), started


def test_long_running_services_have_healthchecks_that_probe_them(resolved):
    assert check_healthchecks(resolved) == []


def test_prometheus_scrapes_the_scheduler_every_worker_process_and_flower(resolved):
    assert check_prometheus(resolved, ROOT) == []


def test_cpu_services_get_cpu_torch_and_gpu_workers_cuda_torch(resolved):
    assert check_torch_build(resolved, ROOT) == []


def test_env_example_lists_every_secret_with_a_comment_and_no_value(compose):
    assert check_env_example(compose, ROOT) == []


def test_readme_compose_commands_match_the_file(compose):
    assert check_readme(compose, ROOT) == []


def test_dockerignore_keeps_env_out_of_the_image():
    assert check_dockerignore(ROOT) == []


def test_whole_file_has_no_problems(compose):
    assert compose_problems(compose) == []
    assert file_problems(compose) == []


# ---- each check can fail ------------------------------------------------------------------------

BROKEN = {
    "services": {
        "redis": {"image": "redis:7", "command": "redis-server --appendonly no"},
        "postgres": {"image": "postgres:16", "environment": {"POSTGRES_PASSWORD": "aigc"}},
        "migrate": {"build": ".", "command": ["db"], "environment": {
            "AIGC_DATABASE_URL": "postgresql://aigc:aigc@postgres/aigc"}},
        "worker-cpu": {"build": {"context": ".", "dockerfile": "Nope.dockerfile"},
                       "command": ["wrker", "--queues", "text"],
                       "environment": ["AIGC_BROKR_URL=redis://redis:6379/0", "AIGC_LEASE_S=ten"]},
        "worker-gpu": {"build": {"context": "no-such-dir"}, "command": ["worker", "--pool", "prefork"],
                       "depends_on": ["cache"]},
        "scheduler": {"build": ".", "command": ["reconcile", "--every", "30"]},
        "flower": {"build": ".", "entrypoint": ["celery"],
                   "command": ["-A", "worker.nope", "flower", "--basic-auth=${AIGC_FLOWER_BASIC_AUTH:?set it}"]},
        "gpu-hog": {"image": "x", "deploy": {"resources": {"reservations": {"devices": [
            {"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]}}}},
        "prometheus": {"image": "prom/prometheus:latest"},
    },
    "x-aigc-env": {"AIGC_MADE_UP": "1", "AWS_SECRET_ACCESS_KEY": "${AIGC_S3_SECRET_KEY:-aigc-secret}"},
}


def test_interpolate_reads_like_compose():
    assert interpolate("u:${P:-aigc}@h") == "u:aigc@h"
    assert interpolate("--basic-auth=${A:-admin:change-me}") == "--basic-auth=admin:change-me"
    assert interpolate("${A}|$B|${C:?set C}|$$") == "|||$"
    errors: list[str] = []
    env = {"A": "a", "E": ""}
    assert interpolate("${A:-x}${E:-y}${E-z}${N-w}${A:?m}$$H", env, errors) == "ayw" + "a$H"
    assert errors == []
    interpolate("${E:?copy it}${N?set N}${E?fine}", env, errors)
    assert errors == ["required variable E is missing a value: copy it",
                      "required variable N is missing a value: set N"]


def test_checker_reports_a_broken_compose_file():
    problems = "\n".join(compose_problems(copy.deepcopy(BROKEN)))
    for expected in [
        "migrate: `aigc db` is a group",
        "worker-cpu: `aigc` has no command 'wrker'",
        "scheduler: `aigc reconcile`: No such option: --every",
        "flower: celery app 'worker.nope' is not an importable module",
        "x-aigc-env: AIGC_MADE_UP is not a setting",
        "service worker-cpu: AIGC_BROKR_URL is not a setting",
        "service worker-cpu: AIGC_LEASE_S='ten' is not valid",
        "migrate: AIGC_BROKER_URL is not set",
        "worker-cpu: dockerfile",
        "worker-gpu: build context",
        "worker-gpu: depends on unknown service cache",
        "scheduler: must depend on migrate with condition service_completed_successfully",
        "redis: not run with --appendonly yes",
        "redis: not run with --maxmemory-policy noeviction",
        "flower: --basic-auth on its command line",
        "flower: no basic auth",
        "gpu-hog: reserves a device but is not behind a profile",
        "worker-gpu: does not reserve one nvidia gpu",
        "worker-gpu: not in the gpu profile",
        "worker-gpu: must run `worker --pool solo`",
        "worker-gpu: AIGC_DEVICE is not cuda",
        "services.postgres.environment.POSTGRES_PASSWORD: a literal secret",
        "services.migrate.environment.AIGC_DATABASE_URL: a literal password in a URL ('aigc')",
        "x-aigc-env.AWS_SECRET_ACCESS_KEY: secret AIGC_S3_SECRET_KEY has a default ('aigc-secret')",
        "the message for a missing AIGC_FLOWER_BASIC_AUTH does not say to copy .env.example",
        "flower: the value of AIGC_FLOWER_BASIC_AUTH is in its command",
        "worker-gpu: no healthcheck",
        "scheduler: no healthcheck",
        "prometheus: image 'prom/prometheus:latest' is not pinned",
    ]:
        assert expected in problems, f"not reported: {expected}\n--- reported:\n{problems}"


def _set(path: str, value: Any):
    def mutate(d: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        for p in parents:
            d = d[p]
        d[last] = value
    return mutate


def _drop(path: str):
    def mutate(d: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        for p in parents:
            d = d[p]
        del d[last]
    return mutate


def _ping(node: str) -> list[str]:
    return ["CMD-SHELL", f"celery -A worker.app inspect ping -d {node} --timeout 10"]


MUTATIONS = [
    (_set("services.worker-cpu.command", ["work", "--queues", "text"]), "has no command 'work'"),
    (_set("services.migrate.command", ["db", "downgrade"]), "has no command 'downgrade'"),
    (_set("services.worker-cpu.environment.AIGC_CONCURRENCY", "4"), "AIGC_CONCURRENCY is not a setting"),
    (_set("services.flower.command", ["flowr"]), "has no command 'flowr'"),
    (_set("services.migrate.build.dockerfile", "Dockerfile.missing"), "does not exist"),
    (_set("services.redis.command", ["redis-server"]), "--appendonly yes"),
    (_set("services.worker-gpu.command", ["worker", "--pool", "prefork"]), "--pool solo"),
    (_set("services.worker-gpu.deploy", {}), "does not reserve one nvidia gpu"),
    (_set("services.worker-gpu.profiles", []), "reserves a device but is not behind a profile"),
    (_set("services.scheduler.depends_on", {"redis": {"condition": "service_healthy"}}), "depend on migrate"),
    # defect 1: secrets
    (_set("services.flower.command", ["flower", "--port", "5555", "--basic-auth=${AIGC_FLOWER_BASIC_AUTH}"]),
     "--basic-auth on its command line"),
    (_set("services.flower.command", ["flower", "--unauthenticated"]), "--unauthenticated"),
    (_drop("services.flower.environment.AIGC_FLOWER_BASIC_AUTH"), "flower: no basic auth"),
    (_set("services.flower.environment.AWS_SECRET_ACCESS_KEY", "${AIGC_S3_SECRET_KEY:?copy .env.example}"),
     "flower: gets AWS_SECRET_ACCESS_KEY"),
    (_drop("services.flower.environment.AIGC_BROKER_URL"), "flower: AIGC_BROKER_URL is not set"),
    (_set("services.postgres.environment.POSTGRES_PASSWORD", "${AIGC_POSTGRES_PASSWORD:-aigc}"),
     "secret AIGC_POSTGRES_PASSWORD has a default"),
    (_set("services.postgres.environment.POSTGRES_PASSWORD", "aigc"), "POSTGRES_PASSWORD: a literal secret"),
    (_set("services.postgres.environment.POSTGRES_PASSWORD", "${AIGC_POSTGRES_PASSWORD}"),
     "secret AIGC_POSTGRES_PASSWORD may be unset"),
    (_set("services.postgres.environment.POSTGRES_PASSWORD", "${AIGC_POSTGRES_PASSWORD:?set it}"),
     "does not say to copy .env.example"),
    (_set("x-aigc-env.AIGC_DATABASE_URL", "postgresql://aigc:hunter2@postgres:5432/aigc"),
     "a literal password in a URL ('hunter2')"),
    (_set("configs.s3-identities.content", '{"identities": [{"credentials": [{"accessKey": "aigc", '
                                           '"secretKey": "aigc-secret"}]}]}'), "secretKey is a literal"),
    (_set("services.s3-init.command", ["aws", "--secret", "${AIGC_S3_SECRET_KEY:?copy .env.example}"]),
     "s3-init: the value of AIGC_S3_SECRET_KEY is in its command"),
    (_set("x-aigc-env.AIGC_DATABASE_URL", "postgresql://aigc:${AIGC_DB_PASSWORD:?copy .env.example}@postgres/aigc"),
     "required variable AIGC_DB_PASSWORD is missing a value"),
    # defect 2: healthchecks
    (_drop("services.worker-cpu.healthcheck"), "worker-cpu: no healthcheck"),
    (_drop("services.scheduler.healthcheck"), "scheduler: no healthcheck"),
    (_drop("services.flower.healthcheck"), "flower: no healthcheck"),
    (_set("services.worker-gpu.healthcheck.test", _ping("celery@$$HOSTNAME")), "answers `inspect ping` only"),
    (_set("services.worker-cpu.healthcheck.test", _ping("worker@$$HOSTNAME")), "but the worker is celery@$HOSTNAME"),
    (_set("services.worker-cpu.healthcheck.test", ["CMD", "python", "-c", "print('ok')"]),
     "neither pings the worker nor probes its metrics"),
    (_set("services.scheduler.environment.AIGC_METRICS_PORT", "9901"), "does not probe its metrics endpoint"),
    (_set("services.flower.healthcheck.test", ["CMD", "curl", "-f", "http://127.0.0.1:5555/healthcheck"]),
     "healthcheck runs 'curl', which the image does not have"),
    (_set("services.flower.command", ["flower", "--port", "5556"]), "does not request :5556/healthcheck"),
    (_drop("services.api.healthcheck"), "api: no healthcheck"),
    (_set("services.api.command", ["serve", "--host", "0.0.0.0", "--port", "8001"]), "does not request :8001/healthz"),
    (_set("services.api.command", ["serve", "--host", "0.0.0.0", "--no-auth"]), "api: runs `aigc serve --no-auth`"),
    (_set("services.api.command", ["serve", "--port", "8000"]), "api: serves on the container's loopback only"),
    (_set("services.api.environment.AIGC_API_MAX_FILE_BYTES", "0"), "AIGC_API_MAX_FILE_BYTES='0' is not valid"),
    (_set("services.api.depends_on", {"redis": {"condition": "service_healthy"}}), "api: must depend on migrate"),
    # defect 3: Prometheus
    (_drop("services.prometheus"), "prometheus: no such service"),
    (_set("services.prometheus.image", "prom/prometheus:latest"), "not pinned to a release tag"),
    (_set("services.prometheus.volumes", ["./deploy/prometheus.yml:/etc/prometheus/prometheus.yml"]),
     "not mounted read-only"),
    (_set("services.prometheus.volumes", ["./deploy/nope.yml:/etc/prometheus/prometheus.yml:ro"]),
     "is not a file shipped in this repository"),
    (_set("services.worker-cpu.command", ["worker", "--queues", "text", "--pool", "prefork", "--concurrency", "3"]),
     "does not scrape worker-cpu:9811/metrics"),
    (_set("services.worker-gpu.environment.AIGC_WORKER_METRICS_PORT", "9900"), "does not scrape worker-gpu:9900"),
    (_drop("services.scheduler.environment.AIGC_METRICS_PORT"), "AIGC_METRICS_PORT is not set"),
    # defect 4: torch
    (_set("services.worker-cpu.build.args", {"TORCH_VARIANT": "cu128"}), "worker-cpu: runs on CPU but"),
    (_set("services.worker-gpu.build.args", {"TORCH_VARIANT": "cpu"}), "worker-gpu: reserves a GPU but"),
    (_set("services.worker-gpu.image", "aigc-runner:cpu"), "one build overwrites the other"),
]


@pytest.mark.parametrize(("mutate", "expected"), MUTATIONS, ids=[expected for _, expected in MUTATIONS])
def test_one_change_to_the_real_file_is_caught(compose, mutate, expected):
    broken = copy.deepcopy(compose)
    mutate(broken)
    problems = compose_problems(broken)
    assert any(expected in p for p in problems), problems


SHIPPED = ("Dockerfile", "pyproject.toml", "README.md", "docker-compose.yml", ".dockerignore", ".env.example",
           "deploy/prometheus.yml")


def _copy_tree(tmp_path: Path, replace: dict[str, str]) -> Path:
    """The shipped files in tmp_path, one of them replaced."""
    for name in SHIPPED:
        target = tmp_path / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if name in replace:
            target.write_text(replace[name], encoding="utf-8")
        elif (ROOT / name).is_file():
            target.write_text((ROOT / name).read_text(encoding="utf-8"), encoding="utf-8")
    return tmp_path


def _edit(name: str, old: str, new: str) -> str:
    text = (ROOT / name).read_text(encoding="utf-8")
    assert old in text, f"{name} no longer has {old!r}: update this test"
    return text.replace(old, new)


FILE_MUTATIONS = [
    ("Dockerfile", lambda: _edit("Dockerfile", "--index-url", "--extra-index-url"), "from PyTorch's index alone"),
    ("Dockerfile", lambda: re.sub(r"(?m)^ARG TORCH_VERSION=.*$", "ARG TORCH_VERSION=2.12.1",
                                  (ROOT / "Dockerfile").read_text()), "does not satisfy pyproject's torch=="),
    ("Dockerfile", lambda: re.sub(r"pip install[^\n]*torch==[^\n]*", "true", (ROOT / "Dockerfile").read_text()),
     "torch is not installed on its own before `pip install .`"),
    (".dockerignore", lambda: _edit(".dockerignore", ".env", ".venv2"), ".env is not excluded"),
    (".env.example", lambda: _edit(".env.example", "AIGC_S3_SECRET_KEY=", "AIGC_S3_SECRET_KEY=aigc-secret"),
     "AIGC_S3_SECRET_KEY has a value"),
    (".env.example", lambda: re.sub(r"(?m)^AIGC_POSTGRES_PASSWORD=.*\n", "",
                                             (ROOT / ".env.example").read_text()),
     ".env.example: AIGC_POSTGRES_PASSWORD is missing"),
    (".env.example", lambda: (ROOT / ".env.example").read_text() + "\nAIGC_UNUSED=1\n",
     "AIGC_UNUSED has no comment above it"),
    ("README.md", lambda: _edit("README.md", "cp .env.example .env", "cp .env.sample .env"),
     "README: does not say `cp .env.example .env`"),
    ("README.md", lambda: _edit("README.md", "docker compose --profile gpu", "docker compose --profile cuda"),
     "names profile 'cuda'"),
    ("README.md", lambda: _edit("README.md", "scheduler submit /jobs/job.yaml", "schedulr submit /jobs/job.yaml"),
     "names unknown service 'schedulr'"),
    ("README.md", lambda: _edit("README.md", "`AIGC_S3_SECRET_KEY`", "the S3 secret"),
     "AIGC_S3_SECRET_KEY (in .env.example) is not explained"),
    ("deploy/prometheus.yml", lambda: _edit("deploy/prometheus.yml", "port: 9810", "port: 9811"),
     "does not scrape worker-cpu:9810/metrics"),
]


@pytest.mark.parametrize(("name", "text", "expected"), FILE_MUTATIONS, ids=[e for _, _, e in FILE_MUTATIONS])
def test_one_change_to_a_shipped_file_is_caught(compose, tmp_path, name, text, expected):
    root = _copy_tree(tmp_path, {name: text()})
    problems = compose_problems(compose, root) + file_problems(compose, root)
    assert any(expected in p for p in problems), problems
