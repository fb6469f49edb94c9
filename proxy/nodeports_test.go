package proxy

import (
	"errors"
	"testing"
	"time"

	"github.com/entra-redis-proxy/entra-redis-proxy/topology"
)

// TestNodePorts: one range for every cache's nodes; a departed node's port is held for it (it gets it
// back when it returns) until the hold has passed, then goes to the next new node.
func TestNodePorts(t *testing.T) {
	now := time.Date(2026, 12, 7, 12, 0, 0, 0, time.UTC)
	p := NewNodePorts(7000, 7002, 0)
	p.now = func() time.Time { return now }
	assign := func(cache, id string, want int) {
		t.Helper()
		if got, err := p.Assign(cache, id); err != nil || got != want {
			t.Fatalf("Assign(%s, %s) = %d, %v; want %d", cache, id, got, err, want)
		}
	}
	assign("a:6380", "n1", 7000)
	assign("b:10000", "n1", 7001) // the same id in another cache is another node
	assign("a:6380", "n2", 7002)
	if _, err := p.Assign("a:6380", "n3"); !errors.Is(err, topology.ErrNoPort) {
		t.Fatalf("a 4th node in 3 ports: %v, want ErrNoPort", err)
	}

	p.depart("a:6380", "n1")
	now = now.Add(DefaultPortHold - time.Second)
	if _, err := p.Assign("a:6380", "n3"); !errors.Is(err, topology.ErrNoPort) {
		t.Fatalf("a new node while the departed one's port is held: %v, want ErrNoPort", err)
	}
	assign("a:6380", "n1", 7000) // back within the hold: the same port, held no more

	p.depart("a:6380", "n1")
	now = now.Add(DefaultPortHold)
	assign("a:6380", "n3", 7000) // the hold has passed: the port is free
	if _, err := p.Assign("a:6380", "n1"); !errors.Is(err, topology.ErrNoPort) {
		t.Fatalf("n1 back after its hold, range full: %v, want ErrNoPort", err)
	}
}
