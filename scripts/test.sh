#!/usr/bin/env bash
# The whole test suite: builds/starts what the tests need (a tansu Kafka
# broker on loopback), runs `cargo test`, and stops the broker again.
# Extra arguments go to `cargo test` (e.g. `scripts/test.sh --test topics`).
set -euo pipefail
cd "$(dirname "$0")/.."
# deploy/: manifests, alert rules and dashboard (tests/deploy.rs checks their metric names).
if [ $# -eq 0 ]; then scripts/deploy-check.sh; fi

export SWITCHYARD_KAFKA_PORT="${SWITCHYARD_KAFKA_PORT:-19092}"
export SWITCHYARD_KAFKA_DIR="${SWITCHYARD_KAFKA_DIR:-${TMPDIR:-/tmp}/switchyard-test-kafka}"
scripts/kafka-dev.sh install
SWITCHYARD_TEST_BROKERS="$(scripts/kafka-dev.sh start)"
export SWITCHYARD_TEST_BROKERS
trap 'scripts/kafka-dev.sh stop' EXIT

cargo test --workspace --locked "$@"
# Production images build without the vendor stand-ins; keep that build working.
if [ $# -eq 0 ]; then cargo build --locked --no-default-features --bin switchyard; fi
