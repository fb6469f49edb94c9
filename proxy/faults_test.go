package proxy_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/entra-redis-proxy/entra-redis-proxy/internal/azurefake"
	"github.com/entra-redis-proxy/entra-redis-proxy/proxy"
)

// While the identity endpoint hangs, fails or talks nonsense for 60% of a token's life, clients notice
// nothing: no error, no new connection; when it recovers, connections move to the next token.
func TestIdentityEndpointFaults(t *testing.T) {
	const lifetime = 6 * time.Second
	for _, fault := range []azurefake.Fault{azurefake.FaultHang, azurefake.FaultStatus500, azurefake.FaultGarbage} {
		t.Run(fault.String(), func(t *testing.T) {
			f := newFixture(t, fixtureOpts{lifetime: lifetime, reqTimeout: time.Second})
			ctx := t.Context()
			idle, busy := f.client(t, 2), f.client(t, 3)
			idleID, err := idle.ClientID(ctx).Result()
			if err != nil {
				t.Fatal(err)
			}
			busyID, err := busy.ClientID(ctx).Result()
			if err != nil {
				t.Fatal(err)
			}

			// The fault starts as a token arrives and lasts 60% of its life, past its refresh at half-life.
			// What is left after it (2.4 s) must hold two request timeouts (1 s each): an attempt that
			// starts just before the fault ends gets a 500, and MSAL's own retry delay then takes the rest
			// of its timeout (seen at 80%, under load: the token expired before the next attempt).
			_, changed := f.src.Current()
			select {
			case <-changed:
			case <-time.After(2 * lifetime):
				t.Fatal("no new token")
			}
			f.env.SetFault(fault)
			faulty := f.currentOID()
			faults := f.env.Stats().Faults
			busyErr := make(chan error, 1)
			stop := make(chan struct{})
			go func() { busyErr <- busyLoop(ctx, busy, stop) }()
			select {
			case <-time.After(lifetime * 6 / 10):
			case err := <-busyErr:
				t.Fatalf("busy client during the fault: %v", err)
			}
			f.env.SetFault(azurefake.FaultNone)
			if f.env.Stats().Faults == faults {
				t.Fatal("the identity endpoint was not asked during the fault: the test proves nothing")
			}
			// Recovery: both connections reach a newer token, and outlive the one they had during the fault.
			waitFor(t, lifetime, "a token newer than the one of the fault", func() bool { return f.currentOID() != faulty })
			for name, c := range map[string]redisDoer{"idle": idle, "busy": busy} {
				waitFor(t, 5*time.Second, name+" on the newest token", func() bool {
					who, err := c.Do(ctx, "ACL", "WHOAMI").Text()
					return err == nil && who == f.currentOID()
				})
			}
			waitFor(t, 2*lifetime, "the fault's token to expire", func() bool { return oidDeleted(f.env, faulty) })
			close(stop)
			if err := <-busyErr; err != nil {
				t.Fatalf("busy client: %v", err)
			}
			for name, c := range map[string]redisDoer{"idle": idle, "busy": busy} {
				want := map[string]int64{"idle": idleID, "busy": busyID}[name]
				if id, err := c.Do(ctx, "CLIENT", "ID").Int64(); err != nil || id != want {
					t.Errorf("%s: CLIENT ID = %d, %v; want %d (the same upstream connection)", name, id, err, want)
				}
			}
		})
	}
}

// redisDoer is what the tests need of a go-redis client.
type redisDoer interface {
	Do(ctx context.Context, args ...any) *redis.Cmd
}

// busyLoop runs SET/GET pairs on c until stop is closed, and returns the first error.
func busyLoop(ctx context.Context, c *redis.Client, stop <-chan struct{}) error {
	for i := 0; ; i++ {
		select {
		case <-stop:
			return nil
		default:
		}
		v := strconv.Itoa(i)
		if err := c.Set(ctx, "busy", v, 0).Err(); err != nil {
			return fmt.Errorf("SET #%d: %w", i, err)
		}
		if got, err := c.Get(ctx, "busy").Result(); err != nil || got != v {
			return fmt.Errorf("GET #%d = %q, %v; want %q", i, got, err, v)
		}
	}
}

// oidDeleted reports whether the token with this oid has expired and its ACL user is gone.
func oidDeleted(env *azurefake.Env, oid string) bool {
	for _, tok := range env.Tokens() {
		if tok.OID == oid {
			return tok.Deleted
		}
	}
	return false
}

// expectClosed reads r until the proxy closes it, failing on a hang. What came before the close may only
// be whole error replies: never part of a reply.
func expectClosed(t *testing.T, r *raw, within time.Duration) {
	t.Helper()
	r.c.SetReadDeadline(time.Now().Add(within))
	rest, err := io.ReadAll(r.r)
	if err != nil && !errors.Is(err, syscall.ECONNRESET) {
		t.Fatalf("connection not closed within %v (%v); read %q", within, err, rest)
	}
	for _, line := range strings.SplitAfter(string(rest), "\r\n") {
		if line != "" && (!strings.HasPrefix(line, "-") || !strings.HasSuffix(line, "\r\n")) {
			t.Fatalf("read %q before the close: not whole error replies", rest)
		}
	}
}

// When redis goes away, its clients are closed at once, not left hanging; clients arriving meanwhile are
// told why; once it is back, new clients are served within a second.
func TestUpstreamRestart(t *testing.T) {
	f := newFixture(t, fixtureOpts{})
	ctx := t.Context()
	idle := f.raw(t)
	idle.send("PING")
	idle.expect("+PONG\r\n")
	blocked := f.raw(t)
	blocked.send("CLIENT SETNAME blocker", "BLPOP restart:q 0")
	blocked.expect("+OK\r\n")
	waitFor(t, 5*time.Second, "BLPOP to block in redis", func() bool {
		list, err := f.env.Admin(ctx, "CLIENT", "LIST")
		s, _ := list.(string)
		return err == nil && strings.Contains(s, "name=blocker") && strings.Contains(s, "cmd=blpop")
	})

	if err := f.env.StopRedis(); err != nil {
		t.Fatal(err)
	}
	for name, r := range map[string]*raw{"idle": idle, "blocked": blocked} {
		t.Run(name+" client closed", func(t *testing.T) { expectClosed(t, r, 3*time.Second) })
	}
	t.Run("client while redis is down", func(t *testing.T) {
		r := f.raw(t)
		r.send("PING")
		r.c.SetReadDeadline(time.Now().Add(10 * time.Second))
		if line, err := r.r.ReadString('\n'); err != nil || !strings.HasPrefix(line, "-ERR entra-redis-proxy: connect to "+f.env.RedisAddr) {
			t.Fatalf("reply %q, %v; want an error saying the upstream cannot be reached", line, err)
		}
		expectClosed(t, r, 3*time.Second)
	})

	if err := f.env.StartRedis(ctx); err != nil {
		t.Fatal(err)
	}
	back := time.Now()
	r := f.raw(t)
	r.send("PING")
	r.expect("+PONG\r\n")
	if d := time.Since(back); d > time.Second {
		t.Errorf("first client after the restart served after %v; want within 1s", d)
	}
}

// A certificate the proxy must not trust is refused, and the client's first command gets an error that
// names the reason.
func TestUpstreamCertificateRefused(t *testing.T) {
	env := startEnv(t)
	expired := azurefake.StartT(t, azurefake.Options{TokenLifetime: 2 * time.Minute, ExpiredCert: true})
	cases := []struct {
		desc string
		env  *azurefake.Env
		o    fixtureOpts
		want string
	}{
		{"untrusted CA", env, fixtureOpts{caFile: env.UntrustedCAFile()}, "certificate signed by unknown authority"},
		{"another host", env, fixtureOpts{proxyOpt: func(o *proxy.Options) {
			o.Dialer.(*proxy.TLSDialer).Config.ServerName = "other.example.com"
		}}, "not other.example.com"},
		{"expired", expired, fixtureOpts{}, "certificate has expired"},
	}
	for _, tc := range cases {
		t.Run(tc.desc, func(t *testing.T) {
			f := newProxyFor(t, tc.env, tc.o)
			r := f.raw(t)
			r.send("PING")
			r.c.SetReadDeadline(time.Now().Add(10 * time.Second))
			line, err := r.r.ReadString('\n')
			if err != nil {
				t.Fatalf("reply %q, %v", line, err)
			}
			if !strings.HasPrefix(line, "-ERR entra-redis-proxy: TLS handshake with "+tc.env.RedisAddr) || !strings.Contains(line, tc.want) {
				t.Fatalf("reply %q; want a TLS handshake error saying %q", line, tc.want)
			}
			expectClosed(t, r, 3*time.Second)
		})
	}
}

// refusingTokens wraps the proxy's token source: once armed, it disables the ACL user of the next new
// token before the proxy can send it, so the re-AUTH gets WRONGPASS. Refresh re-enables it if heal is set.
type refusingTokens struct {
	proxy.TokenSource
	env  *azurefake.Env
	heal bool

	mu      sync.Mutex
	armed   bool
	seen    string // the secret current when armed
	refused string // the oid disabled
	err     error  // of the ACL command

	refreshes atomic.Int32
}

func (r *refusingTokens) arm() {
	tok, _ := r.TokenSource.Current()
	r.mu.Lock()
	defer r.mu.Unlock()
	r.armed, r.seen = true, tok.Secret
}

func (r *refusingTokens) Current() (proxy.Token, <-chan struct{}) {
	tok, ch := r.TokenSource.Current()
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.armed && tok.Secret != r.seen {
		r.armed, r.refused = false, tok.Username
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		_, r.err = r.env.Admin(ctx, "ACL", "SETUSER", tok.Username, "off")
	}
	return tok, ch
}

func (r *refusingTokens) Refresh(ctx context.Context) (proxy.Token, error) {
	r.refreshes.Add(1)
	tok, err := r.TokenSource.Refresh(ctx)
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.heal && r.refused != "" {
		_, r.err = r.env.Admin(ctx, "ACL", "SETUSER", r.refused, "on")
	}
	return tok, err
}

func (r *refusingTokens) refusedOID() (string, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.refused, r.err
}

// syncBuffer collects log output for a test to search, and passes it on to t.Log.
type syncBuffer struct {
	t  *testing.T
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.t.Log(strings.TrimRight(string(p), "\n"))
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// A re-AUTH that Azure refuses with WRONGPASS is retried once with a freshly fetched token; if that is
// refused too, the connection is closed with a log line that says why.
func TestWrongpassOnReauth(t *testing.T) {
	const lifetime = 4 * time.Second
	env := azurefake.StartT(t, azurefake.Options{TokenLifetime: lifetime})
	for _, heal := range []bool{true, false} {
		desc := map[bool]string{true: "retry succeeds", false: "retry refused too"}[heal]
		t.Run(desc, func(t *testing.T) {
			logs := &syncBuffer{t: t}
			var rt *refusingTokens
			f := newProxyFor(t, env, fixtureOpts{proxyOpt: func(o *proxy.Options) {
				rt = &refusingTokens{TokenSource: o.Tokens, env: env, heal: heal}
				o.Tokens = rt
				o.Logger = slog.New(slog.NewTextHandler(logs, &slog.HandlerOptions{Level: slog.LevelWarn}))
			}})
			ctx := t.Context()
			c := f.client(t, 2)
			id, err := c.ClientID(ctx).Result()
			if err != nil {
				t.Fatal(err)
			}
			r := f.raw(t)
			r.send("PING")
			r.expect("+PONG\r\n")
			old := f.currentOID()

			rt.arm()
			waitFor(t, 2*lifetime, "a new token to be refused", func() bool { oid, _ := rt.refusedOID(); return oid != "" })
			refused, err := rt.refusedOID()
			if err != nil {
				t.Fatalf("disable the new token's user: %v", err)
			}
			waitFor(t, 5*time.Second, "the proxy to fetch a fresh token", func() bool { return rt.refreshes.Load() > 0 })

			if heal {
				// The retry works: the same connections, on the new token, outlive the old one.
				waitFor(t, 5*time.Second, "the connection on the refused-then-accepted token", func() bool {
					who, err := c.Do(ctx, "ACL", "WHOAMI").Text()
					return err == nil && who == refused
				})
				waitFor(t, 2*lifetime, "the old token to expire", func() bool { return oidDeleted(env, old) })
				if got, err := c.ClientID(ctx).Result(); err != nil || got != id {
					t.Errorf("CLIENT ID = %d, %v; want %d (the same upstream connection)", got, err, id)
				}
				r.send("PING")
				r.expect("+PONG\r\n")
			} else {
				expectClosed(t, r, 5*time.Second)
				want := "upstream refused a freshly fetched token; closing the connection"
				waitFor(t, 5*time.Second, "the log line", func() bool { return strings.Contains(logs.String(), want) })
				if strings.Contains(logs.String(), "eyJ") {
					t.Error("the log shows a token")
				}
			}
			// One retry per connection, not a loop.
			if n := rt.refreshes.Load(); n > 2 {
				t.Errorf("%d token refreshes for two connections; want at most one each", n)
			}
		})
	}
}
