package main

// End-to-end tests of the binary's code in-process: run() against an Azure-like redis-server and
// identity endpoint (internal/azurefake), with real HTTP probes and go-redis clients. They change the
// process environment and one sends SIGTERM to the test process, so none of them runs in parallel.

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/signal"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/entra-redis-proxy/entra-redis-proxy/internal/azurefake"
)

// tokenLifetime stays under 5 minutes: MSAL's process-wide managed identity cache would otherwise hand one
// test's token to the next test's proxy.
const tokenLifetime = 2 * time.Minute

// syncBuffer is an io.Writer that run's goroutines write to while the test reads it.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// eventually polls cond until it returns true or timeout passes, then fails with cond's last message.
func eventually(t *testing.T, timeout time.Duration, what string, cond func() (bool, string)) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		ok, msg := cond()
		if ok {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: not within %v: %s", what, timeout, msg)
		}
		time.Sleep(20 * time.Millisecond) // poll interval, not a synchronisation
	}
}

// freeAddr returns a loopback address with a port that was free a moment ago.
func freeAddr(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().String()
}

// setFakeEnv points the proxy's settings at fake (and only there: every other setting is unset).
func setFakeEnv(t *testing.T, fake *azurefake.Env) {
	t.Helper()
	cleanEnv(t)
	for _, kv := range fake.ProxyEnv() {
		k, v, _ := strings.Cut(kv, "=")
		t.Setenv(k, v)
	}
}

// assertNoToken fails if out holds any token fake issued.
func assertNoToken(t *testing.T, fake *azurefake.Env, what, out string) {
	t.Helper()
	for _, tok := range fake.Tokens() {
		if strings.Contains(out, tok.Token) {
			t.Errorf("%s contains token %d", what, tok.Seq)
		}
	}
}

// proxyRun is run() in a goroutine, with its settings and output.
type proxyRun struct {
	t              *testing.T
	fake           *azurefake.Env
	listen, http   string // LISTEN and the base URL of HTTP_LISTEN
	admin          string // the base URL of ADMIN_LISTEN
	adminClient    *http.Client
	stdout, stderr *syncBuffer
	done           chan int // receives run's exit code
}

// startProxy runs the proxy against fake with free loopback ports and /quitquitquit on, plus extra
// settings (ENTRA_REDIS_PROXY_ is added to their names). The test's cleanup stops it if it still runs.
func startProxy(t *testing.T, fake *azurefake.Env, extra map[string]string) *proxyRun {
	t.Helper()
	setFakeEnv(t, fake)
	p := &proxyRun{t: t, fake: fake, listen: freeAddr(t), stdout: &syncBuffer{}, stderr: &syncBuffer{}, done: make(chan int, 1),
		adminClient: http.DefaultClient}
	httpAddr, adminAddr := freeAddr(t), freeAddr(t)
	p.http = "http://" + httpAddr
	env := map[string]string{"LISTEN": p.listen, "HTTP_LISTEN": httpAddr, "ADMIN_LISTEN": adminAddr, "QUITQUITQUIT": "true", "LOG_LEVEL": "debug"}
	for k, v := range extra {
		env[k] = v
	}
	if l, ok := extra["LISTEN"]; ok {
		p.listen = l
	}
	p.admin = "http://" + env["ADMIN_LISTEN"]
	if path, ok := strings.CutPrefix(env["ADMIN_LISTEN"], "unix:"); ok {
		p.admin = "http://admin.invalid" // the host is not used: every connection goes to the socket
		p.adminClient = &http.Client{Transport: &http.Transport{DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "unix", path)
		}}}
	}
	setEnv(t, env)
	go func() { p.done <- run(nil, p.stdout, p.stderr) }()
	t.Cleanup(func() {
		select {
		case <-p.done:
		default:
			p.quit()
			select {
			case <-p.done:
			case <-time.After(45 * time.Second):
				t.Errorf("the proxy did not stop after /quitquitquit")
			}
		}
		assertNoToken(t, fake, "stdout", p.stdout.String())
		assertNoToken(t, fake, "the log", p.stderr.String())
		if t.Failed() {
			t.Logf("proxy log:\n%s", p.stderr.String())
		}
	})
	return p
}

// get returns the status code and body of a GET on HTTP_LISTEN, or 0 and the error when the request failed.
func (p *proxyRun) get(path string) (int, string) {
	return p.request(http.DefaultClient, http.MethodGet, p.http+path)
}

// quit POSTs /quitquitquit on ADMIN_LISTEN.
func (p *proxyRun) quit() (int, string) {
	return p.request(p.adminClient, http.MethodPost, p.admin+"/quitquitquit")
}

func (p *proxyRun) request(c *http.Client, method, url string) (int, string) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, method, url, nil)
	if err != nil {
		return 0, err.Error()
	}
	resp, err := c.Do(req)
	if err != nil {
		return 0, err.Error()
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
	if err != nil {
		return 0, err.Error()
	}
	return resp.StatusCode, string(body)
}

// awaitStatus polls path until it answers code.
func (p *proxyRun) awaitStatus(path string, code int, timeout time.Duration) {
	p.t.Helper()
	eventually(p.t, timeout, fmt.Sprintf("GET %s = %d", path, code), func() (bool, string) {
		got, body := p.get(path)
		return got == code, fmt.Sprintf("%d %q", got, body)
	})
}

func (p *proxyRun) awaitStarted() {
	p.t.Helper()
	p.awaitStatus("/startup", http.StatusOK, 30*time.Second)
}

// wait returns run's exit code, failing the test if it does not return within timeout.
func (p *proxyRun) wait(timeout time.Duration) int {
	p.t.Helper()
	select {
	case code := <-p.done:
		p.done <- code // for the cleanup
		return code
	case <-time.After(timeout):
		p.t.Fatalf("run did not return within %v", timeout)
		return -1
	}
}

// metric returns the value of the sample line that starts with series (name{labels}), from /metrics.
func (p *proxyRun) metric(series string) (float64, bool) {
	_, body := p.get("/metrics")
	for _, l := range strings.Split(body, "\n") {
		if v, ok := strings.CutPrefix(l, series+" "); ok {
			f, err := strconv.ParseFloat(v, 64)
			return f, err == nil
		}
	}
	return 0, false
}

// client returns a go-redis client of the proxy with at most one connection, closed by the test's cleanup.
// Close the client (not a *redis.Conn, which only goes back to the pool) to disconnect.
func (p *proxyRun) client() *redis.Client {
	network, addr := "tcp", p.listen
	if path, ok := strings.CutPrefix(p.listen, "unix:"); ok {
		network, addr = "unix", path
	}
	c := redis.NewClient(&redis.Options{Network: network, Addr: addr, PoolSize: 1, MaxRetries: -1, DialTimeout: 5 * time.Second,
		ReadTimeout: 10 * time.Second, WriteTimeout: 10 * time.Second})
	p.t.Cleanup(func() { c.Close() })
	return c
}

// setGet writes and reads a key through c.
func setGet(ctx context.Context, c interface {
	Set(context.Context, string, any, time.Duration) *redis.StatusCmd
	Get(context.Context, string) *redis.StringCmd
}, key, value string) error {
	if err := c.Set(ctx, key, value, time.Minute).Err(); err != nil {
		return fmt.Errorf("SET %s: %w", key, err)
	}
	got, err := c.Get(ctx, key).Result()
	if err != nil {
		return fmt.Errorf("GET %s: %w", key, err)
	}
	if got != value {
		return fmt.Errorf("GET %s = %q, want %q", key, got, value)
	}
	return nil
}

// rawPing dials addr, sends PING and returns the first reply line, or the error of the first step that failed.
func rawPing(addr string) (string, error) {
	c, err := net.DialTimeout("tcp", addr, 2*time.Second)
	if err != nil {
		return "", err
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(10 * time.Second))
	if _, err := c.Write([]byte("*1\r\n$4\r\nPING\r\n")); err != nil {
		return "", err
	}
	return bufio.NewReader(c).ReadString('\n')
}

func TestStartupProbesAndTraffic(t *testing.T) {
	fake := azurefake.StartT(t, azurefake.Options{TokenLifetime: tokenLifetime})
	fake.SetFault(azurefake.FaultStatus500) // no token until the test allows one
	p := startProxy(t, fake, nil)
	p.awaitStatus("/liveness", http.StatusOK, 30*time.Second)
	for _, path := range []string{"/startup", "/readiness"} {
		if code, body := p.get(path); code != http.StatusServiceUnavailable {
			t.Errorf("%s without a token: %d %q, want 503", path, code, body)
		}
	}

	fake.SetFault(azurefake.FaultNone)
	p.awaitStarted()
	for _, path := range []string{"/startup", "/liveness", "/readiness"} {
		if code, body := p.get(path); code != http.StatusOK {
			t.Errorf("%s: %d %q, want 200", path, code, body)
		}
	}

	ctx := t.Context()
	c := p.client()
	if err := setGet(ctx, c, "hello", "world"); err != nil {
		t.Fatal(err)
	}

	code, body := p.get("/metrics")
	if code != http.StatusOK {
		t.Fatalf("/metrics: %d", code)
	}
	for _, family := range []string{"entra_redis_proxy_client_connections", "entra_redis_proxy_client_connections_accepted_total",
		"entra_redis_proxy_upstream_connections", "entra_redis_proxy_token_expiry_timestamp_seconds", "entra_redis_proxy_bytes_total",
		"go_goroutines", "process_start_time_seconds"} {
		if !strings.Contains(body, "# TYPE "+family+" ") {
			t.Errorf("/metrics lacks %s", family)
		}
	}
	if v, ok := p.metric("entra_redis_proxy_client_connections"); !ok || v != 1 {
		t.Errorf("client_connections = %v (found %v), want 1", v, ok)
	}
	toks := fake.Tokens()
	if len(toks) == 0 {
		t.Fatal("the identity endpoint issued no token")
	}
	if v, ok := p.metric("entra_redis_proxy_token_expiry_timestamp_seconds"); !ok || int64(v) != toks[len(toks)-1].ExpiresOn.Unix() {
		t.Errorf("token_expiry_timestamp_seconds = %v (found %v), want %d", v, ok, toks[len(toks)-1].ExpiresOn.Unix())
	}
}

// shutdown starts the shutdown of p with SIGTERM or /quitquitquit.
func shutdown(t *testing.T, p *proxyRun, sigterm bool) {
	t.Helper()
	if !sigterm {
		if code, body := p.quit(); code != http.StatusOK {
			t.Fatalf("POST /quitquitquit: %d %q", code, body)
		}
		return
	}
	// run's signal.NotifyContext has registered a handler (it runs before serve starts the HTTP server
	// that answered /startup), so SIGTERM goes to it instead of killing the test binary. The test's own
	// registration keeps it that way should run have returned already.
	own := make(chan os.Signal, 1)
	signal.Notify(own, syscall.SIGTERM)
	t.Cleanup(func() { signal.Stop(own) })
	if err := syscall.Kill(os.Getpid(), syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	select {
	case <-own:
	case <-time.After(5 * time.Second):
		t.Fatal("SIGTERM was not delivered")
	}
}

// sendRaw dials the proxy's TCP listener and writes cmds; the connection is closed by the test's cleanup.
func (p *proxyRun) sendRaw(cmds string) net.Conn {
	p.t.Helper()
	c, err := net.DialTimeout("tcp", p.listen, 5*time.Second)
	if err != nil {
		p.t.Fatal(err)
	}
	p.t.Cleanup(func() { c.Close() })
	if _, err := c.Write([]byte(cmds)); err != nil {
		p.t.Fatal(err)
	}
	return c
}

// blpop is BLPOP key timeout in RESP.
func blpop(key, timeout string) string {
	return fmt.Sprintf("*3\r\n$5\r\nBLPOP\r\n$%d\r\n%s\r\n$%d\r\n%s\r\n", len(key), key, len(timeout), timeout)
}

// awaitBytesIn waits until the proxy has read n bytes from its clients: it forwards what it reads at once.
func (p *proxyRun) awaitBytesIn(n int) {
	p.t.Helper()
	eventually(p.t, 20*time.Second, fmt.Sprintf("the proxy reads %d bytes from its clients", n), func() (bool, string) {
		v, ok := p.metric(`entra_redis_proxy_bytes_total{direction="in"}`)
		return ok && v == float64(n), fmt.Sprintf("bytes_total{in} = %v (found %v)", v, ok)
	})
}

// awaitLog waits until the proxy's log contains line.
func (p *proxyRun) awaitLog(line string, timeout time.Duration) {
	p.t.Helper()
	eventually(p.t, timeout, fmt.Sprintf("the log says %q", line), func() (bool, string) {
		return strings.Contains(p.stderr.String(), line), "not yet"
	})
}

// readAll returns everything c receives until the proxy closes it (or a deadline of timeout passes).
func readAll(c net.Conn, timeout time.Duration) (string, error) {
	c.SetReadDeadline(time.Now().Add(timeout))
	b, err := io.ReadAll(c)
	return string(b), err
}

// The shutdown sequence with a client connection open: readiness 503 at once; during MIN_SIGTERM_DELAY new
// connections are accepted and the open one is served; then the listener closes, the open client, idle, is
// closed at once (its next safe point), and run exits 0 without waiting for MAX_SIGTERM_DELAY.
func TestShutdownDrains(t *testing.T) {
	fake := azurefake.StartT(t, azurefake.Options{TokenLifetime: tokenLifetime})
	for _, tc := range []struct {
		name    string
		sigterm bool
	}{{"quitquitquit", false}, {"SIGTERM", true}} {
		t.Run(tc.name, func(t *testing.T) {
			ctx := t.Context()
			p := startProxy(t, fake, map[string]string{"MIN_SIGTERM_DELAY": "3s", "MAX_SIGTERM_DELAY": "30s"})
			p.awaitStarted()
			p.awaitStatus("/readiness", http.StatusOK, 10*time.Second)
			held := p.client()
			if err := setGet(ctx, held, "before", "1"); err != nil {
				t.Fatal(err)
			}

			shutdown(t, p, tc.sigterm)
			start := time.Now()
			p.awaitStatus("/readiness", http.StatusServiceUnavailable, time.Second)
			if reply, err := rawPing(p.listen); err != nil || reply != "+PONG\r\n" {
				t.Errorf("a new connection during MIN_SIGTERM_DELAY: %q, %v; want +PONG", reply, err)
			}
			if err := setGet(ctx, held, "during", "2"); err != nil {
				t.Errorf("the open client during MIN_SIGTERM_DELAY: %v", err)
			}
			if time.Since(start) > 3*time.Second {
				t.Fatalf("the checks during the delay took %v, longer than the delay: the machine is too slow for this test", time.Since(start))
			}
			eventually(t, 10*time.Second, "the listener closes after MIN_SIGTERM_DELAY", func() (bool, string) {
				c, err := net.DialTimeout("tcp", p.listen, time.Second)
				if err == nil {
					c.Close()
				}
				return errors.Is(err, syscall.ECONNREFUSED), fmt.Sprintf("dial: %v", err)
			})
			if d := time.Since(start); d < 2900*time.Millisecond {
				t.Errorf("the listener closed %v after the shutdown began, before MIN_SIGTERM_DELAY (3s)", d)
			}
			if code := p.wait(10 * time.Second); code != exitOK {
				t.Errorf("exit %d after draining an idle client, want 0", code)
			}
			if d := time.Since(start); d > 20*time.Second {
				t.Errorf("run returned %v after the shutdown began: it waited for the idle client instead of closing it", d)
			}
			if err := held.Ping(ctx).Err(); err == nil {
				t.Error("the idle client still works after the drain")
			}
			if log := p.stderr.String(); !strings.Contains(log, "shut down cleanly") {
				t.Errorf("the log does not say the shutdown was clean:\n%s", log)
			}
		})
	}
}

// Defect 9: at SIGTERM, clients with a slow command in flight get its reply, then the proxy closes them and
// exits 0. Each client sends BLPOP with a 3s timeout, which redis answers with a null array.
func TestShutdownDeliversSlowReplies(t *testing.T) {
	const clients = 50
	fake := azurefake.StartT(t, azurefake.Options{TokenLifetime: tokenLifetime})
	p := startProxy(t, fake, map[string]string{"MAX_SIGTERM_DELAY": "30s"})
	p.awaitStarted()
	conns := make([]net.Conn, clients)
	sent := 0
	start := time.Now()
	for i := range conns {
		cmd := blpop(fmt.Sprintf("drain-%d", i), "3")
		conns[i] = p.sendRaw(cmd)
		sent += len(cmd)
	}
	p.awaitBytesIn(sent)
	if v, ok := p.metric(`entra_redis_proxy_bytes_total{direction="out"}`); !ok || v != 0 {
		t.Fatalf("replies reached the clients %v after the first BLPOP was sent, before SIGTERM (bytes_total{out} = %v, found %v): the machine is too slow for this test",
			time.Since(start), v, ok)
	}
	shutdown(t, p, true)
	for i, c := range conns {
		if got, err := readAll(c, 20*time.Second); got != "*-1\r\n" || err != nil {
			t.Errorf("client %d: %q, %v; want the BLPOP's null reply, then the connection closed", i, got, err)
		}
	}
	if code := p.wait(20 * time.Second); code != exitOK {
		t.Errorf("exit %d after every reply was delivered, want 0", code)
	}
	if log := p.stderr.String(); !strings.Contains(log, "shut down cleanly") {
		t.Errorf("the log does not say the shutdown was clean:\n%s", log)
	}
}

// A client that waits for a reply that never comes (BLPOP k 0) is cut after MAX_SIGTERM_DELAY, and the exit
// code says so unless EXIT_ZERO_ON_SIGTERM.
func TestShutdownCuts(t *testing.T) {
	fake := azurefake.StartT(t, azurefake.Options{TokenLifetime: tokenLifetime})
	for _, tc := range []struct {
		name     string
		exitZero string
		sigterm  bool
		wantCode int
	}{
		{"quitquitquit", "false", false, exitRuntime},
		{"SIGTERM", "false", true, exitRuntime},
		{"EXIT_ZERO_ON_SIGTERM", "true", false, exitOK},
	} {
		t.Run(tc.name, func(t *testing.T) {
			p := startProxy(t, fake, map[string]string{"MAX_SIGTERM_DELAY": "1s", "EXIT_ZERO_ON_SIGTERM": tc.exitZero})
			p.awaitStarted()
			cmd := blpop("never", "0")
			held := p.sendRaw(cmd)
			p.awaitBytesIn(len(cmd))
			start := time.Now()
			shutdown(t, p, tc.sigterm)
			code := p.wait(20 * time.Second)
			if code != tc.wantCode {
				t.Errorf("exit %d with a reply still outstanding, want %d", code, tc.wantCode)
			}
			if d := time.Since(start); d < 900*time.Millisecond {
				t.Errorf("run returned %v after the shutdown began, before MAX_SIGTERM_DELAY (1s)", d)
			}
			if got, _ := readAll(held, 10*time.Second); got != "" {
				t.Errorf("the cut client received %q, want nothing", got)
			}
			if log := p.stderr.String(); !strings.Contains(log, "open connections were cut") || !strings.Contains(log, "cut=1") {
				t.Errorf("the log does not say one connection was cut:\n%s", log)
			}
		})
	}
}

// A signal during the shutdown forces it: during the drain the open connections are cut at once (exit 1), and
// during MIN_SIGTERM_DELAY the delay ends.
func TestShutdownSecondSignalForces(t *testing.T) {
	fake := azurefake.StartT(t, azurefake.Options{TokenLifetime: tokenLifetime})
	for _, tc := range []struct {
		name     string
		env      map[string]string
		outWait  bool   // a client waits for a reply that never comes
		await    string // the log line after which the second signal is sent
		wantCode int
	}{
		{"drain", map[string]string{"MAX_SIGTERM_DELAY": "60s"}, true, "waiting for open connections to finish", exitRuntime},
		{"MIN_SIGTERM_DELAY", map[string]string{"MIN_SIGTERM_DELAY": "60s"}, false, "still accepting connections", exitOK},
	} {
		t.Run(tc.name, func(t *testing.T) {
			p := startProxy(t, fake, tc.env)
			p.awaitStarted()
			var held net.Conn
			if tc.outWait {
				cmd := blpop("never", "0")
				held = p.sendRaw(cmd)
				p.awaitBytesIn(len(cmd))
			}
			shutdown(t, p, true)
			p.awaitLog(tc.await, 10*time.Second)
			shutdown(t, p, true)
			start := time.Now()
			code := p.wait(20 * time.Second)
			// Promptly: well before the 60s, and (on today's session core) before a drained client's replies
			// would be given up on after 5s anyway.
			if d := time.Since(start); d > 3*time.Second {
				t.Errorf("run returned %v after the second SIGTERM, want it at once", d)
			}
			if code != tc.wantCode {
				t.Errorf("exit %d, want %d", code, tc.wantCode)
			}
			p.awaitLog("signal received during the shutdown", time.Second)
			if held != nil {
				if got, _ := readAll(held, 10*time.Second); got != "" {
					t.Errorf("the cut client received %q, want nothing", got)
				}
			}
		})
	}
}

// breakListener shuts down the listening socket on addr's port in this process (run's own listener), so
// its Accept fails with EINVAL: a listener failure that no retry cures.
func breakListener(t *testing.T, addr string) {
	t.Helper()
	_, port, _ := net.SplitHostPort(addr)
	want, _ := strconv.Atoi(port)
	fds, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Skipf("cannot list file descriptors: %v", err)
	}
	for _, e := range fds {
		fd, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		sa, err := syscall.Getsockname(fd)
		if in4, ok := sa.(*syscall.SockaddrInet4); err != nil || !ok || in4.Port != want {
			continue
		}
		if v, err := syscall.GetsockoptInt(fd, syscall.SOL_SOCKET, syscall.SO_ACCEPTCONN); err != nil || v != 1 {
			continue // a connection accepted on that port
		}
		if err := syscall.Shutdown(fd, syscall.SHUT_RD); err != nil {
			t.Fatal(err)
		}
		return
	}
	t.Fatalf("no listening socket on %s", addr)
}

// A listener that fails for good ends the proxy with exit 1 and a log line, after draining its clients.
func TestListenerFailure(t *testing.T) {
	fake := azurefake.StartT(t, azurefake.Options{TokenLifetime: tokenLifetime})
	p := startProxy(t, fake, map[string]string{"MIN_SIGTERM_DELAY": "60s"})
	p.awaitStarted()
	if err := setGet(t.Context(), p.client(), "k", "v"); err != nil {
		t.Fatal(err)
	}
	breakListener(t, p.listen)
	if code := p.wait(20 * time.Second); code != exitRuntime {
		t.Errorf("exit %d after the listener failed, want %d", code, exitRuntime)
	}
	log := p.stderr.String()
	for _, want := range []string{"listener failed", "invalid argument", "shut down after the listener failed"} {
		if !strings.Contains(log, want) {
			t.Errorf("the log lacks %q:\n%s", want, log)
		}
	}
}

func TestMaxConnections(t *testing.T) {
	fake := azurefake.StartT(t, azurefake.Options{TokenLifetime: tokenLifetime})
	p := startProxy(t, fake, map[string]string{"MAX_CONNECTIONS": "1"})
	p.awaitStarted()
	p.awaitStatus("/readiness", http.StatusOK, 10*time.Second)
	ctx := t.Context()

	first := p.client()
	if err := setGet(ctx, first, "k", "v"); err != nil {
		t.Fatal(err)
	}
	p.awaitStatus("/readiness", http.StatusServiceUnavailable, 5*time.Second)

	reply, err := rawPing(p.listen)
	if reply != "-ERR max number of clients reached\r\n" {
		t.Errorf("second client: %q, %v; want -ERR max number of clients reached", reply, err)
	}
	if v, ok := p.metric(`entra_redis_proxy_client_connections_rejected_total{reason="max_connections"}`); !ok || v != 1 {
		t.Errorf("rejected_total{max_connections} = %v (found %v), want 1", v, ok)
	}
	if v, ok := p.metric("entra_redis_proxy_max_connections"); !ok || v != 1 {
		t.Errorf("max_connections = %v (found %v), want 1", v, ok)
	}
	if err := setGet(ctx, first, "k2", "v2"); err != nil {
		t.Errorf("the first client after the refusal: %v", err)
	}

	first.Close()
	p.awaitStatus("/readiness", http.StatusOK, 10*time.Second)
	if reply, err := rawPing(p.listen); err != nil || reply != "+PONG\r\n" {
		t.Errorf("a client after the first left: %q, %v; want +PONG", reply, err)
	}
}

func TestUnixSocket(t *testing.T) {
	fake := azurefake.StartT(t, azurefake.Options{TokenLifetime: tokenLifetime})
	// Not t.TempDir: its long path can exceed the 108-byte limit of a socket path.
	dir, err := os.MkdirTemp("", "erp-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	sock := filepath.Join(dir, "s.sock")
	p := startProxy(t, fake, map[string]string{"LISTEN": "unix:" + sock})
	p.awaitStarted()

	fi, err := os.Stat(sock)
	if err != nil {
		t.Fatal(err)
	}
	if fi.Mode()&os.ModeSocket == 0 || fi.Mode().Perm() != 0o600 {
		t.Errorf("%s: mode %v, want a socket with 0600", sock, fi.Mode())
	}
	c := p.client()
	if err := setGet(t.Context(), c, "unix", "ok"); err != nil {
		t.Fatal(err)
	}
	c.Close()

	shutdown(t, p, false)
	if code := p.wait(20 * time.Second); code != exitOK {
		t.Errorf("exit %d, want 0", code)
	}
	if _, err := os.Lstat(sock); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("%s after exit: %v, want it removed", sock, err)
	}
}

// LOCAL_PASSWORD is documented as "clients must AUTH with this password before other commands".
func TestLocalPassword(t *testing.T) {
	fake := azurefake.StartT(t, azurefake.Options{TokenLifetime: tokenLifetime})
	p := startProxy(t, fake, map[string]string{"LOCAL_PASSWORD": "s3cret"})
	p.awaitStarted()
	err := p.client().Set(t.Context(), "k", "v", 0).Err()
	if err == nil || !strings.Contains(err.Error(), "NOAUTH") {
		t.Errorf("SET without AUTH when LOCAL_PASSWORD is set: %v, want a NOAUTH error", err)
	}
	if strings.Contains(p.stdout.String()+p.stderr.String(), "s3cret") {
		t.Error("the output contains LOCAL_PASSWORD")
	}
}

func TestCheck(t *testing.T) {
	fake := azurefake.StartT(t, azurefake.Options{TokenLifetime: tokenLifetime})
	for _, tc := range []struct {
		name     string
		env      map[string]string
		wantCode int
		want     []string // in stdout
	}{
		{"ok", nil, exitOK, []string{"ok      configuration", "ok      token", "ok      upstream", "expires", "AUTH and PING answered"}},
		{"WRONGPASS", map[string]string{"USERNAME": "not-this-identity"}, exitCheck,
			[]string{"ok      token", "username not-this-identity", "FAILED  auth", "WRONGPASS",
				"remedy:", "Microsoft Entra Authentication is enabled", "data access policy", "ENTRA_REDIS_PROXY_USERNAME"}},
		{"unreachable", map[string]string{"UPSTREAM": freeAddr(t)}, exitCheck,
			[]string{"ok      token", "FAILED  dial", "connection refused", "remedy:", "check ENTRA_REDIS_PROXY_UPSTREAM"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			setFakeEnv(t, fake)
			setEnv(t, tc.env)
			var stdout, stderr bytes.Buffer
			code := run([]string{"check"}, &stdout, &stderr)
			out := stdout.String()
			if code != tc.wantCode {
				t.Errorf("exit %d, want %d", code, tc.wantCode)
			}
			for _, w := range tc.want {
				if !strings.Contains(out, w) {
					t.Errorf("output lacks %q", w)
				}
			}
			toks := fake.Tokens()
			if len(toks) == 0 {
				t.Fatal("no token was issued")
			}
			if tc.env["USERNAME"] == "" && !strings.Contains(out, "username "+toks[len(toks)-1].OID) {
				t.Errorf("output lacks the token's username %s", toks[len(toks)-1].OID)
			}
			assertNoToken(t, fake, "check's output", out+stderr.String())
			if t.Failed() {
				t.Logf("stdout:\n%s\nstderr:\n%s", out, stderr.String())
			}
		})
	}
}

// /quitquitquit and /debug/pprof answer on ADMIN_LISTEN only; HTTP_LISTEN (which a manifest may bind to the
// pod address) keeps the probes and metrics and answers 404 for them.
func TestAdminListener(t *testing.T) {
	fake := azurefake.StartT(t, azurefake.Options{TokenLifetime: tokenLifetime})
	// Not t.TempDir: its long path can exceed the 108-byte limit of a socket path.
	dir, err := os.MkdirTemp("", "erp-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	sock := filepath.Join(dir, "admin.sock")
	for _, tc := range []struct {
		name  string
		admin string // ADMIN_LISTEN; empty: a free loopback port
	}{{"loopback", ""}, {"unix socket", "unix:" + sock}} {
		t.Run(tc.name, func(t *testing.T) {
			extra := map[string]string{"PPROF": "true"}
			if tc.admin != "" {
				extra["ADMIN_LISTEN"] = tc.admin
			}
			p := startProxy(t, fake, extra)
			p.awaitStarted()
			onHTTP := func(method, path string) (int, string) { return p.request(http.DefaultClient, method, p.http+path) }
			onAdmin := func(method, path string) (int, string) { return p.request(p.adminClient, method, p.admin+path) }
			for _, r := range []struct {
				on           func(string, string) (int, string)
				where        string
				method, path string
				code         int
				body         string
			}{
				{onHTTP, "HTTP_LISTEN", "GET", "/debug/pprof/", http.StatusNotFound, ""},
				{onHTTP, "HTTP_LISTEN", "GET", "/debug/pprof/goroutine?debug=1", http.StatusNotFound, ""},
				{onHTTP, "HTTP_LISTEN", "POST", "/quitquitquit", http.StatusNotFound, ""},
				{onHTTP, "HTTP_LISTEN", "GET", "/startup", http.StatusOK, "ok"},
				{onHTTP, "HTTP_LISTEN", "GET", "/metrics", http.StatusOK, "entra_redis_proxy_"},
				{onAdmin, "ADMIN_LISTEN", "GET", "/debug/pprof/", http.StatusOK, "goroutine"},
				{onAdmin, "ADMIN_LISTEN", "GET", "/debug/pprof/goroutine?debug=1", http.StatusOK, "goroutine profile"},
				{onAdmin, "ADMIN_LISTEN", "GET", "/quitquitquit", http.StatusMethodNotAllowed, ""},
				{onAdmin, "ADMIN_LISTEN", "GET", "/startup", http.StatusNotFound, ""},
				{onAdmin, "ADMIN_LISTEN", "GET", "/metrics", http.StatusNotFound, ""},
			} {
				code, body := r.on(r.method, r.path)
				if code != r.code || !strings.Contains(body, r.body) {
					t.Errorf("%s %s on %s: %d %.80q, want %d with %q", r.method, r.path, r.where, code, body, r.code, r.body)
				}
			}
			if tc.admin != "" {
				if fi, err := os.Stat(sock); err != nil || fi.Mode()&os.ModeSocket == 0 || fi.Mode().Perm() != 0o600 {
					t.Errorf("%s: %v, %v; want a socket with mode 0600", sock, fi, err)
				}
			}
			want := tc.admin
			if want == "" {
				want = strings.TrimPrefix(p.admin, "http://")
			}
			if log := p.stderr.String(); !strings.Contains(log, "admin="+want) {
				t.Errorf("the start line does not name the admin listener %s:\n%s", want, log)
			}

			if code, body := p.quit(); code != http.StatusOK {
				t.Fatalf("POST /quitquitquit on ADMIN_LISTEN: %d %q", code, body)
			}
			if code := p.wait(20 * time.Second); code != exitOK {
				t.Errorf("exit %d after /quitquitquit, want 0", code)
			}
			if _, err := os.Lstat(sock); tc.admin != "" && !errors.Is(err, os.ErrNotExist) {
				t.Errorf("%s after exit: %v, want it removed", sock, err)
			}
		})
	}
}

// With /quitquitquit and /debug/pprof both off, nothing listens on ADMIN_LISTEN.
func TestAdminListenerOff(t *testing.T) {
	fake := azurefake.StartT(t, azurefake.Options{TokenLifetime: tokenLifetime})
	adminAddr := freeAddr(t)
	p := startProxy(t, fake, map[string]string{"QUITQUITQUIT": "false", "ADMIN_LISTEN": adminAddr})
	p.awaitStarted()
	if c, err := net.DialTimeout("tcp", adminAddr, 2*time.Second); err == nil {
		c.Close()
		t.Errorf("%s accepts connections with QUITQUITQUIT and PPROF off", adminAddr)
	}
	if log := p.stderr.String(); !strings.Contains(log, "admin=off") {
		t.Errorf("the start line does not say admin=off:\n%s", log)
	}
	shutdown(t, p, true)
	if code := p.wait(20 * time.Second); code != exitOK {
		t.Errorf("exit %d, want 0", code)
	}
}

// The connection limit derived from RLIMIT_NOFILE refuses the client beyond it at once with redis's error,
// probes and served clients keep working, a larger MAX_CONNECTIONS is lowered with a WARN, and the start log
// says the limit, its source and how to raise it.
func TestConnectionLimitFromNofile(t *testing.T) {
	fake := azurefake.StartT(t, azurefake.Options{TokenLifetime: tokenLifetime})
	const nofile = 90 // 86 reserved with a pool of 4, 2 per client: 2 clients
	if cl, err := deriveConnLimit(syscall.Rlimit{Cur: nofile, Max: nofile}, 4, 0); err != nil || cl.limit != 2 {
		t.Fatalf("RLIMIT_NOFILE %d allows %d clients (%v), the test wants 2", nofile, cl.limit, err)
	}
	withNofile(t, syscall.Rlimit{Cur: nofile, Max: nofile})
	p := startProxy(t, fake, map[string]string{"MAX_CONNECTIONS": "1000", "POOL_MAX": "4"})
	p.awaitStarted()
	log := p.stderr.String()
	for _, want := range []string{
		`level=WARN msg="ENTRA_REDIS_PROXY_MAX_CONNECTIONS is above what the open-file limit allows: using the derived limit" max_connections=1000 limit=2`,
		`level=INFO msg="client connection limit" limit=2 source=RLIMIT_NOFILE nofile=90`,
		"ulimit -n",
	} {
		if !strings.Contains(log, want) {
			t.Errorf("the start log lacks %q:\n%s", want, log)
		}
	}
	if v, ok := p.metric("entra_redis_proxy_max_connections"); !ok || v != 2 {
		t.Errorf("max_connections = %v (found %v), want 2", v, ok)
	}

	ctx := t.Context()
	a, b := p.client(), p.client()
	for i, c := range []*redis.Client{a, b} {
		if err := setGet(ctx, c, fmt.Sprintf("k%d", i), "v"); err != nil {
			t.Fatalf("client %d within the limit: %v", i, err)
		}
	}
	p.awaitStatus("/readiness", http.StatusServiceUnavailable, 5*time.Second)
	reply, err := rawPing(p.listen)
	if reply != "-ERR max number of clients reached\r\n" {
		t.Errorf("the client beyond the limit: %q, %v; want -ERR max number of clients reached", reply, err)
	}
	if err := setGet(ctx, a, "k0", "v2"); err != nil {
		t.Errorf("a served client after the refusal: %v", err)
	}
	b.Close()
	p.awaitStatus("/readiness", http.StatusOK, 10*time.Second)
	if reply, err := rawPing(p.listen); err != nil || reply != "+PONG\r\n" {
		t.Errorf("a client after one left: %q, %v; want +PONG", reply, err)
	}
}

// net/http logs its own errors (here a handler's panic, as an accept failure at the open-file limit would
// be) through ErrorLog: with LOG_FORMAT=json they must come out as JSON lines of the proxy's logger.
func TestHTTPServerErrorsGoThroughSlog(t *testing.T) {
	var out syncBuffer
	log, err := newLogger(&Config{LogFormat: "json", LogLevel: "info"}, &out)
	if err != nil {
		t.Fatal(err)
	}
	hs := newHTTPServer(log, http.HandlerFunc(func(http.ResponseWriter, *http.Request) { panic("boom") }))
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- hs.Serve(ln) }()
	if resp, err := http.Get("http://" + ln.Addr().String() + "/"); err == nil {
		resp.Body.Close()
	}
	hs.Close() // waits for nothing, but the panic was logged before the connection closed
	<-done
	lines := strings.Split(strings.TrimSpace(out.String()), "\n")
	if len(lines) != 1 {
		t.Fatalf("want one log line for the panic, got %d:\n%s", len(lines), out.String())
	}
	var rec map[string]any
	if err := json.Unmarshal([]byte(lines[0]), &rec); err != nil {
		t.Fatalf("not JSON: %v\n%s", err, lines[0])
	}
	if rec["level"] != "WARN" || rec["component"] != "http" || !strings.Contains(fmt.Sprint(rec["msg"]), "http: panic serving") {
		t.Errorf("the panic's line: %v", rec)
	}
}
