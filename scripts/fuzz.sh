#!/usr/bin/env bash
# Runs each Fuzz* target of the repository in turn for FUZZTIME (default 1m).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh

need_go
fuzztime=${FUZZTIME:-1m}
found=0
for pkg in $(go list ./...); do
	# go test -list prints the matching names, then "ok <pkg>"; only the names start with Fuzz.
	for target in $(go test -list '^Fuzz' "$pkg" | grep '^Fuzz' || true); do
		found=1
		echo "== $pkg $target ($fuzztime)"
		go test -run='^$' -fuzz="^${target}\$" -fuzztime="$fuzztime" "$pkg"
	done
done
((found)) || die "no Fuzz targets found"
