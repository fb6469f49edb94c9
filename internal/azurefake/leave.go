package azurefake

import (
	"context"
	"fmt"
	"strings"
)

// RemoveNode takes the cluster node at addr (a replica) out of the cluster, as a scale-in or a
// replaced node does: CLUSTER RESET on it (it forgets the others and becomes an empty primary of no
// slot), then CLUSTER FORGET on every other node, which then leave it out of CLUSTER SLOTS at once.
// The process keeps running (its connections too), outside the cluster.
func (e *Env) RemoveNode(ctx context.Context, addr string) error {
	e.redisMu.Lock()
	defer e.redisMu.Unlock()
	gone, err := e.node(addr)
	if err != nil {
		return err
	}
	if gone.admin == nil {
		return fmt.Errorf("azurefake: cluster node %s is stopped", addr)
	}
	ctx, cancel := context.WithTimeout(ctx, clusterFormLimit)
	defer cancel()
	if err := gone.admin.Do(ctx, "CLUSTER", "RESET", "SOFT").Err(); err != nil {
		return fmt.Errorf("CLUSTER RESET on %s: %w", addr, err)
	}
	for _, n := range e.nodes {
		if n == gone || n.admin == nil {
			continue
		}
		// FORGET bans the id for a minute, longer than any test, so gossip does not bring it back.
		if err := n.admin.Do(ctx, "CLUSTER", "FORGET", gone.id).Err(); err != nil && !strings.Contains(err.Error(), "Unknown node") {
			return fmt.Errorf("CLUSTER FORGET %s on %s: %w", gone.id, n.addr, err)
		}
	}
	return nil
}
