package proxy_test

import (
	"fmt"
	"net"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/entra-redis-proxy/entra-redis-proxy/proxy"
)

// budgetEvents counts the client and upstream connections of LISTEN and every node listener.
type budgetEvents struct {
	proxy.NopObserver
	clients, upstreams atomic.Int64
	noClients          chan struct{} // a send (dropped if one waits) each time the last client closes
}

func (e *budgetEvents) ClientOpened()                { e.clients.Add(1) }
func (e *budgetEvents) UpstreamOpened(time.Duration) { e.upstreams.Add(1) }
func (e *budgetEvents) UpstreamClosed()              { e.upstreams.Add(-1) }
func (e *budgetEvents) ClientClosed() {
	if e.clients.Add(-1) == 0 {
		select {
		case e.noClients <- struct{}{}:
		default:
		}
	}
}

func (e *budgetEvents) awaitNoClients(t *testing.T) {
	t.Helper()
	timeout := time.After(20 * time.Second)
	for e.clients.Load() != 0 {
		select {
		case <-e.noClients:
		case <-timeout:
			t.Fatalf("%d client connections still open after 20 s", e.clients.Load())
		}
	}
}

// TestClusterPoolsWithinBudget, on one real cluster: the warm pools of LISTEN and of every node listener
// draw on the one descriptor budget of the clients; with the clients at the limit, client sockets, their
// upstreams and the pooled connections together stay within it, and the pools go back to their floors
// (LISTEN's POOL_SIZE, 1 per node) once the clients leave. It logs how many connections a go-redis
// ClusterClient opens per node.
func TestClusterPoolsWithinBudget(t *testing.T) {
	// At the limit the pools have 6 descriptors: fewer than LISTEN's 4 and the nodes' 1 each want.
	const maxClients, descriptors = 48, 2*48 + 6
	ev := &budgetEvents{noClients: make(chan struct{}, 1)}
	limit := proxy.NewDescriptorBudget(maxClients, descriptors)
	f := newClusterFixture(t, 2*time.Minute, func(o *proxy.Options, cc *proxy.ClusterConfig) {
		o.Limit = limit
		o.PoolSize, o.PoolMax = 4, 32
		o.Observer = ev
		cc.NodeObserver = func(int) proxy.Observer { return ev }
	})
	byAddr := proxy.NodeServers(f.cluster)
	var nodes []*proxy.Server // primaries, then their replicas
	for _, addr := range f.env.ClusterNodes() {
		nodes = append(nodes, byAddr[addr])
	}
	servers := append([]*proxy.Server{f.srv}, nodes...)
	floors := func(idle int) bool { return idle == 4+len(nodes) }
	proxy.AwaitPools(t, servers, "4 on LISTEN and 1 per node", floors)
	fits := func(when string) {
		t.Helper()
		clients, upstreams, pooled := ev.clients.Load(), ev.upstreams.Load(), int64(limit.Pooled())
		if clients+upstreams > descriptors || 2*clients+pooled > descriptors {
			t.Errorf("%s: %d client and %d upstream sockets, %d pooled: more than the %d descriptors",
				when, clients, upstreams, pooled, descriptors)
		}
		t.Logf("%s: %d clients, %d upstream connections, %d pooled", when, clients, upstreams, pooled)
	}

	t.Run("ClusterClient", func(t *testing.T) {
		ctx := t.Context()
		cc := clusterClient(t, f.addr, 3, nil, "", "")
		var wg sync.WaitGroup
		errs := make(chan error, 8)
		for g := range 8 {
			wg.Go(func() {
				for i := range 100 {
					if err := cc.Set(ctx, fmt.Sprintf("k%d-%d", g, i), "v", 0).Err(); err != nil {
						errs <- err
						return
					}
				}
			})
		}
		wg.Wait()
		close(errs)
		for err := range errs {
			t.Error(err)
		}
		per := []int{}
		for _, s := range nodes {
			per = append(per, s.Clients())
		}
		t.Logf("8 goroutines x 100 SETs: the ClusterClient holds %d connections on LISTEN, %v on the primaries, %v on the replicas",
			f.srv.Clients(), per[:3], per[3:])
		fits("a ClusterClient")
		cc.Close()
		ev.awaitNoClients(t)
	})

	t.Run("clients at the limit", func(t *testing.T) {
		_, locals := f.cluster.Topology()
		addrs := []string{f.addr}
		for _, l := range locals {
			addrs = append(addrs, l)
		}
		var conns []net.Conn
		for i := range maxClients {
			c, _ := dialPing(t, addrs[i%len(addrs)])
			conns = append(conns, c)
		}
		fits(fmt.Sprintf("%d clients", maxClients))
		if got := limit.Pooled(); got > descriptors-2*maxClients {
			t.Errorf("%d descriptors pooled with the clients at the limit, want at most %d", got, descriptors-2*maxClients)
		}
		c, r := dialRaw(t, addrs[1])
		if line, err := r.ReadString('\n'); err != nil || line != "-ERR max number of clients reached\r\n" {
			t.Errorf("a client beyond the limit: %q, %v; want the limit's refusal", line, err)
		}
		c.Close()
		for _, c := range conns {
			c.Close()
		}
		ev.awaitNoClients(t)
		proxy.AwaitPools(t, servers, "their floors again", floors)
		fits("the clients gone")
	})
}
