"""Check the PromQL in rendered manifests: every PrometheusRule expr and every query of a Grafana dashboard ConfigMap.

    python k8s/promql.py RENDERED.yaml...

Neither the API server nor the PrometheusRule's schema looks inside an expr (a string), and Grafana ships a dashboard
whatever its queries say: a typo there shows up as an alert that never fires or an empty panel. For each query this
  1. parses it with promql-parser (requirements/lint.txt; a Rust port of Prometheus' parser, GreptimeTeam's, that
     also checks function names, argument types such as rate() of a range, and label regexes), after replacing
     Grafana's range variables ($__rate_interval, $__interval, $__range) by 5m: any other `$` outside a string is
     an error;
  2. compares the metric names of the parsed query with metric_names(), the plain-text reading that
     tests/test_k8s_monitoring.py uses (it runs without promql-parser) to check every name against those vLLM and the
     gate define, so that reading is checked on exactly these queries.
A dashboard is a ConfigMap labelled grafana_dashboard (the Grafana Helm chart's sidecar convention) whose every value
must be a JSON dashboard with a query in each panel. Needs PyYAML (and promql-parser for the check itself).
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import yaml

DASHBOARD_LABEL = "grafana_dashboard"
GRAFANA_RANGES = re.compile(r"\$(?:__(?:rate_interval|interval|range)\b|\{__(?:rate_interval|interval|range)\})")
LABEL_VALUES = re.compile(r"^\s*label_values\((?P<expr>.*),\s*[A-Za-z_][A-Za-z0-9_]*\s*\)\s*$", re.S)
KEYWORDS = {
    "and",
    "or",
    "unless",
    "atan2",
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "bool",
    "offset",
    "start",
    "end",
    "inf",
    "nan",
}


def dashboards(objects: list[dict]) -> list[tuple[str, dict]]:
    """(where, dashboard) of every JSON value of every ConfigMap labelled grafana_dashboard; ValueError if not JSON."""
    out = []
    for obj in objects:
        if obj.get("kind") != "ConfigMap" or DASHBOARD_LABEL not in obj["metadata"].get("labels", {}):
            continue
        for key, text in obj.get("data", {}).items():
            where = f"ConfigMap/{obj['metadata']['name']} {key}"
            try:
                out.append((where, json.loads(text)))
            except ValueError as exc:
                raise ValueError(f"{where}: not JSON: {exc}") from None
    return out


def panels(dashboard: dict) -> list[dict]:
    """Every panel of a dashboard, those inside rows included."""
    out = []
    for panel in dashboard.get("panels", []):
        out.append(panel)
        out += panels(panel)  # a row holds its collapsed panels in "panels"
    return out


def queries(objects: list[dict]) -> list[tuple[str, str]]:
    """(where, PromQL) of every rule of every PrometheusRule, and of every panel target and query variable of every
    dashboard (label_values(QUERY, LABEL) as QUERY), Grafana's range variables as they are."""
    out = []
    for obj in objects:
        if obj.get("kind") != "PrometheusRule":
            continue
        for group in obj["spec"].get("groups", []):
            for rule in group.get("rules", []):
                name = rule.get("alert") or rule.get("record")
                out.append((f"PrometheusRule/{obj['metadata']['name']} {group['name']}/{name}", str(rule["expr"])))
    for where, dashboard in dashboards(objects):
        for panel in panels(dashboard):
            for target in panel.get("targets", []):
                out.append((f"{where} panel {panel.get('title')!r} {target.get('refId')}", target.get("expr", "")))
        for variable in dashboard.get("templating", {}).get("list", []):
            if variable.get("type") == "query":
                query = variable["query"]
                query = query.get("query", "") if isinstance(query, dict) else query
                match = LABEL_VALUES.match(query)
                out.append((f"{where} variable {variable['name']}", match["expr"] if match else query))
    return out


def without_grafana_variables(expr: str) -> str:
    return GRAFANA_RANGES.sub("5m", expr)


def metric_names(expr: str) -> set[str]:
    """The metric names a query selects, read as text: what is left once strings, {label matchers}, [ranges] and the
    label lists of by/without/on/ignoring/group_* are taken out, less function names (followed by a parenthesis),
    keywords and numbers. A {__name__=...} selector is not read (k8s/ uses none; the parse check would catch it)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`', '""', expr)
    text = re.sub(r"\{[^}]*\}", " ", text)
    text = re.sub(r"\[[^\]]*\]", " ", text)
    text = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    names = re.findall(r"(?<![\w:.])([A-Za-z_:][\w:]*)(?![\w:])(?!\s*\()", text)
    return {n for n in names if n.lower() not in KEYWORDS}


def check(objects: list[dict]) -> list[str]:
    """Errors of every query in the objects: not PromQL, or metric names that metric_names() reads otherwise."""
    import promql_parser  # noqa: PLC0415 - only the lint environment has it

    errors = []
    try:
        found = queries(objects)
    except ValueError as exc:  # a dashboard that is not JSON
        return [str(exc)]
    for where, dashboard in dashboards(objects):
        errors += [
            f"{where}: panel {p.get('title')!r} has no query"
            for p in panels(dashboard)
            if p.get("type") != "row" and not [t for t in p.get("targets", []) if t.get("expr")]
        ]
    for where, expr in found:
        try:
            ast = promql_parser.parse(without_grafana_variables(expr))
        except ValueError as exc:
            errors.append(f"{where}: not PromQL ({exc}): {expr}")
            continue
        parsed: set[str] = set()

        def visit(node, parsed=parsed):
            if isinstance(node, promql_parser.VectorSelector):
                parsed.add(node.name)

        promql_parser.walk(ast, visit)
        if parsed != metric_names(expr):
            errors.append(f"{where}: metric_names() reads {sorted(metric_names(expr))}, the parser {sorted(parsed)}")
    return errors


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
        return 2
    errors, checked = [], 0
    for path in argv:
        objects = [o for o in yaml.safe_load_all(Path(path).read_text()) if o]
        errors += [f"{path}: {e}" for e in check(objects)]
        checked += len(queries(objects))
    for error in errors:
        print(f"promql.py: {error}", file=sys.stderr)
    if not errors:
        print(f"promql.py: {checked} PromQL queries parse (rules and dashboards)")
    return 1 if errors else 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
