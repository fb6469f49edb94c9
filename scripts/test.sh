#!/usr/bin/env bash
# Runs every check and test of the repository: gofmt, go vet, go test -race (including the
# fuzz seed corpora). Installs redis-server and redis-tools, which the tests start, if missing.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh

need_go
need_packages redis-server:redis-server redis-cli:redis-tools redis-benchmark:redis-tools

echo "== gofmt -l ."
unformatted=$(gofmt -l .)
if [[ -n $unformatted ]]; then
	echo "$unformatted"
	die "these files are not gofmt-formatted; run: gofmt -w ."
fi

echo "== go vet ./..."
go vet ./...

echo "== go test -race -count=1 ./..."
go test -race -count=1 ./...
echo "all tests passed"
