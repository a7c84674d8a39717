"""The deployment files agree with each other and with the ClickHouse tables, without starting a container.

Compose and Grafana provisioning are YAML (these checks need PyYAML); the Dockerfile and dashboards are
checked always. Dashboard SQL is checked here statically against the sink's tables; every query runs on chDB,
over data, in tests/integration/test_dashboards.py.
"""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from ctxflow.sinks.clickhouse_ddl import TABLES as DDL_TABLES
from ctxflow.streams.report.grafana import drift

from tests.support_project import PACKAGES, ROOT

COMPOSE_DIR = ROOT / "compose"
PROVISIONING = COMPOSE_DIR / "grafana" / "provisioning"
DATASOURCE_UID = "ctxflow-clickhouse"
NO_YAML = "PyYAML is not installed (not a ctxflow dependency yet): compose/provisioning YAML cannot be parsed"

#: ClickHouse tables the dashboards may read, with their columns: the sink's own DDL (columns ClickHouse fills at
#: insert included), so a panel naming a column the tables lack fails here.
TABLES: dict[str, dict[str, str]] = {spec.name: dict((*spec.columns, *spec.server_columns)) for spec in DDL_TABLES}
#: SQL words the dashboards use that are neither functions (followed by "(") nor columns.
_KEYWORD = re.compile(
    r"select|from|where|and|or|not|as|group|by|order|limit|desc|asc|in|is|null|final|interval|second"
    r"|join|left|inner|full|outer|using|union|all|on|distinct|having|true|false|settings|over|partition|rows"
    r"|between|preceding|current|row",
    re.I,
)


def _dashboards() -> dict[str, dict[str, Any]]:
    return {p.name: json.loads(p.read_text()) for p in sorted((ROOT / "dashboards").glob("*.json"))}


def _panels(board: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in board["panels"]:
        yield from (panel.get("panels", []) if panel["type"] == "row" else [panel])


def _panel_queries() -> Iterator[tuple[str, str]]:
    for name, board in _dashboards().items():
        for panel in _panels(board):
            for target in panel["targets"]:
                yield f"{name}:{panel['title']}:{target['refId']}", target["rawSql"]


PANEL_QUERIES = dict(_panel_queries())


def _sql_names(sql: str) -> tuple[list[tuple[str, bool]], set[str]]:
    """(table references with whether each reads FINAL, identifiers used as columns) of one query."""
    text = re.sub(r"'(?:[^'\\]|\\.)*'", "''", sql).replace("`", "")
    text = re.sub(r"\$\{[^}]*\}|\$__\w+|\$\w+", " ", text)
    tables = [
        (t, bool(f))
        for t, f in re.findall(r"\b(?:FROM|JOIN)\s+(\w+)(?:\s+AS\s+\w+)?(\s+FINAL\b)?", text, re.I)
    ]
    aliases = set(re.findall(r"\bAS\s+(\w+)", text, re.I))
    names = {
        m[1]
        for m in re.finditer(r"(?<![\w$])([A-Za-z_]\w*)(?!\w)(?!\s*[(.])", text)
        if not _KEYWORD.fullmatch(m[1]) and m[1] not in aliases and m[1] not in TABLES
    }
    return tables, names


@pytest.mark.parametrize("query_id", sorted(PANEL_QUERIES))
def test_panel_sql_reads_known_columns_with_final_and_the_tenant_filter(query_id: str) -> None:
    sql = PANEL_QUERIES[query_id]
    tables, names = _sql_names(sql)
    assert tables and {t for t, _ in tables} <= TABLES.keys(), f"unknown table in {tables}"
    known = set().union(*(TABLES[t] for t, _ in tables))
    assert names <= known, f"columns not in {sorted({t for t, _ in tables})}: {sorted(names - known)}"
    final_setting = re.search(r"SETTINGS\s+final\s*=\s*1", sql, re.I)
    assert final_setting or all(final for _, final in tables), "ReplacingMergeTree read without FINAL"
    assert "${tenant:singlequote}" in sql, "panel ignores the tenant variable"


def test_dashboards_cover_budgets_runs_and_pipeline_with_a_tenant_variable() -> None:
    boards = _dashboards()
    titles = " | ".join(b["title"] for b in boards.values())
    for view in ("Tenant budgets", "Runs and cost", "Pipeline health"):
        assert view in titles
    assert len({b["uid"] for b in boards.values()}) == len(boards)
    for board in boards.values():
        assert board["schemaVersion"] >= 39
        (tenant,) = [v for v in board["templating"]["list"] if v["name"] == "tenant"]
        assert tenant["datasource"]["uid"] == DATASOURCE_UID and tenant["multi"] and tenant["includeAll"]
        tables, names = _sql_names(tenant["query"]["rawSql"])
        assert all(final for _, final in tables) and names <= TABLES["runs"].keys()


def test_every_panel_and_target_uses_the_provisioned_datasource() -> None:
    for name, board in _dashboards().items():
        for panel in _panels(board):
            for source in [panel["datasource"], *(t["datasource"] for t in panel["targets"])]:
                assert source == {"type": "grafana-clickhouse-datasource", "uid": DATASOURCE_UID}, name
            assert all(t["editorType"] == "sql" and t["rawSql"].strip() for t in panel["targets"])


def test_panels_fit_the_grid_without_overlapping() -> None:
    for name, board in _dashboards().items():
        taken: dict[tuple[int, int], str] = {}
        for panel in board["panels"]:
            pos = panel["gridPos"]
            assert pos["x"] + pos["w"] <= 24, f"{name}: {panel['title']} is wider than the grid"
            for cell in (
                (x, y)
                for x in range(pos["x"], pos["x"] + pos["w"])
                for y in range(pos["y"], pos["y"] + pos["h"])
            ):
                assert cell not in taken, f"{name}: {panel['title']} overlaps {taken[cell]}"
                taken[cell] = panel["title"]


def test_every_report_view_is_the_sql_of_its_dashboard_panel() -> None:
    assert drift(ROOT / "dashboards") == [], "run: python -m ctxflow.streams.report.grafana dashboards"


def test_dockerfile_installs_every_project_package_and_runs_ctxflow() -> None:
    dockerfile = (COMPOSE_DIR / "Dockerfile").read_text()
    assert re.search(r"^FROM python:3\.11-slim\b", dockerfile, re.M)
    assert re.search(r'^ENTRYPOINT \["ctxflow"\]$', dockerfile, re.M)
    copied = {src for line in re.findall(r"^COPY (.+)$", dockerfile, re.M) for src in line.split()[:-1]}
    assert all((ROOT / src).exists() for src in copied), copied
    assert all((ROOT / package / "__init__.py").exists() for package in PACKAGES), PACKAGES
    assert {"pyproject.toml", *PACKAGES} <= copied


def _interpolate(node: Any) -> Any:
    """Resolve ``${NAME:-default}`` the way compose does when NAME is unset; ``$$`` is a literal ``$``."""
    if isinstance(node, dict):
        return {k: _interpolate(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_interpolate(v) for v in node]
    if isinstance(node, str):
        assert not re.search(r"\$\{\w+\}", node), f"variable without a default: {node}"
        return re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", node).replace("$$", "$")
    return node


@pytest.fixture(scope="module")
def services() -> dict[str, Any]:
    yaml = pytest.importorskip("yaml", reason=NO_YAML)
    return _interpolate(yaml.safe_load((COMPOSE_DIR / "docker-compose.yml").read_text()))["services"]


@pytest.fixture(scope="module")
def provisioning() -> dict[str, Any]:
    yaml = pytest.importorskip("yaml", reason=NO_YAML)
    return {p.parent.name: yaml.safe_load(p.read_text()) for p in PROVISIONING.glob("*/*.yaml")}


def test_kafka_is_one_kraft_broker_and_controller(services: dict[str, Any]) -> None:
    kafka = services["kafka"]
    env = {k: str(v) for k, v in kafka["environment"].items()}
    assert kafka["image"].startswith("apache/kafka:")
    assert set(env["KAFKA_PROCESS_ROLES"].split(",")) == {"broker", "controller"}
    listeners = dict(item.split("://") for item in env["KAFKA_LISTENERS"].split(","))
    controller_port = listeners[env["KAFKA_CONTROLLER_LISTENER_NAMES"]].split(":")[-1]
    assert env["KAFKA_CONTROLLER_QUORUM_VOTERS"] == f"{env['KAFKA_NODE_ID']}@kafka:{controller_port}"
    assert "PLAINTEXT://kafka:9092" in env["KAFKA_ADVERTISED_LISTENERS"].split(",")
    protocols = dict(item.split(":") for item in env["KAFKA_LISTENER_SECURITY_PROTOCOL_MAP"].split(","))
    assert set(listeners) <= set(protocols)
    assert len(base64.urlsafe_b64decode(env["CLUSTER_ID"] + "==")) == 16
    assert env["KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR"] == "1"


def test_workers_and_init_reach_the_services_and_wait_for_them(services: dict[str, Any]) -> None:
    clickhouse = services["clickhouse"]["environment"]
    expected_env = {
        "CTXFLOW_BOOTSTRAP": "kafka:9092",
        "CTXFLOW_REDIS_URL": "redis://redis:6379/0",
        "CTXFLOW_CLICKHOUSE_DSN": f"http://{clickhouse['CLICKHOUSE_USER']}:{clickhouse['CLICKHOUSE_PASSWORD']}"
        "@clickhouse:8123/default",
    }
    assert expected_env["CTXFLOW_CLICKHOUSE_DSN"] == "http://ctxflow:ctxflow@clickhouse:8123/default"
    init, worker = services["ctxflow-init"], services["worker"]
    for service in (init, worker):
        assert expected_env.items() <= service["environment"].items()
        assert (COMPOSE_DIR / service["build"]["context"] / service["build"]["dockerfile"]).is_file()
    assert init["command"] == ["topics", "create"] and init["restart"] == "no"
    assert worker["command"] == ["worker"] and worker["deploy"]["replicas"] >= 2
    assert "container_name" not in worker and "ports" not in worker, "fixed names or ports block scaling"
    assert worker["depends_on"]["ctxflow-init"]["condition"] == "service_completed_successfully"
    for name, service in services.items():
        for dependency, rule in service.get("depends_on", {}).items():
            if rule["condition"] == "service_healthy":
                assert "healthcheck" in services[dependency], f"{name} waits on {dependency} health"
        assert name == "ctxflow-init" or "healthcheck" in service, f"{name} has no healthcheck"
    assert {"kafka", "redis", "clickhouse"} <= worker["depends_on"].keys()


def test_grafana_loads_the_plugin_datasource_and_dashboards(
    services: dict[str, Any], provisioning: dict[str, Any]
) -> None:
    grafana = services["grafana"]
    assert "grafana-clickhouse-datasource" in grafana["environment"]["GF_INSTALL_PLUGINS"]
    mounts = dict(volume.split(":")[:2] for volume in grafana["volumes"])
    assert mounts["./grafana/provisioning"] == "/etc/grafana/provisioning"
    (provider,) = provisioning["dashboards"]["providers"]
    assert mounts["../dashboards"] == provider["options"]["path"]
    home = Path(grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"])
    assert home.parent == Path(provider["options"]["path"]) and (ROOT / "dashboards" / home.name).is_file()
    (source,) = provisioning["datasources"]["datasources"]
    assert source["uid"] == DATASOURCE_UID and source["type"] == "grafana-clickhouse-datasource"
    clickhouse = services["clickhouse"]["environment"]
    assert source["jsonData"]["username"] == clickhouse["CLICKHOUSE_USER"]
    assert (source["jsonData"]["host"], source["jsonData"]["port"]) == ("clickhouse", 8123)
    assert source["secureJsonData"]["password"] == "$CLICKHOUSE_PASSWORD"
    assert grafana["environment"]["CLICKHOUSE_PASSWORD"] == clickhouse["CLICKHOUSE_PASSWORD"]


def test_summarizers_run_apart_from_the_workers(services: dict[str, Any]) -> None:
    summarizer = services["summarizer"]
    assert summarizer["command"] == ["summarizer"] and "container_name" not in summarizer
    assert summarizer["depends_on"]["ctxflow-init"]["condition"] == "service_completed_successfully"


def test_the_clickhouse_sink_runs_apart_from_the_workers(services: dict[str, Any]) -> None:
    sink, worker = services["sink"], services["worker"]
    assert sink["command"] == ["sink"] and "container_name" not in sink and "ports" not in sink
    assert worker["environment"]["CTXFLOW_SINK"] == "off", "the workers leave ClickHouse to the sink service"
    assert sink["environment"]["CTXFLOW_CLICKHOUSE_DSN"] == worker["environment"]["CTXFLOW_CLICKHOUSE_DSN"]
    assert sink["environment"].get("CTXFLOW_SINK", "auto") != "off"
    assert {"kafka", "clickhouse", "ctxflow-init"} <= sink["depends_on"].keys()
    assert "6067" in " ".join(sink["healthcheck"]["test"])  # the sink's own port (CTXFLOW_SINK_WEB_PORT)
