package proxy_test

import (
	"bufio"
	"context"
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/Azure/azure-sdk-for-go/sdk/azcore"
	"github.com/redis/go-redis/v9"

	"github.com/entra-redis-proxy/entra-redis-proxy/internal/azurefake"
	"github.com/entra-redis-proxy/entra-redis-proxy/proxy"
	"github.com/entra-redis-proxy/entra-redis-proxy/resp"
	"github.com/entra-redis-proxy/entra-redis-proxy/tokensource"
)

// fixture is an Azure-like cache (TLS redis-server, a new ACL user per token, deleted at expiry), the real
// azidentity managed identity credential talking to the fake identity endpoint, and a proxy in front.
type fixture struct {
	env  *azurefake.Env
	src  *tokensource.Source
	srv  *proxy.Server
	addr string // the proxy's listener
}

type fixtureOpts struct {
	lifetime   time.Duration // token lifetime; default 2m
	idlePing   time.Duration // proxy.Options.IdlePing
	username   string        // token source username override
	caFile     string        // trust this CA instead of the fake's
	upstream   string        // dial this address instead of the fake's
	reqTimeout time.Duration // tokensource.Options.RequestTimeout; default 30s
	proxyOpt   func(*proxy.Options)
	userRules  []string                        // azurefake.Options.UserRules: a data access policy
	renames    map[string]string               // azurefake.Options.RenameCommands: a server lacking some
	listener   func(net.Listener) net.Listener // wraps the proxy's listener (to watch client connections)
}

// testLogger prints the proxy's warnings (everything with PROXY_TEST_DEBUG set), and fails the test if the
// proxy ever got a reply it did not expect: reply accounting must be exact in every test.
func testLogger(t testing.TB) *slog.Logger {
	show := slog.LevelWarn
	if os.Getenv("PROXY_TEST_DEBUG") != "" {
		show = slog.LevelDebug
	}
	text := slog.NewTextHandler(testWriter{t}, &slog.HandlerOptions{Level: slog.LevelDebug})
	return slog.New(&checkHandler{Handler: text, t: t, show: show})
}

// unexpectedReply is the proxy's debug message for a reply with no command waiting for it.
const unexpectedReply = "reply with no command waiting; passing it on"

type checkHandler struct {
	slog.Handler
	t    testing.TB
	show slog.Level
}

func (h *checkHandler) Enabled(context.Context, slog.Level) bool { return true }

func (h *checkHandler) Handle(ctx context.Context, r slog.Record) error {
	if r.Message == unexpectedReply {
		h.t.Errorf("the proxy got a reply it did not expect: reply accounting is off")
	}
	if r.Level < h.show {
		return nil
	}
	return h.Handler.Handle(ctx, r)
}

func (h *checkHandler) WithAttrs(as []slog.Attr) slog.Handler {
	return &checkHandler{Handler: h.Handler.WithAttrs(as), t: h.t, show: h.show}
}

func (h *checkHandler) WithGroup(name string) slog.Handler {
	return &checkHandler{Handler: h.Handler.WithGroup(name), t: h.t, show: h.show}
}

type testWriter struct{ t testing.TB }

func (w testWriter) Write(p []byte) (int, error) {
	w.t.Log(strings.TrimRight(string(p), "\n"))
	return len(p), nil
}

func newFixture(t testing.TB, o fixtureOpts) *fixture {
	t.Helper()
	if o.lifetime == 0 {
		// Long enough for no rotation in a test, and short enough that MSAL's process-wide managed identity
		// cache (which keeps tokens valid for 5 minutes or more) never hands one Env's token to another.
		o.lifetime = 2 * time.Minute
	}
	env := azurefake.StartT(t, azurefake.Options{TokenLifetime: o.lifetime, UserRules: o.userRules, RenameCommands: o.renames})
	return newProxyFor(t, env, o)
}

func newProxyFor(t testing.TB, env *azurefake.Env, o fixtureOpts) *fixture {
	t.Helper()
	t.Setenv("IDENTITY_ENDPOINT", env.IdentityEndpoint)
	t.Setenv("IDENTITY_HEADER", env.IdentityHeader)
	log := testLogger(t)
	src, err := tokensource.New(func() (azcore.TokenCredential, error) {
		return tokensource.NewCredential("managed-identity", "", "")
	}, tokensource.Options{Scope: "https://redis.azure.com/.default", Username: o.username, Logger: log,
		RequestTimeout: o.reqTimeout})
	if err != nil {
		t.Fatal(err)
	}
	caFile := env.CAFile
	if o.caFile != "" {
		caFile = o.caFile
	}
	pem, err := os.ReadFile(caFile)
	if err != nil {
		t.Fatal(err)
	}
	pool := x509.NewCertPool()
	pool.AppendCertsFromPEM(pem)
	upstream := env.RedisAddr
	if o.upstream != "" {
		upstream = o.upstream
	}
	opts := proxy.Options{
		Tokens: src, Logger: log, IdlePing: o.idlePing, DialTimeout: 5 * time.Second,
		Dialer:       &proxy.TLSDialer{Addr: upstream, Config: &tls.Config{ServerName: env.ServerName, RootCAs: pool}},
		ReauthSpread: 200 * time.Millisecond,
		// Off unless a test turns it on: a connection the cache closed (a token that expired before its
		// re-AUTH) must show as a closed client, not be hidden by a reconnect.
		ReconnectTimeout: -1,
	}
	if o.proxyOpt != nil {
		o.proxyOpt(&opts)
	}
	ctx, cancel := context.WithCancel(context.Background())
	runDone := make(chan struct{})
	go func() { defer close(runDone); src.Run(ctx) }()
	t.Cleanup(func() { cancel(); <-runDone }) // after the proxy's cleanup (cleanups run last first)
	srv, addr := startProxyOn(t, opts, o.listener)
	f := &fixture{env: env, src: src, srv: srv, addr: addr}
	select {
	case <-src.Ready():
	case <-time.After(10 * time.Second):
		t.Fatal("no token from the fake identity endpoint")
	}
	return f
}

// startProxy runs a Server built from opts on a loopback listener until the test ends, and checks then that
// no client connection had to be cut.
func startProxy(t testing.TB, opts proxy.Options) (*proxy.Server, string) {
	t.Helper()
	return startProxyOn(t, opts, nil)
}

// startProxyOn is startProxy with the listener wrapped by wrap, if not nil.
func startProxyOn(t testing.TB, opts proxy.Options, wrap func(net.Listener) net.Listener) (*proxy.Server, string) {
	t.Helper()
	srv, err := proxy.New(opts)
	if err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	if wrap != nil {
		ln = wrap(ln)
	}
	done := make(chan struct{})
	go func() { defer close(done); srv.Serve(ln) }()
	t.Cleanup(func() {
		ln.Close()
		<-done
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		if cut := srv.Shutdown(ctx); cut > 0 {
			t.Errorf("%d client connections still open at the end", cut)
		}
	})
	return srv, ln.Addr().String()
}

// client returns a go-redis client of the proxy that keeps exactly one connection.
func (f *fixture) client(t *testing.T, protocol int) *redis.Client {
	t.Helper()
	c := redis.NewClient(&redis.Options{Addr: f.addr, Protocol: protocol, PoolSize: 1, MinIdleConns: 0,
		MaxRetries: -1, ReadTimeout: 10 * time.Second, DisableIdentity: true})
	t.Cleanup(func() { c.Close() })
	return c
}

// atLeast reports whether the cache's redis-server is major.minor or newer: tests use a version's equivalent
// of a command it lacks (Azure Cache for Redis runs 6.0, without what 6.2 added).
func (f *fixture) atLeast(major, minor int) bool { return f.env.Version().AtLeast(major, minor) }

// minted returns how many tokens the identity endpoint has issued.
func (f *fixture) minted() int { return f.env.Stats().Minted }

// deleted returns how many token users have been deleted (expired).
func (f *fixture) deleted() int {
	n := 0
	for _, tok := range f.env.Tokens() {
		if tok.Deleted {
			n++
		}
	}
	return n
}

// currentOID is the oid of the newest token.
func (f *fixture) currentOID() string {
	tok, _ := f.src.Current()
	return tok.Username
}

// waitFor polls cond until it holds or timeout passes.
func waitFor(t *testing.T, timeout time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %v waiting for %s", timeout, what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// raw is a plain socket to the proxy for tests that check exact bytes.
type raw struct {
	t *testing.T
	c net.Conn
	r *bufio.Reader
}

func (f *fixture) raw(t *testing.T) *raw {
	t.Helper()
	c, err := net.Dial("tcp", f.addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return &raw{t: t, c: c, r: bufio.NewReader(c)}
}

// send writes commands, each a space-separated list of arguments, in one write.
func (r *raw) send(cmds ...string) {
	r.t.Helper()
	var b []byte
	for _, c := range cmds {
		b = resp.AppendCommand(b, strings.Fields(c)...)
	}
	if _, err := r.c.Write(b); err != nil {
		r.t.Fatal(err)
	}
}

// expect reads exactly len(want) bytes and compares them.
func (r *raw) expect(want string) {
	r.t.Helper()
	r.c.SetReadDeadline(time.Now().Add(10 * time.Second))
	got := make([]byte, len(want))
	if _, err := io.ReadFull(r.r, got); err != nil {
		r.t.Fatalf("reading %q: got %q, %v", want, got, err)
	}
	if string(got) != want {
		r.t.Fatalf("got %q, want %q", got, want)
	}
}

// readBulk reads one bulk string reply.
func (r *raw) readBulk() string {
	r.t.Helper()
	r.c.SetReadDeadline(time.Now().Add(10 * time.Second))
	line, err := r.r.ReadString('\n')
	if err != nil || !strings.HasPrefix(line, "$") {
		r.t.Fatalf("want a bulk reply, got %q, %v", line, err)
	}
	n, err := strconv.Atoi(strings.TrimSpace(line[1:]))
	if err != nil || n < 0 {
		r.t.Fatalf("bad bulk header %q", line)
	}
	b := make([]byte, n+2)
	if _, err := io.ReadFull(r.r, b); err != nil {
		r.t.Fatal(err)
	}
	return string(b[:n])
}

func bulk(s string) string { return fmt.Sprintf("$%d\r\n%s\r\n", len(s), s) }
