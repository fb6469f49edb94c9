package proxy_test

import (
	"bufio"
	"errors"
	"net"
	"runtime"
	"syscall"
	"testing"
	"time"

	"github.com/entra-redis-proxy/entra-redis-proxy/proxy"
)

// clusterEvents records a Cluster's events (proxy.ClusterObserver) and the client connections its
// Servers close (proxy.Observer), for tests that await them.
type clusterEvents struct {
	proxy.NopObserver
	listeners chan [2]int   // NodeListeners(open, departed), in order
	refreshes chan string   // TopologyRefresh reasons that succeeded
	closed    chan struct{} // one per ClientClosed, on LISTEN and every node listener
}

func newClusterEvents() *clusterEvents {
	return &clusterEvents{listeners: make(chan [2]int, 4096), refreshes: make(chan string, 4096), closed: make(chan struct{}, 64)}
}

func (e *clusterEvents) NodeListeners(open, departed int) { e.listeners <- [2]int{open, departed} }

func (e *clusterEvents) TopologyRefresh(reason string, err error) {
	if err == nil {
		e.refreshes <- reason
	}
}

func (e *clusterEvents) ClientClosed() { e.closed <- struct{}{} }

// awaitListeners waits for the listener counts open and departed.
func (e *clusterEvents) awaitListeners(t *testing.T, open, departed int) {
	t.Helper()
	timeout := time.After(20 * time.Second)
	for {
		select {
		case got := <-e.listeners:
			if got == [2]int{open, departed} {
				return
			}
		case <-timeout:
			t.Fatalf("no NodeListeners(%d open, %d departed) within 20 s", open, departed)
		}
	}
}

func (e *clusterEvents) awaitClosed(t *testing.T) {
	t.Helper()
	select {
	case <-e.closed:
	case <-time.After(10 * time.Second):
		t.Fatal("no client connection closed within 10 s")
	}
}

// dialPing connects to addr and checks a PING is answered; the test's cleanup closes it.
func dialPing(t *testing.T, addr string) (net.Conn, *bufio.Reader) {
	t.Helper()
	c, r := dialRaw(t, addr)
	ping(t, c, r, "+PONG\r\n")
	return c, r
}

// ping sends PING on c and checks the first reply line is want.
func ping(t *testing.T, c net.Conn, r *bufio.Reader, want string) {
	t.Helper()
	c.SetDeadline(time.Now().Add(10 * time.Second))
	if _, err := c.Write([]byte("*1\r\n$4\r\nPING\r\n")); err != nil {
		t.Fatalf("PING to %s: %v", c.RemoteAddr(), err)
	}
	if line, err := r.ReadString('\n'); err != nil || line != want {
		t.Fatalf("PING to %s: %q, %v; want %q", c.RemoteAddr(), line, err, want)
	}
}

// TestClusterNodeLifecycle, on one real cluster: the connection limit is one budget for LISTEN and
// every node listener; a node that leaves the topology has its listener closed at once (new dials
// are refused) while a session opened before keeps working, and its Server ends with that session,
// leaving no goroutine behind.
func TestClusterNodeLifecycle(t *testing.T) {
	ev := newClusterEvents()
	const limit = 3
	f := newClusterFixture(t, 2*time.Minute, func(o *proxy.Options, cc *proxy.ClusterConfig) {
		o.Limit = proxy.NewConnLimit(limit)
		o.PoolSize = 1 // pooled upstreams are not clients: they take nothing from the budget
		o.Observer = ev
		cc.Observer = ev
		cc.NodeObserver = func(int) proxy.Observer { return ev }
		cc.RefreshEvery = 100 * time.Millisecond // the departure is seen by the periodic refresh
	})
	_, locals := f.cluster.Topology()
	nodes := f.env.ClusterNodes() // primaries, then their replicas in the same order
	seedLocal, replica := locals[nodes[0]], nodes[4]

	t.Run("one connection budget", func(t *testing.T) {
		a, _ := dialPing(t, f.addr)
		dialPing(t, f.addr)
		dialPing(t, locals[nodes[1]])
		if !f.srv.AtLimit() {
			t.Fatal("3 clients on LISTEN and a node listener, limit 3: AtLimit is false")
		}
		for _, addr := range []string{locals[nodes[2]], f.addr, seedLocal} {
			c, r := dialRaw(t, addr)
			if line, err := r.ReadString('\n'); err != nil || line != "-ERR max number of clients reached\r\n" {
				t.Fatalf("a 4th client on %s: %q, %v; want the limit's refusal", addr, line, err)
			}
			if _, err := r.ReadByte(); err == nil {
				t.Fatalf("a refused client on %s was not closed", addr)
			}
			c.Close()
		}
		a.Close()
		ev.awaitClosed(t)
		dialPing(t, locals[nodes[2]]) // the freed connection is the node listener's to take
	})
	closeAll := func() { // the subtest's clients are closed by its cleanup
		for range limit {
			ev.awaitClosed(t)
		}
	}
	closeAll()

	t.Run("departed node", func(t *testing.T) {
		ev.awaitListeners(t, 6, 0)
		old, r := dialPing(t, locals[replica])
		baseG := runtime.NumGoroutine() // with the replica's Server: its session, rotate loop and pool
		if err := f.env.RemoveNode(t.Context(), replica); err != nil {
			t.Fatal(err)
		}
		ev.awaitListeners(t, 5, 1)
		if c, err := net.DialTimeout("tcp", locals[replica], 5*time.Second); !errors.Is(err, syscall.ECONNREFUSED) {
			if c != nil {
				c.Close()
			}
			t.Fatalf("dial the departed node's listener %s: %v; want connection refused", locals[replica], err)
		}
		ping(t, old, r, "+PONG\r\n") // the session opened before still works
		if _, now := f.cluster.Topology(); now[replica] != "" {
			t.Fatalf("the departed node still maps to %s", now[replica])
		}
		old.Close()
		ev.awaitClosed(t)
		ev.awaitListeners(t, 5, 0) // its Server closed with its last session
		// A leaked Server keeps its rotate loop, a leaked session two goroutines: allow one of noise.
		var g int
		waitFor(t, 10*time.Second, "goroutines to drop below the baseline", func() bool {
			g = runtime.NumGoroutine()
			return g <= baseG-2
		})
	})
}

// dialRaw connects to addr without sending anything; the test's cleanup closes it.
func dialRaw(t *testing.T, addr string) (net.Conn, *bufio.Reader) {
	t.Helper()
	c, err := net.DialTimeout("tcp", addr, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	c.SetDeadline(time.Now().Add(10 * time.Second))
	return c, bufio.NewReader(c)
}
