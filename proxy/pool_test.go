package proxy_test

import (
	"slices"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/entra-redis-proxy/entra-redis-proxy/proxy"
)

func withPool(n int) func(*proxy.Options) { return func(o *proxy.Options) { o.PoolSize = n } }

// upstreamIDs returns the CLIENT IDs of the cache's connections other than the admin's.
func (f *fixture) upstreamIDs(t *testing.T) map[int64]bool {
	t.Helper()
	list, err := f.env.Admin(t.Context(), "CLIENT", "LIST")
	if err != nil {
		t.Fatal(err)
	}
	ids := map[int64]bool{}
	for _, line := range strings.Split(list.(string), "\n") {
		if line == "" || slices.Contains(strings.Fields(line), "user=admin") { // 6.0 ends the line with user=
			continue
		}
		for _, field := range strings.Fields(line) {
			if v, ok := strings.CutPrefix(field, "id="); ok {
				id, _ := strconv.ParseInt(v, 10, 64)
				ids[id] = true
			}
		}
	}
	return ids
}

// clientID returns the upstream CLIENT ID of a new raw connection, and the connection.
func (f *fixture) clientID(t *testing.T) (int64, *raw) {
	t.Helper()
	r := f.raw(t)
	r.send("CLIENT ID")
	r.c.SetReadDeadline(time.Now().Add(10 * time.Second))
	line, err := r.r.ReadString('\n')
	if err != nil || !strings.HasPrefix(line, ":") {
		t.Fatalf("CLIENT ID: %q, %v", line, err)
	}
	id, _ := strconv.ParseInt(strings.TrimSpace(line[1:]), 10, 64)
	return id, r
}

// clientInfo returns the fields of CLIENT INFO for the upstream connection id serving r: through r on 6.2+, and
// on 6.0, which has no CLIENT INFO, from the admin's CLIENT LIST.
func (f *fixture) clientInfo(t *testing.T, r *raw, id int64) []string {
	t.Helper()
	if f.atLeast(6, 2) {
		r.send("CLIENT INFO")
		return strings.Fields(r.readBulk())
	}
	list, err := f.env.Admin(t.Context(), "CLIENT", "LIST")
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(list.(string), "\n") {
		if fields := strings.Fields(line); slices.Contains(fields, "id="+strconv.FormatInt(id, 10)) {
			return fields
		}
	}
	t.Fatalf("upstream %d is not in CLIENT LIST %q", id, list)
	return nil
}

// poolIdle waits for the pool to hold n idle connections and no loan, and returns their CLIENT IDs.
func poolIdle(t *testing.T, f *fixture, n int) []int64 {
	t.Helper()
	var ids []int64
	proxy.AwaitPool(t, f.srv, strconv.Itoa(n)+" idle connections", func(idle []int64, lent int) bool {
		ids = idle
		return len(idle) == n && lent == 0
	})
	return ids
}

// poolObserver counts pool reuses and keeps the upstream_connections gauge.
type poolObserver struct {
	proxy.NopObserver
	reused, opened, closed atomic.Int64
	negative               atomic.Bool
}

func (o *poolObserver) Mechanism(name string) {
	if name == "pool_reuse" {
		o.reused.Add(1)
	}
}

func (o *poolObserver) UpstreamOpened(time.Duration) { o.opened.Add(1) }

func (o *poolObserver) UpstreamClosed() {
	if o.closed.Add(1) > o.opened.Load() {
		o.negative.Store(true)
	}
}

func observePool(n int, obs *poolObserver) func(*proxy.Options) {
	return func(o *proxy.Options) { o.PoolSize, o.Observer = n, obs }
}

// The pool keeps connections ready, never more than configured, and a clean client's upstream is reused.
func TestPoolReusesCleanConnections(t *testing.T) {
	f := newFixture(t, fixtureOpts{proxyOpt: withPool(2)})
	poolIdle(t, f, 2)

	id, r := f.clientID(t)
	r.send("SET pooled 1", "GET pooled")
	r.expect("+OK\r\n" + bulk("1"))
	r.c.Close()
	// The pool hands out the most recently returned connection first.
	if ids := poolIdle(t, f, 2); ids[1] != id {
		t.Fatalf("idle %v, want the recycled %d last", ids, id)
	}
	if next, nr := f.clientID(t); next != id {
		t.Fatalf("next client got upstream %d, want the recycled %d", next, id)
	} else {
		nr.c.Close()
	}
	poolIdle(t, f, 2)
	if n := len(f.upstreamIDs(t)); n > 2 {
		t.Fatalf("%d idle upstream connections, pool size 2", n)
	}
}

// Long-lived clients keep pooled connections past the loan window: the pool replaces them, and clients that
// connect per request still reuse connections.
func TestPoolReusesBesideLongLivedClients(t *testing.T) {
	obs := &poolObserver{}
	f := newFixture(t, fixtureOpts{proxyOpt: observePool(2, obs)})
	poolIdle(t, f, 2)
	for range 2 { // twice the pool's size in all: each takes a pooled connection and keeps it
		for range 2 {
			_, r := f.clientID(t)
			r.send("PING")
			r.expect("+PONG\r\n")
		}
		poolIdle(t, f, 2) // replaced once their loan window has passed
	}
	const short = 20
	for range short {
		id, r := f.clientID(t)
		r.send("PING")
		r.expect("+PONG\r\n")
		r.c.Close()
		if ids := poolIdle(t, f, 2); ids[1] != id {
			t.Fatalf("idle %v: the short client's upstream %d did not come back", ids, id)
		}
	}
	if n := obs.reused.Load(); n != 4+short {
		t.Fatalf("%d clients got a pooled connection, want all %d", n, 4+short)
	}
	if obs.negative.Load() {
		t.Fatal("more upstream closes reported than opens")
	}
}

// Idle pooled connections that the cache closed (CLIENT KILL, a failover) are never handed out: every new
// client is served.
func TestPoolServesAfterIdleConnectionsAreKilled(t *testing.T) {
	obs := &poolObserver{}
	f := newFixture(t, fixtureOpts{proxyOpt: observePool(4, obs)})
	killed := poolIdle(t, f, 4)
	for _, id := range killed {
		if _, err := f.env.Admin(t.Context(), "CLIENT", "KILL", "ID", strconv.FormatInt(id, 10)); err != nil {
			t.Fatal(err)
		}
	}
	for i := range 8 { // all open at once, so that they take every pooled connection and more
		id, r := f.clientID(t)
		if slices.Contains(killed, id) {
			t.Fatalf("client %d got the killed upstream %d", i, id)
		}
		r.send("SET k"+strconv.Itoa(i)+" v", "GET k"+strconv.Itoa(i))
		r.expect("+OK\r\n" + bulk("v"))
	}
	if obs.negative.Load() {
		t.Fatal("more upstream closes reported than opens")
	}
}

// The upkeep loop notices idle connections the cache closed, and replaces them before any client asks.
func TestPoolReplacesKilledIdleConnections(t *testing.T) {
	f := newFixture(t, fixtureOpts{idlePing: 400 * time.Millisecond, proxyOpt: withPool(2)})
	killed := poolIdle(t, f, 2)
	for _, id := range killed {
		if _, err := f.env.Admin(t.Context(), "CLIENT", "KILL", "ID", strconv.FormatInt(id, 10)); err != nil {
			t.Fatal(err)
		}
	}
	proxy.AwaitPool(t, f.srv, "2 new idle connections", func(idle []int64, lent int) bool {
		return len(idle) == 2 && !slices.ContainsFunc(idle, func(id int64) bool { return slices.Contains(killed, id) })
	})
}

// A connection whose client changed its state is never handed to another client.
func TestPoolNeverReusesDirtyConnections(t *testing.T) {
	f := newFixture(t, fixtureOpts{proxyOpt: withPool(2)})
	cases := []struct{ desc, cmd, reply string }{
		{"database", "SELECT 2", "+OK\r\n"},
		{"name", "CLIENT SETNAME app", "+OK\r\n"},
		{"subscription", "SUBSCRIBE ch", "*3\r\n$9\r\nsubscribe\r\n$2\r\nch\r\n:1\r\n"},
		{"transaction", "MULTI", "+OK\r\n"},
		{"watch", "WATCH k", "+OK\r\n"},
		{"reply mode", "CLIENT REPLY SKIP", ""},
		{"protocol", "HELLO 3", "%"},
		{"readonly", "READONLY", "-"},
	}
	for _, tc := range cases {
		t.Run(tc.desc, func(t *testing.T) {
			id, r := f.clientID(t)
			r.send(tc.cmd)
			r.expect(tc.reply)
			r.c.Close()
			waitFor(t, 10*time.Second, "the dirty upstream closed", func() bool { return !f.upstreamIDs(t)[id] })
			for range 3 {
				next, nr := f.clientID(t)
				if next == id {
					t.Fatal("a dirty connection was reused")
				}
				fields := f.clientInfo(t, nr, next)
				want := []string{"db=0", "name=", "sub=0", "psub=0", "multi=-1", "flags=N"}
				if f.atLeast(7, 0) {
					want = append(want, "resp=2")
				} else {
					// No resp= field before 7.0: an empty hash is *0 in RESP2, %0 in RESP3.
					nr.send("HGETALL pool:nohash")
					nr.expect("*0\r\n")
				}
				for _, w := range want {
					if !slices.Contains(fields, w) {
						t.Errorf("new client's connection is not clean: %q lacks %q", fields, w)
					}
				}
				nr.c.Close()
			}
		})
	}
}

// Pooled connections are re-authenticated on rotation: after several, a new client is served at once.
func TestPoolAcrossRotations(t *testing.T) {
	f := newFixture(t, fixtureOpts{lifetime: 3 * time.Second, proxyOpt: withPool(2)})
	before := poolIdle(t, f, 2)
	f.rotations(t, 3)
	for i := range 3 {
		id, r := f.clientID(t)
		r.send("ACL WHOAMI")
		f.expectLiveOID(t, r.readBulk())
		if i == 0 && !slices.Contains(before, id) {
			t.Errorf("first client got upstream %d, not one of the pooled %v", id, before)
		}
		r.c.Close()
	}
}
