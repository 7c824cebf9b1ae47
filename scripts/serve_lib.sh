# Sourced by the serving benchmarks: start `mtad-trt serve` in the background and wait for /health,
# stop it. Needs ENGINES, OUT and PORT set. A port that already answers is refused: an old server
# left running would otherwise be measured in place of the new one.

start_server() {  # name, serve flags...  -> sets SERVER_PID, writes OUT/name.server.log and .memory.txt
  local name=$1; shift
  if curl -sf "http://127.0.0.1:$PORT/health" > /dev/null; then
    echo "error: something already serves on port $PORT (stop it, or set PORT)" >&2
    exit 1
  fi
  mtad-trt serve "$ENGINES" --port "$PORT" "$@" > "$OUT/$name.server.log" 2>&1 &
  SERVER_PID=$!
  trap 'kill $SERVER_PID 2>/dev/null || true' EXIT
  local t0=$SECONDS
  until curl -sf "http://127.0.0.1:$PORT/health" > /dev/null; do
    kill -0 $SERVER_PID 2>/dev/null || { cat "$OUT/$name.server.log"; exit 1; }
    sleep 1
  done
  echo "$name: up in $((SECONDS - t0)) s, VmRSS $(ps -o rss= -p $SERVER_PID) KiB" | tee "$OUT/$name.memory.txt"
}

stop_server() {  # name
  echo "$1: VmRSS after the runs $(ps -o rss= -p $SERVER_PID) KiB" | tee -a "$OUT/$1.memory.txt"
  kill $SERVER_PID; wait $SERVER_PID 2>/dev/null || true
  trap - EXIT
}
