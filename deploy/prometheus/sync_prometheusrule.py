#!/usr/bin/env python3
"""Keeps prometheusrule.yaml (for the Prometheus Operator) equal to rules/courier.rules.yml.

The rules file is the one that promtool checks and unit-tests; the PrometheusRule wraps the same groups.
`sync_prometheusrule.py` rewrites it; `sync_prometheusrule.py --check` fails if it is out of date.
"""

import sys
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
RULES = HERE / "rules" / "courier.rules.yml"
TARGET = HERE / "prometheusrule.yaml"
HEADER = (
    "# Generated from rules/courier.rules.yml by sync_prometheusrule.py; edit the rules file, not this.\n"
    "# yamllint disable rule:line-length\n"
)


def wanted():
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {
            "name": "courier",
            "labels": {"app.kubernetes.io/name": "courier", "app.kubernetes.io/part-of": "courier"},
        },
        "spec": {"groups": groups},
    }


class BlockDumper(yaml.SafeDumper):
    """Writes multi-line strings (PromQL, descriptions) as literal blocks, as a person would."""


def _string(dumper, value):
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


BlockDumper.add_representer(str, _string)


def render(document):
    return HEADER + yaml.dump(document, Dumper=BlockDumper, sort_keys=False, width=110, default_flow_style=False)


def main():
    if sys.argv[1:] == ["--check"]:
        current = yaml.safe_load(TARGET.read_text()) if TARGET.exists() else None
        if current != wanted():
            print(f"{TARGET.name} is out of date: run deploy/prometheus/sync_prometheusrule.py", file=sys.stderr)
            return 1
        return 0
    TARGET.write_text(render(wanted()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
