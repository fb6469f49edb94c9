package proxy

import (
	"sync"
	"time"

	"github.com/entra-redis-proxy/entra-redis-proxy/topology"
)

// DefaultPortHold is how long a departed node's port stays reserved for it (ClusterConfig.PortHold).
// A node that leaves often comes back with the same id: a failed primary restarted as a replica, a node
// back from patching (Azure restarts nodes one at a time, each for minutes). Meanwhile clients that cached
// the topology (cluster clients reload it on errors, or every few minutes) still name its port; giving
// that port to another node would send them to the wrong shard. 15 minutes covers both; a port range
// sized for the cluster's nodes plus those that leave within it never runs out.
const DefaultPortHold = 15 * time.Minute

// NodePorts hands out node listener ports from CLUSTER_PORTS for every cache of the process (one
// range, no collisions): a node keeps its port while it is in its cache's topology and for a hold
// after it leaves. Safe for concurrent use.
type NodePorts struct {
	hold time.Duration
	now  func() time.Time // time.Now; tests move it

	mu       sync.Mutex
	ports    *topology.Ports
	departed map[string]time.Time // key -> when its node left; its port is held until hold has passed
}

// NewNodePorts returns the allocator of first..last; hold <= 0 means DefaultPortHold.
func NewNodePorts(first, last int, hold time.Duration) *NodePorts {
	if hold <= 0 {
		hold = DefaultPortHold
	}
	return &NodePorts{hold: hold, now: time.Now, ports: topology.NewPorts(first, last), departed: map[string]time.Time{}}
}

// nodeKey names a node across caches: node ids are random, but a cache is the id's scope.
func nodeKey(cache, id string) string { return cache + "/" + id }

// Assign returns the port of node id of cache: the one it holds (also after it left and came back
// within the hold), or the lowest free one.
func (p *NodePorts) Assign(cache, id string) (int, error) {
	key := nodeKey(cache, id)
	p.mu.Lock()
	defer p.mu.Unlock()
	p.expireLocked()
	delete(p.departed, key)
	return p.ports.Assign(key)
}

// depart starts the hold of node id of cache: it left the topology.
func (p *NodePorts) depart(cache, id string) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.departed[nodeKey(cache, id)] = p.now()
}

// release frees the port of node id of cache at once (its listener could not open).
func (p *NodePorts) release(cache, id string) {
	key := nodeKey(cache, id)
	p.mu.Lock()
	defer p.mu.Unlock()
	delete(p.departed, key)
	p.ports.Release(key)
}

// expireLocked frees the ports whose hold has passed. p.mu must be held.
func (p *NodePorts) expireLocked() {
	now := p.now()
	for key, at := range p.departed {
		if now.Sub(at) >= p.hold {
			delete(p.departed, key)
			p.ports.Release(key)
		}
	}
}
