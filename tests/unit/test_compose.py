"""docker-compose.yml and the Dockerfile, checked without Docker.

``compose_problems`` lists what would break at ``docker compose up``: commands the ``aigc`` CLI
does not have, AIGC_* variables Settings ignores, missing build paths, a lossy Redis, an open
Flower, a GPU worker that does not reserve a GPU. The last tests feed it broken files to show
that each check can fail.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import re
import shlex
import tomllib
from pathlib import Path
from typing import Any

import pytest
import typer
import yaml

from aigc_core.settings import Limits, Settings

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "docker-compose.yml"
PROJECT_SERVICES = {"migrate", "worker-cpu", "worker-gpu", "scheduler", "flower"}
AFTER_MIGRATE = {"worker-cpu", "worker-gpu", "scheduler"}

KNOWN_AIGC_VARS = {f"AIGC_{name.upper()}" for name in Settings.model_fields if name != "limits"} | {
    f"AIGC_LIMIT_{name.upper()}" for name in Limits.model_fields
}

_VAR = re.compile(r"\$\$|\$\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?])(?P<default>[^}]*))?\}"
                  r"|\$(?P<bare>[A-Za-z_][A-Za-z0-9_]*)")


def interpolate(value: Any) -> Any:
    """Compose's ``${VAR:-default}`` as it reads with nothing set: the default (or empty)."""
    if not isinstance(value, str):
        return value

    def sub(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        return (m.group("default") or "") if m.group("op") in (":-", "-") else ""

    return _VAR.sub(sub, value)


def words(command: Any) -> list[str]:
    if command is None:
        return []
    if isinstance(command, str):
        return shlex.split(command)
    return [interpolate(str(w)) for w in command]


def environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.partition("=")[::2] for item in env)
    return {str(k): interpolate("" if v is None else str(v)) for k, v in env.items()}


def is_project_service(service: dict[str, Any]) -> bool:
    return "build" in service


# ---- the checks ---------------------------------------------------------------------------------

def _aigc_cli():
    from scheduler.cli import app

    return typer.main.get_command(app)


def check_aigc_command(args: list[str]) -> str | None:
    """None if ``aigc ARGS`` names a real command (nested groups too) and its options parse."""
    cmd, path = _aigc_cli(), ["aigc"]
    while hasattr(cmd, "commands"):  # a group: the next word must name a subcommand
        if not args:
            return f"`{' '.join(path)}` is a group, not a command (has {sorted(cmd.commands)})"
        name, args = args[0], args[1:]
        if name not in cmd.commands:
            return f"`{' '.join(path)}` has no command {name!r} (has {sorted(cmd.commands)})"
        cmd, path = cmd.commands[name], [*path, name]
    try:
        cmd.make_context(" ".join(path), list(args))
    except typer.TyperException as e:  # typer's click: usage errors, bad values, unknown options
        return f"`{' '.join(path)}`: {e}"
    return None


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
        for var in ("AIGC_DATABASE_URL", "AIGC_BROKER_URL", "AIGC_STORAGE_URL", "AIGC_CACHE_DIR"):
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
        context = root / interpolate(build.get("context", "."))
        dockerfile = context / interpolate(build.get("dockerfile", "Dockerfile"))
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
    flower = compose.get("services", {}).get("flower")
    if flower is None:
        return ["flower: no such service"]
    args = words(flower.get("command"))
    auth = _flag_value(args, "--basic-auth") or environment(flower).get("FLOWER_BASIC_AUTH")
    problems = []
    raw = _flag_value([str(w) for w in flower.get("command") or []], "--basic-auth") or ""
    required = raw.startswith("${") and ":?" in raw  # compose refuses to start without the variable
    if not (required or (auth and all(part for part in auth.partition(":")[::2]))):
        problems.append("flower: no --basic-auth user:password (its API would be open)")
    if "flower" not in args:
        problems.append("flower: command does not run flower")
    return problems


def check_gpu_worker(compose: dict[str, Any]) -> list[str]:
    services = compose.get("services", {})
    problems = []
    for name, svc in services.items():  # plain `docker compose up` must work on a machine without GPUs
        devices = (((svc.get("deploy") or {}).get("resources") or {}).get("reservations") or {}).get("devices")
        if devices and not svc.get("profiles"):
            problems.append(f"{name}: reserves a device but is not behind a profile")
    gpu = services.get("worker-gpu")
    if gpu is None:
        return [*problems, "worker-gpu: no such service"]
    devices = (((gpu.get("deploy") or {}).get("resources") or {}).get("reservations") or {}).get("devices") or []
    one_gpu = [d for d in devices if d.get("driver") == "nvidia" and "gpu" in (d.get("capabilities") or [])
               and (d.get("count") == 1 or len(d.get("device_ids") or []) == 1)]
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


def compose_problems(compose: dict[str, Any], root: Path = ROOT) -> list[str]:
    return [*check_commands(compose, root), *check_environment(compose), *check_build(compose, root),
            *check_depends_on(compose), *check_redis(compose), *check_flower(compose),
            *check_gpu_worker(compose)]


# ---- the real files -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE_FILE.read_text(encoding="utf-8"))
    assert isinstance(data, dict) and isinstance(data.get("services"), dict)
    return data


def test_compose_parses_with_the_expected_services(compose):
    assert {"redis", "postgres", "s3", "s3-init", *PROJECT_SERVICES} <= set(compose["services"])


def test_project_services_run_real_commands(compose):
    assert check_commands(compose, ROOT) == []


def test_aigc_environment_variables_are_settings(compose):
    assert check_environment(compose) == []


def test_dockerfile_and_build_paths_exist(compose):
    assert (ROOT / "Dockerfile").is_file()
    assert (ROOT / ".dockerignore").is_file()
    assert check_build(compose, ROOT) == []


def test_services_start_in_order(compose):
    assert check_depends_on(compose) == []


def test_redis_keeps_messages(compose):
    assert check_redis(compose) == []


def test_flower_has_basic_auth(compose):
    assert check_flower(compose) == []


def test_gpu_worker_reserves_a_gpu_and_runs_solo(compose):
    assert check_gpu_worker(compose) == []


def test_whole_file_has_no_problems(compose):
    assert compose_problems(compose) == []


# ---- each check can fail ------------------------------------------------------------------------

BROKEN = {
    "services": {
        "redis": {"image": "redis:7", "command": "redis-server --appendonly no"},
        "migrate": {"build": ".", "command": ["db"], "environment": {}},
        "worker-cpu": {"build": {"context": ".", "dockerfile": "Nope.dockerfile"},
                       "command": ["wrker", "--queues", "text"],
                       "environment": ["AIGC_BROKR_URL=redis://redis:6379/0", "AIGC_LEASE_S=ten"]},
        "worker-gpu": {"build": {"context": "no-such-dir"}, "command": ["worker", "--pool", "prefork"],
                       "depends_on": ["cache"]},
        "scheduler": {"build": ".", "command": ["reconcile", "--every", "30"]},
        "flower": {"build": ".", "entrypoint": ["celery"], "command": ["-A", "worker.nope", "flower"]},
        "gpu-hog": {"image": "x", "deploy": {"resources": {"reservations": {"devices": [
            {"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]}}}},
    },
    "x-aigc-env": {"AIGC_MADE_UP": "1"},
}


def test_interpolate_reads_defaults():
    assert interpolate("u:${P:-aigc}@h") == "u:aigc@h"
    assert interpolate("--basic-auth=${A:-admin:change-me}") == "--basic-auth=admin:change-me"
    assert interpolate("${A}|$B|${C:?set C}|$$") == "|||$"


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
        "flower: no --basic-auth",
        "gpu-hog: reserves a device but is not behind a profile",
        "worker-gpu: does not reserve one nvidia gpu",
        "worker-gpu: not in the gpu profile",
        "worker-gpu: must run `worker --pool solo`",
        "worker-gpu: AIGC_DEVICE is not cuda",
    ]:
        assert expected in problems, f"not reported: {expected}\n--- reported:\n{problems}"


def _set(path: str, value: Any):
    def mutate(d: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        for p in parents:
            d = d[p]
        d[last] = value
    return mutate


MUTATIONS = [
    (_set("services.worker-cpu.command", ["work", "--queues", "text"]), "has no command 'work'"),
    (_set("services.migrate.command", ["db", "downgrade"]), "has no command 'downgrade'"),
    (_set("services.worker-cpu.environment.AIGC_CONCURRENCY", "4"), "AIGC_CONCURRENCY is not a setting"),
    (_set("services.flower.command", ["-A", "workers.app", "flower"]), "not an importable module"),
    (_set("services.migrate.build.dockerfile", "Dockerfile.missing"), "does not exist"),
    (_set("services.redis.command", ["redis-server"]), "--appendonly yes"),
    (_set("services.flower.command", ["-A", "worker.app", "flower", "--port=5555"]), "no --basic-auth"),
    (_set("services.worker-gpu.command", ["worker", "--pool", "prefork"]), "--pool solo"),
    (_set("services.worker-gpu.deploy", {}), "does not reserve one nvidia gpu"),
    (_set("services.worker-gpu.profiles", []), "reserves a device but is not behind a profile"),
    (_set("services.scheduler.depends_on", {"redis": {"condition": "service_healthy"}}), "depend on migrate"),
]


@pytest.mark.parametrize(("mutate", "expected"), MUTATIONS, ids=[expected for _, expected in MUTATIONS])
def test_one_change_to_the_real_file_is_caught(compose, mutate, expected):
    broken = copy.deepcopy(compose)
    mutate(broken)
    assert any(expected in p for p in compose_problems(broken)), compose_problems(broken)
