#!/usr/bin/env bash
# The end-to-end run: install if needed, retrain on flower_photos, serve with
# gunicorn on a free port, classify one image with curl, check the answer, stop.
#
#   ./test.sh                      # online: downloads flower_photos and ImageNet weights
#   FLOWERS_DIR=../shared/data/flower_photos ARCHITECTURE=efficientnet_lite0 \
#   WEIGHTS=../shared/models/efficientnet_lite0_imagenet ./test.sh   # offline
#
# Variables: FLOWERS_DIR (default: ~/flower_photos, downloaded when absent),
# ARCHITECTURE (inception_v3), WEIGHTS (imagenet), STEPS (4000), MODEL_OUT (where the model
# goes: ./model, where README's Serve section expects it), WORK (bottlenecks and logs: a temp
# dir, removed at the end unless given), PYTHON (python3; a .venv is made unless VIRTUAL_ENV or
# NO_VENV=1).
set -euo pipefail
cd "$(dirname "$0")"

if [ -z "${VIRTUAL_ENV:-}" ] && [ "${NO_VENV:-0}" != 1 ]; then
  if [ ! -x .venv/bin/python ]; then
    "${PYTHON:-python3}" -m venv .venv
  fi
  .venv/bin/python -c "import retrain, classify_server, tensorflow, flask, gunicorn" 2>/dev/null \
    || .venv/bin/pip install -q -e .
  PATH="$PWD/.venv/bin:$PATH"
fi

remove_work=
if [ -z "${WORK:-}" ]; then WORK=$(mktemp -d); remove_work=1; fi
MODEL_OUT=${MODEL_OUT:-$PWD/model}
FLOWERS_DIR=${FLOWERS_DIR:-}
ARCHITECTURE=${ARCHITECTURE:-inception_v3}
WEIGHTS=${WEIGHTS:-imagenet}
STEPS=${STEPS:-4000}
server_pid=

cleanup() {
  if [ -n "$server_pid" ]; then kill "$server_pid" 2>/dev/null || true; wait "$server_pid" 2>/dev/null || true; fi
  if [ -n "$remove_work" ]; then rm -rf "$WORK"; fi
}
trap cleanup EXIT

echo "== retrain ($ARCHITECTURE, weights $WEIGHTS) into $MODEL_OUT"
python -m retrain ${FLOWERS_DIR:+--image_dir "$FLOWERS_DIR"} --architecture "$ARCHITECTURE" \
  --weights "$WEIGHTS" --how_many_training_steps "$STEPS" \
  --output_dir "$MODEL_OUT" --bottleneck_dir "$WORK/bottlenecks" --summaries_dir "$WORK/summaries"

port=$(python -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
echo "== serve on 127.0.0.1:$port"
MODEL_DIR="$MODEL_OUT" WEB_CONCURRENCY=1 gunicorn classify_server:app -b "127.0.0.1:$port" \
  > "$WORK/gunicorn.log" 2>&1 &
server_pid=$!
for _ in $(seq 120); do
  curl -sf "127.0.0.1:$port/readyz" > /dev/null && break
  kill -0 "$server_pid" 2>/dev/null || { cat "$WORK/gunicorn.log"; echo "FAIL: server exited"; exit 1; }
  sleep 1
done
curl -sf "127.0.0.1:$port/readyz" > /dev/null || { cat "$WORK/gunicorn.log"; echo "FAIL: not ready"; exit 1; }
sed 's/^/   /' "$WORK/gunicorn.log"  # ends with the worker's "serving model ..." line

image=$(find "${FLOWERS_DIR:-$HOME/flower_photos}" -type f -iname '*.jpg' | sort | sed -n 1p)  # sed reads all: no SIGPIPE under pipefail
echo "== curl -F data=@$image 127.0.0.1:$port/"
answer=$(curl -sf -F "data=@$image" "127.0.0.1:$port/")
echo "$answer"
python - "$answer" "$MODEL_OUT/labels.txt" <<'PY'
import json, sys
answer, labels = json.loads(sys.argv[1]), open(sys.argv[2]).read().split("\n")
assert isinstance(answer, list) and answer, "answer is not a non-empty list"
assert all(len(p) == 2 and p[0] in labels and 0 <= p[1] <= 1 for p in answer), "bad [label, score] pairs"
assert [p[1] for p in answer] == sorted((p[1] for p in answer), reverse=True), "not sorted best first"
print(f"OK: best label {answer[0][0]!r} with score {answer[0][1]:.3f}")
PY
echo "== the model is in $MODEL_OUT (its training report: $MODEL_OUT/report.html). Serve it with:"
echo "   cd $PWD && MODEL_DIR=$MODEL_OUT $(command -v gunicorn) classify_server:app"
