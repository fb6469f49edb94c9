# Shared helpers for the scripts in this directory; source it, don't run it.
# shellcheck shell=bash

# die prints its arguments to stderr and exits 1.
die() {
	echo "error: $*" >&2
	exit 1
}

# need_packages CMD:PACKAGE... makes sure every CMD is on PATH (a CMD starting with / is a file that
# must exist). Missing ones are installed with apt-get when running as root; otherwise the exact
# command to run is printed.
need_packages() {
	local missing=() pkgs=() spec cmd pkg
	for spec in "$@"; do
		cmd=${spec%%:*} pkg=${spec#*:}
		if [[ $cmd == /* && ! -e $cmd ]] || [[ $cmd != /* ]] && ! command -v "$cmd" >/dev/null 2>&1; then
			missing+=("$cmd")
			[[ " ${pkgs[*]} " == *" $pkg "* ]] || pkgs+=("$pkg")
		fi
	done
	((${#missing[@]} == 0)) && return 0
	local install="apt-get update && apt-get install -y ${pkgs[*]}"
	if [[ $(id -u) != 0 ]]; then
		die "${missing[*]} not found. Install with (as root): $install"
	fi
	echo "${missing[*]} not found; running: $install"
	DEBIAN_FRONTEND=noninteractive apt-get update -qq &&
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${pkgs[@]}" >/dev/null ||
		die "installing ${pkgs[*]} failed; run: $install"
}

# need_go fails with a hint when the go command is missing.
need_go() {
	command -v go >/dev/null 2>&1 || die "go not found; install Go $(sed -n 's/^go //p' go.mod) or newer from https://go.dev/dl/"
}

# port_in_use PORT succeeds if something accepts TCP connections on 127.0.0.1:PORT.
port_in_use() {
	(exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

# free_port prints a loopback port nobody listens on right now. It stays below the kernel's
# ephemeral range, where a port can be busy as the local end of an outgoing connection.
free_port() {
	local low p
	low=$(cut -f1 /proc/sys/net/ipv4/ip_local_port_range 2>/dev/null || echo 32768)
	while :; do
		p=$((10000 + RANDOM % (low - 10000)))
		port_in_use "$p" || break
	done
	echo "$p"
}

# free_port_range N prints the first of N consecutive loopback ports nobody listens on right now
# (below the ephemeral range, as free_port).
free_port_range() {
	local n=$1 low p i
	low=$(cut -f1 /proc/sys/net/ipv4/ip_local_port_range 2>/dev/null || echo 32768)
	while :; do
		p=$((10000 + RANDOM % (low - 10000 - n)))
		for ((i = 0; i < n; i++)); do
			port_in_use $((p + i)) && break
		done
		((i == n)) && break
	done
	echo "$p"
}

# wait_until SECONDS WHAT COMMAND... runs COMMAND every 0.1 s until it succeeds; after
# SECONDS it fails, saying what it waited for.
wait_until() {
	local limit=$1 what=$2
	shift 2
	local deadline=$((SECONDS + limit))
	until "$@"; do
		((SECONDS < deadline)) || die "timed out after ${limit}s waiting for $what"
		sleep 0.1
	done
}

# alive PID succeeds while process PID runs.
alive() {
	kill -0 "$1" 2>/dev/null
}

# stop_pids PID... sends SIGTERM to each process and waits up to 10 s for it to exit, then
# SIGKILL. Only processes this script started are passed here.
stop_pids() {
	local pid i
	for pid in "$@"; do
		[[ -z $pid ]] || kill -TERM "$pid" 2>/dev/null || true
	done
	for pid in "$@"; do
		[[ -n $pid ]] || continue
		for ((i = 0; i < 100; i++)); do
			alive "$pid" || break
			sleep 0.1
		done
		kill -KILL "$pid" 2>/dev/null || true
		wait "$pid" 2>/dev/null || true # its exit status after SIGTERM says nothing
	done
	return 0
}

# start_fakeazure LIFETIME ENVFILE LOGFILE [FLAG...] starts the fake Azure cache (binary in $BIN) in
# the background, sets FAKE_PID, waits for its env file, and loads that file into the environment.
# FLAGs go to fakeazure (e.g. -cluster).
start_fakeazure() {
	local lifetime=$1 envfile=$2 log=$3
	shift 3
	rm -f "$envfile"
	"$BIN/fakeazure" -token-lifetime "$lifetime" -env-file "$envfile" "$@" >"$log" 2>&1 &
	FAKE_PID=$!
	local deadline=$((SECONDS + 40))
	until [[ -s $envfile ]]; do
		alive "$FAKE_PID" || die "fakeazure exited: $(tail -n 5 "$log")"
		((SECONDS < deadline)) || die "fakeazure not ready after 40s: $(tail -n 5 "$log")"
		sleep 0.1
	done
	set -a
	# shellcheck disable=SC1090
	. "$envfile"
	set +a
}
