package proxy

import (
	"net"
	"reflect"
	"testing"
	"testing/synctest"
	"time"
)

// The budget's arithmetic: clients up to max, and pool descriptors only within what clients leave, keeping
// spareClients clients' descriptors free (or as many as the limit still allows).
func TestConnLimitBudget(t *testing.T) {
	for _, tc := range []struct {
		desc                 string
		max, descriptors     int
		clients              int
		pooled               int // how many descriptors pools may take then
		pooledAtLimitClients int // and with max clients (descriptors - 2 x max): what pools always have
	}{
		{"no descriptor budget: pools unbounded", 3, 0, 3, 1000, 1000},
		{"16 clients kept free", 100, 300, 0, 300 - 2*16, 100},
		{"clients take theirs", 100, 300, 50, 300 - 2*50 - 2*16, 100},
		{"within 16 of the limit: the limit's share", 100, 300, 90, 300 - 2*100, 100},
		{"at the limit", 100, 300, 100, 100, 100},
		// ulimit -n 256, default pool: 174 descriptors for clients and pools, 71 clients (limits.go).
		{"derived from 256", 71, 174, 0, 174 - 2*16, 32},
		{"derived from 256, at the limit", 71, 174, 71, 32, 32},
		{"MAX_CONNECTIONS=10 leaves pools more", 10, 174, 0, 174 - 2*10, 154},
		{"unlimited clients", 0, 100, 10, 100 - 2*10 - 2*16, -1},
	} {
		t.Run(tc.desc, func(t *testing.T) {
			l := NewDescriptorBudget(tc.max, tc.descriptors)
			for i := range tc.clients {
				if !l.acquire() {
					t.Fatalf("client %d of %d refused", i+1, tc.clients)
				}
			}
			if got := takeAll(l, 1000); got != tc.pooled {
				t.Errorf("%d clients: pools took %d descriptors, want %d", tc.clients, got, tc.pooled)
			}
			if tc.descriptors > 0 {
				if c, p := counts(l.st.Load()); 2*c+p > int64(tc.descriptors) {
					t.Errorf("%d clients and %d pooled need more than %d descriptors", c, p, tc.descriptors)
				}
			}
			if tc.max == 0 {
				return
			}
			l.releasePooled(l.Pooled())
			for l.acquire() {
			}
			if c, _ := counts(l.st.Load()); c != int64(tc.max) || !l.AtLimit() {
				t.Errorf("%d clients accepted (AtLimit %v), want %d", c, l.AtLimit(), tc.max)
			}
			if got := takeAll(l, 1000); got != tc.pooledAtLimitClients {
				t.Errorf("at the limit pools took %d descriptors, want %d", got, tc.pooledAtLimitClients)
			}
		})
	}
}

// takeAll takes pool descriptors until refused, at most n.
func takeAll(l *ConnLimit, n int) int {
	for i := range n {
		if !l.takePooled() {
			return i
		}
	}
	return n
}

// A pool fills only within the budget clients leave, resumes when they leave, gives its idle connections
// to clients that need the descriptors, and counts a lent connection as the client's.
func TestPoolFillsWithinBudget(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		// 40 clients; 100 descriptors: at the limit the pools have 20.
		l := NewDescriptorBudget(40, 100)
		clients := func(n int) { // n > 0 connect, n < 0 leave
			t.Helper()
			for ; n > 0; n-- {
				if !l.acquire() {
					t.Fatal("a client within the limit refused")
				}
				if c, p := counts(l.st.Load()); 2*c+p > 100 {
					t.Fatalf("%d clients and %d pooled need more than 100 descriptors", c, p)
				}
			}
			for ; n < 0; n++ {
				l.release()
			}
		}
		clients(30)
		up, _, srv := startFakePoolWith(t, Options{PoolSize: 30, PoolMax: 30, Limit: l})
		synctest.Wait()
		wantPool(t, srv, 100-2*40, 0) // 30 clients: within 16 of the limit, so its share
		wantDials(t, up, 20)

		clients(-10) // 20 clients: 100 - 2 x (20 + 16) = 28
		synctest.Wait()
		wantPool(t, srv, 28, 0)
		clients(-20)
		synctest.Wait()
		wantPool(t, srv, 30, 0)
		wantDials(t, up, 30)

		// A lent connection is the client's: its descriptor goes back to the budget, and comes from it again
		// when the connection is put back.
		clients(1)
		c := srv.pool.get()
		if got := l.Pooled(); got != 29 {
			t.Fatalf("%d descriptors pooled with one of 30 lent, want 29", got)
		}
		if !srv.pool.put(c) || l.Pooled() != 30 {
			t.Fatalf("put back: %d pooled, want 30", l.Pooled())
		}
		clients(-1)

		// 40 clients need 80: the pool gives back 10 idle connections as they connect, and does not refill.
		clients(40)
		synctest.Wait()
		wantPool(t, srv, 20, 0)
		wantDials(t, up, 30)
		if _, open, _ := up.stats(); open != 20 {
			t.Fatalf("%d upstream connections open, want the 20 idle", open)
		}
		if l.acquire() {
			t.Fatal("a 41st client accepted")
		}

		clients(-40)
		synctest.Wait()
		wantPool(t, srv, 30, 0)
		wantDials(t, up, 40)
	})
}

// A connection dialled while clients took the last descriptors is closed when the dial ends, not kept: the
// accept found nothing idle to evict, so the budget is over until then.
func TestPoolDropsADialClientsNeed(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		l := NewDescriptorBudget(40, 80) // at the limit nothing is left for pools
		held := &fakeUpstream{ends: map[int64]net.Conn{}, gate: make(chan struct{})}
		up, _, srv := startFakePoolWith(t, Options{PoolSize: 30, PoolMax: 30, Limit: l, Dialer: held})
		synctest.Wait() // the first dial waits at the gate, holding a descriptor
		for range 40 {
			if !l.acquire() {
				t.Fatal("a client within the limit refused")
			}
		}
		if !l.over() {
			t.Fatalf("40 clients and %d pooled: not over the 80 descriptors", l.Pooled())
		}
		up.unhold()
		synctest.Wait()
		wantPool(t, srv, 0, 0)
		wantDials(t, up, 1)
		if _, open, _ := up.stats(); open != 0 || l.Pooled() != 0 || l.over() {
			t.Fatalf("%d upstream connections open, %d pooled; want none", open, l.Pooled())
		}
		for range 40 {
			l.release()
		}
		synctest.Wait()
		wantPool(t, srv, 30, 0)
	})
}

// NodeServers returns the Servers of c's node listeners that accept clients, by node address. For the
// tests of package proxy_test.
func NodeServers(c *Cluster) map[string]*Server {
	c.mu.Lock()
	defer c.mu.Unlock()
	out := map[string]*Server{}
	for up, n := range c.nodes {
		out[up] = n.srv
	}
	return out
}

// AwaitPools waits until cond holds for the idle connections of the pools of servers, summed. It wakes at
// each change of any of them, so a test waits for the event itself.
func AwaitPools(t testing.TB, servers []*Server, what string, cond func(idle int) bool) {
	t.Helper()
	timeout := time.After(20 * time.Second)
	for {
		idle := 0
		cases := []reflect.SelectCase{{Dir: reflect.SelectRecv, Chan: reflect.ValueOf(timeout)}}
		for _, s := range servers {
			ids, _, changed := s.pool.watch()
			idle += len(ids)
			cases = append(cases, reflect.SelectCase{Dir: reflect.SelectRecv, Chan: reflect.ValueOf(changed)})
		}
		if cond(idle) {
			return
		}
		if i, _, _ := reflect.Select(cases); i == 0 {
			t.Fatalf("timed out waiting for the pools to have %s: %d idle", what, idle)
		}
	}
}

// An accept and a close against the budget, beside the old limit's cost (one atomic add each, no descriptor
// budget) in the same run, and a pool's take and give-back of a descriptor.
func BenchmarkConnLimit(b *testing.B) {
	b.Run("clients/no-descriptor-budget", func(b *testing.B) {
		l := NewConnLimit(1 << 20)
		b.RunParallel(func(pb *testing.PB) {
			for pb.Next() {
				l.acquire()
				l.release()
			}
		})
	})
	b.Run("clients/descriptor-budget", func(b *testing.B) {
		l := NewDescriptorBudget(1<<20, 1<<22)
		b.RunParallel(func(pb *testing.PB) {
			for pb.Next() {
				l.acquire()
				l.release()
			}
		})
	})
	b.Run("pooled", func(b *testing.B) {
		l := NewDescriptorBudget(1<<20, 1<<22)
		b.RunParallel(func(pb *testing.PB) {
			for pb.Next() {
				l.takePooled()
				l.releasePooled(1)
			}
		})
	})
}

// A maintenance move drops the idle connections dialed before it: their descriptors go back to the budget
// and the replacements take them again, so the budget counts what is open (not 4 dropped + 4 new).
func TestPoolDropAtMoveGivesDescriptorsBack(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		l := NewDescriptorBudget(40, 100)
		up, _, srv := startFakePoolWith(t, Options{PoolSize: 4, PoolMax: 4, Limit: l})
		synctest.Wait()
		wantPool(t, srv, 4, 0)
		srv.pool.dropOpenedBefore(srv.now() + 1)
		synctest.Wait()
		wantPool(t, srv, 4, 0)
		wantDials(t, up, 8)
		if got := l.Pooled(); got != 4 {
			t.Fatalf("%d descriptors pooled with 4 idle, want 4", got)
		}
	})
}
