package main

// End-to-end tests of the failure modes an operator meets (issue 14), with the binary's code against the
// emulated cache and identity endpoint. Figures the README quotes are logged with t.Logf (go test -v).

import (
	"bufio"
	"fmt"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/entra-redis-proxy/entra-redis-proxy/internal/azurefake"
	"github.com/entra-redis-proxy/entra-redis-proxy/proxy"
)

// connectedClients reads connected_clients from the cache's INFO, as the admin user (one connection).
func connectedClients(t *testing.T, fake *azurefake.Env) int {
	t.Helper()
	info, err := fake.Admin(t.Context(), "INFO", "clients")
	if err != nil {
		t.Fatal(err)
	}
	m := regexp.MustCompile(`connected_clients:(\d+)`).FindStringSubmatch(fmt.Sprint(info))
	if m == nil {
		t.Fatalf("INFO clients without connected_clients:\n%v", info)
	}
	n, _ := strconv.Atoi(m[1])
	return n
}

// logLines returns the proxy's log lines that contain msg.
func (p *proxyRun) logLines(msg string) []string {
	var out []string
	for _, l := range strings.Split(p.stderr.String(), "\n") {
		if strings.Contains(l, msg) {
			out = append(out, l)
		}
	}
	return out
}

const (
	tokenExpiredDrops = "upstream connections closed by the cache: the Entra token expired"
	noTokenRefusals   = "clients refused without dialing the cache: no valid Entra token"
)

// The identity endpoint answers 500, then hangs for 8 requests, past the token's life. Live connections are dropped by the
// cache at expiry: one WARN line with their count and a metric. A new client is answered at once, without
// a dial, with the cause. Once the endpoint answers again, a token arrives within about a second (no hung
// request is waited out) and clients are served again.
func TestIdentityOutagePastExpiry(t *testing.T) {
	const lifetime = 4 * time.Second
	fake := azurefake.StartT(t, azurefake.Options{TokenLifetime: lifetime})
	p := startProxy(t, fake, map[string]string{"POOL_SIZE": "0", "LOG_LEVEL": "info"})
	p.awaitStarted()
	ctx := t.Context()
	const live = 3
	for i := range live {
		if err := setGet(ctx, p.client(), fmt.Sprintf("k%d", i), "v"); err != nil {
			t.Fatal(err)
		}
	}
	fake.SetFault(azurefake.FaultStatus500)
	tokens := len(p.logLines("new Entra token"))

	// Past the token's life: the cache closes the live connections.
	p.awaitLog(tokenExpiredDrops, 3*lifetime)
	fake.SetFault(azurefake.FaultHang)
	hangFrom := fake.Stats().Faults
	dials, _ := p.metric("entra_redis_proxy_upstream_dial_duration_seconds_count")
	start := time.Now()
	reply, err := rawPing(p.listen)
	took := time.Since(start)
	t.Logf("a new client during the outage: answered in %v: %q", took, reply)
	if err != nil || !strings.HasPrefix(reply, "-ERR entra-redis-proxy: no valid Entra token since ") ||
		!strings.Contains(reply, "last Entra error: ") || !strings.Contains(reply, "500") ||
		!strings.Contains(reply, "check the identity endpoint") {
		t.Errorf("a new client during the outage: %q, %v; want the cause, the last Entra error and what to check", reply, err)
	}
	if took > 2*time.Second { // a dial would take DIAL_TIMEOUT (10s) to fail
		t.Errorf("answered after %v, want at once", took)
	}
	if after, _ := p.metric("entra_redis_proxy_upstream_dial_duration_seconds_count"); after != dials {
		t.Errorf("upstream dials %v -> %v during the outage, want none", dials, after)
	}
	if v, _ := p.metric(`entra_redis_proxy_client_connections_rejected_total{reason="no_token"}`); v != 1 {
		t.Errorf(`rejected_total{no_token} = %v, want 1`, v)
	}
	if v, _ := p.metric(`entra_redis_proxy_upstream_errors_total{kind="token_expired"}`); v != live {
		t.Errorf(`upstream_errors_total{token_expired} = %v, want %d`, v, live)
	}
	drops := p.logLines(tokenExpiredDrops)
	if len(drops) != 1 || !strings.Contains(drops[0], "level=WARN") || !strings.Contains(drops[0], fmt.Sprintf("count=%d", live)) {
		t.Errorf("want one WARN line with count=%d for the connections dropped at expiry, got:\n%s", live, strings.Join(drops, "\n"))
	}
	if l := p.logLines("upstream connection lost"); len(l) != 0 {
		t.Errorf("per-connection loss lines at expiry:\n%s", strings.Join(l, "\n"))
	}
	if l := p.logLines(noTokenRefusals); len(l) != 1 || !strings.Contains(l[0], "last_entra_error=") {
		t.Errorf("want one WARN line for the refused client with the last Entra error, got:\n%s", strings.Join(l, "\n"))
	}

	// Let the hang last until 8 requests hang (one a second: the first time out about then), so that hung
	// requests are out when it ends.
	eventually(t, 30*time.Second, "8 requests to the hanging identity endpoint", func() (bool, string) {
		n := fake.Stats().Faults - hangFrom
		return n >= 8, fmt.Sprintf("%d so far", n)
	})
	fake.SetFault(azurefake.FaultNone)
	recovered := time.Now()
	eventually(t, 10*time.Second, "a new token", func() (bool, string) {
		return len(p.logLines("new Entra token")) > tokens, "none yet"
	})
	t.Logf("recovery: a new token %v after the identity endpoint answered again", time.Since(recovered))
	if d := time.Since(recovered); d > 3*time.Second {
		t.Errorf("a new token %v after the endpoint answered again, want within a second or two", d)
	}
	if reply, err := rawPing(p.listen); err != nil || reply != "+PONG\r\n" {
		t.Errorf("a client after recovery: %q, %v", reply, err)
	}
}

// LOCAL_PASSWORD: unauthenticated clients hold no upstream; wrong passwords are answered later and later
// and the connection closed (with a FIN) after proxy.MaxAuthFailures; one WARN line per source per minute.
func TestLocalPasswordGuessing(t *testing.T) {
	fake := azurefake.StartT(t, azurefake.Options{TokenLifetime: tokenLifetime})
	// The cache's connected_clients counts the proxy's upstreams: without the control connections of cluster
	// detection and of the maintenance announcements, which come and go on their own schedule.
	p := startProxy(t, fake, map[string]string{"LOCAL_PASSWORD": "s3cret", "POOL_SIZE": "0", "LOG_LEVEL": "info",
		"CLUSTER": "off", "MAINTENANCE_EVENTS": "false"})
	p.awaitStarted()
	before := connectedClients(t, fake)

	// 30 idle unauthenticated clients, each answered (so each session runs).
	const idle = 30
	for range idle {
		c := p.sendRaw("*1\r\n$4\r\nPING\r\n")
		c.SetReadDeadline(time.Now().Add(10 * time.Second))
		if line, err := bufio.NewReader(c).ReadString('\n'); err != nil || line != "-NOAUTH Authentication required.\r\n" {
			t.Fatalf("unauthenticated PING: %q, %v", line, err)
		}
	}
	during := connectedClients(t, fake)
	t.Logf("the cache's connected_clients: %d before, %d with %d idle unauthenticated clients", before, during, idle)
	if during != before {
		t.Errorf("connected_clients %d -> %d with %d unauthenticated clients, want no upstream for them", before, during, idle)
	}

	// 300 wrong passwords in one write on one connection.
	const sent = 300
	start := time.Now()
	c := p.sendRaw(strings.Repeat("*2\r\n$4\r\nAUTH\r\n$5\r\nguess\r\n", sent))
	got, err := readAll(c, 20*time.Second)
	took := time.Since(start)
	answered := strings.Count(got, "-WRONGPASS invalid username-password pair or user is disabled.\r\n")
	if err != nil || answered != proxy.MaxAuthFailures || len(got) != answered*len("-WRONGPASS invalid username-password pair or user is disabled.\r\n") {
		t.Errorf("%d wrong AUTHs on one connection: %d answered, then %v (%q); want %d WRONGPASS, then EOF", sent, answered, err, got, proxy.MaxAuthFailures)
	}
	t.Logf("%d wrong passwords on one connection: %d answered in %v, then closed: %.1f guesses/s", sent, answered, took.Round(time.Millisecond),
		float64(answered)/took.Seconds())

	// A guesser that reconnects each time it is closed.
	const rounds = 3
	start = time.Now()
	for range rounds {
		c := p.sendRaw(strings.Repeat("AUTH guess\r\n", proxy.MaxAuthFailures))
		if out, err := readAll(c, 20*time.Second); err != nil || strings.Count(out, "-WRONGPASS") != proxy.MaxAuthFailures {
			t.Fatalf("reconnecting guesser: %q, %v", out, err)
		}
	}
	rate := float64(rounds*proxy.MaxAuthFailures) / time.Since(start).Seconds()
	t.Logf("a guesser reconnecting after each close: %.1f guesses/s", rate)

	wrong := float64((1 + rounds) * proxy.MaxAuthFailures)
	if v, _ := p.metric(`entra_redis_proxy_client_connections_rejected_total{reason="local_auth"}`); v != wrong {
		t.Errorf("rejected_total{local_auth} = %v, want %v", v, wrong)
	}
	if v, _ := p.metric(`entra_redis_proxy_client_connections_rejected_total{reason="local_auth_closed"}`); v != 1+rounds {
		t.Errorf("rejected_total{local_auth_closed} = %v, want %d", v, 1+rounds)
	}
	if l := p.logLines(`msg="wrong LOCAL_PASSWORD"`); len(l) != 1 || !strings.Contains(l[0], "level=WARN") || !strings.Contains(l[0], "count=1") {
		t.Errorf("within a minute from one address, want one WARN line (the first), got:\n%s", strings.Join(l, "\n"))
	}

	// The right password: served, on one new upstream.
	c = p.sendRaw("*2\r\n$4\r\nAUTH\r\n$6\r\ns3cret\r\n*1\r\n$4\r\nPING\r\n")
	r := bufio.NewReader(c)
	for _, want := range []string{"+OK\r\n", "+PONG\r\n"} {
		c.SetReadDeadline(time.Now().Add(10 * time.Second))
		if line, err := r.ReadString('\n'); err != nil || line != want {
			t.Fatalf("after the right password: %q, %v; want %q", line, err, want)
		}
	}
	if n := connectedClients(t, fake); n != before+1 {
		t.Errorf("connected_clients %d after one client authenticated, want %d", n, before+1)
	}
	// go-redis authenticates with HELLO 3 AUTH (RESP3) or AUTH (RESP2).
	for _, proto := range []int{2, 3} {
		c := redis.NewClient(&redis.Options{Addr: p.listen, Password: "s3cret", Protocol: proto, PoolSize: 1, MaxRetries: -1})
		if err := setGet(t.Context(), c, "auth", "ok"); err != nil {
			t.Errorf("go-redis RESP%d with the password: %v", proto, err)
		}
		c.Close()
	}

	// At shutdown the 30 unauthenticated clients, still open, are closed at once (drained, not cut), and the
	// minute's count is flushed: the rest of the wrong passwords in one more line.
	shutdown(t, p, false)
	if code := p.wait(20 * time.Second); code != exitOK {
		t.Errorf("exit %d with unauthenticated clients open, want %d (all drained)", code, exitOK)
	}
	if l := p.logLines(`msg="wrong LOCAL_PASSWORD"`); len(l) != 2 || !strings.Contains(l[1], fmt.Sprintf("count=%d", int(wrong)-1)) {
		t.Errorf("after shutdown, want a second line with count=%d, got:\n%s", int(wrong)-1, strings.Join(l, "\n"))
	}
}

// Clients refused at the connection limit make one WARN line per interval with a count, not one each.
func TestRefusalsLoggedWithACount(t *testing.T) {
	fake := azurefake.StartT(t, azurefake.Options{TokenLifetime: tokenLifetime})
	p := startProxy(t, fake, map[string]string{"MAX_CONNECTIONS": "1", "LOG_LEVEL": "info"})
	p.awaitStarted()
	if err := setGet(t.Context(), p.client(), "k", "v"); err != nil {
		t.Fatal(err)
	}
	const refused = 20
	for range refused {
		if reply, err := rawPing(p.listen); reply != "-ERR max number of clients reached\r\n" {
			t.Fatalf("a client beyond the limit: %q, %v", reply, err)
		}
	}
	if v, _ := p.metric(`entra_redis_proxy_client_connections_rejected_total{reason="max_connections"}`); v != refused {
		t.Errorf("rejected_total{max_connections} = %v, want %d", v, refused)
	}
	shutdown(t, p, false)
	p.wait(20 * time.Second)
	l := p.logLines(`msg="clients refused"`)
	if len(l) != 2 || !strings.Contains(l[0], "count=1") || !strings.Contains(l[1], fmt.Sprintf("count=%d", refused-1)) ||
		!strings.Contains(l[0], "reason=max_connections") {
		t.Errorf("want the first refusal's line and one line counting the other %d, got:\n%s", refused-1, strings.Join(l, "\n"))
	}
}

// LOG_CONNECTIONS=false moves the per-connection lines to debug; the token lines stay.
func TestLogConnectionsOff(t *testing.T) {
	fake := azurefake.StartT(t, azurefake.Options{TokenLifetime: tokenLifetime})
	p := startProxy(t, fake, map[string]string{"LOG_CONNECTIONS": "false", "LOG_LEVEL": "info"})
	p.awaitStarted()
	if reply, err := rawPing(p.listen); err != nil || reply != "+PONG\r\n" {
		t.Fatalf("PING: %q, %v", reply, err)
	}
	shutdown(t, p, false)
	p.wait(20 * time.Second)
	for _, msg := range []string{"client connected", "client disconnected"} {
		if l := p.logLines(msg); len(l) != 0 {
			t.Errorf("%q logged with LOG_CONNECTIONS=false:\n%s", msg, strings.Join(l, "\n"))
		}
	}
	if len(p.logLines("new Entra token")) == 0 {
		t.Error("the token line is missing")
	}
}
