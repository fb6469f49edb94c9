package topology

import (
	"errors"
	"fmt"
	"strconv"
	"strings"
)

// ErrNoPort: every port of the range is taken by a node.
var ErrNoPort = errors.New("no free port left in the cluster port range")

// Ports hands out the local listeners' ports from a range, one per node id: a node keeps its
// port while it exists, so that clients that cached the topology keep reaching the same node.
// A new node takes the lowest free port. It is not safe for concurrent use: its owner
// (proxy.NodePorts) holds a lock around every call.
type Ports struct {
	first, last int
	byID        map[string]int
	taken       map[int]bool
}

// ParsePortRange parses "FIRST-LAST" (e.g. "6380-6479"): 1 <= FIRST <= LAST <= 65535.
func ParsePortRange(s string) (first, last int, err error) {
	a, b, ok := strings.Cut(strings.TrimSpace(s), "-")
	if ok {
		first, err = strconv.Atoi(a)
		if err == nil {
			last, err = strconv.Atoi(b)
		}
	}
	if !ok || err != nil || first < 1 || last < first || last > 65535 {
		return 0, 0, fmt.Errorf("port range %q: want FIRST-LAST with 1 <= FIRST <= LAST <= 65535, e.g. 6380-6479", s)
	}
	return first, last, nil
}

// NewPorts returns an allocator over first..last (as ParsePortRange checks them).
func NewPorts(first, last int) *Ports {
	return &Ports{first: first, last: last, byID: map[string]int{}, taken: map[int]bool{}}
}

// Assign returns id's port, taking the lowest free one for a new id.
func (p *Ports) Assign(id string) (int, error) {
	if port, ok := p.byID[id]; ok {
		return port, nil
	}
	for port := p.first; port <= p.last; port++ {
		if !p.taken[port] {
			p.byID[id], p.taken[port] = port, true
			return port, nil
		}
	}
	return 0, fmt.Errorf("%w (%d-%d, %d nodes): widen ENTRA_REDIS_PROXY_CLUSTER_PORTS", ErrNoPort, p.first, p.last, len(p.byID))
}

// Release frees id's port, so that another node can be given it.
func (p *Ports) Release(id string) {
	if port, ok := p.byID[id]; ok {
		delete(p.byID, id)
		delete(p.taken, port)
	}
}
