"""Static checks of deploy/: the Dockerfile, the compose file, the Kubernetes manifests and the
NATS Helm values.

Nothing here needs Docker, a Kubernetes cluster or Helm: the files are parsed, validated against
the Compose specification schema (as shipped by check-jsonschema) and the Kubernetes OpenAPI
schemas (as shipped by kubernetes-validate), and cross-checked against the code: every
environment variable must be one kloudmeter reads, every command a real ``kloudmeter``
subcommand, every probe must hit ``/healthy`` on the gateway's port.
"""

import argparse
import http.server
import json
import os
import re
import shlex
import subprocess
import sys
import threading
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import jsonschema
import kubernetes_validate
import pytest
import yaml
from check_jsonschema.builtin_schemas import get_builtin_schema
from packaging.version import Version

from kloudmeter_py import cli, config

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
DOCKERFILE = DEPLOY / "Dockerfile"
COMPOSE = DEPLOY / "docker-compose.yml"
K8S = DEPLOY / "k8s"
NATS_VALUES = K8S / "nats-values.yaml"
KUSTOMIZATION = K8S / "kustomization.yaml"

# The manifests must stay valid from Kubernetes 1.29 (or the oldest schema kubernetes-validate
# still ships, if it dropped 1.29) to the newest it ships.
K8S_VERSIONS = tuple(
    sorted(
        {
            next(
                v for v in kubernetes_validate.utils.all_versions() if Version(v) >= Version("1.29")
            ),
            kubernetes_validate.latest_version(),
        },
        key=Version,
    )
)
HEALTH_PATH = "/healthy"


# ---- what the application accepts -------------------------------------------------------------


def app_env_names() -> set[str]:
    """Every environment variable kloudmeter reads: the settings table, plus what cli.py reads
    itself (LOG_LEVEL)."""
    names = {var for var, _field, _kind in config._ENV}
    cli_source = Path(cli.__file__).read_text()
    names |= set(re.findall(r"os\.environ\.get\(\s*[\"']([A-Z][A-Z0-9_]*)[\"']", cli_source))
    return names


def subcommands() -> set[str]:
    for action in cli._parser()._actions:
        if isinstance(action, argparse._SubParsersAction):
            return set(action.choices)
    raise AssertionError("kloudmeter_py.cli._parser() has no subcommands")


def check_kloudmeter_command(command: list[str], where: str) -> str:
    """``command`` runs a real kloudmeter subcommand with flags it accepts; returns the
    subcommand."""
    assert command, f"{where}: empty command"
    assert command[0] == "kloudmeter", f"{where}: {command} does not run kloudmeter"
    assert len(command) > 1 and command[1] in subcommands(), (
        f"{where}: {command[1:2]} is not one of {sorted(subcommands())}"
    )
    try:
        cli._parser().parse_args(command[1:])
    except SystemExit as exc:  # argparse exits on a bad flag
        raise AssertionError(f"{where}: kloudmeter rejects {command}") from exc
    return command[1]


def check_env(env: dict[str, Any], where: str) -> config.Settings:
    """Only variables the app reads, with values it accepts."""
    unknown = set(env) - app_env_names()
    assert not unknown, f"{where}: kloudmeter reads no {sorted(unknown)}"
    try:
        return config.Settings.from_env({k: str(v) for k, v in env.items()})
    except Exception as exc:
        raise AssertionError(f"{where}: kloudmeter rejects its environment: {exc}") from exc


# ---- YAML ---------------------------------------------------------------------------------------


def yaml_files() -> list[Path]:
    return sorted(p for p in DEPLOY.rglob("*") if p.suffix in (".yml", ".yaml"))


def load_all(path: Path) -> list[Any]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def test_deploy_has_the_expected_files() -> None:
    for path in (DOCKERFILE, COMPOSE, NATS_VALUES, KUSTOMIZATION, DEPLOY / "README.md"):
        assert path.is_file(), f"missing {path.relative_to(ROOT)}"
    assert len(k8s_manifest_files()) >= 4


@pytest.mark.parametrize("path", yaml_files(), ids=lambda p: str(p.relative_to(DEPLOY)))
def test_yaml_parses(path: Path) -> None:
    docs = load_all(path)
    assert docs, f"{path.name}: no YAML document"
    for doc in docs:
        assert isinstance(doc, dict), f"{path.name}: a document is not a mapping"


def test_readme_mentions_every_deploy_file() -> None:
    readme = (DEPLOY / "README.md").read_text()
    for path in DEPLOY.rglob("*"):
        if path.is_file() and path.name != "README.md":
            assert path.name in readme, f"deploy/README.md does not mention {path.name}"


# ---- Dockerfile ---------------------------------------------------------------------------------


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(KEYWORD, arguments) per instruction: line continuations joined, comments dropped (as
    Docker drops them, also inside a continuation)."""
    instructions: list[tuple[str, str]] = []
    current = ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            current += line[:-1].rstrip() + " "
            continue
        current += line
        keyword, _, rest = current.partition(" ")
        instructions.append((keyword.upper(), rest.strip()))
        current = ""
    assert not current, "Dockerfile ends inside a line continuation"
    return instructions


def instruction_args(keyword: str) -> list[str]:
    return [rest for kw, rest in dockerfile_instructions() if kw == keyword]


def exec_form(rest: str, where: str) -> list[str]:
    assert rest.startswith("["), f"{where} should use the exec (JSON) form: {rest}"
    value = json.loads(rest)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), where
    return value


def final_stage() -> list[tuple[str, str]]:
    instructions = dockerfile_instructions()
    last_from = max(i for i, (kw, _) in enumerate(instructions) if kw == "FROM")
    return instructions[last_from:]


def final_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for kw, rest in final_stage():
        if kw == "ENV":
            for item in shlex.split(rest):
                key, sep, value = item.partition("=")
                assert sep, f"ENV {rest!r}: use the KEY=value form"
                env[key] = value
    return env


def healthcheck_command() -> list[str]:
    (rest,) = [r for kw, r in final_stage() if kw == "HEALTHCHECK"]
    options, sep, command = rest.partition("CMD ")
    assert sep, f"HEALTHCHECK without CMD: {rest}"
    assert all(opt.startswith("--") for opt in options.split()), options
    return exec_form(command.strip(), "HEALTHCHECK CMD")


def dockerfile_uid() -> int:
    users = [rest for kw, rest in final_stage() if kw == "USER"]
    assert users, "the final stage sets no USER: the container would run as root"
    user = users[-1].split(":")[0]
    assert user.isdigit(), f"USER {user}: use a numeric uid so runAsNonRoot can verify it"
    return int(user)


def test_dockerfile_base_and_stages() -> None:
    froms = instruction_args("FROM")
    assert froms, "no FROM"
    for rest in froms:
        image = rest.split()[0]
        assert image.startswith("python:3.11-slim"), f"FROM {image}: expected python:3.11-slim"
    python_floor = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "requires-python"
    ]
    assert python_floor == ">=3.11", f"requires-python changed to {python_floor}: check FROM"


def test_dockerfile_copies_only_what_exists() -> None:
    ignore = (DEPLOY / "Dockerfile.dockerignore").read_text().split()
    for kw, rest in dockerfile_instructions():
        if kw not in ("COPY", "ADD"):
            continue
        parts = shlex.split(rest)
        if any(p.startswith("--from") for p in parts):
            continue
        sources = [p for p in parts if not p.startswith("--")][:-1]
        for src in sources:
            assert (ROOT / src).exists(), f"COPY {src}: not in the build context (repo root)"
            assert f"!{src.rstrip('/')}" in ignore, f"Dockerfile.dockerignore excludes {src}"


def test_dockerfile_installs_the_kloudmeter_script() -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert pyproject["project"]["scripts"]["kloudmeter"] == "kloudmeter_py.cli:main"
    runs = " ".join(instruction_args("RUN"))
    assert "pip wheel" in runs or "pip install" in runs


def test_dockerfile_runs_as_a_non_root_user() -> None:
    assert dockerfile_uid() != 0


def test_dockerfile_default_command_is_the_gateway() -> None:
    (cmd,) = [r for kw, r in final_stage() if kw == "CMD"]
    command = exec_form(cmd, "CMD")
    assert check_kloudmeter_command(command, "Dockerfile CMD") == "gateway"
    assert not [r for kw, r in final_stage() if kw == "ENTRYPOINT"]


def test_dockerfile_exposes_the_gateway_port_on_all_interfaces() -> None:
    env = final_env()
    check_env({k: v for k, v in env.items() if not k.startswith(("PYTHON", "PIP_"))}, "ENV")
    assert env["HTTP_SERVER_HOST"] == "0.0.0.0", "a gateway on 127.0.0.1 is unreachable"
    exposed = {p.split("/")[0] for rest in instruction_args("EXPOSE") for p in rest.split()}
    assert exposed == {env["HTTP_SERVER_PORT"]} == {"8080"}


def test_dockerfile_healthcheck_is_python_on_healthy() -> None:
    command = healthcheck_command()
    assert command[:2] == ["python", "-c"], f"expected a python one-liner: {command}"
    assert "curl" not in " ".join(command) and "wget" not in " ".join(command)
    code = command[2]
    compile(code, "<HEALTHCHECK>", "exec")
    assert HEALTH_PATH in code and "urllib" in code
    assert "HTTP_SERVER_PORT" in code, "the healthcheck should follow HTTP_SERVER_PORT"


class _Health(http.server.BaseHTTPRequestHandler):
    status = 200

    def do_GET(self) -> None:
        code = type(self).status if self.path == HEALTH_PATH else 404
        body = b'{"status":"ok"}' if code == 200 else b'{"status":"error"}'
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def health_server() -> Iterator[tuple[http.server.HTTPServer, type[_Health]]]:
    handler = type("Health", (_Health,), {"status": 200})
    server = http.server.HTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server, handler
    finally:
        server.shutdown()
        server.server_close()


def test_dockerfile_healthcheck_exit_status(
    health_server: tuple[http.server.HTTPServer, type[_Health]],
) -> None:
    """The one-liner exits 0 on 200 and non-zero on 503 or when nothing listens."""
    server, handler = health_server
    command = [sys.executable, *healthcheck_command()[1:]]
    env = {**os.environ, "HTTP_SERVER_PORT": str(server.server_address[1])}

    def status() -> int:
        return subprocess.run(command, env=env, capture_output=True, timeout=30).returncode

    assert status() == 0
    handler.status = 503
    assert status() != 0
    server.shutdown()
    server.server_close()
    assert status() != 0


# ---- docker-compose.yml -------------------------------------------------------------------------


def compose() -> dict[str, Any]:
    (doc,) = load_all(COMPOSE)
    assert isinstance(doc, dict)
    return doc


def services() -> dict[str, dict[str, Any]]:
    return compose()["services"]


def service_env(svc: dict[str, Any]) -> dict[str, str]:
    env = svc.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: "" if v is None else str(v) for k, v in env.items()}


def command_list(svc: dict[str, Any]) -> list[str]:
    command = svc.get("command") or []
    return shlex.split(command) if isinstance(command, str) else [str(c) for c in command]


def kloudmeter_services() -> dict[str, dict[str, Any]]:
    return {n: s for n, s in services().items() if command_list(s)[:1] == ["kloudmeter"]}


def nats_services() -> dict[str, dict[str, Any]]:
    return {n: s for n, s in services().items() if str(s.get("image", "")).startswith("nats:")}


def flags(args: list[str]) -> dict[str, str | None]:
    """nats-server flags: ``-x value`` pairs, or None for a switch such as ``-js``."""
    out: dict[str, str | None] = {}
    for i, arg in enumerate(args):
        if arg.startswith("-"):
            nxt = args[i + 1] if i + 1 < len(args) else None
            out[arg] = None if nxt is None or nxt.startswith("-") else nxt
    return out


def by_role(role: str) -> dict[str, dict[str, Any]]:
    return {n: s for n, s in kloudmeter_services().items() if command_list(s)[1] == role}


def test_compose_matches_the_compose_spec_schema() -> None:
    schema = get_builtin_schema("vendor.compose-spec")
    validator_cls = jsonschema.validators.validator_for(schema)
    validator_cls.check_schema(schema)
    errors = sorted(validator_cls(schema).iter_errors(compose()), key=lambda e: e.json_path)
    assert not errors, "\n".join(f"{e.json_path}: {e.message}" for e in errors)


def test_compose_services_have_an_image_or_a_build() -> None:
    for name, svc in services().items():
        assert "image" in svc or "build" in svc, f"{name}: neither image nor build"
        build = svc.get("build")
        if build is not None:
            context = (COMPOSE.parent / build["context"]).resolve()
            assert (context / "pyproject.toml").is_file(), f"{name}: build context {context}"
            assert (context / build["dockerfile"]).resolve() == DOCKERFILE


def test_compose_depends_on_targets_exist() -> None:
    all_services = services()
    for name, svc in all_services.items():
        for target, spec in (svc.get("depends_on") or {}).items():
            assert target in all_services, f"{name} depends on unknown service {target}"
            condition = spec["condition"]
            if condition == "service_healthy":
                assert "healthcheck" in all_services[target] or target in kloudmeter_services()
                assert not all_services[target].get("healthcheck", {}).get("disable")
            elif condition == "service_completed_successfully":
                assert all_services[target].get("restart", "no") == "no", target
            else:
                assert condition == "service_started", f"{name}: condition {condition}"


def test_compose_roles() -> None:
    assert len(nats_services()) == 3
    assert len(by_role("setup")) == 1
    assert len(by_role("worker")) == 2
    assert len(by_role("gateway")) == 2
    setup_name = next(iter(by_role("setup")))
    for name, svc in {**by_role("worker"), **by_role("gateway")}.items():
        dep = svc["depends_on"][setup_name]
        assert dep["condition"] == "service_completed_successfully", name
    setup = by_role("setup")[setup_name]
    for nats_name in nats_services():
        assert setup["depends_on"][nats_name]["condition"] == "service_healthy"


def test_compose_kloudmeter_services_are_consistent() -> None:
    nats = nats_services()
    envs = {}
    for name, svc in kloudmeter_services().items():
        role = check_kloudmeter_command(command_list(svc), name)
        env = service_env(svc)
        settings = check_env(env, name)
        envs[name] = {
            k: v for k, v in env.items() if k not in ("HTTP_SERVER_HOST", "HTTP_SERVER_PORT")
        }
        # every NATS node is listed, each at its client port
        urls = [urlparse(u.strip()) for u in settings.nats_url.split(",")]
        assert {u.hostname for u in urls} == set(nats), f"{name}: NATS_URL {settings.nats_url}"
        for u in urls:
            client_port = flags(command_list(nats[u.hostname])).get("-p") or "4222"
            assert u.port == int(client_port), f"{name}: {u.geturl()}"
        assert settings.replicas == len(nats), f"{name}: METER_REPLICAS != number of NATS nodes"
        # the image's HEALTHCHECK (/healthy) only makes sense for the gateway
        disabled = bool(svc.get("healthcheck", {}).get("disable"))
        assert disabled == (role != "gateway"), f"{name}: healthcheck disable={disabled}"
        if role == "gateway":
            assert settings.http_host == "0.0.0.0", f"{name}: unreachable on {settings.http_host}"
            published = [str(p).rsplit(":", 1) for p in svc["ports"]]
            assert [target for _host, target in published] == [str(settings.http_port)], name
    # one installation: every container agrees on everything but the listen address
    assert len({json.dumps(e, sort_keys=True) for e in envs.values()}) == 1, envs
    ports = [str(p).rsplit(":", 1)[0] for s in by_role("gateway").values() for p in s["ports"]]
    assert sorted(ports) == ["8081", "8082"]
    partitions = check_env(next(iter(envs.values())), "env").partitions
    assert len(by_role("worker")) <= partitions, "workers beyond METER_PARTITIONS sit idle"


def test_compose_nats_cluster() -> None:
    nats = nats_services()
    declared_volumes = set(compose().get("volumes") or {})
    names, clusters, route_sets = set(), set(), set()
    for name, svc in nats.items():
        args = flags(command_list(svc))
        assert "-js" in args or "--jetstream" in args, f"{name}: JetStream is off"
        names.add(args.get("--server_name") or args.get("-n"))
        clusters.add(args["--cluster_name"])
        route_sets.add(args["--routes"])
        routes = {urlparse(r) for r in (args["--routes"] or "").split(",")}
        cluster_port = urlparse(args["--cluster"]).port
        assert {r.hostname for r in routes} == set(nats), f"{name}: routes {routes}"
        assert {r.port for r in routes} == {cluster_port}, f"{name}: route ports"
        store = args.get("-sd") or args.get("--store_dir")
        mounts = {str(v).split(":")[1]: str(v).split(":")[0] for v in svc["volumes"]}
        assert store in mounts, f"{name}: the JetStream store {store} is not on a volume"
        assert mounts[store] in declared_volumes, f"{name}: volume {mounts[store]} not declared"
        assert "healthcheck" in svc, f"{name}: no healthcheck for depends_on to wait on"
    assert len(names) == len(nats) and None not in names, "server names must be unique"
    assert len(clusters) == 1 and len(route_sets) == 1


# ---- Kubernetes ---------------------------------------------------------------------------------


def k8s_manifest_files() -> list[Path]:
    return sorted(p for p in K8S.glob("*.yaml") if p not in (NATS_VALUES, KUSTOMIZATION))


def k8s_docs() -> list[dict[str, Any]]:
    return [doc for path in k8s_manifest_files() for doc in load_all(path)]


def of_kind(kind: str) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in k8s_docs() if d["kind"] == kind}


def workloads() -> dict[str, dict[str, Any]]:
    return {**of_kind("Deployment"), **of_kind("Job")}


def the_config_map() -> dict[str, str]:
    (cm,) = of_kind("ConfigMap").values()
    return dict(cm["data"])


def containers(workload: dict[str, Any]) -> list[dict[str, Any]]:
    return list(workload["spec"]["template"]["spec"]["containers"])


def container_env(container: dict[str, Any]) -> dict[str, str]:
    """The container's environment: envFrom ConfigMaps, then env entries."""
    maps = of_kind("ConfigMap")
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        ref = source["configMapRef"]["name"]
        assert ref in maps, f"envFrom names unknown ConfigMap {ref}"
        env.update(maps[ref]["data"])
    for item in container.get("env", []):
        env[item["name"]] = item.get("value", "")
    return env


def resolve_port(container: dict[str, Any], port: int | str) -> int:
    by_name = {p.get("name"): p["containerPort"] for p in container.get("ports", [])}
    if isinstance(port, str):
        assert port in by_name, f"port {port!r} is not a named container port"
        return int(by_name[port])
    assert port in by_name.values(), f"port {port} is not a container port"
    return port


def role_of(workload: dict[str, Any]) -> str:
    (container,) = containers(workload)
    return check_kloudmeter_command(container["command"], workload["metadata"]["name"])


def workload_for(role: str) -> dict[str, Any]:
    (found,) = [w for w in workloads().values() if role_of(w) == role]
    return found


def nats_values() -> dict[str, Any]:
    (doc,) = load_all(NATS_VALUES)
    return doc


@pytest.mark.parametrize("path", k8s_manifest_files(), ids=lambda p: p.name)
def test_k8s_manifests_match_the_kubernetes_schema(path: Path) -> None:
    for doc in load_all(path):
        where = f"{path.name}: {doc.get('kind')}/{doc.get('metadata', {}).get('name')}"
        for version in K8S_VERSIONS:
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                at = ".".join(str(p) for p in exc.path)
                raise AssertionError(
                    f"{where}, Kubernetes {version}: {at}: {exc.message}"
                ) from None


def test_k8s_manifests_have_identity() -> None:
    seen = set()
    for doc in k8s_docs():
        assert doc.get("apiVersion") and doc.get("kind"), doc
        name = doc["metadata"]["name"]
        assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", name) and len(name) <= 63, name
        assert (doc["kind"], name) not in seen, f"duplicate {doc['kind']}/{name}"
        seen.add((doc["kind"], name))


def test_k8s_kustomization_lists_every_manifest() -> None:
    (kustomization,) = load_all(KUSTOMIZATION)
    assert kustomization["kind"] == "Kustomization"
    assert sorted(kustomization["resources"]) == [p.name for p in k8s_manifest_files()]
    images = {c["image"].rsplit(":", 1)[0] for w in workloads().values() for c in containers(w)}
    assert {i["name"] for i in kustomization["images"]} == images


def test_k8s_selectors_match_template_labels() -> None:
    templates = {
        name: w["spec"]["template"]["metadata"]["labels"] for name, w in workloads().items()
    }
    for name, deployment in of_kind("Deployment").items():
        selector = deployment["spec"]["selector"]["matchLabels"]
        assert selector.items() <= templates[name].items(), f"{name}: selector {selector}"
        others = [n for n, labels in templates.items() if n != name]
        for other in others:
            assert not selector.items() <= templates[other].items(), f"{name} selects {other}"
    for kind, path in (("Service", ("spec", "selector")), ("PodDisruptionBudget", None)):
        for name, doc in of_kind(kind).items():
            selector = doc["spec"]["selector"] if path else doc["spec"]["selector"]["matchLabels"]
            matched = [n for n, labels in templates.items() if selector.items() <= labels.items()]
            assert len(matched) == 1, f"{kind}/{name} selects {matched}"


def test_k8s_containers_run_kloudmeter_with_known_env() -> None:
    uid = dockerfile_uid()
    images = set()
    for name, workload in workloads().items():
        pod = workload["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True, name
        assert pod["securityContext"]["runAsUser"] == uid, f"{name}: not the image's USER"
        for container in containers(workload):
            check_kloudmeter_command(container["command"], name)
            check_env(container_env(container), f"{name}/{container['name']}")
            images.add(container["image"])
    assert len(images) == 1, f"one image for every role: {images}"
    check_env(the_config_map(), "ConfigMap")


def test_k8s_roles_and_replicas() -> None:
    settings = check_env(the_config_map(), "ConfigMap")
    worker = workload_for("worker")
    gateway = workload_for("gateway")
    job = workload_for("setup")
    assert worker["kind"] == gateway["kind"] == "Deployment" and job["kind"] == "Job"
    assert worker["spec"]["replicas"] == 2
    assert gateway["spec"]["replicas"] == 2
    assert worker["spec"]["replicas"] <= settings.partitions
    assert job["spec"]["template"]["spec"]["restartPolicy"] in ("OnFailure", "Never")


def test_k8s_gateway_probes_hit_healthy_on_the_container_port() -> None:
    settings = check_env(the_config_map(), "ConfigMap")
    assert settings.http_host == "0.0.0.0", "a gateway on 127.0.0.1 fails its probes"
    gateway = workload_for("gateway")
    (container,) = containers(gateway)
    for probe in ("readinessProbe", "livenessProbe"):
        get = container[probe]["httpGet"]
        assert get["path"] == HEALTH_PATH, f"{probe} path {get['path']}"
        assert resolve_port(container, get["port"]) == settings.http_port, probe
    (service,) = of_kind("Service").values()
    for port in service["spec"]["ports"]:
        assert resolve_port(container, port["targetPort"]) == settings.http_port


def test_k8s_nats_values() -> None:
    values = nats_values()
    cluster = values["config"]["cluster"]
    assert cluster["enabled"] is True
    assert cluster["replicas"] >= 3 and cluster["replicas"] % 2 == 1
    jetstream = values["config"]["jetstream"]
    assert jetstream["enabled"] is True
    file_store = jetstream["fileStore"]
    assert file_store["enabled"] is True and file_store["pvc"]["enabled"] is True

    def gib(quantity: str) -> float:
        match = re.fullmatch(r"(\d+(?:\.\d+)?)(Mi|Gi|Ti)", quantity)
        assert match, f"unexpected quantity {quantity}"
        return float(match[1]) * {"Mi": 1 / 1024, "Gi": 1, "Ti": 1024}[match[2]]

    assert gib(file_store["maxSize"]) < gib(file_store["pvc"]["size"])
    settings = check_env(the_config_map(), "ConfigMap")
    assert settings.replicas == cluster["replicas"], "METER_REPLICAS should match the cluster"
