"""Deployment files: gunicorn runs with config/gunicorn.py, and only the web process gets
PROMETHEUS_MULTIPROC_DIR, on a tmpfs or an emptyDir.

A Celery worker must never run in prometheus_client's multiprocess mode: its metrics are counted in
its main process (jobs/metrics.py), every prefork child would leave files behind that nothing
folds, and with the directory missing every metric update raises, database connections included
(django-prometheus counts them).
"""

from __future__ import annotations

import json

from tests.test_deploy_files import (
    ENV_EXAMPLE,
    REPO,
    _pod,
    dockerfile_instructions,
    k8s_objects,
    k8s_of_kind,
    services,
)

VARIABLE = "PROMETHEUS_MULTIPROC_DIR"


def test_the_image_runs_gunicorn_with_the_project_config_and_sets_no_metrics_directory():
    instructions = dockerfile_instructions()
    (cmd,) = [json.loads(rest) for keyword, rest in instructions if keyword == "CMD"]
    config = cmd[cmd.index("--config") + 1]
    assert config == "/app/config/gunicorn.py"
    assert (REPO / config.removeprefix("/app/")).is_file()
    for keyword, rest in instructions:
        if keyword in {"ENV", "ARG"}:
            assert VARIABLE not in rest.upper(), "the worker, beat and Flower containers would inherit it"


def test_compose_gives_the_directory_to_web_alone_on_a_tmpfs():
    svc = services()
    path = svc["web"]["environment"][VARIABLE]
    assert any(entry.split(":")[0] == path for entry in svc["web"]["tmpfs"])
    for name, service in svc.items():
        if name != "web":
            assert VARIABLE not in (service.get("environment") or {}), name
    assert VARIABLE not in ENV_EXAMPLE.read_text(encoding="utf-8"), ".env is every app container's env_file"


def test_kubernetes_gives_the_directory_to_web_alone_on_an_emptydir():
    for obj in k8s_objects():
        if obj.get("kind") == "ConfigMap":
            assert VARIABLE not in obj.get("data", {}), obj["metadata"]["name"]
    for name, deployment in k8s_of_kind("Deployment").items():
        pod = _pod(deployment)
        for container in pod["containers"]:
            env = {item["name"]: item.get("value") for item in container.get("env", [])}
            if name != "web":
                assert VARIABLE not in env, name
                continue
            mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
            volumes = {v["name"]: v for v in pod["volumes"]}
            assert "emptyDir" in volumes[mounts[env[VARIABLE]]], "web: the metrics directory must be an emptyDir"
