#!/usr/bin/env bash
# Runs the test suites that start redis-server (the end-to-end ones) against each Redis version of the
# matrix: 6.0.20 (what Azure Cache for Redis runs) and 7.2.6 (close to Azure Managed Redis), built from the
# upstream sources in REDIS_SOURCES (default: ../shared/redis beside the repository) by its build.sh, once per
# machine (cached in REDIS_BUILD_CACHE, default ~/.cache/redis-builds). `make test` does gofmt, vet and every
# package against the distribution's redis-server; this runs only the suites whose result depends on the server.
# REDIS_VERSIONS="6.0.20" picks versions. Every version runs; the exit status is 1 if any failed.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh
need_go

sources=${REDIS_SOURCES:-$(pwd)/../shared/redis}
read -ra versions <<<"${REDIS_VERSIONS:-6.0.20 7.2.6}"
# The packages whose tests start redis-server.
packages=(./resp/ ./internal/azurefake/ ./cmd/entra-redis-proxy/ ./proxy/)
# The long, load-shaped tests run at full length in `make test`; per version a shorter soak and two seeds per
# data access policy cover the server's dialect (about 80 s less per version; set them to run the full ones).
export PROXY_SOAK=${PROXY_SOAK:-20s} PROXY_DIFF_POLICY_SEEDS=${PROXY_DIFF_POLICY_SEEDS:-2}
# Tests of the identity endpoint's failures do not depend on the server: `make test` runs them once.
skip='^(TestIdentityEndpointFaults|TestIdentityOutagePastExpiry)$'

[[ -x $sources/build.sh ]] || die "Redis sources not found: looked for $sources/build.sh (and redis-VERSION.tar.gz beside it).
Set REDIS_SOURCES to the directory that holds them, e.g. REDIS_SOURCES=/path/to/shared/redis make test-versions"
for v in "${versions[@]}"; do
	[[ -f $sources/redis-$v.tar.gz ]] || die "$sources/redis-$v.tar.gz not found (REDIS_SOURCES=$sources)"
done

# Build (or find cached) first, so that a build failure shows before any test time is spent.
declare -A bindir
for v in "${versions[@]}"; do
	echo "== redis $v: build (cached after the first time)"
	start=$SECONDS
	bindir[$v]=$("$sources/build.sh" "$v" ${REDIS_BUILD_CACHE:+"$REDIS_BUILD_CACHE"}) ||
		die "building redis $v failed (it needs: apt-get install -y build-essential pkg-config libssl-dev)"
	got=$("${bindir[$v]}/redis-server" --version)
	[[ $got == *"v=$v "* ]] || die "${bindir[$v]}/redis-server is not $v: $got"
	echo "   ${bindir[$v]} ($((SECONDS - start)) s)"
done

# The versions run side by side: the suites wait on token lifetimes far more than they use the CPU (about 0.4
# of a core each), so two at once halve the matrix's time. Each version's output goes to its own log, printed
# whole when it ends.
logs=$(mktemp -d)
trap 'rm -rf "$logs"' EXIT
declare -A pid started
for v in "${versions[@]}"; do
	echo "== redis $v: PROXY_SOAK=$PROXY_SOAK PROXY_DIFF_POLICY_SEEDS=$PROXY_DIFF_POLICY_SEEDS go test -race -count=1 -p 1 -skip '$skip' ${packages[*]}"
	started[$v]=$SECONDS
	(
		export PATH="${bindir[$v]}:$PATH"
		redis-server --version
		go test -race -count=1 -p 1 -timeout 20m -skip "$skip" "${packages[@]}"
	) >"$logs/$v.log" 2>&1 &
	pid[$v]=$!
done
failed=()
summary=()
for v in "${versions[@]}"; do
	if wait "${pid[$v]}"; then
		summary+=("redis $v: passed in $((SECONDS - started[$v])) s")
	else
		summary+=("redis $v: FAILED after $((SECONDS - started[$v])) s")
		failed+=("$v")
	fi
	echo "== redis $v: output"
	cat "$logs/$v.log"
done
echo "== version matrix"
printf '   %s\n' "${summary[@]}"
((${#failed[@]} == 0)) || die "tests failed against redis ${failed[*]}"
echo "all versions passed"
