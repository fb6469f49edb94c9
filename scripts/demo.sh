#!/usr/bin/env bash
# End-to-end demo on loopback, in about a minute: a fake Azure Cache for Redis with Entra ID
# authentication and 20-second tokens, the proxy in front of it, plain redis-cli through the
# proxy, and one connection that stays open while the token rotates underneath it.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh

LIFETIME=20s
BIN=bin
WORK=$(mktemp -d -t entra-redis-proxy-demo.XXXXXX)
FAKE_PID='' PROXY_PID='' CLI_PID=''

cleanup() {
	stop_pids "$CLI_PID" "$PROXY_PID" "$FAKE_PID"
	rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

section() { printf '\n== %s\n' "$*"; }

# show_log FILE PATTERN prints the log lines matching PATTERN, indented.
show_log() { grep -E -- "$2" "$1" | sed 's/^/    log: /'; }

need_go
need_packages redis-server:redis-server redis-cli:redis-tools

section "1. Build the proxy and the fake Azure cache"
mkdir -p "$BIN"
version=$(git describe --tags --always --dirty 2>/dev/null || echo dev)
CGO_ENABLED=0 go build -trimpath -ldflags "-s -w -X main.version=$version" -o "$BIN/entra-redis-proxy" ./cmd/entra-redis-proxy
go build -o "$BIN/fakeazure" ./internal/cmd/fakeazure
echo "built $BIN/entra-redis-proxy and $BIN/fakeazure"

section "2. Start a fake Azure Cache for Redis (TLS-only redis-server + managed identity endpoint, $LIFETIME tokens)"
start_fakeazure "$LIFETIME" "$WORK/fake.env" "$WORK/fakeazure.log"
echo "redis-server (TLS only, no default user): $ENTRA_REDIS_PROXY_UPSTREAM"
echo "identity endpoint (like App Service):     $IDENTITY_ENDPOINT"
echo "each token is a new ACL user, named by the token's oid, deleted when the token expires"

section "3. Start entra-redis-proxy"
port=6379
port_in_use "$port" && port=$(free_port)
export ENTRA_REDIS_PROXY_LISTEN=127.0.0.1:$port
export ENTRA_REDIS_PROXY_HTTP_LISTEN=127.0.0.1:$(free_port)
echo "ENTRA_REDIS_PROXY_LISTEN=$ENTRA_REDIS_PROXY_LISTEN"
echo "ENTRA_REDIS_PROXY_UPSTREAM=$ENTRA_REDIS_PROXY_UPSTREAM"
echo "ENTRA_REDIS_PROXY_CREDENTIAL=$ENTRA_REDIS_PROXY_CREDENTIAL (azidentity, talking to the fake endpoint)"
"$BIN/entra-redis-proxy" >"$WORK/proxy.log" 2>&1 &
PROXY_PID=$!
proxy_ready() {
	alive "$PROXY_PID" || die "the proxy exited: $(tail -n 5 "$WORK/proxy.log")"
	grep -q 'msg="ready: holding an Entra token"' "$WORK/proxy.log"
}
wait_until 30 "the proxy's first token" proxy_ready
show_log "$WORK/proxy.log" 'msg="new Entra token"'

section "4. Hello world through the proxy: plain redis-cli, no TLS, no password"
cli=(redis-cli -h 127.0.0.1 -p "$port")
echo "\$ redis-cli -p $port SET Az:key1 value1"
"${cli[@]}" SET Az:key1 value1
echo "\$ redis-cli -p $port GET Az:key1"
"${cli[@]}" GET Az:key1

section "5. Open one connection and keep it open"
coproc CLI { exec "${cli[@]}" 2>&1; } # sets CLI_PID, stopped by cleanup
# ask CMD... sends one command on the long-lived connection and prints its one-line reply.
ask() {
	local reply
	echo "$*" >&"${CLI[1]}"
	IFS= read -r -t 10 reply <&"${CLI[0]}" || die "no reply to '$*' on the long-lived connection"
	echo "$reply"
}
oid1=$(ask ACL WHOAMI)
id1=$(ask CLIENT ID)
echo "ACL WHOAMI -> $oid1   (the oid of the token the proxy authenticated with)"
echo "CLIENT ID  -> $id1   (this connection's id inside redis-server)"

section "6. Wait for the next token (the proxy refreshes well before expiry)"
new_token_line() { grep 'msg="new token: re-authenticating connections"' "$WORK/proxy.log" | grep -v "username=$oid1" | head -n 1; }
has_new_token() { [[ -n $(new_token_line) ]]; }
wait_until 60 "a new token" has_new_token
new_token_line | sed 's/^/    log: /'
oid2=$(new_token_line | sed -n 's/.* username=\([^ ]*\).*/\1/p')
on_new_token() { [[ $(ask ACL WHOAMI) == "$oid2" ]]; }
wait_until 20 "the connection to move to token $oid2" on_new_token
id2=$(ask CLIENT ID)
echo "same connection: ACL WHOAMI -> $oid2   CLIENT ID -> $id2"
[[ $id2 == "$id1" ]] || die "CLIENT ID changed from $id1 to $id2: the upstream connection was replaced"
echo "re-authenticated in place: the same redis connection, now on the new token"

section "7. The first token expires: the cache deletes its user (ACL DELUSER)"
expired() { grep -q "msg=\"token expired, ACL user deleted\".*oid=$oid1" "$WORK/fakeazure.log"; }
wait_until 40 "token $oid1 to expire" expired
show_log "$WORK/fakeazure.log" "oid=$oid1"
echo "same connection: GET Az:key1 -> $(ask GET Az:key1)   ACL WHOAMI -> $(ask ACL WHOAMI)   CLIENT ID -> $(ask CLIENT ID)"

section "Done: the client never saw TLS, a token or a reconnect"
echo "proxy log: $(grep -c 'msg="new Entra token"' "$WORK/proxy.log") tokens fetched; stopping everything"
