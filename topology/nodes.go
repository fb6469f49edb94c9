package topology

import (
	"errors"
	"fmt"
	"net"
	"strconv"
	"strings"
)

// Node is one cluster node as CLUSTER SLOTS names it.
type Node struct {
	ID      string   // node id
	Addr    string   // upstream host:port (net.JoinHostPort); an empty or "?" endpoint is the connected host
	Primary bool     // it serves its slots; false for a replica
	Slots   [][2]int // the slot ranges it serves, or, for a replica, those of its primary
}

// Topology is a cluster's nodes, in the order CLUSTER SLOTS first names them.
type Topology struct {
	Nodes   []Node
	Covered int // slots served by some primary (16384 when the cluster is whole)
}

// ParseSlots reads a CLUSTER SLOTS reply, from a connection to connected (a host), into a
// Topology: what the proxy needs to open a listener per node and to report the topology.
func ParseSlots(connected string, reply []byte) (Topology, error) {
	v, err := parse(reply)
	if err != nil {
		return Topology{}, err
	}
	if v.typ == '-' || v.typ == '!' {
		return Topology{}, fmt.Errorf("CLUSTER SLOTS: %s", v.text)
	}
	if v.typ != '*' {
		return Topology{}, errors.Join(ErrMalformed, errors.New("CLUSTER SLOTS: not an array"))
	}
	var t Topology
	index := map[string]int{} // node id -> position in t.Nodes
	for _, rng := range v.kids {
		first, fok := rng.kidNum(0)
		last, lok := rng.kidNum(1)
		if rng.typ != '*' || !fok || !lok || first < 0 || last < first || last >= 16384 {
			return Topology{}, errors.Join(ErrMalformed, errors.New("CLUSTER SLOTS: a range is not [first, last, nodes...]"))
		}
		t.Covered += int(last - first + 1)
		for i, node := range rng.kids[2:] {
			n, err := slotsNode(connected, node)
			if err != nil {
				return Topology{}, err
			}
			at, seen := index[n.ID]
			if !seen {
				at, n.Primary = len(t.Nodes), i == 0
				index[n.ID] = at
				t.Nodes = append(t.Nodes, n)
			}
			t.Nodes[at].Slots = append(t.Nodes[at].Slots, [2]int{int(first), int(last)})
		}
	}
	return t, nil
}

func (v value) kidNum(i int) (int64, bool) {
	if i >= len(v.kids) {
		return 0, false
	}
	return v.kids[i].num()
}

// slotsNode reads one [host, port, id, ...] of CLUSTER SLOTS; a node without an id (Redis
// before 4) is named by its address.
func slotsNode(connected string, node value) (Node, error) {
	host, port, err := slotsEndpoint(node)
	if err != nil {
		return Node{}, err
	}
	if port <= 0 || port > 65535 {
		return Node{}, errors.Join(ErrMalformed, fmt.Errorf("CLUSTER SLOTS: port %d", port))
	}
	n := Node{Addr: net.JoinHostPort(resolveHost(host, connected), strconv.FormatInt(port, 10))}
	n.ID = n.Addr
	if len(node.kids) > 2 {
		if id, ok := node.kids[2].str(); ok && id != "" {
			n.ID = id
		}
	}
	return n, nil
}

// String describes t in one line for logs and `check`: each node with its role and ranges.
func (t Topology) String() string {
	var b strings.Builder
	fmt.Fprintf(&b, "%d nodes, %d of 16384 slots covered:", len(t.Nodes), t.Covered)
	for _, n := range t.Nodes {
		role := "replica"
		if n.Primary {
			role = "primary"
		}
		fmt.Fprintf(&b, " %s (%s", n.Addr, role)
		for _, r := range n.Slots {
			fmt.Fprintf(&b, " %d-%d", r[0], r[1])
		}
		b.WriteString(")")
	}
	return b.String()
}
