#!/usr/bin/env bash
# Several `gunicorn classify_server:app` instances on one host, behind Debian's nginx.
#
#   MODEL_DIR=model deploy/local_cluster.sh 2        # start 2 instances and nginx on 127.0.0.1:8080;
#                                                    # runs until Ctrl-C or SIGTERM, then stops them all
#   deploy/local_cluster.sh stop RUN_DIR             # the same, from another shell
#
# Each instance is a gunicorn master with its own workers on a free loopback port, in its own process
# group; nginx balances over them (least connections), takes an instance out for FAIL_TIMEOUT seconds
# after MAX_FAILS failed attempts (passive health checks: connection refused or reset, a timeout, a 502
# or 503) and sends the request to another instance instead. Every wait is bounded. Works as root (nginx
# workers then run as nobody) or as any user.
#
# Variables (all optional):
#   MODEL_DIR        the model folder or base folder of numbered versions (./model)
#   LISTEN_HOST, LISTEN_PORT   nginx's address (127.0.0.1, 8080)
#   PORTS            the instances' ports, space separated (default: free ones)
#   WEB_CONCURRENCY  gunicorn workers per instance (1); TF_INTRA_OP_THREADS defaults to
#                    cores / (instances x workers), so that the cluster uses every core once
#   MAX_UPLOAD_BYTES nginx's client_max_body_size, the same limit as the app's (10485760)
#   TIMEOUT          nginx's proxy timeouts and gunicorn's TIMEOUT (60)
#   MAX_FAILS, FAIL_TIMEOUT    the passive health checks (2, 10)
#   RUN_DIR          config, pid files and logs (a new folder under /tmp); kept after the stop
#   READY_TIMEOUT    seconds to wait for the instances to load the model (180)
#   STOP_TIMEOUT     seconds to wait for a graceful stop before SIGKILL (GRACEFUL_TIMEOUT + 5, so 35)
#   PYTHON           the interpreter with the package ($VIRTUAL_ENV, ./.venv or python3)
#   NGINX_BIN        the nginx binary (nginx on PATH, or /usr/sbin/nginx)
# Any other setting of docs/settings.md's table (THREADS, GRACEFUL_TIMEOUT, ...) passes through to every instance.
set -euo pipefail
set -m  # every background job in its own process group: an instance is stopped or killed as a whole

ROOT=$(cd "$(dirname "$0")/.." && pwd)

die() { echo "local_cluster: $*" >&2; exit 1; }

if [ "${1:-}" = stop ]; then
  dir=${2:?usage: $0 stop RUN_DIR}
  pid=$(cat "$dir/cluster.pid" 2>/dev/null) || die "no cluster.pid in $dir"
  running() {  # a zombie (exited, its parent has not collected it yet) is not running
    kill -0 "$1" 2>/dev/null || return 1
    local stat
    stat=$(sed 's/.*) //' "/proc/$1/stat" 2>/dev/null) || return 0
    [ "${stat%% *}" != Z ]
  }
  if ! running "$pid" || ! kill -TERM "$pid" 2>/dev/null; then
    echo "local_cluster: not running"
    exit 0
  fi
  for _ in $(seq $(( (${STOP_TIMEOUT:-35} + 15) * 5 ))); do
    running "$pid" || { echo "local_cluster: stopped"; exit 0; }
    sleep 0.2
  done
  die "pid $pid still running"
fi

N=${1:-}
case "$N" in
  '' | *[!0-9]* | 0) die "usage: $0 N (the number of instances, at least 1) | $0 stop RUN_DIR" ;;
esac

if [ -z "${PYTHON:-}" ]; then
  if [ -n "${VIRTUAL_ENV:-}" ]; then PYTHON=$VIRTUAL_ENV/bin/python
  elif [ -x "$ROOT/.venv/bin/python" ]; then PYTHON=$ROOT/.venv/bin/python
  else PYTHON=python3
  fi
fi
NGINX_BIN=${NGINX_BIN:-$(command -v nginx || echo /usr/sbin/nginx)}
[ -x "$NGINX_BIN" ] || die "no nginx (apt-get install nginx, or set NGINX_BIN)"
MODEL_DIR=$(cd "$ROOT" && realpath -m "${MODEL_DIR:-model}")
[ -d "$MODEL_DIR" ] || die "MODEL_DIR=$MODEL_DIR: no such folder (train one: python -m retrain)"
LISTEN_HOST=${LISTEN_HOST:-127.0.0.1}
LISTEN_PORT=${LISTEN_PORT:-8080}
MAX_UPLOAD_BYTES=${MAX_UPLOAD_BYTES:-10485760}
TIMEOUT=${TIMEOUT:-60}
MAX_FAILS=${MAX_FAILS:-2}
FAIL_TIMEOUT=${FAIL_TIMEOUT:-10}
READY_TIMEOUT=${READY_TIMEOUT:-180}
STOP_TIMEOUT=${STOP_TIMEOUT:-$(( ${GRACEFUL_TIMEOUT:-30} + 5 ))}
WORKERS=${WEB_CONCURRENCY:-1}
CORES=$(nproc)
THREADS_PER_WORKER=$(( CORES / (N * WORKERS) ))
export TF_INTRA_OP_THREADS=${TF_INTRA_OP_THREADS:-$(( THREADS_PER_WORKER > 0 ? THREADS_PER_WORKER : 1 ))}
export ACCESS_LOG=${ACCESS_LOG-}  # nginx logs every request, with the instance that answered it

RUN_DIR=${RUN_DIR:-$(mktemp -d /tmp/classify-cluster.XXXXXX)}
mkdir -p "$RUN_DIR/nginx"
RUN_DIR=$(cd "$RUN_DIR" && pwd)
chmod 755 "$RUN_DIR" "$RUN_DIR/nginx"  # nginx's workers (nobody, when started as root) use its temp folders
NGINX_TEMP=$RUN_DIR/nginx  # (or a folder of their own: below)
: > "$RUN_DIR/instances"
rm -f "$RUN_DIR/ready"

if [ -z "${PORTS:-}" ]; then  # free ports, all held at once so that they differ
  PORTS=$("$PYTHON" -c '
import socket, sys
socks = [socket.socket() for _ in range(int(sys.argv[1]))]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(" ".join(str(s.getsockname()[1]) for s in socks))' "$N")
fi
read -r -a ports <<< "$PORTS"
[ "${#ports[@]}" -eq "$N" ] || die "PORTS has ${#ports[@]} ports for $N instances"

pids=()
nginx_pid=
stopping=0

alive() { kill -0 "$1" 2>/dev/null; }

# shellcheck disable=SC2317  # run from the EXIT trap
# Wait until every pid in "$@" has exited, for at most $STOP_TIMEOUT seconds; 0 when they all did.
wait_gone() {
  local deadline=$(( SECONDS + STOP_TIMEOUT )) pid
  while [ "$SECONDS" -le "$deadline" ]; do
    for pid in "$@"; do alive "$pid" && break; pid=; done
    [ -z "$pid" ] && return 0
    sleep 0.2
  done
  return 1
}

# shellcheck disable=SC2317  # the EXIT trap
stop_all() {
  [ "$stopping" = 1 ] && return
  stopping=1
  trap '' INT TERM
  if [ -n "$nginx_pid" ] && alive "$nginx_pid"; then
    kill -QUIT "$nginx_pid" 2>/dev/null || true  # graceful: requests in flight are answered first
    wait_gone "$nginx_pid" || kill -KILL -- "-$nginx_pid" 2>/dev/null || true
  fi
  local pid
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done  # gunicorn's graceful stop
  if ! wait_gone "${pids[@]}"; then
    echo "local_cluster: an instance did not stop within ${STOP_TIMEOUT}s: SIGKILL" >&2
  fi
  for pid in "${pids[@]}" ${nginx_pid:+"$nginx_pid"}; do  # the groups: no worker outlives its master
    kill -KILL -- "-$pid" 2>/dev/null || true
  done
  wait 2>/dev/null || true
  rm -f "$RUN_DIR/ready" "$RUN_DIR/cluster.pid"
  [ "$NGINX_TEMP" = "$RUN_DIR/nginx" ] || rm -rf "$NGINX_TEMP"
  echo "local_cluster: stopped (logs in $RUN_DIR)" >&2
}
trap stop_all EXIT
# nginx's workers write request bodies over client_body_buffer_size (1 MB) to its temp folders: as root, if
# nobody cannot reach RUN_DIR (a parent closed to others, such as root's home or pytest's temp folder), every
# such upload would get a 500. The temp folders then go in a folder of their own under /tmp, removed at the stop.
if [ "$(id -u)" = 0 ] && ! runuser -u nobody -- test -x "$NGINX_TEMP" 2>/dev/null; then
  NGINX_TEMP=$(mktemp -d /tmp/classify-nginx.XXXXXX)
  chmod 755 "$NGINX_TEMP"
fi
trap 'exit 0' INT  # asked to stop: stop_all (the EXIT trap), and a clean exit
trap 'exit 0' TERM

# --- the instances ------------------------------------------------------------------------------------
for i in $(seq "$N"); do
  port=${ports[$((i - 1))]}
  dir=$RUN_DIR/instance-$i
  mkdir -p "$dir/metrics"
  # Own Prometheus files (gunicorn.conf.py clears them at start) and own control socket (gunicorn puts it
  # in $XDG_RUNTIME_DIR, else ~/.gunicorn, shared by every instance of the user).
  (cd "$ROOT" && MODEL_DIR=$MODEL_DIR WEB_CONCURRENCY=$WORKERS TIMEOUT=$TIMEOUT BIND=127.0.0.1:$port \
    PROMETHEUS_MULTIPROC_DIR=$dir/metrics XDG_RUNTIME_DIR=$dir TRUSTED_PROXIES=1 \
    exec "$PYTHON" -m gunicorn classify_server:app -c "$ROOT/gunicorn.conf.py" -b "127.0.0.1:$port" \
    > "$RUN_DIR/instance-$i.log" 2>&1) &
  pids+=("$!")
  echo "$i $port $!" >> "$RUN_DIR/instances"
done

http_ok() {  # http_ok URL: 0 when it answers 200 within 2 seconds
  "$PYTHON" -c '
import sys, urllib.request
try:
    sys.exit(0 if urllib.request.urlopen(sys.argv[1], timeout=2).status == 200 else 1)
except Exception:
    sys.exit(1)' "$1"
}

deadline=$(( SECONDS + READY_TIMEOUT ))
for i in $(seq "$N"); do
  port=${ports[$((i - 1))]}
  until http_ok "http://127.0.0.1:$port/readyz"; do
    if ! alive "${pids[$((i - 1))]}"; then
      tail -n 30 "$RUN_DIR/instance-$i.log" >&2
      die "instance $i (port $port) exited; its log: $RUN_DIR/instance-$i.log"
    fi
    [ "$SECONDS" -lt "$deadline" ] || die "instance $i (port $port) not ready after ${READY_TIMEOUT}s: $RUN_DIR/instance-$i.log"
    sleep 0.5
  done
done

# --- nginx ----------------------------------------------------------------------------------------------
user_line=
if [ "$(id -u)" = 0 ]; then
  user_line="user nobody $(id -gn nobody);"
fi
servers=
for port in "${ports[@]}"; do
  servers+="        server 127.0.0.1:$port max_fails=$MAX_FAILS fail_timeout=${FAIL_TIMEOUT}s;"$'\n'
done
cat > "$RUN_DIR/nginx.conf" <<EOF
# Generated by deploy/local_cluster.sh: $N instances of classify_server behind one address.
daemon off;
$user_line
worker_processes ${NGINX_WORKERS:-1};
pid $RUN_DIR/nginx/nginx.pid;
error_log $RUN_DIR/nginx-error.log warn;

events {
    worker_connections 1024;
}

http {
    log_format upstream '\$remote_addr [\$time_local] "\$request" \$status \$body_bytes_sent '
                        'rt=\$request_time upstream=\$upstream_addr status=\$upstream_status '
                        'ut=\$upstream_response_time id=\$req_id';
    access_log $RUN_DIR/nginx-access.log upstream;
    client_body_temp_path $NGINX_TEMP/client_body;
    proxy_temp_path $NGINX_TEMP/proxy;
    fastcgi_temp_path $NGINX_TEMP/fastcgi;
    uwsgi_temp_path $NGINX_TEMP/uwsgi;
    scgi_temp_path $NGINX_TEMP/scgi;
    server_tokens off;

    # The client's X-Request-Id, else nginx's own: the same id in nginx's log and the instance's.
    map \$http_x_request_id \$req_id {
        default \$http_x_request_id;
        ""      \$request_id;
    }

    upstream classify {
        least_conn;
$servers
        # Connections to the instances are kept open; closed by nginx before gunicorn's KEEPALIVE (5 s)
        # would, so that nginx never sends on a connection that gunicorn is closing.
        keepalive 16;
        keepalive_timeout 4s;
    }

    server {
        listen $LISTEN_HOST:$LISTEN_PORT;

        # The app's limit (MAX_UPLOAD_BYTES), on the whole body as the app counts it, answered the app's
        # way; nginx buffers the body before it picks an instance, so a slow upload holds no gunicorn thread.
        client_max_body_size $MAX_UPLOAD_BYTES;
        client_body_buffer_size 1m;
        # The instances' own limit on slow headers (HEADER_TIMEOUT); a body may pause this long between reads.
        client_header_timeout ${HEADER_TIMEOUT:-10}s;
        client_body_timeout ${HEADER_TIMEOUT:-10}s;
        error_page 413 = @too_large;

        proxy_http_version 1.1;
        proxy_set_header Connection "";
        proxy_set_header Host \$host;
        proxy_set_header X-Forwarded-For \$proxy_add_x_forwarded_for;
        proxy_set_header X-Forwarded-Proto \$scheme;
        proxy_set_header X-Request-Id \$req_id;
        proxy_connect_timeout 2s;
        proxy_send_timeout ${TIMEOUT}s;
        proxy_read_timeout ${TIMEOUT}s;

        # Passive health checks: an attempt that fails this way counts against the instance (MAX_FAILS in
        # FAIL_TIMEOUT takes it out for FAIL_TIMEOUT), and the request goes to the next instance.
        # non_idempotent: nginx by default never resends a POST that it had started to send, since a
        # POST may have had an effect. Classifying an image (POST /) has none, and the one POST that
        # writes, /feedback, stores an image under its content hash, so a second copy is the same file:
        # resending is safe, and without it every request in flight on an instance that dies would fail.
        # Not http_503: an instance answers 503 when its queue is full (MAX_QUEUE), and nginx would count
        # each as a failure, take every busy instance out and answer 502 to everyone (docs/reliability.md:
        # 342,044 of 342,238 answers under a crowd); the 503 and its Retry-After go to the client instead.
        proxy_next_upstream error timeout http_502 non_idempotent;
        proxy_next_upstream_timeout ${TIMEOUT}s;

        # Which instance answered (the last address, when nginx had to try several).
        add_header X-Upstream \$upstream_addr always;
        add_header X-Content-Type-Options nosniff always;  # also on nginx's and gunicorn's own error pages

        location / {
            proxy_pass http://classify;
        }

        # An instance with no model answers /readyz 503: that is its state, not a failure.
        location ~ ^/(healthz|readyz)\$ {
            proxy_next_upstream error timeout;
            proxy_pass http://classify;
        }

        location @too_large {
            default_type application/json;
            return 413 '{"error": "request body too large: the limit is $MAX_UPLOAD_BYTES bytes (MAX_UPLOAD_BYTES)", "code": "request_too_large"}';
        }
    }
}
EOF

nginx_args=(-p "$RUN_DIR/nginx/" -c "$RUN_DIR/nginx.conf" -e "$RUN_DIR/nginx-error.log")
# Without NGINX in the environment: nginx reads it as sockets inherited from an older nginx.
env -u NGINX "$NGINX_BIN" -t -q "${nginx_args[@]}" || die "nginx rejected $RUN_DIR/nginx.conf"
env -u NGINX "$NGINX_BIN" "${nginx_args[@]}" &
nginx_pid=$!
until http_ok "http://$LISTEN_HOST:$LISTEN_PORT/readyz"; do
  alive "$nginx_pid" || { tail -n 20 "$RUN_DIR/nginx-error.log" >&2; die "nginx exited"; }
  [ "$SECONDS" -lt "$deadline" ] || die "nginx not answering on $LISTEN_HOST:$LISTEN_PORT"
  sleep 0.2
done

echo $$ > "$RUN_DIR/cluster.pid"
echo "http://$LISTEN_HOST:$LISTEN_PORT/" > "$RUN_DIR/ready"
echo "local_cluster: ready at http://$LISTEN_HOST:$LISTEN_PORT/ -> $N instance(s) on 127.0.0.1 ports ${ports[*]}" \
  "($WORKERS worker(s) x $TF_INTRA_OP_THREADS TensorFlow thread(s) each); config and logs in $RUN_DIR;" \
  "Ctrl-C or \`$0 stop $RUN_DIR\` stops them all" >&2

# Until Ctrl-C or SIGTERM. An instance that dies is left dead (nginx routes around it); nginx dying ends all.
while alive "$nginx_pid"; do
  sleep 1 &
  wait $! || true
done
die "nginx exited: $RUN_DIR/nginx-error.log"
