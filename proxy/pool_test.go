package proxy_test

import (
	"slices"
	"strconv"
	"strings"
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
		if line == "" || strings.Contains(line, " user=admin ") {
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

// The pool keeps connections ready, never more than configured, and a clean client's upstream is reused.
func TestPoolReusesCleanConnections(t *testing.T) {
	f := newFixture(t, fixtureOpts{proxyOpt: withPool(2)})
	waitFor(t, 10*time.Second, "2 pooled connections", func() bool { return len(f.upstreamIDs(t)) == 2 })

	id, r := f.clientID(t)
	r.send("SET pooled 1", "GET pooled")
	r.expect("+OK\r\n" + bulk("1"))
	r.c.Close()
	waitFor(t, 10*time.Second, "the client's session to end", func() bool { return f.srv.Clients() == 0 })
	// The pool hands out the most recently returned connection first.
	if next, nr := f.clientID(t); next != id {
		t.Fatalf("next client got upstream %d, want the recycled %d", next, id)
	} else {
		nr.c.Close()
	}
	waitFor(t, 10*time.Second, "no client connected", func() bool { return f.srv.Clients() == 0 })
	if n := len(f.upstreamIDs(t)); n > 2 {
		t.Fatalf("%d idle upstream connections, pool size 2", n)
	}
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
				nr.send("CLIENT INFO")
				fields := strings.Fields(nr.readBulk())
				for _, want := range []string{"db=0", "name=", "sub=0", "psub=0", "multi=-1", "resp=2", "flags=N"} {
					if !slices.Contains(fields, want) {
						t.Errorf("new client's connection is not clean: %q lacks %q", fields, want)
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
	waitFor(t, 10*time.Second, "2 pooled connections", func() bool { return len(f.upstreamIDs(t)) == 2 })
	before := f.upstreamIDs(t)
	f.rotations(t, 3)
	for i := range 3 {
		id, r := f.clientID(t)
		r.send("ACL WHOAMI")
		f.expectLiveOID(t, r.readBulk())
		if i == 0 && !before[id] {
			t.Errorf("first client got upstream %d, not one of the pooled %v", id, before)
		}
		r.c.Close()
	}
}
