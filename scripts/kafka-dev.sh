#!/usr/bin/env bash
# Installs and runs a local Kafka-protocol broker (tansu, SQLite storage) for
# tests and local runs on machines without Docker.
#
#   scripts/kafka-dev.sh install   build tansu once into the cache (≈12 min on 2 cores)
#   scripts/kafka-dev.sh start     start a broker in a fresh data dir; prints its bootstrap address
#   scripts/kafka-dev.sh stop      stop it (SIGTERM, then SIGKILL)
#   scripts/kafka-dev.sh kill      SIGKILL it (data survives: used by crash tests)
#   scripts/kafka-dev.sh restart   start again on the same port and data dir
#   scripts/kafka-dev.sh status    exit 0 when it answers on its port
#
# The install is cached outside the repo (SWITCHYARD_CACHE, default
# ~/.cache/switchyard) so reruns are instant, but nothing depends on the cache
# existing: a missing binary is built.
set -euo pipefail

TANSU_VERSION=0.6.0
CACHE="${SWITCHYARD_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/switchyard}"
TANSU_ROOT="$CACHE/tansu-$TANSU_VERSION"
TANSU_BIN="$TANSU_ROOT/bin/tansu"
RUN_DIR="${SWITCHYARD_KAFKA_DIR:-${TMPDIR:-/tmp}/switchyard-kafka}"
PORT="${SWITCHYARD_KAFKA_PORT:-19092}"
# What the broker tells clients to connect to: itself, unless something
# fronts it (the TLS test puts a TLS terminator there).
ADVERTISED="${SWITCHYARD_KAFKA_ADVERTISED:-127.0.0.1:$PORT}"
# How often tansu runs retention, compaction and its other SQLite upkeep. Each
# run scans every stored record while holding the write lock, so produce
# acknowledgements stall for seconds once the database is large. Tests keep it
# short so that upkeep happens while they run; throughput measurements should
# use tansu's own default of 10 minutes (docs/operations.md, "For
# development and tests").
MAINTENANCE="${SWITCHYARD_TANSU_MAINTENANCE:-5s}"

log() { echo "kafka-dev: $*" >&2; }

install() {
  if [ -x "$TANSU_BIN" ]; then
    return 0
  fi
  log "building tansu $TANSU_VERSION into $TANSU_ROOT (one time, about 12 minutes on 2 cores)"
  mkdir -p "$CACHE"
  # Build in a private target dir so a half-finished build never leaves a broken binary in place.
  local target="$CACHE/tansu-build"
  CARGO_TARGET_DIR="$target" cargo install "tansu@$TANSU_VERSION" --locked \
    --no-default-features --features libsql --root "$TANSU_ROOT" >&2
  rm -rf "$target"
  [ -x "$TANSU_BIN" ] || { log "tansu build finished but $TANSU_BIN is missing"; exit 1; }
}

pid_alive() { [ -f "$RUN_DIR/tansu.pid" ] && kill -0 "$(cat "$RUN_DIR/tansu.pid")" 2>/dev/null; }

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null; }

wait_ready() {
  for _ in $(seq 1 150); do
    if port_open; then return 0; fi
    if ! pid_alive; then
      log "tansu exited during start-up; last log lines:"
      tail -n 20 "$RUN_DIR/tansu.log" >&2 || true
      exit 1
    fi
    sleep 0.2
  done
  log "tansu did not open 127.0.0.1:$PORT within 30 s"
  exit 1
}

launch() {
  # tansu resolves the SQLite path against its working directory, so run it from inside the data dir.
  (
    cd "$RUN_DIR/data"
    nohup "$TANSU_BIN" broker \
      --listener-url "tcp://127.0.0.1:$PORT" \
      --advertised-listener-url "tcp://$ADVERTISED" \
      --storage-engine "sqlite://tansu.db?maintenance_interval=$MAINTENANCE" \
      >>"$RUN_DIR/tansu.log" 2>&1 &
    echo $! >"$RUN_DIR/tansu.pid"
  )
  wait_ready
  echo "127.0.0.1:$PORT"
}

start() {
  install
  if pid_alive; then
    log "already running (pid $(cat "$RUN_DIR/tansu.pid"))"
    echo "127.0.0.1:$PORT"
    return 0
  fi
  if port_open; then
    log "port $PORT is taken by another process; set SWITCHYARD_KAFKA_PORT"
    exit 1
  fi
  rm -rf "$RUN_DIR"
  mkdir -p "$RUN_DIR/data"
  launch
}

restart() {
  [ -d "$RUN_DIR/data" ] || { log "no data dir at $RUN_DIR; use start"; exit 1; }
  pid_alive && { log "already running"; echo "127.0.0.1:$PORT"; return 0; }
  launch
}

stop() {
  pid_alive || { rm -f "$RUN_DIR/tansu.pid"; return 0; }
  local pid; pid=$(cat "$RUN_DIR/tansu.pid")
  kill "$pid" 2>/dev/null || true
  for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  kill -9 "$pid" 2>/dev/null || true
  rm -f "$RUN_DIR/tansu.pid"
}

crash() {
  pid_alive || return 0
  kill -9 "$(cat "$RUN_DIR/tansu.pid")"
  rm -f "$RUN_DIR/tansu.pid"
}

case "${1:-}" in
  install) install ;;
  start) start ;;
  stop) stop ;;
  kill) crash ;;
  restart) restart ;;
  status) port_open ;;
  bin) install; echo "$TANSU_BIN" ;;
  *) echo "usage: $0 install|start|stop|kill|restart|status|bin" >&2; exit 2 ;;
esac
