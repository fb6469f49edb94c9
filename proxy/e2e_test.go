package proxy_test

import (
	"context"
	"fmt"
	"net"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/entra-redis-proxy/entra-redis-proxy/internal/azurefake"
	"github.com/entra-redis-proxy/entra-redis-proxy/proxy"
)

func startEnv(t *testing.T) *azurefake.Env {
	return azurefake.StartT(t, azurefake.Options{TokenLifetime: 2 * time.Minute})
}

// closedPort returns a loopback address nothing listens on.
func closedPort(t *testing.T) string {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close()
	return addr
}

// rotations waits until n more tokens have expired (their ACL users deleted, which drops every connection
// still on them), so a test has really lived through n rotations.
func (f *fixture) rotations(t *testing.T, n int) {
	t.Helper()
	target := f.deleted() + n
	waitFor(t, time.Duration(n+2)*10*time.Second, fmt.Sprintf("%d token expiries", n), func() bool { return f.deleted() >= target })
}

func TestSetGetThroughProxy(t *testing.T) {
	f := newFixture(t, fixtureOpts{})
	ctx := t.Context()
	for _, proto := range []int{2, 3} {
		t.Run(fmt.Sprintf("RESP%d", proto), func(t *testing.T) {
			c := f.client(t, proto)
			if err := c.Set(ctx, "Az:key1", "value1", 0).Err(); err != nil {
				t.Fatal(err)
			}
			if got, err := c.Get(ctx, "Az:key1").Result(); err != nil || got != "value1" {
				t.Fatalf("GET = %q, %v", got, err)
			}
			who, err := c.Do(ctx, "ACL", "WHOAMI").Text()
			if err != nil || who != f.currentOID() {
				t.Fatalf("ACL WHOAMI = %q, %v; want the token's oid %q", who, err, f.currentOID())
			}
		})
	}
}

// Idle and busy connections keep their upstream (same CLIENT ID) over several rotations, and end on the
// newest token.
func TestConnectionsSurviveRotations(t *testing.T) {
	f := newFixture(t, fixtureOpts{lifetime: 3 * time.Second})
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
	stop := make(chan struct{})
	errs := make(chan error, 1)
	go func() {
		defer close(errs)
		for i := 0; ; i++ {
			select {
			case <-stop:
				return
			default:
			}
			v := strconv.Itoa(i)
			if err := busy.Set(ctx, "busy", v, 0).Err(); err != nil {
				errs <- err
				return
			}
			if got, err := busy.Get(ctx, "busy").Result(); err != nil || got != v {
				errs <- fmt.Errorf("GET busy = %q, %v; want %q", got, err, v)
				return
			}
		}
	}()
	f.rotations(t, 3)
	close(stop)
	if err := <-errs; err != nil {
		t.Fatalf("busy connection: %v", err)
	}
	for name, c := range map[string]*redis.Client{"idle": idle, "busy": busy} {
		want := map[string]int64{"idle": idleID, "busy": busyID}[name]
		if id, err := c.ClientID(ctx).Result(); err != nil || id != want {
			t.Errorf("%s: CLIENT ID = %d, %v; want %d (the same upstream connection)", name, id, err, want)
		}
		waitFor(t, 5*time.Second, name+" on the newest token", func() bool {
			who, err := c.Do(ctx, "ACL", "WHOAMI").Text()
			return err == nil && who == f.currentOID()
		})
	}
}

// Pipelines sent continuously across rotations get every reply, in order.
func TestPipelinesInOrderAcrossRotations(t *testing.T) {
	f := newFixture(t, fixtureOpts{lifetime: 3 * time.Second})
	ctx := t.Context()
	c := f.client(t, 2)
	target := f.deleted() + 3
	for round := 0; f.deleted() < target; round++ {
		if round > 100000 {
			t.Fatal("rotations did not happen")
		}
		pipe := c.Pipeline()
		var cmds []*redis.StringCmd
		for i := range 50 {
			pipe.Set(ctx, fmt.Sprintf("p%d", i), fmt.Sprintf("%d-%d", round, i), 0)
			cmds = append(cmds, pipe.Get(ctx, fmt.Sprintf("p%d", i)))
		}
		if _, err := pipe.Exec(ctx); err != nil {
			t.Fatalf("round %d: %v", round, err)
		}
		for i, cmd := range cmds {
			if want := fmt.Sprintf("%d-%d", round, i); cmd.Val() != want {
				t.Fatalf("round %d: reply %d = %q, want %q", round, i, cmd.Val(), want)
			}
		}
	}
}

// A MULTI held open while a new token arrives gets exactly its own EXEC reply; the re-AUTH waits for it.
func TestMultiAcrossRefresh(t *testing.T) {
	f := newFixture(t, fixtureOpts{lifetime: 4 * time.Second})
	due := f.reauthDue()
	r := f.raw(t)
	r.send("MULTI", "SET tx 1", "INCR tx")
	r.expect("+OK\r\n+QUEUED\r\n+QUEUED\r\n")
	<-due // the AUTH is due while the MULTI is open: it must wait for EXEC
	r.send("EXEC")
	r.expect("*2\r\n+OK\r\n:2\r\n")
	// After EXEC the deferred AUTH goes out: the connection outlives the token it started with.
	f.rotations(t, 1)
	r.send("ACL WHOAMI")
	f.expectLiveOID(t, r.readBulk())
}

// reauthDue returns a channel that receives when the next re-AUTH becomes due on a session.
func (f *fixture) reauthDue() <-chan struct{} {
	due := make(chan struct{}, 1)
	proxy.OnReauthDue(f.srv, func(uint64) {
		select {
		case due <- struct{}{}:
		default:
		}
	})
	return due
}

// expectLiveOID checks that oid belongs to a token that has not expired.
func (f *fixture) expectLiveOID(t *testing.T, oid string) {
	t.Helper()
	for _, tok := range f.env.Tokens() {
		if tok.OID == oid {
			if tok.Deleted {
				t.Fatalf("connection is on expired token #%d", tok.Seq)
			}
			return
		}
	}
	t.Fatalf("ACL WHOAMI = %q: not a token's oid", oid)
}

// CLIENT REPLY OFF and SKIP stay exact across re-AUTHs: no injected reply reaches the client and none of
// the client's is lost.
func TestClientReplyAcrossRotation(t *testing.T) {
	f := newFixture(t, fixtureOpts{lifetime: 3 * time.Second})
	t.Run("off", func(t *testing.T) {
		r := f.raw(t)
		r.send("CLIENT REPLY OFF", "SET off1 a")
		f.rotations(t, 1) // the connection was re-authenticated with replies off, or it would be gone
		r.send("SET off2 b", "CLIENT REPLY ON", "MGET off1 off2", "ACL WHOAMI")
		r.expect("+OK\r\n*2\r\n" + bulk("a") + bulk("b"))
		f.expectLiveOID(t, r.readBulk())
	})
	t.Run("skip", func(t *testing.T) {
		due := f.reauthDue()
		r := f.raw(t)
		r.send("CLIENT REPLY SKIP")
		<-due // the AUTH is due after the SKIP: it must not take the skip
		r.send("SET skip1 a", "GET skip1")
		r.expect(bulk("a"))
		f.rotations(t, 1)
		r.send("ACL WHOAMI")
		f.expectLiveOID(t, r.readBulk())
	})
}

// RESET (6.2+) puts the connection back in database 0, still authenticated as the token's user; on 6.0 it is an
// unknown command and changes nothing.
func TestResetThenCommands(t *testing.T) {
	f := newFixture(t, fixtureOpts{})
	r := f.raw(t)
	r.send("SELECT 2", "RESET", "SET k v", "ACL WHOAMI", "SELECT 0", "GET k")
	if f.atLeast(6, 2) {
		r.expect("+OK\r\n+RESET\r\n+OK\r\n" + bulk(f.currentOID()) + "+OK\r\n" + bulk("v"))
	} else {
		r.expect("+OK\r\n-ERR unknown command `RESET`, with args beginning with: \r\n+OK\r\n" + bulk(f.currentOID()) + "+OK\r\n$-1\r\n")
	}
}

// The client's own credentials are answered by the proxy and never reach the cache.
func TestClientAuthAndHello(t *testing.T) {
	f := newFixture(t, fixtureOpts{})
	ctx := t.Context()
	t.Run("go-redis with a password", func(t *testing.T) {
		for _, proto := range []int{2, 3} {
			c := redis.NewClient(&redis.Options{Addr: f.addr, Protocol: proto, Username: "app", Password: "secret", PoolSize: 1})
			defer c.Close()
			if err := c.Set(ctx, "auth", "ok", 0).Err(); err != nil {
				t.Fatalf("RESP%d: %v", proto, err)
			}
			if who, err := c.Do(ctx, "ACL", "WHOAMI").Text(); err != nil || who != f.currentOID() {
				t.Fatalf("RESP%d: ACL WHOAMI = %q, %v", proto, who, err)
			}
		}
	})
	t.Run("raw", func(t *testing.T) {
		r := f.raw(t)
		r.send("AUTH onlypassword", "AUTH user pass", "ACL WHOAMI")
		r.expect("+OK\r\n+OK\r\n" + bulk(f.currentOID()))
	})
	t.Run("HELLO 3 AUTH SETNAME", func(t *testing.T) {
		c := f.client(t, 2)
		hello, err := c.Do(ctx, "HELLO", "3", "AUTH", "user", "pass", "SETNAME", "myapp").Result()
		if m, ok := hello.(map[any]any); err != nil || !ok || m["proto"] != int64(3) {
			t.Fatalf("HELLO = %#v, %v; want a RESP3 map with proto 3", hello, err)
		}
		if name, err := c.ClientGetName(ctx).Result(); err != nil || name != "myapp" {
			t.Fatalf("CLIENT GETNAME = %q, %v", name, err)
		}
		if who, err := c.Do(ctx, "ACL", "WHOAMI").Text(); err != nil || who != f.currentOID() {
			t.Fatalf("ACL WHOAMI = %q, %v", who, err)
		}
	})
}

func TestQuit(t *testing.T) {
	f := newFixture(t, fixtureOpts{})
	r := f.raw(t)
	r.send("SET q 1", "QUIT")
	r.expect("+OK\r\n+OK\r\n")
	r.c.SetReadDeadline(time.Now().Add(5 * time.Second))
	if b, err := r.r.ReadByte(); err == nil {
		t.Fatalf("read %q after QUIT; want the connection closed", b)
	}
}

// When the upstream can't be set up, the client's first command gets an error that says why.
func TestUpstreamFailures(t *testing.T) {
	env := startEnv(t)
	cases := []struct {
		desc string
		o    fixtureOpts
		want string
	}{
		{"upstream down", fixtureOpts{upstream: closedPort(t)}, "-ERR entra-redis-proxy: connect to"},
		{"untrusted CA", fixtureOpts{caFile: env.UntrustedCAFile()}, "-ERR entra-redis-proxy: TLS handshake with"},
		{"wrong username", fixtureOpts{username: "not-the-oid"}, "-WRONGPASS entra-redis-proxy: upstream refused AUTH for username not-the-oid: WRONGPASS"},
	}
	for _, tc := range cases {
		t.Run(tc.desc, func(t *testing.T) {
			f := newProxyFor(t, env, tc.o)
			r := f.raw(t)
			r.send("PING")
			r.expect(tc.want)
			line, _ := r.r.ReadString('\n')
			for _, tok := range f.env.Tokens() {
				if strings.Contains(line, tok.Token) {
					t.Fatal("the error reveals the token")
				}
			}
		})
	}
}

// RESP3 subscribers are re-authenticated in band: every message arrives across rotations.
func TestRESP3PubSubAcrossRotations(t *testing.T) {
	f := newFixture(t, fixtureOpts{lifetime: 3 * time.Second})
	ctx, cancel := context.WithCancel(t.Context())
	defer cancel()
	sub := f.client(t, 3).Subscribe(ctx, "news")
	if _, err := sub.Receive(ctx); err != nil {
		t.Fatal(err)
	}
	pub := f.client(t, 2)
	ch := sub.Channel()
	target := f.deleted() + 3
	n := 0
	for ; f.deleted() < target; n++ {
		if err := pub.Publish(ctx, "news", strconv.Itoa(n)).Err(); err != nil {
			t.Fatal(err)
		}
		select {
		case m := <-ch:
			if m.Payload != strconv.Itoa(n) {
				t.Fatalf("message %q, want %d", m.Payload, n)
			}
		case <-time.After(5 * time.Second):
			t.Fatalf("message %d did not arrive", n)
		}
	}
}

// MONITOR clients keep their stream across rotations; the proxy's AUTH replies don't show in it.
func TestMonitorAcrossRotations(t *testing.T) {
	f := newFixture(t, fixtureOpts{lifetime: 3 * time.Second})
	r := f.raw(t)
	r.send("MONITOR")
	r.expect("+OK\r\n")
	other := f.client(t, 2)
	f.rotations(t, 2)
	if err := other.Set(t.Context(), "monitored", "1", 0).Err(); err != nil {
		t.Fatal(err)
	}
	r.c.SetReadDeadline(time.Now().Add(10 * time.Second))
	for {
		line, err := r.r.ReadString('\n')
		if err != nil {
			t.Fatalf("monitor stream ended: %v", err)
		}
		if !strings.HasPrefix(line, "+") || len(line) < 2 || line[1] < '0' || line[1] > '9' {
			t.Fatalf("not a monitor line: %q", line)
		}
		if strings.Contains(line, `"monitored"`) {
			return
		}
	}
}
