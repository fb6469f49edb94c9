#!/usr/bin/env bash
# Runs the proxy package's tests (with -race) STRESS_RUNS times in a row (default 20) while two busy loops
# load the machine, and stops at the first failure. A flaky test shows up here long before CI sees it.
# Logs: .stress/run-N.log.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh
need_go
RUNS=${STRESS_RUNS:-20}
mkdir -p .stress
go test -race -c -o .stress/proxy.test ./proxy/
(while :; do :; done) &
b1=$!
(while :; do :; done) &
b2=$!
trap 'kill $b1 $b2 2>/dev/null' EXIT
for i in $(seq 1 "$RUNS"); do
	start=$SECONDS
	if (cd proxy && ../.stress/proxy.test -test.count=1 -test.timeout=20m >"../.stress/run-$i.log" 2>&1); then
		echo "run $i/$RUNS passed in $((SECONDS - start)) s"
	else
		echo "run $i/$RUNS FAILED in $((SECONDS - start)) s: see .stress/run-$i.log"
		exit 1
	fi
done
echo "all $RUNS runs passed"
