#!/usr/bin/env bash
# Compares the proxy with the two other ways to reach a TLS-only, Entra-authenticated cache: direct
# TLS, and stunnel in client mode (the classic TLS tunnel for Redis). Everything runs on loopback:
# the fake Azure cache (TLS redis-server, tokens from a fake managed identity endpoint), stunnel4,
# the proxy, and redis-benchmark against each of the three in turn, for BENCH_ROUNDS rounds
# (default 3). The proxy's warm pool holds BENCH_POOL_SIZE (default 40: twice row e's clients, so a
# client that reconnects finds the connection its predecessor returned). Prints one table of medians and ratios and writes it to .bench/results.md; raw
# numbers and logs stay in .bench/. See issue 5 for the rows and targets. The CPU time (utime+stime) of
# stunnel and the proxy is read from /proc around each run, per request. BENCH_PROXY2_ENV (NAME=VALUE
# words, e.g. GOMAXPROCS=1) adds a fourth target, proxy2: a second proxy with those variables set, in the
# same rounds, and a table comparing it with the first (issue 13); BENCH_PROXY2_BIN runs another build as
# proxy2 (e.g. the one before a change).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh

ROUNDS=${BENCH_ROUNDS:-3}
IDLE_CLIENTS=5000 # row f; each also holds an upstream: the proxy needs 2 descriptors per client
# Requests per redis-benchmark run, per row: a few seconds each on 2 shared cores, so that 3
# rounds take about 3 minutes (under 10 even when other jobs load the machine).
N_A=30000 N_B=150000 N_C=10000 N_D=1500 N_E=800
TARGETS=(direct stunnel proxy)
PROXY2_ENV=${BENCH_PROXY2_ENV:-} PROXY2_BIN=${BENCH_PROXY2_BIN:-}
[[ -z $PROXY2_ENV$PROXY2_BIN ]] || TARGETS+=(proxy2)
PROXY2_LABEL="${PROXY2_ENV:+$PROXY2_ENV }${PROXY2_BIN:-same build}"

OUT=.bench
BIN=$OUT/bin
RAW=$OUT/raw.csv
CPU=$OUT/cpu.csv
FAKE_PID='' STUNNEL_PID='' PROXY_PID='' PROXY2_PID='' IDLE_PID=''

cleanup() { stop_pids "$IDLE_PID" "$PROXY2_PID" "$PROXY_PID" "$STUNNEL_PID" "$FAKE_PID"; }
trap cleanup EXIT
trap 'exit 130' INT TERM

[[ $ROUNDS =~ ^[1-9][0-9]*$ ]] || die "BENCH_ROUNDS must be a positive number, not '$ROUNDS'"
need_go
need_packages redis-server:redis-server redis-cli:redis-tools redis-benchmark:redis-tools stunnel4:stunnel4
if (($(ulimit -n) < 2 * IDLE_CLIENTS + 100)); then
	die "the open file limit ($(ulimit -n)) is below $((2 * IDLE_CLIENTS + 100)), which row f needs; raise it with: ulimit -n 20000"
fi

started=$SECONDS
mkdir -p "$BIN"
rm -f "$OUT"/*.log "$RAW" "$CPU" "$OUT/failures.txt"
echo "== Build"
version=$(git describe --tags --always --dirty 2>/dev/null || echo dev)
CGO_ENABLED=0 go build -trimpath -ldflags "-s -w -X main.version=$version" -o "$BIN/entra-redis-proxy" ./cmd/entra-redis-proxy
go build -o "$BIN/fakeazure" ./internal/cmd/fakeazure
go build -o "$BIN/idleclients" ./scripts/idleclients

echo "== Start the fake Azure cache, stunnel and the proxy"
# Tokens outlive the run: this measures the data path, not rotation.
start_fakeazure 2h "$OUT/fake.env" "$OUT/fakeazure.log"
REDIS_PORT=$FAKEAZURE_REDIS_PORT
echo "redis-server (TLS): 127.0.0.1:$REDIS_PORT"

STUNNEL_PORT=$(free_port)
cat >"$OUT/stunnel.conf" <<EOF
foreground = yes
pid =
debug = 3
output = $OUT/stunnel.log
[redis]
client = yes
accept = 127.0.0.1:$STUNNEL_PORT
connect = 127.0.0.1:$REDIS_PORT
CAfile = $FAKEAZURE_CA_FILE
verifyChain = yes
checkHost = $FAKEAZURE_SERVER_NAME
sni = $FAKEAZURE_SERVER_NAME
EOF
stunnel4 "$OUT/stunnel.conf" >"$OUT/stunnel.out" 2>&1 &
STUNNEL_PID=$!
stunnel_up() {
	alive "$STUNNEL_PID" || die "stunnel exited: $(tail -n 5 "$OUT/stunnel.out" "$OUT/stunnel.log" 2>/dev/null)"
	port_in_use "$STUNNEL_PORT"
}
wait_until 15 "stunnel on port $STUNNEL_PORT" stunnel_up
echo "stunnel (client mode): 127.0.0.1:$STUNNEL_PORT"

PROXY_PORT=$(free_port)
# start_proxy starts a fresh proxy on PROXY_PORT and waits until it answers PING.
start_proxy() {
	# No HTTP listener (metrics, health): nothing here reads it.
	ENTRA_REDIS_PROXY_LISTEN=127.0.0.1:$PROXY_PORT ENTRA_REDIS_PROXY_HTTP_LISTEN= \
		ENTRA_REDIS_PROXY_LOG_LEVEL=warn ENTRA_REDIS_PROXY_POOL_SIZE=${BENCH_POOL_SIZE:-40} "$BIN/entra-redis-proxy" >>"$OUT/proxy.log" 2>&1 &
	PROXY_PID=$!
	wait_until 30 "the proxy on port $PROXY_PORT to answer PING" proxy_up
}
proxy_up() {
	alive "$PROXY_PID" || die "the proxy exited: $(tail -n 5 "$OUT/proxy.log")"
	[[ $(redis-cli -p "$PROXY_PORT" PING 2>/dev/null) == PONG ]]
}
start_proxy
echo "entra-redis-proxy $version: 127.0.0.1:$PROXY_PORT"
if [[ -n $PROXY2_ENV$PROXY2_BIN ]]; then
	PROXY2_PORT=$(free_port)
	# shellcheck disable=SC2086 # PROXY2_ENV is a list of NAME=VALUE words
	env $PROXY2_ENV ENTRA_REDIS_PROXY_LISTEN=127.0.0.1:$PROXY2_PORT ENTRA_REDIS_PROXY_HTTP_LISTEN= \
		ENTRA_REDIS_PROXY_LOG_LEVEL=warn ENTRA_REDIS_PROXY_POOL_SIZE=${BENCH_POOL_SIZE:-40} "${PROXY2_BIN:-$BIN/entra-redis-proxy}" >>"$OUT/proxy2.log" 2>&1 &
	PROXY2_PID=$!
	proxy2_up() {
		alive "$PROXY2_PID" || die "proxy2 exited: $(tail -n 5 "$OUT/proxy2.log")"
		[[ $(redis-cli -p "$PROXY2_PORT" PING 2>/dev/null) == PONG ]]
	}
	wait_until 30 "proxy2 on port $PROXY2_PORT to answer PING" proxy2_up
	echo "proxy2 ($PROXY2_LABEL): 127.0.0.1:$PROXY2_PORT"
fi

# target_args TARGET prints redis-benchmark's connection options for TARGET.
target_args() {
	local auth="--user $FAKEAZURE_ADMIN_USER -a $FAKEAZURE_ADMIN_PASSWORD"
	case $1 in
	direct) echo "-h 127.0.0.1 -p $REDIS_PORT --tls --cacert $FAKEAZURE_CA_FILE --sni $FAKEAZURE_SERVER_NAME $auth" ;;
	stunnel) echo "-h 127.0.0.1 -p $STUNNEL_PORT $auth" ;;
	proxy) echo "-h 127.0.0.1 -p $PROXY_PORT" ;; # no password: the proxy authenticates with the token
	proxy2) echo "-h 127.0.0.1 -p $PROXY2_PORT" ;;
	esac
}

# target_pid TARGET prints the process id of TARGET's hop, if it has one.
target_pid() {
	case $1 in
	stunnel) echo "$STUNNEL_PID" ;;
	proxy) echo "$PROXY_PID" ;;
	proxy2) echo "$PROXY2_PID" ;;
	esac
}

# cpu_ticks PID prints the process's utime+stime in clock ticks (fields 14 and 15 of /proc/PID/stat,
# counted after the command name, which may hold spaces).
cpu_ticks() {
	sed 's/^.*) //' "/proc/$1/stat" | awk '{ print $12 + $13 }'
}
CLK_TCK=$(getconf CLK_TCK)

# requests ARGS... prints how many requests a redis-benchmark command line makes: -n per test of -t.
requests() {
	local n=100000 tests=1
	while (($#)); do
		case $1 in
		-n)
			n=$2
			shift
			;;
		-t)
			tests=$(($(tr -cd , <<<"$2" | wc -c) + 1))
			shift
			;;
		esac
		shift
	done
	echo $((n * tests))
}

# bench ROW TARGET ROUND ARGS... runs redis-benchmark and appends one line per test to $RAW:
# row,target,test,round,rps,p50_ms,p99_ms.
bench() {
	local row=$1 target=$2 round=$3 out pid ticks=''
	shift 3
	pid=$(target_pid "$target")
	[[ -z $pid ]] || ticks=$(cpu_ticks "$pid")
	# shellcheck disable=SC2046 # target_args is a list of words without spaces inside
	if ! out=$(redis-benchmark $(target_args "$target") "$@" --csv 2>"$OUT/redis-benchmark.err"); then
		# Keep going: the table shows the cell as failed, and the other rows still count.
		printf '  %-8s FAILED (row %s): %s\n' "$target" "$row" "$(tail -n 1 "$OUT/redis-benchmark.err")" | tee -a "$OUT/failures.txt"
		return 0
	fi
	echo "$out" | tr -d '"' | awk -F, -v p="$row,$target" -v r="$round" \
		'NR > 1 && $2 > 0 { print p "," $1 "," r "," $2 "," $5 "," $7 }' >>"$RAW"
	if [[ -n $pid ]]; then # row,target,round,CPU us per request
		awk -v r="$row,$target,$round" -v t="$(($(cpu_ticks "$pid") - ticks))" -v hz="$CLK_TCK" -v n="$(requests "$@")" \
			'BEGIN { printf "%s,%.3f\n", r, t / hz * 1e6 / n }' >>"$CPU"
	fi
	printf '  %-8s %s\n' "$target" "$(echo "$out" | tr -d '"' | awk -F, 'NR > 1 { printf "%s %.0f/s p50 %s ms  ", $1, $2, $5 }')"
}

ROWS=(a b c d e)
declare -A ROW_ARGS=(
	[a]="-t set,get -c 50 -n $N_A"
	[b]="-t set,get -c 50 -P 16 -n $N_B"
	[c]="-t get -c 1 -n $N_C"
	[d]="-t set,get -c 50 -d 102400 -n $N_D"
	[e]="-t get -c 20 -k 0 -n $N_E"
)
for ((round = 1; round <= ROUNDS; round++)); do
	for row in "${ROWS[@]}"; do
		echo "== Round $round/$ROUNDS, row $row: redis-benchmark ${ROW_ARGS[$row]}"
		# Rotate the order every round, so that no target always runs first or last, and reverse it every
		# other round, so that no target always runs right after another (the one after the proxy won by
		# 14-44% at -P 16 whichever it was, in two runs of issue 13).
		ntargets=${#TARGETS[@]}
		for ((i = 0; i < ntargets; i++)); do
			j=$(((round % 2 ? i : ntargets - 1 - i) + round - 1))
			target=${TARGETS[$((j % ntargets))]}
			# shellcheck disable=SC2086
			bench "$row" "$target" "$round" ${ROW_ARGS[$row]}
		done
	done
done

echo "== Row f: proxy memory with $IDLE_CLIENTS idle clients (a fresh proxy)"
stop_pids "$PROXY_PID"
start_proxy
rss() { awk '/^VmRSS:/ { print $2 }' "/proc/$PROXY_PID/status"; } # KiB
rss_before=$(rss)
"$BIN/idleclients" -addr "127.0.0.1:$PROXY_PORT" -n "$IDLE_CLIENTS" >"$OUT/idleclients.out" 2>&1 &
IDLE_PID=$!
idle_ready() {
	alive "$IDLE_PID" || die "idleclients failed: $(tail -n 3 "$OUT/idleclients.out")"
	grep -q '^ready' "$OUT/idleclients.out"
}
wait_until 180 "$IDLE_CLIENTS idle clients" idle_ready
sleep 3 # let the connection storm's garbage be collected before measuring
rss_with=$(rss)
stop_pids "$IDLE_PID"
IDLE_PID=''
per_client=$(awk -v a="$rss_before" -v b="$rss_with" -v n="$IDLE_CLIENTS" 'BEGIN { printf "%.1f", (b - a) / n }')
echo "  proxy RSS: $rss_before KiB before, $rss_with KiB with $IDLE_CLIENTS idle clients: $per_client KiB per client"

# median ROW TARGET TEST FIELD prints the median of a field of $RAW (5: rps, 6: p50 ms, 7: p99 ms).
median() {
	awk -F, -v r="$1" -v t="$2" -v x="$3" -v f="$4" '$1 == r && $2 == t && $3 == x { print $f }' "$RAW" | sort -g |
		awk '{ v[NR] = $1 } END { if (NR == 0) print "nan"; else if (NR % 2) print v[(NR + 1) / 2]; else print (v[NR / 2] + v[NR / 2 + 1]) / 2 }'
}

# table_row LABEL ROW TEST FIELD SCALE KIND prints one table line. KIND says which targets apply:
# tput:MIN (throughput, at least MIN x direct and 1.5x stunnel), conn:MIN (at least MIN x direct),
# p50 (added latency at most 60 us), p99 (no target).
table_row() {
	local label=$1 row=$2 test=$3 field=$4 scale=$5 kind=$6
	awk -v label="$label" -v kind="$kind" -v s="$scale" \
		-v d="$(median "$row" direct "$test" "$field")" \
		-v t="$(median "$row" stunnel "$test" "$field")" \
		-v p="$(median "$row" proxy "$test" "$field")" '
	function cell(v) { return v == "nan" ? "failed" : sprintf("%.0f", v * s) }
	function ratio(a, b) { return a == "nan" || b == "nan" || b == 0 ? "-" : sprintf("%.2f", a / b) }
	BEGIN {
		rd = ratio(p, d); rt = ratio(p, t)
		split(kind, k, ":")
		if (k[1] == "tput") { target = sprintf(">= %.1fx direct, >= 1.5x stunnel", k[2]); met = rd != "-" && rt != "-" && rd + 0 >= k[2] + 0 && rt + 0 >= 1.5 }
		else if (k[1] == "conn") { target = sprintf(">= %dx direct", k[2]); met = rd != "-" && rd + 0 >= k[2] + 0 }
		else if (k[1] == "p50") {
			added = p == "nan" || d == "nan" ? "?" : sprintf("%+.0f", (p - d) * s)
			target = "added p50 <= 60 us (here " added " us)"; met = added != "?" && added + 0 <= 60
		}
		else { target = "-"; met = -1 }
		printf "| %s | %s | %s | %s | %s | %s | %s | %s |\n", label, cell(d), cell(t), cell(p), rd, rt, target, met < 0 ? "-" : met ? "yes" : "NO"
	}'
}

cpu=$(awk -F': ' '/^model name/ { print $2; exit }' /proc/cpuinfo)
{
	echo "## Benchmark: entra-redis-proxy vs direct TLS vs stunnel"
	echo
	echo "Command: \`make bench\` (BENCH_ROUNDS=$ROUNDS), $(date -u '+%Y-%m-%d %H:%M UTC'), took $((SECONDS - started)) s."
	echo "Machine: $(nproc) CPUs, ${cpu:-unknown CPU}, Linux $(uname -r), load average at the end: $(cut -d' ' -f1-3 /proc/loadavg)."
	echo "Versions: entra-redis-proxy $version, $(go version | cut -d' ' -f3), $(redis-server --version | cut -d' ' -f1-3),"
	echo "$(redis-benchmark --version), $(stunnel4 -version 2>&1 | grep -m1 '^stunnel' | cut -d' ' -f1-2)."
	echo "Everything (load generator, proxy or stunnel, redis-server) shares these CPUs on loopback; redis-server"
	echo "speaks TLS only, like Azure. Medians of $ROUNDS round(s); the three targets alternate within each row."
	echo "Ratios are proxy/other: above 1 is better for req/s, below 1 is better for latency (row c)."
	echo
	echo "| row | direct TLS | stunnel | proxy | proxy/direct | proxy/stunnel | target | met |"
	echo "|---|---:|---:|---:|---:|---:|---|---|"
	table_row "a. SET, 50 clients (req/s)" a SET 5 1 tput:0.7
	table_row "a. GET, 50 clients (req/s)" a GET 5 1 tput:0.7
	table_row "b. SET, 50 clients, -P 16 (req/s)" b SET 5 1 tput:0.8
	table_row "b. GET, 50 clients, -P 16 (req/s)" b GET 5 1 tput:0.8
	table_row "c. GET, 1 client, p50 latency (us)" c GET 6 1000 p50
	table_row "c. GET, 1 client, p99 latency (us)" c GET 7 1000 p99
	table_row "d. SET 100 KB, 50 clients (req/s)" d SET 5 1 tput:0.7
	table_row "d. GET 100 KB, 50 clients (req/s)" d GET 5 1 tput:0.7
	table_row "e. GET, new connection per request, 20 clients (req/s)" e GET 5 1 conn:8
	awk -v v="$per_client" -v n="$IDLE_CLIENTS" 'BEGIN {
		printf "| f. proxy RSS per idle client, %d clients (KiB) | - | - | %.1f | - | - | <= 40 KiB | %s |\n", n, v, v <= 40 ? "yes" : "NO" }'
	echo
	echo "CPU of the hop per request (utime+stime of its process over each run, median, us):"
	echo
	if [[ -n $PROXY2_ENV$PROXY2_BIN ]]; then
		echo "| row | stunnel | proxy | proxy2 ($PROXY2_LABEL) | proxy2/proxy CPU | proxy2/proxy req/s |"
		echo "|---|---:|---:|---:|---:|---|"
	else
		echo "| row | stunnel | proxy |"
		echo "|---|---:|---:|"
	fi
	for row in "${ROWS[@]}"; do
		awk -F, -v row="$row" -v two="$PROXY2_ENV$PROXY2_BIN" -v rps="$(for x in SET GET; do
			a=$(median "$row" proxy "$x" 5) b=$(median "$row" proxy2 "$x" 5)
			[[ $a == nan || $b == nan ]] || awk -v x="$x" -v a="$a" -v b="$b" 'BEGIN { printf "%s %.2f ", x, b / a }'
		done)" '
		$1 == row { v[$2] = v[$2] " " $4 }
		function med(s,   a, n, i, j, t) {
			n = split(s, a, " "); if (n == 0) return "-"
			for (i = 1; i <= n; i++) for (j = i + 1; j <= n; j++) if (a[j] + 0 < a[i] + 0) { t = a[i]; a[i] = a[j]; a[j] = t }
			return n % 2 ? a[(n + 1) / 2] : (a[n / 2] + a[n / 2 + 1]) / 2
		}
		END {
			s = med(v["stunnel"]); p = med(v["proxy"]); q = med(v["proxy2"])
			if (two == "") { printf "| %s | %s | %s |\n", row, s, p; exit }
			printf "| %s | %s | %s | %s | %s | %s |\n", row, s, p, q, (p == "-" || q == "-" || p == 0) ? "-" : sprintf("%.2f", q / p), rps == "" ? "-" : rps
		}' "$CPU"
	done
	if [[ -s $OUT/failures.txt ]]; then
		echo
		echo "Failed runs (their cells count as missing; see the logs in $OUT/):"
		sed 's/^ */- /' "$OUT/failures.txt"
	fi
} >"$OUT/results.md"

echo
cat "$OUT/results.md"
echo
echo "Written to $OUT/results.md; raw numbers in $RAW, logs in $OUT/."
