"""deploy/: what can be checked without Docker, systemd, Prometheus or Grafana.

The dashboard queries only metrics the running service exports; the Prometheus and compose files
parse and point at each other; the example config validates; every command the images and the
unit run is a real `elit-stream` console-script invocation that the CLI parser accepts; every
file the Dockerfiles copy exists. (Building and running the images is not tested: see
deploy/README.md, "What was not run".)
"""
from __future__ import annotations

import configparser
import json
import re
import shlex
import urllib.request
from pathlib import Path

import pytest
import tomllib

from elit_stream.protocol.auth import create_keys
from elit_stream.tools.cli import build_parser
from elit_stream.service.config import ServiceConfig, exposed_addresses, load_config
from elit_stream.tools.launcher import ServiceProcess

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "elit-stream.json"
DOCKERFILES = [DEPLOY / "Dockerfile.gpu", DEPLOY / "Dockerfile.cpu"]


def load_yaml(path: Path):
    yaml = pytest.importorskip("yaml", reason="PyYAML not installed (add it to the test extra)")

    class Loader(yaml.SafeLoader):
        pass
    Loader.add_constructor("!reset", lambda loader, node: None)   # compose's override tag
    return yaml.load(path.read_text(), Loader=Loader)


@pytest.fixture(scope="module")
def exported_metric_names(tiny_artifact) -> set[str]:
    """Every series name the real service exposes on /metrics (incl. histogram suffixes)."""
    with ServiceProcess(["--model", str(tiny_artifact), "--threads", "1"]) as sp:
        text = urllib.request.urlopen(sp.endpoints["metrics"], timeout=10).read().decode()
    names = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split()
            names |= {name} | ({f"{name}_bucket", f"{name}_sum", f"{name}_count"}
                               if kind == "histogram" else set())
        elif line and not line.startswith("#"):
            names.add(re.split(r"[{ ]", line, maxsplit=1)[0])
    return names


def dashboard_exprs() -> list[str]:
    dash = json.loads(DASHBOARD.read_text())
    return [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]


def test_dashboard_queries_only_metrics_the_service_exports(exported_metric_names):
    exprs = dashboard_exprs()
    used = {m for e in exprs for m in re.findall(r"\belit_[a-z_]+", e)}
    assert len(exprs) >= 15 and used
    assert sorted(used - exported_metric_names) == []
    must_show = {"elit_stage_seconds_bucket", "elit_frames_processed_total",
                 "elit_frames_dropped_total", "elit_frames_rejected_total", "elit_active_members",
                 "elit_mean_uncertainty", "elit_drift_advisories_total"}
    assert must_show <= used


def test_dashboard_uses_the_provisioned_datasource():
    uid = load_yaml(DEPLOY / "grafana/provisioning/datasources/prometheus.yml")[
        "datasources"][0]["uid"]
    dash = json.loads(DASHBOARD.read_text())
    assert dash["uid"] and [p["id"] for p in dash["panels"]] == \
        list(range(1, len(dash["panels"]) + 1))
    for p in dash["panels"]:
        assert p["datasource"]["uid"] == uid and all(t["datasource"]["uid"] == uid
                                                     for t in p["targets"])
    provider = load_yaml(DEPLOY / "grafana/provisioning/dashboards/elit-stream.yml")
    compose = load_yaml(DEPLOY / "docker-compose.yml")
    mounts = compose["services"]["grafana"]["volumes"]
    assert f"./grafana/dashboards:{provider['providers'][0]['options']['path']}:ro" in mounts


def test_prometheus_scrapes_the_compose_service_on_the_default_metrics_port():
    prom = load_yaml(DEPLOY / "prometheus" / "prometheus.yml")
    compose = load_yaml(DEPLOY / "docker-compose.yml")
    (job,) = prom["scrape_configs"]
    (target,) = job["static_configs"][0]["targets"]
    host, port = target.split(":")
    assert host in compose["services"] and int(port) == ServiceConfig().metrics.port
    assert job.get("metrics_path", "/metrics") == "/metrics"


def test_compose_mounts_files_that_exist_and_builds_a_dockerfile_that_exists():
    compose = load_yaml(DEPLOY / "docker-compose.yml")
    assert {"elit-stream", "prometheus", "grafana"} <= set(compose["services"])
    svc = compose["services"]["elit-stream"]
    dockerfile = re.sub(r"\$\{\w+:-([^}]+)\}", r"\1", svc["build"]["dockerfile"])
    assert (DEPLOY / svc["build"]["context"] / dockerfile).resolve() in \
        [d.resolve() for d in DOCKERFILES]
    assert svc["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
    for name in ("prometheus", "grafana"):
        for vol in compose["services"][name]["volumes"]:
            src = vol.split(":")[0]
            if src.startswith("./"):
                assert (DEPLOY / src).exists(), vol
    cpu = load_yaml(DEPLOY / "docker-compose.cpu.yml")
    assert cpu["services"]["elit-stream"]["deploy"] is None          # !reset


def test_example_config_validates_and_exposes_nothing_unauthenticated(tmp_path, monkeypatch):
    for key in [k for k in __import__("os").environ if k.startswith("ELIT_")]:
        monkeypatch.delenv(key)
    example = DEPLOY / "elit-stream.example.toml"
    ServiceConfig.model_validate(tomllib.loads(example.read_text()))
    create_keys(tmp_path, ["healthcheck"])
    cfg = load_config(example, {"auth.keys_dir": str(tmp_path)})     # the keys must exist
    assert cfg.auth.required() == {"ingest", "results", "control"}
    assert exposed_addresses(cfg) and exposed_addresses(cfg, unauthenticated_only=True) == []
    assert str(cfg.model.path).startswith("/opt/elit-stream/models/")


def _dockerfile_commands(path: Path) -> tuple[list[list[str]], dict[str, str]]:
    text = path.read_text().replace("\\\n", " ")
    env = {}
    for m in re.finditer(r"^ENV (.+)$", text, re.M):
        env.update(dict(kv.split("=", 1) for kv in shlex.split(m.group(1))))
    cmds = []
    for m in re.finditer(r"^(?:CMD|HEALTHCHECK .*?CMD) (\[.*\])\s*$", text, re.M):
        argv = json.loads(m.group(1))
        if argv[:2] == ["sh", "-c"]:
            argv = shlex.split(re.sub(r"\$(\w+)", lambda v: env.get(v.group(1), ""),
                                      argv[2].split(">")[0]))
        cmds.append(argv)
    return cmds, env


def _check_cli(argv: list[str]) -> None:
    assert Path(argv[0]).name == "elit-stream", argv
    args = build_parser().parse_args(argv[1:])        # SystemExit if the CLI rejects them
    assert args.func is not None


def test_the_commands_the_images_and_the_unit_run_exist():
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["elit-stream"] == "elit_stream.tools.cli:main"
    for dockerfile in DOCKERFILES:
        cmds, env = _dockerfile_commands(dockerfile)
        assert len(cmds) == 2, dockerfile                       # CMD and HEALTHCHECK
        for argv in cmds:
            _check_cli(argv)
        assert any(a[1] == "serve" for a in cmds) and any(a[1:3] == ["ctl", "ping"]
                                                          for a in cmds)
        assert re.search(r"^USER 10001", dockerfile.read_text(), re.M)   # not root
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.read(DEPLOY / "systemd" / "elit-stream.service")
    _check_cli(shlex.split(unit["Service"]["ExecStart"]))
    assert unit["Service"]["User"] not in ("", "root")


def test_every_file_the_images_copy_exists_and_is_in_the_build_context():
    ignore = (REPO / ".dockerignore").read_text().splitlines()
    allowed = [line[1:].rstrip("/") for line in ignore if line.startswith("!")]
    for dockerfile in DOCKERFILES:
        for m in re.finditer(r"^COPY (\S+) ", dockerfile.read_text(), re.M):
            src = m.group(1)
            assert (REPO / src).exists(), f"{dockerfile.name}: COPY {src}"
            assert any(src == a or src.startswith(a + "/") for a in allowed), src
    assert "gpu" in tomllib.loads((REPO / "pyproject.toml").read_text())["project"][
        "optional-dependencies"]
    assert "'.[gpu]'" in (DEPLOY / "Dockerfile.gpu").read_text()


def test_the_ray_cluster_example_has_gpu_workers_and_an_image_that_can_be_built():
    """deploy/ray (docs/cluster.md): a KubeRay RayCluster whose workers take one GPU each, the
    head none; the image's Ray version is the manifest's; what it copies is in the context."""
    cluster = load_yaml(DEPLOY / "ray" / "raycluster.yaml")
    assert cluster["kind"] == "RayCluster"
    assert cluster["spec"]["headGroupSpec"]["rayStartParams"]["num-gpus"] == "0"
    (workers,) = cluster["spec"]["workerGroupSpecs"]
    limits = workers["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert limits["nvidia.com/gpu"] == "1" and workers["rayStartParams"]["num-gpus"] == "1"
    dockerfile = (DEPLOY / "ray" / "Dockerfile").read_text()
    assert f"ray[default]=={cluster['spec']['rayVersion']}" in dockerfile
    assert "cluster" in tomllib.loads((REPO / "pyproject.toml").read_text())["project"][
        "optional-dependencies"]
    ignore = (REPO / ".dockerignore").read_text().splitlines()
    allowed = [line[1:].rstrip("/") for line in ignore if line.startswith("!")]
    for src in re.findall(r"^COPY (\S+) ", dockerfile, re.M):
        assert (REPO / src).exists() and any(src == a or src.startswith(a + "/") for a in allowed), src
