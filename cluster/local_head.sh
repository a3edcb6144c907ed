#!/usr/bin/env bash
# A one-node Ray head on 127.0.0.1 with the job server, for `ray job submit` on this machine.
#
#   cluster/local_head.sh start    start it (nothing to do when it runs), then print the env lines to export
#   cluster/local_head.sh env      print them again:  eval "$(cluster/local_head.sh env)"
#   cluster/local_head.sh status   running or not, the sockets it listens on, `ray status`
#   cluster/local_head.sh stop     stop this head and nothing else (no plain `ray stop`, which stops every
#                                  Ray process of the user)
#
# Settings (environment): MAGICLENS_HEAD_PORT (GCS, 6379), MAGICLENS_DASHBOARD_PORT (dashboard and job server,
# 8265), MAGICLENS_CLIENT_PORT (Ray Client server, 10001), MAGICLENS_AGENT_PORT (the dashboard agent's HTTP
# port, through which the job server starts jobs; default a free one, as Ray's fixed 52365 is often held by
# another Ray on the machine, and then no job can be submitted), MAGICLENS_HEAD_CPUS (logical CPUs, default: Ray's
# count), MAGICLENS_HEAD_DIR (Ray's temp dir, /tmp/magiclens-head-<port>), MAGICLENS_RAY (the `ray` program,
# default .venv/bin/ray), MAGICLENS_START_TIMEOUT_S (seconds start waits for the dashboard, then for the job
# server and its agent, 60 each; raise it on a loaded machine), MAGICLENS_STOP_GRACE_S (seconds stop waits
# before SIGKILL, 9), RAY_AUTH_MODE (token or disabled; unset: token when the token file exists, as
# `ray start` itself decides).
#
# Loopback only: `--node-ip-address 127.0.0.1` alone is not enough, as Ray replaces a loopback node address by
# the machine's outward one (and binds its gRPC servers there) unless RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0,
# which makes Ray keep 127.0.0.1 for a single-node cluster; `start` checks every socket the head listens on.
# Which processes are this head's: `ray start` runs in a session of its own (setsid), so every process it
# starts shares one process group, recorded in HEAD_DIR/head.pgid; `stop` signals that group and the processes
# descending from it (job drivers run in sessions of their own), checked against HEAD_DIR first.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PORT=${MAGICLENS_HEAD_PORT:-6379}
DASHBOARD_PORT=${MAGICLENS_DASHBOARD_PORT:-8265}
CLIENT_PORT=${MAGICLENS_CLIENT_PORT:-10001}
HEAD_DIR=${MAGICLENS_HEAD_DIR:-/tmp/magiclens-head-$PORT}
GRACE_S=${MAGICLENS_STOP_GRACE_S:-9}
START_TIMEOUT_S=${MAGICLENS_START_TIMEOUT_S:-60}
# Ray's own wait for its dashboard (60 s unless RAY_DASHBOARD_STARTUP_TIMEOUT_S says otherwise)
DASHBOARD_TIMEOUT_S=${RAY_DASHBOARD_STARTUP_TIMEOUT_S:-$START_TIMEOUT_S}
TOKEN_FILE=${RAY_AUTH_TOKEN_PATH:-$HOME/.ray/auth_token}
PGID_FILE=$HEAD_DIR/head.pgid
MODE_FILE=$HEAD_DIR/auth_mode
if [[ -n ${MAGICLENS_RAY:-} ]]; then
    RAY_BIN=$MAGICLENS_RAY
elif [[ -x $ROOT/.venv/bin/ray ]]; then
    RAY_BIN=$ROOT/.venv/bin/ray
else
    RAY_BIN=$(command -v ray || true)
fi

die() { echo "local_head: $*" >&2; exit 1; }

# The pids of this head: its process group and every process descending from it, zombies left out.
head_pids() {
    [[ -f $PGID_FILE ]] || return 0
    local pgid
    pgid=$(<"$PGID_FILE")
    ps -eo pid=,ppid=,pgid=,stat= | awk -v group="$pgid" '
        $4 !~ /^Z/ { parent[$1] = $2; if ($3 == group) mine[$1] = 1 }
        END {
            do { grew = 0; for (pid in parent) if (!(pid in mine) && (parent[pid] in mine)) { mine[pid] = 1; grew = 1 } } while (grew)
            for (pid in mine) print pid
        }'
}

# True when the recorded group is alive and still this head's (a group id can be reused once it is gone).
running() {
    local pid
    for pid in $(head_pids); do
        if tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -q "gcs_server .*$HEAD_DIR/"; then
            return 0
        fi
    done
    return 1
}

print_env() {
    echo "export RAY_ADDRESS=http://127.0.0.1:$DASHBOARD_PORT"
    if [[ $(cat "$MODE_FILE" 2>/dev/null) == token ]]; then
        echo "export RAY_AUTH_MODE=token"
    else
        echo "unset RAY_AUTH_MODE"
    fi
}

# Listening TCP sockets of this head's processes, as `ss -ltnpH` prints them.
listeners() {
    local pids
    pids=$(head_pids | paste -sd'|')
    [[ -n $pids ]] || return 0
    ss -ltnpH | grep -E "pid=($pids)," || true
}

# True when the job server answers /api/version (with the token, in token mode; given on stdin, not in `ps`).
job_server_answers() {
    local header=""
    [[ $(cat "$MODE_FILE") == token ]] && header="Authorization: Bearer ${RAY_AUTH_TOKEN:-$(cat "$TOKEN_FILE" 2>/dev/null)}"
    printf '%s\n' "$header" | curl -sf -H @- "http://127.0.0.1:$DASHBOARD_PORT/api/version" >/dev/null
}

port_in_use() {
    ss -ltnH "sport = :$1" | grep -q .
}

# Record the process group of this head's GCS in PGID_FILE; false when no GCS of HEAD_DIR runs.
record_group() {
    local gcs
    gcs=$(pgrep -f "gcs_server .*$HEAD_DIR/" | head -n1 || true)
    [[ -n $gcs ]] || return 1
    ps -o pgid= -p "$gcs" | tr -d ' ' >"$PGID_FILE"
}

free_port() {
    local python
    python=$(dirname "$RAY_BIN")/python
    [[ -x $python ]] || python=python3
    "$python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

start() {
    if running; then
        echo "local_head: already running (GCS 127.0.0.1:$PORT, job server http://127.0.0.1:$DASHBOARD_PORT, $HEAD_DIR)" >&2
        print_env
        return 0
    fi
    [[ -x $RAY_BIN ]] || die "no ray program (make install, or set MAGICLENS_RAY)"
    local port agent_port=${MAGICLENS_AGENT_PORT:-$(free_port)}
    for port in "$PORT" "$DASHBOARD_PORT" "$CLIENT_PORT" "$agent_port"; do
        port_in_use "$port" && die "port $port is taken on this machine; choose others with MAGICLENS_HEAD_PORT," \
                                   "MAGICLENS_DASHBOARD_PORT, MAGICLENS_CLIENT_PORT, MAGICLENS_AGENT_PORT"
    done
    local mode=${RAY_AUTH_MODE:-}
    if [[ -z $mode ]]; then
        if [[ -s $TOKEN_FILE || -n ${RAY_AUTH_TOKEN:-} ]]; then mode=token; else mode=disabled; fi
    fi
    mkdir -p "$HEAD_DIR"
    echo "$mode" >"$MODE_FILE"
    rm -f "$PGID_FILE"
    local cpus=()
    [[ -n ${MAGICLENS_HEAD_CPUS:-} ]] && cpus=(--num-cpus "$MAGICLENS_HEAD_CPUS")
    # PATH first names the `ray` program's folder, so `python` in a job's entrypoint is the project's Python.
    if ! setsid --wait env -u RAY_ADDRESS PATH="$(dirname "$RAY_BIN"):$PATH" RAY_AUTH_MODE="$mode" \
            RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 RAY_DASHBOARD_STARTUP_TIMEOUT_S="$DASHBOARD_TIMEOUT_S" \
            "$RAY_BIN" start --head --node-ip-address 127.0.0.1 --port "$PORT" \
            --dashboard-host 127.0.0.1 --dashboard-port "$DASHBOARD_PORT" --include-dashboard true \
            --ray-client-server-port "$CLIENT_PORT" --dashboard-agent-listen-port "$agent_port" \
            --temp-dir "$HEAD_DIR" --disable-usage-stats "${cpus[@]}" \
            >"$HEAD_DIR/start.log" 2>&1 </dev/null; then
        cat "$HEAD_DIR/start.log" >&2
        # a failed start can leave the GCS and some of its processes running: stop them
        if record_group; then stop; fi
        die "ray start failed (log: $HEAD_DIR/start.log)"
    fi
    record_group || die "ray start returned but no GCS of $HEAD_DIR runs (log: $HEAD_DIR/start.log)"
    local waited=0
    until job_server_answers && listeners | grep -q ":$agent_port "; do
        ((waited++ < 2 * START_TIMEOUT_S)) || {
            stop
            die "the job server or its agent (port $agent_port) was not up within $START_TIMEOUT_S s"
        }
        sleep 0.5
    done
    local outward
    outward=$(listeners | awk '{print $4}' | grep -Ev '^(127\.0\.0\.1|\[::ffff:127\.0\.0\.1\]|\[::1\]):' || true)
    if [[ -n $outward ]]; then
        listeners >&2
        stop
        die "the head listened beyond loopback (above); stopped it"
    fi
    if ! grep -q "Local node IP.*127\.0\.0\.1" "$HEAD_DIR/start.log"; then
        stop
        die "Ray advertised a node address other than 127.0.0.1 (log: $HEAD_DIR/start.log)"
    fi
    echo "local_head: started (GCS 127.0.0.1:$PORT, job server http://127.0.0.1:$DASHBOARD_PORT, auth $mode, logs $HEAD_DIR/session_latest/logs)" >&2
    print_env
}

# SIGTERM to `pids`, up to `seconds` for them to go, then SIGKILL to the rest.
terminate() {
    local seconds=$1; shift
    [[ $# -gt 0 ]] || return 0
    kill -TERM "$@" 2>/dev/null || true
    local deadline=$((SECONDS + seconds)) pid alive
    while ((SECONDS < deadline)); do
        alive=0
        for pid in "$@"; do
            [[ -d /proc/$pid && $(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null) != Z ]] && alive=1 && break
        done
        ((alive)) || return 0
        sleep 0.2
    done
    kill -KILL "$@" 2>/dev/null || true
}

stop() {
    if ! running; then
        echo "local_head: not running ($HEAD_DIR)" >&2
        rm -f "$PGID_FILE"
        return 0
    fi
    # As `ray stop` orders it: the raylet first, then the other processes, the GCS last.
    local share=$(((GRACE_S + 2) / 3)) pid
    local -a raylet=() gcs=() others=()
    for pid in $(head_pids); do
        case $(cat "/proc/$pid/comm" 2>/dev/null || true) in
            raylet) raylet+=("$pid") ;;
            gcs_server) gcs+=("$pid") ;;
        esac
    done
    terminate "$share" "${raylet[@]}"
    for pid in $(head_pids); do
        [[ " ${gcs[*]} " == *" $pid "* ]] || others+=("$pid")
    done
    terminate "$share" "${others[@]}"
    terminate "$share" "${gcs[@]}"
    local -a left
    read -ra left <<<"$(head_pids | paste -sd' ')"
    terminate 1 "${left[@]}"
    rm -f "$PGID_FILE"
    echo "local_head: stopped ($HEAD_DIR; logs kept there)" >&2
}

status() {
    if ! running; then
        echo "local_head: not running ($HEAD_DIR)"
        return 3
    fi
    echo "local_head: running, process group $(<"$PGID_FILE"), $(head_pids | wc -l) processes, auth $(<"$MODE_FILE")"
    echo "listening:"
    listeners | awk '{print "  " $4 "  " $6}'
    RAY_AUTH_MODE=$(<"$MODE_FILE") RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 "$RAY_BIN" status --address "127.0.0.1:$PORT"
}

case ${1:-} in
    start) start ;;
    stop) stop ;;
    status) status ;;
    env) running || die "not running; cluster/local_head.sh start"; print_env ;;
    *) echo "usage: $0 start|stop|status|env" >&2; exit 2 ;;
esac
