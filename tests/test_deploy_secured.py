"""Static checks that deploy/ mounts NATS credentials and certificates from secrets: the
Compose override and the Kubernetes Secret volume, against the settings kloudmeter reads."""

import re
from typing import Any

import jsonschema
from check_jsonschema.builtin_schemas import get_builtin_schema

from kloudmeter_py.config import _ENV
from tests.test_deploy import (
    DEPLOY,
    K8S,
    check_env,
    containers,
    kloudmeter_services,
    load_all,
    service_env,
    workloads,
)

OVERRIDE = DEPLOY / "docker-compose.secured.yml"
SECURED_VARS = {"NATS_CREDS", "NATS_NKEY_SEED", "NATS_TLS_CERT", "NATS_TLS_KEY", "NATS_TLS_CA"}
MOUNT = "/etc/kloudmeter/nats"


def _override() -> dict[str, Any]:
    (doc,) = load_all(OVERRIDE)
    assert isinstance(doc, dict)
    return doc


def test_secured_settings_are_settings() -> None:
    """The variables deploy/ sets for secured NATS are ones kloudmeter reads."""
    assert SECURED_VARS <= {var for var, _field, _kind in _ENV}


def test_compose_override_mounts_every_file_it_names() -> None:
    """Each kloudmeter service gets the secrets its NATS_* paths point at, and accepts the
    merged environment."""
    doc = _override()
    jsonschema.validate(doc, get_builtin_schema("vendor.compose-spec"))
    declared = set(doc["secrets"])
    assert all(not str(s["file"]).startswith("/") for s in doc["secrets"].values())
    base = kloudmeter_services()
    assert set(doc["services"]) == set(base)
    for name, svc in doc["services"].items():
        env = {**service_env(base[name]), **service_env(svc)}
        settings = check_env(env, name)
        assert settings.nats_creds and settings.nats_tls_cert and settings.nats_tls_ca
        for var in SECURED_VARS & set(env):
            path = env[var]
            assert path.startswith("/run/secrets/"), f"{name}: {var}={path}"
            secret = path.removeprefix("/run/secrets/")
            assert secret in svc["secrets"] and secret in declared, f"{name}: {secret}"


def test_k8s_pods_mount_the_nats_secret_readably() -> None:
    """Every workload mounts the optional Secret kloudmeter-nats read-only where the
    ConfigMap's paths point, with fsGroup so that the non-root user can read it."""
    for name, workload in workloads().items():
        pod = workload["spec"]["template"]["spec"]
        ctx = pod["securityContext"]
        assert ctx["fsGroup"] == ctx["runAsGroup"], name
        (volume,) = [v for v in pod["volumes"] if v["name"] == "nats-auth"]
        assert volume["secret"]["secretName"] == "kloudmeter-nats", name
        assert volume["secret"]["optional"] is True, name
        assert volume["secret"]["defaultMode"] == 0o440, name
        for container in containers(workload):
            mounts = {m["name"]: m for m in container.get("volumeMounts", [])}
            assert mounts["nats-auth"]["mountPath"] == MOUNT, name
            assert mounts["nats-auth"]["readOnly"] is True, name


def test_k8s_configmap_documents_each_secured_setting_under_the_mount() -> None:
    """The ConfigMap's commented secured-NATS lines are real settings with paths in the mount,
    and uncommenting them gives an environment kloudmeter accepts (a creds file, not a seed)."""
    text = (K8S / "configmap.yaml").read_text()
    lines = dict(re.findall(r"^  # (NATS_[A-Z_]+): (\S+)$", text, re.M))
    assert set(lines) == SECURED_VARS
    assert all(path.startswith(MOUNT + "/") for path in lines.values())
    lines.pop("NATS_NKEY_SEED")
    check_env(lines, "configmap.yaml, uncommented")
