#!/usr/bin/env bash
# Compares the proxy with the other ways to reach a TLS-only, Entra-authenticated cache: direct TLS, and
# three C proxies doing the same hop (plaintext in, TLS out, certificate verified; they can't inject
# AUTH, so they bound what the hop itself costs): stunnel in client mode, haproxy (2 threads) and nginx
# stream (2 workers). Everything runs on loopback: the fake Azure cache (TLS redis-server, tokens from a
# fake managed identity endpoint), the three C proxies, the proxy with its default settings, and
# redis-benchmark against each target in turn, for BENCH_ROUNDS rounds (default 3), the targets
# alternating within each row. Prints one table of medians and ratios (to haproxy, the best C proxy
# here) and writes it to .bench/results.md; raw numbers and logs stay in .bench/. See issue 13 for the
# rows and targets. The CPU time (utime+stime) of each hop's processes is read from /proc around each
# run, per request. After the rounds, one -P 16 run per proxy is counted with `perf stat` (system calls
# by kind, context switches; strace -c when perf has no tracepoints) into .bench/syscalls-*.txt.
# BENCH_POOL_SIZE sets the proxy's POOL_SIZE (default: the proxy's default). BENCH_PROXY2_ENV (NAME=VALUE
# words, e.g. GOMAXPROCS=1) adds a second proxy with those variables set, in the same rounds, and a
# table comparing it with the first; BENCH_PROXY2_BIN runs another build as proxy2 (e.g. the one before
# a change). Row g runs a clustered cache (fakeazure -cluster: 3 primaries, 3 replicas) with
# redis-benchmark --cluster, direct (TLS to each node) and through the proxy in cluster mode (a plain
# listener per node); BENCH_CLUSTER=0 skips it.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh

ROUNDS=${BENCH_ROUNDS:-3}
IDLE_CLIENTS=5000 # row f; each also holds an upstream: the proxy needs 2 descriptors per client
D_CLIENTS=1000    # row d; each C proxy and the proxy hold 2 descriptors per client
# Requests per redis-benchmark run, per row: a few seconds each on 2 shared cores, so that 3
# rounds take about 10 minutes.
N_A=30000 N_B=150000 N_C=10000 N_D=3000 N_E=800 N_G=30000
CLUSTER=${BENCH_CLUSTER:-1}
TARGETS=(direct stunnel haproxy nginx proxy)
PROXIES=(stunnel haproxy nginx proxy) # the targets that are a hop, with a process whose CPU is counted
PROXY2_ENV=${BENCH_PROXY2_ENV:-} PROXY2_BIN=${BENCH_PROXY2_BIN:-}
if [[ -n $PROXY2_ENV$PROXY2_BIN ]]; then
	TARGETS+=(proxy2)
	PROXIES+=(proxy2)
fi
PROXY2_LABEL="${PROXY2_ENV:+$PROXY2_ENV }${PROXY2_BIN:-same build}"

OUT=.bench
BIN=$OUT/bin
RAW=$OUT/raw.csv
CPU=$OUT/cpu.csv
FAKE_PID='' STUNNEL_PID='' HAPROXY_PID='' NGINX_PID='' PROXY_PID='' PROXY2_PID='' IDLE_PID='' COUNT_PID=''
CFAKE_PID='' CPROXY_PID=''

cleanup() {
	stop_pids "$COUNT_PID" "$IDLE_PID" "$CPROXY_PID" "$PROXY2_PID" "$PROXY_PID" "$NGINX_PID" "$HAPROXY_PID" "$STUNNEL_PID" \
		"$CFAKE_PID" "$FAKE_PID"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

[[ $ROUNDS =~ ^[1-9][0-9]*$ ]] || die "BENCH_ROUNDS must be a positive number, not '$ROUNDS'"
[[ $CLUSTER == [01] ]] || die "BENCH_CLUSTER must be 1 (run row g, the default) or 0 (skip it), not '$CLUSTER'"
need_go
NGINX_STREAM=/usr/lib/nginx/modules/ngx_stream_module.so # Debian builds nginx's stream module as a module
need_packages redis-server:redis-server redis-cli:redis-tools redis-benchmark:redis-tools stunnel4:stunnel4 \
	haproxy:haproxy nginx:nginx-light "$NGINX_STREAM:libnginx-mod-stream" perf:linux-perf strace:strace
if (($(ulimit -n) < 2 * IDLE_CLIENTS + 100)); then
	die "the open file limit ($(ulimit -n)) is below $((2 * IDLE_CLIENTS + 100)), which row f needs; raise it with: ulimit -n 20000"
fi

started=$SECONDS
mkdir -p "$BIN"
rm -f "$OUT"/*.log "$RAW" "$CPU" "$OUT/failures.txt" "$OUT"/syscalls-*.txt
echo "== Build"
version=$(git describe --tags --always --dirty 2>/dev/null || echo dev)
CGO_ENABLED=0 go build -trimpath -ldflags "-s -w -X main.version=$version" -o "$BIN/entra-redis-proxy" ./cmd/entra-redis-proxy
go build -o "$BIN/fakeazure" ./internal/cmd/fakeazure
go build -o "$BIN/idleclients" ./scripts/idleclients

echo "== Start the fake Azure cache, stunnel, haproxy, nginx and the proxy"
# Tokens outlive the run: this measures the data path, not rotation.
start_fakeazure 2h "$OUT/fake.env" "$OUT/fakeazure.log"
REDIS_PORT=$FAKEAZURE_REDIS_PORT
CA=$(realpath "$FAKEAZURE_CA_FILE") NAME=$FAKEAZURE_SERVER_NAME
echo "redis-server (TLS): 127.0.0.1:$REDIS_PORT"

# up NAME PID PORT LOG... succeeds once process PID listens on PORT; it stops the script if PID exited.
up() {
	local name=$1 pid=$2 port=$3
	shift 3
	alive "$pid" || die "$name exited: $(tail -n 5 "$@" 2>/dev/null)"
	port_in_use "$port"
}

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
CAfile = $CA
verifyChain = yes
checkHost = $NAME
sni = $NAME
EOF
stunnel4 "$OUT/stunnel.conf" >"$OUT/stunnel.out" 2>&1 &
STUNNEL_PID=$!
wait_until 15 "stunnel on port $STUNNEL_PORT" up stunnel "$STUNNEL_PID" "$STUNNEL_PORT" "$OUT/stunnel.out" "$OUT/stunnel.log"
echo "stunnel (client mode): 127.0.0.1:$STUNNEL_PORT"

# haproxy: one process, 2 threads (one per core); TLS sessions are resumed by default (no no-ssl-reuse).
HAPROXY_PORT=$(free_port)
cat >"$OUT/haproxy.cfg" <<EOF
global
	nbthread 2
	maxconn 4000
defaults
	mode tcp
	maxconn 4000
	timeout connect 10s
	timeout client 10m
	timeout server 10m
frontend redis
	bind 127.0.0.1:$HAPROXY_PORT
	default_backend cache
backend cache
	server cache 127.0.0.1:$REDIS_PORT ssl verify required ca-file $CA sni str($NAME) verifyhost $NAME
EOF
haproxy -db -f "$OUT/haproxy.cfg" >"$OUT/haproxy.log" 2>&1 &
HAPROXY_PID=$!
wait_until 15 "haproxy on port $HAPROXY_PORT" up haproxy "$HAPROXY_PID" "$HAPROXY_PORT" "$OUT/haproxy.log"
echo "haproxy $(haproxy -v | awk 'NR == 1 { print $3 }') (2 threads): 127.0.0.1:$HAPROXY_PORT"

# nginx stream: 2 worker processes (one per core), TLS session reuse on (its default).
NGINX_PORT=$(free_port)
mkdir -p "$OUT/nginx"
cat >"$OUT/nginx.conf" <<EOF
load_module $NGINX_STREAM;
worker_processes 2;
worker_rlimit_nofile 8200;
pid $PWD/$OUT/nginx/nginx.pid;
error_log $PWD/$OUT/nginx.log warn;
events { worker_connections 4096; }
stream {
	server {
		listen 127.0.0.1:$NGINX_PORT;
		proxy_pass 127.0.0.1:$REDIS_PORT;
		proxy_timeout 10m;
		proxy_ssl on;
		proxy_ssl_verify on;
		proxy_ssl_trusted_certificate $CA;
		proxy_ssl_name $NAME;
		proxy_ssl_server_name on;
		proxy_ssl_session_reuse on;
	}
}
EOF
nginx -p "$PWD/$OUT/nginx" -e "$PWD/$OUT/nginx.log" -c "$PWD/$OUT/nginx.conf" -g 'daemon off;' >"$OUT/nginx.out" 2>&1 &
NGINX_PID=$!
wait_until 15 "nginx on port $NGINX_PORT" up nginx "$NGINX_PID" "$NGINX_PORT" "$OUT/nginx.out" "$OUT/nginx.log"
echo "nginx $(nginx -v 2>&1 | cut -d/ -f2) stream (2 workers): 127.0.0.1:$NGINX_PORT"

PROXY_PORT=$(free_port)
# start_proxy starts a fresh proxy on PROXY_PORT and waits until it answers PING.
start_proxy() {
	# No HTTP listener (metrics, health): nothing here reads it.
	ENTRA_REDIS_PROXY_LISTEN=127.0.0.1:$PROXY_PORT ENTRA_REDIS_PROXY_HTTP_LISTEN= ENTRA_REDIS_PROXY_LOG_LEVEL=warn \
		${BENCH_POOL_SIZE:+ENTRA_REDIS_PROXY_POOL_SIZE=$BENCH_POOL_SIZE} "$BIN/entra-redis-proxy" >>"$OUT/proxy.log" 2>&1 &
	PROXY_PID=$!
	wait_until 30 "the proxy on port $PROXY_PORT to answer PING" proxy_up
}
proxy_up() {
	alive "$PROXY_PID" || die "the proxy exited: $(tail -n 5 "$OUT/proxy.log")"
	[[ $(redis-cli -p "$PROXY_PORT" PING 2>/dev/null) == PONG ]]
}
start_proxy
echo "entra-redis-proxy $version (POOL_SIZE ${BENCH_POOL_SIZE:-default}): 127.0.0.1:$PROXY_PORT"
if [[ -n $PROXY2_ENV$PROXY2_BIN ]]; then
	PROXY2_PORT=$(free_port)
	# shellcheck disable=SC2086 # PROXY2_ENV is a list of NAME=VALUE words
	env $PROXY2_ENV ENTRA_REDIS_PROXY_LISTEN=127.0.0.1:$PROXY2_PORT ENTRA_REDIS_PROXY_HTTP_LISTEN= ENTRA_REDIS_PROXY_LOG_LEVEL=warn \
		${BENCH_POOL_SIZE:+ENTRA_REDIS_PROXY_POOL_SIZE=$BENCH_POOL_SIZE} "${PROXY2_BIN:-$BIN/entra-redis-proxy}" >>"$OUT/proxy2.log" 2>&1 &
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
	direct) echo "-h 127.0.0.1 -p $REDIS_PORT --tls --cacert $FAKEAZURE_CA_FILE --sni $NAME $auth" ;;
	stunnel) echo "-h 127.0.0.1 -p $STUNNEL_PORT $auth" ;;
	haproxy) echo "-h 127.0.0.1 -p $HAPROXY_PORT $auth" ;;
	nginx) echo "-h 127.0.0.1 -p $NGINX_PORT $auth" ;;
	proxy) echo "-h 127.0.0.1 -p $PROXY_PORT" ;; # no password: the proxy authenticates with the token
	proxy2) echo "-h 127.0.0.1 -p $PROXY2_PORT" ;;
	cdirect) echo "--cluster -h 127.0.0.1 -p $CSEED_PORT --tls --cacert $CCA --sni $NAME --user $CUSER -a $CPASS" ;;
	cproxy) echo "--cluster -h 127.0.0.1 -p $CPROXY_PORT" ;;
	esac
}

# target_pids TARGET prints the process ids of TARGET's hop (nginx: its master and workers), if it has one.
target_pids() {
	case $1 in
	stunnel) echo "$STUNNEL_PID" ;;
	haproxy) echo "$HAPROXY_PID" ;;
	nginx) echo "$NGINX_PID" $(pgrep -P "$NGINX_PID") ;;
	proxy) echo "$PROXY_PID" ;;
	proxy2) echo "$PROXY2_PID" ;;
	cproxy) echo "$CPROXY_PID" ;;
	esac
}

# cpu_ticks PID... prints the processes' utime+stime in clock ticks, summed (fields 14 and 15 of
# /proc/PID/stat, counted after the command name, which may hold spaces; all threads included).
cpu_ticks() {
	local pid
	for pid in "$@"; do sed 's/^.*) //' "/proc/$pid/stat"; done | awk '{ t += $12 + $13 } END { print t + 0 }'
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
# row,target,test,round,rps,p50_ms,p99_ms. (Only lines with a rate count: with --cluster, redis-benchmark
# writes the cluster's nodes before its CSV.)
bench() {
	local row=$1 target=$2 round=$3 out pids ticks=''
	shift 3
	pids=$(target_pids "$target")
	# shellcheck disable=SC2086 # a list of process ids
	[[ -z $pids ]] || ticks=$(cpu_ticks $pids)
	# shellcheck disable=SC2046 # target_args is a list of words without spaces inside
	if ! out=$(redis-benchmark $(target_args "$target") "$@" --csv 2>"$OUT/redis-benchmark.err"); then
		# Keep going: the table shows the cell as failed, and the other rows still count.
		printf '  %-8s FAILED (row %s): %s\n' "$target" "$row" "$(tail -n 1 "$OUT/redis-benchmark.err")" | tee -a "$OUT/failures.txt"
		return 0
	fi
	echo "$out" | tr -d '"' | awk -F, -v p="$row,$target" -v r="$round" \
		'$2 + 0 > 0 { print p "," $1 "," r "," $2 "," $5 "," $7 }' >>"$RAW"
	if [[ -n $pids ]]; then # row,target,round,CPU us per request
		# shellcheck disable=SC2086
		awk -v r="$row,$target,$round" -v t="$(($(cpu_ticks $pids) - ticks))" -v hz="$CLK_TCK" -v n="$(requests "$@")" \
			'BEGIN { printf "%s,%.3f\n", r, t / hz * 1e6 / n }' >>"$CPU"
	fi
	printf '  %-8s %s\n' "$target" "$(echo "$out" | tr -d '"' | awk -F, '$2 + 0 > 0 { printf "%s %.0f/s p50 %s ms  ", $1, $2, $5 }')"
}

ROWS=(a b c d e)
declare -A ROW_ARGS=(
	[a]="-t set,get -c 50 -n $N_A"
	[b]="-t set,get -c 50 -P 16 -n $N_B"
	[c]="-t get -c 1 -n $N_C"
	[d]="-t set,get -c $D_CLIENTS -d 102400 -n $N_D --dbnum 1" # its own database: later GETs read small values
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

# System calls per batch at -P 16: one GET run per hop, counted by perf stat's syscall tracepoints
# (strace -c where perf has none: it slows the hop, but counts the same calls).
N_COUNT=$((N_B / 2))
COUNT_ARGS="-t get -c 50 -P 16 -n $N_COUNT"
EVENTS=raw_syscalls:sys_enter,context-switches
for call in read write writev readv recvfrom sendto recvmsg sendmsg epoll_wait epoll_pwait futex nanosleep; do
	EVENTS+=,syscalls:sys_enter_$call
done
COUNTER=perf
perf stat -e "$EVENTS" -- true >/dev/null 2>"$OUT/perf-check.txt" || COUNTER=strace
echo "== System calls at -P 16 ($COUNTER): redis-benchmark $COUNT_ARGS"
for target in "${PROXIES[@]}"; do
	pids=$(target_pids "$target")
	if [[ $COUNTER == perf ]]; then
		perf stat -x, -e "$EVENTS" -p "${pids// /,}" -o "$OUT/syscalls-$target.txt" &
	else
		# shellcheck disable=SC2046 # -p PID for each process
		strace -c -f -o "$OUT/syscalls-$target.txt" $(printf -- '-p %s ' $pids) &
	fi
	COUNT_PID=$!
	sleep 1 # attaching takes a moment; the counts are per batch, so idle time adds only waits
	# shellcheck disable=SC2046,SC2086
	redis-benchmark $(target_args "$target") $COUNT_ARGS -q >"$OUT/syscalls-$target.bench" 2>&1 || true
	kill -INT "$COUNT_PID"
	wait "$COUNT_PID" || true
	COUNT_PID=''
done

echo "== Row f: proxy memory with $IDLE_CLIENTS idle clients (a fresh proxy)"
stop_pids "$PROXY_PID"
start_proxy
rss() { awk '/^VmRSS:/ { print $2 }' "/proc/$PROXY_PID/status"; } # KiB
rss_before=$(rss)
# A stale file would pass the wait below before the new one is created (it did, on a loaded machine).
rm -f "$OUT/idleclients.out"
"$BIN/idleclients" -addr "127.0.0.1:$PROXY_PORT" -n "$IDLE_CLIENTS" >"$OUT/idleclients.out" 2>&1 &
IDLE_PID=$!
idle_ready() {
	alive "$IDLE_PID" || die "idleclients failed: $(tail -n 3 "$OUT/idleclients.out")"
	grep -qs '^ready' "$OUT/idleclients.out"
}
wait_until 180 "$IDLE_CLIENTS idle clients" idle_ready
sleep 3 # let the connection storm's garbage be collected before measuring
rss_with=$(rss)
stop_pids "$IDLE_PID"
IDLE_PID=''
per_client=$(awk -v a="$rss_before" -v b="$rss_with" -v n="$IDLE_CLIENTS" 'BEGIN { printf "%.1f", (b - a) / n }')
echo "  proxy RSS: $rss_before KiB before, $rss_with KiB with $IDLE_CLIENTS idle clients: $per_client KiB per client"

# bench_cluster runs row g: a clustered cache (fakeazure -cluster) with redis-benchmark --cluster, direct
# (TLS to every node) and through a proxy in cluster mode (a plain listener per node, on ports of its own),
# alternating as the other rows do. The C proxies can't take part: a cluster client needs a hop per node,
# and each node's address rewritten to its hop in the cluster's replies.
bench_cluster() {
	echo "== Row g: a cluster (3 primaries, 3 replicas), redis-benchmark --cluster ${ROW_ARGS[g]}, direct vs proxy"
	local main_fake=$FAKE_PID first round
	start_fakeazure 2h "$OUT/fake-cluster.env" "$OUT/fakeazure-cluster.log" -cluster
	CFAKE_PID=$FAKE_PID FAKE_PID=$main_fake
	CSEED_PORT=$FAKEAZURE_REDIS_PORT CCA=$(realpath "$FAKEAZURE_CA_FILE")
	CUSER=$FAKEAZURE_ADMIN_USER CPASS=$FAKEAZURE_ADMIN_PASSWORD
	first=$(free_port_range 9) # LISTEN, then a port per node (6) and two to spare
	CPROXY_PORT=$first
	ENTRA_REDIS_PROXY_LISTEN=127.0.0.1:$CPROXY_PORT ENTRA_REDIS_PROXY_CLUSTER_PORTS=$((first + 1))-$((first + 8)) \
		ENTRA_REDIS_PROXY_HTTP_LISTEN= ENTRA_REDIS_PROXY_LOG_LEVEL=warn \
		${BENCH_POOL_SIZE:+ENTRA_REDIS_PROXY_POOL_SIZE=$BENCH_POOL_SIZE} "$BIN/entra-redis-proxy" >>"$OUT/proxy-cluster.log" 2>&1 &
	CPROXY_PID=$!
	# Ready once CLUSTER SLOTS through LISTEN names the node listeners (the cluster was detected).
	cproxy_up() {
		alive "$CPROXY_PID" || die "the cluster proxy exited: $(tail -n 5 "$OUT/proxy-cluster.log")"
		redis-cli -p "$CPROXY_PORT" CLUSTER SLOTS 2>/dev/null | grep -qx "$((first + 1))"
	}
	wait_until 60 "the cluster proxy on port $CPROXY_PORT to name its node listeners" cproxy_up
	echo "cluster seed (TLS): 127.0.0.1:$CSEED_PORT; proxy in cluster mode: 127.0.0.1:$CPROXY_PORT, nodes on $((first + 1))-$((first + 8))"
	set -a # the single server's values again, for anything after this
	# shellcheck disable=SC1091
	. "$OUT/fake.env"
	set +a
	for ((round = 1; round <= ROUNDS; round++)); do
		for target in $( ((round % 2)) && echo cdirect cproxy || echo cproxy cdirect); do
			# shellcheck disable=SC2086
			bench g "$target" "$round" ${ROW_ARGS[g]}
		done
	done
}
ROW_ARGS[g]="-t set,get -c 50 -n $N_G"
if ((CLUSTER)); then
	bench_cluster
fi

# median ROW TARGET TEST FIELD prints the median of a field of $RAW (5: rps, 6: p50 ms, 7: p99 ms).
median() {
	awk -F, -v r="$1" -v t="$2" -v x="$3" -v f="$4" '$1 == r && $2 == t && $3 == x { print $f }' "$RAW" | sort -g |
		awk '{ v[NR] = $1 } END { if (NR == 0) print "nan"; else if (NR % 2) print v[(NR + 1) / 2]; else print (v[NR / 2] + v[NR / 2 + 1]) / 2 }'
}

# table_row LABEL ROW TEST FIELD SCALE KIND prints one table line. KIND says which target applies:
# tput (throughput at least haproxy's), p50 (added latency over direct at most haproxy's), conn (at least
# 8x direct and 2x nginx), p99 (none).
table_row() {
	local label=$1 row=$2 test=$3 field=$4 scale=$5 kind=$6
	awk -v label="$label" -v kind="$kind" -v s="$scale" \
		-v d="$(median "$row" direct "$test" "$field")" \
		-v t="$(median "$row" stunnel "$test" "$field")" \
		-v h="$(median "$row" haproxy "$test" "$field")" \
		-v x="$(median "$row" nginx "$test" "$field")" \
		-v p="$(median "$row" proxy "$test" "$field")" '
	function cell(v) { return v == "nan" ? "failed" : sprintf("%.0f", v * s) }
	function ratio(a, b) { return a == "nan" || b == "nan" || b == 0 ? "-" : sprintf("%.2f", a / b) }
	BEGIN {
		rh = ratio(p, h); rd = ratio(p, d); met = -1; target = "-"
		if (kind == "tput") { target = ">= 1.0x haproxy"; met = rh != "-" && rh + 0 >= 1 }
		else if (kind == "conn") {
			rx = ratio(p, x)
			target = ">= 8x direct, >= 2x nginx (here " rx "x)"; met = rd != "-" && rx != "-" && rd + 0 >= 8 && rx + 0 >= 2
		}
		else if (kind == "p50") {
			ap = p == "nan" || d == "nan" ? "?" : sprintf("%+.0f", (p - d) * s)
			ah = h == "nan" || d == "nan" ? "?" : sprintf("%+.0f", (h - d) * s)
			target = "added p50 <= haproxy'"'"'s (" ap " vs " ah " us)"; met = ap != "?" && ah != "?" && ap + 0 <= ah + 0
		}
		printf "| %s | %s | %s | %s | %s | %s | %s | %s | %s | %s |\n", label, cell(d), cell(t), cell(h), cell(x), cell(p), rh, rd, target, met < 0 ? "-" : met ? "yes" : "NO"
	}'
}

# cpu_median ROW TARGET prints the median CPU per request of TARGET's hop in ROW (us), or -.
cpu_median() {
	awk -F, -v r="$1" -v t="$2" '$1 == r && $2 == t { print $4 }' "$CPU" | sort -g |
		awk '{ v[NR] = $1 } END { if (NR == 0) print "-"; else if (NR % 2) print v[(NR + 1) / 2]; else print (v[NR / 2] + v[NR / 2 + 1]) / 2 }'
}

# count FILE CALL... prints the number of CALLs (system call names; "all", "cs" for context switches) in a
# perf stat -x, or strace -c output.
count() {
	local file=$1
	shift
	awk -F, -v calls=" $* " '
	FNR == 1 { strace = $0 ~ /% time/ }
	!strace && $3 != "" {
		name = $3; sub(/^syscalls:sys_enter_/, "", name)
		if (name == "raw_syscalls:sys_enter") name = "all"
		if (name == "context-switches") name = "cs"
		if (index(calls, " " name " ")) n += $1
	}
	strace {
		split($0, f, " "); last = f[length(f)]
		if (last ~ /^[a-z_0-9]+$/ && f[4] ~ /^[0-9]+$/) {
			if (last == "total") last = "all"
			if (index(calls, " " last " ")) n += f[4]
		}
	}
	END { print n + 0 }' "$file"
}

cpu=$(awk -F': ' '/^model name/ { print $2; exit }' /proc/cpuinfo)
{
	echo "## Benchmark: entra-redis-proxy vs direct TLS and the C proxies (stunnel, haproxy, nginx)"
	echo
	echo "Command: \`make bench\` (BENCH_ROUNDS=$ROUNDS${BENCH_POOL_SIZE:+, BENCH_POOL_SIZE=$BENCH_POOL_SIZE}), $(date -u '+%Y-%m-%d %H:%M UTC'), took $((SECONDS - started)) s."
	echo "Machine: $(nproc) CPUs, ${cpu:-unknown CPU}, Linux $(uname -r), load average at the end: $(cut -d' ' -f1-3 /proc/loadavg)."
	echo "Versions: entra-redis-proxy $version (POOL_SIZE ${BENCH_POOL_SIZE:-default}), $(go version | cut -d' ' -f3), $(redis-server --version | cut -d' ' -f1-3),"
	echo "$(redis-benchmark --version), $(stunnel4 -version 2>&1 | grep -m1 '^stunnel' | cut -d' ' -f1-2), haproxy $(haproxy -v | awk 'NR == 1 { print $3 }') (2 threads),"
	echo "nginx $(nginx -v 2>&1 | cut -d/ -f2) stream (2 workers)."
	echo "Everything (load generator, hop, redis-server) shares these CPUs on loopback; redis-server speaks TLS"
	echo "only, like Azure. Medians of $ROUNDS round(s); the targets alternate within each row. Ratios are"
	echo "proxy/other: above 1 is better for req/s, below 1 for latency (row c)."
	echo
	echo "| row | direct TLS | stunnel | haproxy | nginx | proxy | proxy/haproxy | proxy/direct | target | met |"
	echo "|---|---:|---:|---:|---:|---:|---:|---:|---|---|"
	table_row "a. SET, 50 clients (req/s)" a SET 5 1 tput
	table_row "a. GET, 50 clients (req/s)" a GET 5 1 tput
	table_row "b. SET, 50 clients, -P 16 (req/s)" b SET 5 1 tput
	table_row "b. GET, 50 clients, -P 16 (req/s)" b GET 5 1 tput
	table_row "c. GET, 1 client, p50 latency (us)" c GET 6 1000 p50
	table_row "c. GET, 1 client, p99 latency (us)" c GET 7 1000 p99
	table_row "d. SET 100 KB, $D_CLIENTS clients (req/s)" d SET 5 1 tput
	table_row "d. GET 100 KB, $D_CLIENTS clients (req/s)" d GET 5 1 tput
	table_row "e. GET, new connection per request, 20 clients (req/s)" e GET 5 1 conn
	awk -v v="$per_client" -v n="$IDLE_CLIENTS" 'BEGIN {
		printf "| f. proxy RSS per idle client, %d clients (KiB) | | | | | %.1f | | | <= 32 KiB | %s |\n", n, v, v <= 32 ? "yes" : "NO" }'
	for test in SET GET; do
		((CLUSTER)) || break
		awk -v t="$test" -v d="$(median g cdirect "$test" 5)" -v p="$(median g cproxy "$test" 5)" '
		function cell(v) { return v == "nan" ? "failed" : sprintf("%.0f", v) }
		BEGIN { printf "| g. cluster 3+3, --cluster %s, 50 clients (req/s) | %s | - | - | - | %s | - | %s | - | - |\n", t, cell(d), cell(p),
			d == "nan" || p == "nan" || d == 0 ? "-" : sprintf("%.2f", p / d) }'
	done
	echo
	echo "CPU of the hop per request (utime+stime of its processes over each run, median, us; row e: per new"
	echo "connection). Target at -P 16 (row b): the proxy's at most haproxy's."
	echo
	if [[ -n $PROXY2_ENV$PROXY2_BIN ]]; then
		echo "| row | stunnel | haproxy | nginx | proxy | proxy/haproxy | proxy2 ($PROXY2_LABEL) | proxy2/proxy CPU | proxy2/proxy req/s |"
		echo "|---|---:|---:|---:|---:|---:|---:|---:|---|"
	else
		echo "| row | stunnel | haproxy | nginx | proxy | proxy/haproxy |"
		echo "|---|---:|---:|---:|---:|---:|"
	fi
	for row in "${ROWS[@]}"; do
		h=$(cpu_median "$row" haproxy) p=$(cpu_median "$row" proxy) q=$(cpu_median "$row" proxy2)
		line="| $row | $(cpu_median "$row" stunnel) | $h | $(cpu_median "$row" nginx) | $p | $(awk -v p="$p" -v h="$h" 'BEGIN { print (p == "-" || h == "-" || h == 0) ? "-" : sprintf("%.2f", p / h) }') |"
		if [[ -n $PROXY2_ENV$PROXY2_BIN ]]; then
			rps=$(for x in SET GET; do
				a=$(median "$row" proxy "$x" 5) b=$(median "$row" proxy2 "$x" 5)
				[[ $a == nan || $b == nan ]] || awk -v x="$x" -v a="$a" -v b="$b" 'BEGIN { printf "%s %.2f ", x, b / a }'
			done)
			line+=" $q | $(awk -v p="$p" -v q="$q" 'BEGIN { print (p == "-" || q == "-" || p == 0) ? "-" : sprintf("%.2f", q / p) }') | ${rps:--} |"
		fi
		echo "$line"
	done
	echo
	echo "System calls per 16-command batch at -P 16 (redis-benchmark $COUNT_ARGS, counted with $COUNTER over"
	echo "the whole run, both directions; raw counts in $OUT/syscalls-*.txt):"
	echo
	echo "| hop | all | reads | writes | epoll waits | futex | context switches |"
	echo "|---|---:|---:|---:|---:|---:|---:|"
	for target in "${PROXIES[@]}"; do
		f=$OUT/syscalls-$target.txt
		[[ -s $f ]] || continue
		awk -v t="$target" -v b="$((N_COUNT / 16))" -v all="$(count "$f" all)" -v r="$(count "$f" read readv recvfrom recvmsg)" \
			-v w="$(count "$f" write writev sendto sendmsg)" -v e="$(count "$f" epoll_wait epoll_pwait)" \
			-v fx="$(count "$f" futex)" -v cs="$(count "$f" cs)" -v perf="$COUNTER" '
			function per(n) { return sprintf("%.2f", n / b) }
			BEGIN { printf "| %s | %s | %s | %s | %s | %s | %s |\n", t, per(all), per(r), per(w), per(e), per(fx), perf == "perf" ? per(cs) : "-" }'
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
echo "Written to $OUT/results.md; raw numbers in $RAW, system call counts in $OUT/syscalls-*.txt, logs in $OUT/."
