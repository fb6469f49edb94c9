package proxy_test

import (
	"fmt"
	"io"
	"net"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/entra-redis-proxy/entra-redis-proxy/proxy"
	"github.com/entra-redis-proxy/entra-redis-proxy/resp"
)

// Issue 9, defects 1 and 2 against real redis: a client that half-closes right after a GET of a reply far
// larger than one read gets all of it, and with a pool of one, the next client gets none of it.
func TestHalfClosedLargeReplyNotLeakedToNextClient(t *testing.T) {
	f := newFixture(t, fixtureOpts{proxyOpt: func(o *proxy.Options) { o.PoolSize = 1 }})
	value := strings.Repeat("+HACKD\r\n", 5120)
	if _, err := f.env.Admin(t.Context(), "SET", "leak", value); err != nil {
		t.Fatal(err)
	}
	for i := range 5 {
		t.Run(fmt.Sprint(i), func(t *testing.T) {
			a := f.raw(t)
			a.send("GET leak")
			if err := a.c.(*net.TCPConn).CloseWrite(); err != nil {
				t.Fatal(err)
			}
			a.c.SetReadDeadline(time.Now().Add(10 * time.Second))
			got, err := io.ReadAll(a.r)
			if want := bulk(value); err != nil || string(got) != want {
				t.Fatalf("half-closed client got %d bytes, %v; want %d", len(got), err, len(want))
			}
			b := f.raw(t)
			b.send("PING")
			b.expect("+PONG\r\n")
		})
	}
}

// Issue 9, defect 5: a command too large to buffer inside a MULTI held open past the token's deadline is
// replayed byte for byte.
func TestMultiWithLargeCommandAcrossDeadline(t *testing.T) {
	f := newFixture(t, fixtureOpts{lifetime: 3 * time.Second})
	big := strings.Repeat("b", 20<<10)
	r := f.raw(t)
	var cmds []byte
	cmds = resp.AppendCommand(cmds, "DEL", "txbig", "txc")
	cmds = resp.AppendCommand(cmds, "MULTI")
	cmds = resp.AppendCommand(cmds, "SET", "txbig", big)
	cmds = resp.AppendCommand(cmds, "INCR", "txc")
	if _, err := r.c.Write(cmds); err != nil {
		t.Fatal(err)
	}
	r.expect(":0\r\n+OK\r\n+QUEUED\r\n+QUEUED\r\n")
	f.rotations(t, 2)
	r.send("EXEC", "STRLEN txbig")
	r.expect(fmt.Sprintf("*2\r\n+OK\r\n:1\r\n:%d\r\n", len(big)))
}

// Issue 9, defect 6: a blocking command with a command pipelined behind it keeps its connection across
// token expiries (ioredis and node-redis share one connection between BLPOP and other commands).
func TestBlockedWithPipelinedCommandAcrossExpiry(t *testing.T) {
	f := newFixture(t, fixtureOpts{lifetime: 3 * time.Second})
	r := f.raw(t)
	r.send("CLIENT ID")
	id := readLine(t, r)
	r.send("BLPOP blpipe 0", "PING", "CLIENT ID")
	f.rotations(t, 2)
	if _, err := f.env.Admin(t.Context(), "RPUSH", "blpipe", "x"); err != nil {
		t.Fatal(err)
	}
	r.expect("*2\r\n" + bulk("blpipe") + bulk("x") + "+PONG\r\n" + id)
}

func readLine(t *testing.T, r *raw) string {
	t.Helper()
	r.c.SetReadDeadline(time.Now().Add(10 * time.Second))
	line, err := r.r.ReadString('\n')
	if err != nil {
		t.Fatal(err)
	}
	return line
}

// Issue 9, defects 8 and 10: QUIT is answered by the proxy; the upstream stays open, is reused by the next
// client, and nothing counts as an upstream error; the upstream gauge never goes below zero.
func TestQuitKeepsPooledUpstream(t *testing.T) {
	obs := &countingObserver{clientClosed: make(chan struct{}, 100)}
	f := newFixture(t, fixtureOpts{proxyOpt: func(o *proxy.Options) { o.PoolSize = 1; o.Observer = obs }})
	var prev string
	for i := range 10 {
		r := f.raw(t)
		r.send("CLIENT ID", "QUIT", "PING")
		id := readLine(t, r)
		r.expect("+OK\r\n")
		r.c.SetReadDeadline(time.Now().Add(5 * time.Second))
		if rest, err := io.ReadAll(r.r); err != nil || len(rest) > 0 {
			t.Fatalf("after QUIT: %q, %v; want the connection closed and nothing after QUIT run", rest, err)
		}
		// The first client may come before the pool has a connection ready; after it, each client gets
		// the upstream the one before it returned.
		if i >= 2 && id != prev {
			t.Fatalf("client %d got upstream %q, want the pooled %q", i, id, prev)
		}
		prev = id
		<-obs.clientClosed // the session ended, after its upstream went back to the pool
	}
	if n := obs.errors(); n != 0 {
		t.Fatalf("%d upstream errors counted for clients that QUIT", n)
	}
	if min := obs.minUpstreams(); min < 0 {
		t.Fatalf("upstream_connections went to %d", min)
	}
}

// countingObserver counts what the tests above check.
type countingObserver struct {
	proxy.NopObserver
	clientClosed chan struct{}
	mu           sync.Mutex
	upErrors     int
	upstreams    int
	low          int
}

func (o *countingObserver) UpstreamError(string) { o.mu.Lock(); o.upErrors++; o.mu.Unlock() }
func (o *countingObserver) UpstreamOpened(time.Duration) {
	o.mu.Lock()
	o.upstreams++
	o.mu.Unlock()
}

func (o *countingObserver) UpstreamClosed() {
	o.mu.Lock()
	o.upstreams--
	o.low = min(o.low, o.upstreams)
	o.mu.Unlock()
}

func (o *countingObserver) ClientClosed() { o.clientClosed <- struct{}{} }

func (o *countingObserver) errors() int       { o.mu.Lock(); defer o.mu.Unlock(); return o.upErrors }
func (o *countingObserver) minUpstreams() int { o.mu.Lock(); defer o.mu.Unlock(); return o.low }

// Issue 9, defect 4: a reply nested deeper than any small constant (a Lua table 200 levels deep) passes
// through like any other.
func TestDeeplyNestedReply(t *testing.T) {
	f := newFixture(t, fixtureOpts{})
	r := f.raw(t)
	var cmd []byte
	cmd = resp.AppendCommand(cmd, "EVAL", "local a={} local c=a for i=1,200 do local n={} c[1]=n c=n end return a", "0")
	cmd = resp.AppendCommand(cmd, "PING")
	if _, err := r.c.Write(cmd); err != nil {
		t.Fatal(err)
	}
	r.expect(strings.Repeat("*1\r\n", 200) + "*0\r\n+PONG\r\n")
}

// Issue 9, defect 9: a drain closes each connection at its next safe point. A client with a blocking
// command and a command held back behind it gets both replies, then EOF; an idle client is closed at once.
func TestShutdownDrainsAtSafePoints(t *testing.T) {
	f := newFixture(t, fixtureOpts{})
	busy, idle := f.raw(t), f.raw(t)
	idle.send("PING")
	idle.expect("+PONG\r\n")
	busy.send("BLPOP drainq 1", "PING")
	done := make(chan int)
	go func() { done <- f.srv.Shutdown(t.Context()) }()
	for name, r := range map[string]*raw{"busy": busy, "idle": idle} {
		r.c.SetReadDeadline(time.Now().Add(10 * time.Second))
		got, err := io.ReadAll(r.r)
		want := map[string]string{"busy": "*-1\r\n+PONG\r\n", "idle": ""}[name]
		if err != nil || string(got) != want {
			t.Fatalf("%s client got %q, %v; want %q then EOF", name, got, err, want)
		}
	}
	if cut := <-done; cut != 0 {
		t.Fatalf("Shutdown cut %d connections, want 0", cut)
	}
}

// A RESP2 subscriber handed over to a new upstream keeps its database and client name, however they were
// set (plain, queued in MULTI, under CLIENT REPLY OFF): once it unsubscribes, its commands run where they
// would have run without the proxy. Found by the differential test (seed 1): SELECT inside MULTI, then a
// handover, then a GET from database 0.
func TestHandoverCarriesDatabaseAndName(t *testing.T) {
	f := newFixture(t, fixtureOpts{lifetime: 3 * time.Second})
	r := f.raw(t)
	r.send("SELECT 2", "MULTI", "SELECT 1", "SELECT 99", "CLIENT SETNAME alpha", "EXEC", "SET hk one")
	r.expect("+OK\r\n+OK\r\n+QUEUED\r\n+QUEUED\r\n+QUEUED\r\n*3\r\n+OK\r\n-ERR DB index is out of range\r\n+OK\r\n+OK\r\n")
	r.send("CLIENT REPLY OFF", "SELECT 3", "SET hk three", "CLIENT REPLY ON")
	r.expect("+OK\r\n")
	r.send("SUBSCRIBE ch")
	r.expect("*3\r\n$9\r\nsubscribe\r\n$2\r\nch\r\n:1\r\n")
	f.rotations(t, 2) // the old connections are gone: handed over
	r.send("UNSUBSCRIBE", "GET hk", "CLIENT GETNAME", "SELECT 1", "GET hk")
	r.expect("*3\r\n$11\r\nunsubscribe\r\n$2\r\nch\r\n:0\r\n" + bulk("three") + bulk("alpha") + "+OK\r\n" + bulk("one"))
}
