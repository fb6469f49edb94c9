package proxy

import (
	"sync"
	"sync/atomic"
)

// ConnLimit is the process's connection budget, shared by every Server given it (Options.Limit): LISTEN's,
// each cluster node listener's, each configured cache's. The descriptors are the process's, so the budget is
// too, whichever listener accepted a client or whichever pool holds a connection.
//
// It counts clients (at most max) and, with a descriptor budget (NewDescriptorBudget), the descriptors of
// the warm pools: a client costs two (its socket and its upstream's, lent by a pool or not), a connection a
// pool holds (idle, being checked, or being dialled) one. Pools fill only within what clients leave,
// keeping spareClients clients' descriptors free (fewer once the client limit is that close), so that
// 2 x clients + pooled never exceeds descriptors: a client accepted when it would evicts idle pooled
// connections. With the derived limit, (descriptors - pool ceiling x caches) / 2, the pools together always
// have that ceiling, and more while clients leave room.
type ConnLimit struct {
	max         int64 // most client connections at once; 0 = unlimited
	descriptors int64 // for clients and pooled connections; 0 = no descriptor budget (pools are not bounded)
	// st packs the counts, so that an accept, a close and a pool's take are one atomic step each:
	// clients<<32 | starved<<31 | pooled. starved: a pool was refused since the last release, which wakes
	// the pools.
	st atomic.Uint64

	mu    sync.Mutex         // guards pools
	pools map[*pool]struct{} // the pools drawing on the budget, to wake or evict from
}

const (
	clientUnit    = 1 << 32
	starvedBit    = 1 << 31
	pooledMask    = starvedBit - 1
	descPerClient = 2 // descriptors per client
	// spareClients is how many more clients' descriptors pool fill leaves free: a burst of that many
	// connects takes no pooled connection away; beyond, the accept closes idle ones (evict).
	spareClients = 16
)

// NewConnLimit returns a budget of max client connections (0: unlimited) without a descriptor budget.
func NewConnLimit(max int) *ConnLimit { return NewDescriptorBudget(max, 0) }

// NewDescriptorBudget returns a budget of max client connections (0: unlimited) and of descriptors for
// clients (two each) and pooled upstream connections (one each); 0 descriptors: pools are not bounded.
func NewDescriptorBudget(max, descriptors int) *ConnLimit {
	return &ConnLimit{max: int64(max), descriptors: int64(descriptors), pools: map[*pool]struct{}{}}
}

func counts(v uint64) (clients, pooled int64) { return int64(v >> 32), int64(v & pooledMask) }

// acquire takes one client connection from the budget; false when it is spent. Listeners accept
// concurrently, so taking and checking are one step. A client whose descriptors pools hold takes them
// back from idle pooled connections.
func (l *ConnLimit) acquire() bool {
	v := l.st.Add(clientUnit)
	clients, pooled := counts(v)
	if l.max > 0 && clients > l.max {
		l.st.Add(^uint64(clientUnit - 1))
		return false
	}
	if over := descPerClient*clients + pooled - l.descriptors; l.descriptors > 0 && over > 0 {
		l.evict(int(over))
	}
	return true
}

func (l *ConnLimit) release() {
	if l.st.Add(^uint64(clientUnit-1))&starvedBit != 0 {
		l.wake()
	}
}

// takePooled takes one descriptor for a pool's connection; false when the budget has none to spare. A
// refusal marks the budget starved, so that the next release wakes the pools to try again. One
// compare-and-swap when it fits: an optimistic add would count a descriptor nobody holds, and an accept
// meanwhile would evict for it.
func (l *ConnLimit) takePooled() bool {
	if l.descriptors == 0 {
		l.st.Add(1)
		return true
	}
	for {
		v := l.st.Load()
		if !l.fits(v + 1) {
			// Marked in the same step as the check: a release after it wakes the pools, one before it
			// fails the swap and is seen on the next try.
			if v&starvedBit != 0 || l.st.CompareAndSwap(v, v|starvedBit) {
				return false
			}
			continue
		}
		if l.st.CompareAndSwap(v, v+1) {
			return true
		}
	}
}

// fits reports whether the counts v, a pool's new descriptor included, leave the clients their share:
// spareClients more clients' descriptors, or as many as the limit still allows.
func (l *ConnLimit) fits(v uint64) bool {
	clients, pooled := counts(v)
	spare := int64(spareClients)
	if l.max > 0 {
		spare = max(0, min(spare, l.max-clients))
	}
	return pooled+descPerClient*(clients+spare) <= l.descriptors
}

// releasePooled gives back n descriptors of a pool's connections (closed, or lent to a client, whose own
// two count them).
func (l *ConnLimit) releasePooled(n int) {
	if n > 0 && l.st.Add(-uint64(n))&starvedBit != 0 {
		l.wake()
	}
}

// over reports whether clients and pools hold more than the descriptors: a pool's connection that was
// dialled or checked meanwhile is then closed rather than kept.
func (l *ConnLimit) over() bool {
	clients, pooled := counts(l.st.Load())
	return l.descriptors > 0 && descPerClient*clients+pooled > l.descriptors
}

// wake clears starved and nudges every pool to fill again.
func (l *ConnLimit) wake() {
	for {
		v := l.st.Load()
		if v&starvedBit == 0 {
			return
		}
		if l.st.CompareAndSwap(v, v&^starvedBit) {
			break
		}
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	for p := range l.pools {
		p.nudge()
	}
}

// evict closes up to n idle pooled connections, to give their descriptors to clients. The pools are then
// starved: they fill again when clients leave.
func (l *ConnLimit) evict(n int) {
	defer l.st.Or(starvedBit)
	l.mu.Lock()
	pools := make([]*pool, 0, len(l.pools))
	for p := range l.pools {
		pools = append(pools, p)
	}
	l.mu.Unlock()
	for _, p := range pools {
		if n -= p.evict(n); n <= 0 {
			return
		}
	}
}

func (l *ConnLimit) register(p *pool) {
	l.mu.Lock()
	l.pools[p] = struct{}{}
	l.mu.Unlock()
}

func (l *ConnLimit) unregister(p *pool) {
	l.mu.Lock()
	delete(l.pools, p)
	l.mu.Unlock()
}

// Max returns the limit (0: unlimited).
func (l *ConnLimit) Max() int { return int(l.max) }

// AtLimit reports whether every connection of the budget is in use (for readiness).
func (l *ConnLimit) AtLimit() bool {
	clients, _ := counts(l.st.Load())
	return l.max > 0 && clients >= l.max
}

// Clients returns how many client connections are open, on every listener sharing the budget.
func (l *ConnLimit) Clients() int {
	clients, _ := counts(l.st.Load())
	return int(clients)
}

// Pooled returns how many descriptors the pools hold now (for metrics).
func (l *ConnLimit) Pooled() int {
	_, pooled := counts(l.st.Load())
	return int(pooled)
}
