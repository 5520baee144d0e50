"""The container files: Dockerfile (hadolint, structure, the healthcheck's exit-code logic against a
real `emlisten serve`), .dockerignore, and docker-compose.yml (consistent services and URLs)."""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any
from urllib.parse import urlsplit

import pytest
import yaml

from emlisten._cli import _parser

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"
VENV_BIN = Path(sys.executable).parent


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, instruction: str) -> list[str]:
        return [args for name, args in self.instructions if name == instruction]

    def one(self, instruction: str) -> str:
        found = self.all(instruction)
        assert len(found) == 1, f"expected one {instruction}, got {found}"
        return found[0]


def parse_dockerfile(text: str) -> tuple[dict[str, str], list[Stage]]:
    """Global ARG defaults and the stages, instructions joined across line continuations."""
    logical: list[str] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        logical.append(pending + line)
        pending = ""
    args: dict[str, str] = {}
    stages: list[Stage] = []
    for line in logical:
        instruction, _, rest = line.partition(" ")
        instruction = instruction.upper()
        rest = rest.strip()
        if instruction == "FROM":
            parts = rest.split()
            base = re.sub(r"\$\{(\w+)\}", lambda m: args.get(m.group(1), m.group(0)), parts[0])
            name = parts[2] if len(parts) == 3 and parts[1].upper() == "AS" else None
            stages.append(Stage(base=base, name=name))
        elif not stages and instruction == "ARG":
            key, _, default = rest.partition("=")
            args[key] = default
        else:
            stages[-1].instructions.append((instruction, rest))
    return args, stages


@pytest.fixture(scope="module")
def stages() -> list[Stage]:
    return parse_dockerfile(DOCKERFILE.read_text())[1]


def test_hadolint_is_clean() -> None:
    hadolint = VENV_BIN / "hadolint"
    result = subprocess.run(
        [str(hadolint), "--no-color", "--failure-threshold", "style", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_multi_stage_on_a_pinned_slim_python(stages: list[Stage]) -> None:
    assert len(stages) >= 2
    for stage in stages:
        # An exact patch version of the 3.11 slim image: no floating "latest" or "3.11".
        assert re.fullmatch(r"python:3\.11\.\d+-slim(-\w+)?", stage.base), stage.base
    assert stages[0].base == stages[-1].base, "the venv's interpreter symlinks need the same base"


def test_final_stage_has_only_the_venv_and_no_build_tools(stages: list[Stage]) -> None:
    builder, final = stages[0], stages[-1]
    copies = final.all("COPY")
    assert copies == [f"--from={builder.name} /opt/venv /opt/venv"]
    final_text = " ".join(args for _, args in final.instructions)
    for tool in ("gcc", "build-essential", "apt-get install", "pip install", "make ", "g++", "-dev"):
        assert tool not in final_text, tool
    # The builder does not need a compiler either: every dependency ships a wheel.
    assert "gcc" not in " ".join(args for _, args in builder.instructions)


def test_final_stage_runs_unprivileged_with_the_documented_environment(stages: list[Stage]) -> None:
    final = stages[-1]
    assert final.one("USER") == "10001:10001"
    assert "--uid 10001" in final.one("RUN")
    assert final.one("EXPOSE") == "8080"
    env = " ".join(final.all("ENV"))
    for setting in (
        "PYTHONDONTWRITEBYTECODE=1",
        "PYTHONUNBUFFERED=1",
        "EMLISTEN_ROLE=all",
        "EMLISTEN_PORT=8080",
    ):
        assert setting in env


def test_final_stage_keeps_state_in_a_volume_owned_by_the_service_user(stages: list[Stage]) -> None:
    final = stages[-1]
    assert json.loads(final.one("VOLUME")) == ["/data"]
    assert "EMLISTEN_DATA_DIR=/data" in " ".join(final.all("ENV"))
    # Created in the image with the service user as owner: a fresh named volume copies that.
    assert "mkdir /data && chown 10001:10001 /data" in final.one("RUN")
    # The volume is declared after the RUN that prepares it (a later RUN's changes to a
    # declared volume are discarded).
    names = [name for name, _ in final.instructions]
    assert names.index("VOLUME") > names.index("RUN")


def test_entrypoint_is_the_console_script_ci_exercises(stages: list[Stage]) -> None:
    entrypoint = json.loads(stages[-1].one("ENTRYPOINT"))
    assert entrypoint == ["emlisten", "serve"]
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts[entrypoint[0]] == "emlisten._cli:main"
    assert _parser().parse_args(entrypoint[1:]).command == "serve"
    # `--role` given after the image name (compose `command:`, `docker run ... --role=primary`).
    assert _parser().parse_args([*entrypoint[1:], "--role=secondary"]).role == "secondary"
    assert (VENV_BIN / "emlisten").exists()


def healthcheck_command(stages: list[Stage]) -> list[str]:
    healthcheck = stages[-1].one("HEALTHCHECK")
    _, _, exec_form = healthcheck.partition("CMD ")
    command: list[str] = json.loads(exec_form)
    return command


def test_healthcheck_fails_only_when_the_api_is_unreachable(stages: list[Stage]) -> None:
    command = healthcheck_command(stages)
    assert command[:2] == ["/bin/sh", "-c"]
    script = command[2]
    assert "emlisten status" in script
    assert "test $? -ne 2" in script
    env = {**os.environ, "PATH": f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}"}
    env.pop("EMLISTEN_API_TOKEN", None)
    with _serving_node(env) as port:
        healthy = subprocess.run([*command[:2], script], env={**env, "EMLISTEN_PORT": str(port)}, check=False)
        assert healthy.returncode == 0
    down = subprocess.run([*command[:2], script], env={**env, "EMLISTEN_PORT": str(port)}, check=False)
    assert down.returncode == 1


@contextlib.contextmanager
def _serving_node(env: dict[str, str]) -> Iterator[int]:
    """A real `emlisten serve --role=all` on a free loopback port; yields the port, stops with SIGTERM."""
    env = {**env, "EMLISTEN_HOST": "127.0.0.1", "EMLISTEN_PORT": "0", "EMLISTEN_LOG_FORMAT": "text"}
    for name in ("EMLISTEN_REDIS_URL", "EMLISTEN_AMQP_URL", "ExchangeListenerRedisHost"):
        env.pop(name, None)
    process = subprocess.Popen(
        [str(VENV_BIN / "emlisten"), "serve", "--role=all"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert process.stderr is not None
    try:
        port = _wait_ready(process.stderr, deadline=time.monotonic() + 30)
        yield port
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        process.stderr.close()


def _wait_ready(stderr: IO[str], deadline: float) -> int:
    """The port from the node's `ready: API on HOST:PORT` log line."""
    # Plain readline, no select(): lines already in Python's buffer are invisible to select().
    seen = []
    while time.monotonic() < deadline:
        line = stderr.readline()
        if not line:
            break
        seen.append(line)
        found = re.search(r"ready: API on [\d.]+:(\d+)", line)
        if found:
            return int(found.group(1))
    raise AssertionError("emlisten serve did not become ready:\n" + "".join(seen))


# --- .dockerignore ---


def _dockerignore_regex(pattern: str) -> re.Pattern[str]:
    out = ""
    i = 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out += "(?:.*/)?"
            i += 3
        elif pattern.startswith("**", i):
            out += ".*"
            i += 2
        elif pattern[i] == "*":
            out += "[^/]*"
            i += 1
        elif pattern[i] == "?":
            out += "[^/]"
            i += 1
        elif pattern[i] == "[":
            end = pattern.index("]", i)
            out += pattern[i : end + 1]
            i = end + 1
        else:
            out += re.escape(pattern[i])
            i += 1
    return re.compile(out)


def excluded_by_dockerignore(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parent folders wins."""
    parts = path.split("/")
    candidates = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    excluded = False
    for pattern in patterns:
        negated = pattern.startswith("!")
        regex = _dockerignore_regex(pattern.lstrip("!").strip("/"))
        if any(regex.fullmatch(candidate) for candidate in candidates):
            excluded = not negated
    return excluded


def dockerignore_patterns() -> list[str]:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


@pytest.mark.parametrize(
    "path",
    [
        ".venv/bin/python",
        ".git/HEAD",
        ".pytest_cache/v/cache/nodeids",
        ".mypy_cache/3.11/x.json",
        ".ruff_cache/x",
        ".hypothesis/examples/x",
        "emlisten/__pycache__/_cli.cpython-311.pyc",
        "emlisten.egg-info/PKG-INFO",
        "tests/deploy/test_chart.py",
        "charts/emlisten/values.yaml",
        "bench/run.py",
    ],
)
def test_dockerignore_keeps_local_state_out(path: str) -> None:
    assert excluded_by_dockerignore(path, dockerignore_patterns())


def test_dockerignore_lets_the_package_sources_through() -> None:
    patterns = dockerignore_patterns()
    needed = ["pyproject.toml", "LICENSE"]
    needed += [
        str(p.relative_to(ROOT))
        for p in (ROOT / "emlisten").rglob("*")
        if p.is_file() and "__pycache__" not in p.parts
    ]
    assert len(needed) > 10
    assert [path for path in needed if excluded_by_dockerignore(path, patterns)] == []


# --- docker-compose.yml ---


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    document: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    return document


def test_compose_references_only_defined_services_volumes_and_configs(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert {"emlisten-primary", "emlisten-secondary", "redis", "rabbitmq", "dovecot"} <= services.keys()
    for name, service in services.items():
        assert "image" in service or "build" in service, name
        assert set(service.get("depends_on", {})) <= services.keys(), name
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if not source.startswith(("/", ".")):
                assert source in compose.get("volumes", {}), (name, source)
        for config in service.get("configs", []):
            assert config["source"] in compose.get("configs", {}), (name, config)


def test_compose_runs_one_primary_and_one_secondary_on_the_image(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert services["emlisten-primary"]["command"] == ["--role=primary"]
    assert services["emlisten-secondary"]["command"] == ["--role=secondary"]
    for name in ("emlisten-primary", "emlisten-secondary"):
        service = services[name]
        assert service["build"] == "."
        environment = service["environment"]
        assert {"EMLISTEN_REDIS_URL", "EMLISTEN_AMQP_URL", "EMLISTEN_SECRET_KEY"} <= environment.keys()
        assert service["depends_on"]["redis"]["condition"] == "service_healthy"
    assert "8080:8080" in services["emlisten-primary"]["ports"]


def test_compose_urls_match_the_servers_they_point_at(compose: dict[str, Any]) -> None:
    services = compose["services"]
    environment = services["emlisten-primary"]["environment"]
    redis_url = urlsplit(environment["EMLISTEN_REDIS_URL"])
    assert redis_url.hostname in services
    redis_command = services[redis_url.hostname]["command"]
    assert redis_command[redis_command.index("--requirepass") + 1] == redis_url.password
    amqp_url = urlsplit(environment["EMLISTEN_AMQP_URL"])
    assert amqp_url.hostname in services
    rabbit = services[amqp_url.hostname]["environment"]
    assert (amqp_url.username, amqp_url.password) == (
        rabbit["RABBITMQ_DEFAULT_USER"],
        rabbit["RABBITMQ_DEFAULT_PASS"],
    )
    assert amqp_url.path.lstrip("/") == rabbit["RABBITMQ_DEFAULT_VHOST"]


def test_compose_dovecot_config_is_inline_and_matches_the_port(compose: dict[str, Any]) -> None:
    config = compose["configs"]["dovecot-conf"]["content"]
    assert "port = 143" in config
    assert "1143:143" in compose["services"]["dovecot"]["ports"]
    assert "passdb {" in config


def _image_environment(stages: list[Stage]) -> dict[str, str]:
    env: dict[str, str] = {}
    for args in stages[-1].all("ENV"):
        for pair in args.split():
            name, _, value = pair.partition("=")
            env[name] = value
    return {name: value for name, value in env.items() if name.startswith("EMLISTEN_")}


def test_the_image_listens_on_all_interfaces_and_insists_on_a_token(stages: list[Stage]) -> None:
    from emlisten.config import load_settings
    from emlisten.errors import ConfigError

    env = _image_environment(stages)
    assert env["EMLISTEN_HOST"] == "0.0.0.0"
    with pytest.raises(ConfigError, match="EMLISTEN_API_TOKEN"):
        load_settings(env)
    assert load_settings({**env, "EMLISTEN_API_TOKEN": "t"}).host == "0.0.0.0"
    assert load_settings({**env, "EMLISTEN_ALLOW_UNAUTHENTICATED": "true"}).api_token is None


def test_compose_gives_every_emlisten_service_a_token(compose: dict[str, Any]) -> None:
    services = {name: s for name, s in compose["services"].items() if s.get("image") == "emlisten:local"}
    assert services
    for name, service in services.items():
        assert service["environment"].get("EMLISTEN_API_TOKEN"), name
