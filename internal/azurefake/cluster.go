package azurefake

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/redis/go-redis/v9"
)

// The cluster Options.Cluster starts: like a clustered cache, primaries with one replica each.
const (
	clusterPrimaries   = 3
	clusterSlots       = 16384
	clusterNodeTimeout = 3000 * time.Millisecond // cluster-node-timeout: a killed primary fails over after it
	clusterFormLimit   = 30 * time.Second        // meet, assign slots, replicate, converge (a second or two when idle)
	clusterPollEvery   = 20 * time.Millisecond   // CLUSTER INFO is the only way redis tells its state
)

// clusterNode is one redis-server of a cluster. Its fields other than proc and admin are fixed
// when the cluster starts; proc and admin are nil while the node is stopped (StopNode), and are
// guarded by Env.redisMu.
type clusterNode struct {
	addr    string // 127.0.0.1:tls-port
	port    int    // TLS port for clients, replication and (tls-cluster) the bus's base
	busPort int    // cluster bus port (cluster-port on 7.0+; port+10000 before)
	dir     string // its own working directory: redis.conf, nodes.conf, redis.log
	id      string // node id (CLUSTER MYID)
	proc    *redisProc
	admin   *redis.Client
}

// clusterConfig is what a cluster node adds to redisConfig: TLS for the bus and replication,
// the admin user for replication, and short timers so that the cluster forms and fails over in
// seconds (a replica counts in CLUSTER SLOTS once its offset is non-zero, which takes the
// primary's first replication ping: 10 s by default).
func (e *Env) clusterConfig(n *clusterNode) string {
	q := strconv.Quote
	var b strings.Builder
	fmt.Fprintf(&b, `cluster-enabled yes
cluster-config-file nodes.conf
cluster-node-timeout %d
repl-ping-replica-period 1
tls-cluster yes
tls-replication yes
masteruser %s
masterauth %s
`, clusterNodeTimeout.Milliseconds(), adminUser, q(e.adminPassword))
	if e.version.AtLeast(6, 2) { // a failover test must not see a replica move to another primary
		b.WriteString("cluster-allow-replica-migration no\n")
	}
	if e.version.AtLeast(7, 0) {
		fmt.Fprintf(&b, "cluster-port %d\n", n.busPort)
	}
	return b.String()
}

// clusterPorts returns a free client port and a free bus port. Before 7.0 the bus port is
// always port+10000, so both must be free.
func (e *Env) clusterPorts() (port, bus int, err error) {
	for range bindAttempts {
		if port, err = freePort(); err != nil {
			return 0, 0, err
		}
		if e.version.AtLeast(7, 0) {
			bus, err = freePort()
			return port, bus, err
		}
		if bus = port + 10000; bus <= 65535 && portFree(bus) {
			return port, bus, nil
		}
	}
	return 0, 0, errors.New("find free ports for a cluster node: none found with a free bus port (port+10000)")
}

func portFree(port int) bool {
	l, err := net.Listen("tcp", net.JoinHostPort("127.0.0.1", strconv.Itoa(port)))
	if err != nil {
		return false
	}
	_ = l.Close()
	return true
}

// startClusterLocked starts 2*clusterPrimaries nodes, joins them, gives each primary a third of
// the slots and each replica a primary, and returns once every node reports cluster_state:ok
// and sees the whole topology. The caller holds e.redisMu.
func (e *Env) startClusterLocked(ctx context.Context) error {
	ctx, cancel := context.WithTimeout(ctx, clusterFormLimit)
	defer cancel()
	for i := range 2 * clusterPrimaries {
		n, err := e.startNewNode(ctx, i)
		if err != nil {
			return err
		}
		e.nodes = append(e.nodes, n)
	}
	e.RedisAddr = e.nodes[0].addr
	for i, n := range e.nodes {
		id, err := n.admin.Do(ctx, "CLUSTER", "MYID").Text()
		if err != nil {
			return fmt.Errorf("CLUSTER MYID on %s: %w", n.addr, err)
		}
		n.id = id
		// Distinct epochs from the start, as redis-cli --cluster create sets them.
		if err := n.admin.Do(ctx, "CLUSTER", "SET-CONFIG-EPOCH", i+1).Err(); err != nil {
			return fmt.Errorf("CLUSTER SET-CONFIG-EPOCH on %s: %w", n.addr, err)
		}
	}
	seed := e.nodes[0]
	for _, n := range e.nodes[1:] {
		args := []any{"CLUSTER", "MEET", "127.0.0.1", n.port}
		if e.version.AtLeast(7, 0) {
			args = append(args, n.busPort)
		}
		if err := seed.admin.Do(ctx, args...).Err(); err != nil {
			return fmt.Errorf("CLUSTER MEET %s from %s: %w", n.addr, seed.addr, err)
		}
	}
	for i, n := range e.nodes[:clusterPrimaries] {
		first, last := i*clusterSlots/clusterPrimaries, (i+1)*clusterSlots/clusterPrimaries-1
		args := []any{"CLUSTER", "ADDSLOTS"}
		for s := first; s <= last; s++ {
			args = append(args, s)
		}
		if err := n.admin.Do(ctx, args...).Err(); err != nil {
			return fmt.Errorf("CLUSTER ADDSLOTS %d-%d on %s: %w", first, last, n.addr, err)
		}
	}
	for i, n := range e.nodes[clusterPrimaries:] {
		primary := e.nodes[i]
		// The replica learns the primary's id by gossip: "Unknown node" until then.
		if err := e.untilCluster(ctx, func() error {
			return n.admin.Do(ctx, "CLUSTER", "REPLICATE", primary.id).Err()
		}); err != nil {
			return fmt.Errorf("CLUSTER REPLICATE %s on %s: %w", primary.addr, n.addr, err)
		}
	}
	return e.untilCluster(ctx, e.clusterFormed)
}

// startNewNode starts node i of a new cluster in its own directory, on fresh ports.
func (e *Env) startNewNode(ctx context.Context, i int) (*clusterNode, error) {
	dir := e.path("node-" + strconv.Itoa(i))
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("create %s: %w", dir, err)
	}
	var err error
	for range bindAttempts {
		n := &clusterNode{dir: dir}
		if n.port, n.busPort, err = e.clusterPorts(); err != nil {
			return nil, err
		}
		n.addr = net.JoinHostPort("127.0.0.1", strconv.Itoa(n.port))
		if err = e.startNode(ctx, n); err == nil {
			return n, nil
		}
		if !errors.Is(err, errExitedEarly) {
			break
		}
		_ = os.Remove(filepath.Join(dir, "nodes.conf")) // the next ports make a new node
	}
	return nil, fmt.Errorf("cluster node %d: %w", i, err)
}

// startNode starts n's process (again, after StopNode: nodes.conf brings it back into the
// cluster). The caller holds e.redisMu.
func (e *Env) startNode(ctx context.Context, n *clusterNode) error {
	p, err := e.launch(ctx, n.dir, n.port, e.clusterConfig(n))
	if err != nil {
		return err
	}
	n.proc, n.admin = p, redis.NewClient(e.adminOptions(n.addr, 3))
	return nil
}

// clusterFormed reports nil once every node sees cluster_state:ok, all slots served, every node
// known, every slot range with a primary and a replica, and each replica in sync.
func (e *Env) clusterFormed() error {
	ctx, cancel := context.WithTimeout(e.ctx, aclTimeout)
	defer cancel()
	for _, n := range e.nodes {
		info, err := n.admin.Do(ctx, "CLUSTER", "INFO").Text()
		if err != nil {
			return fmt.Errorf("CLUSTER INFO on %s: %w", n.addr, err)
		}
		want := []string{"cluster_state:ok", "cluster_slots_ok:" + strconv.Itoa(clusterSlots),
			"cluster_known_nodes:" + strconv.Itoa(len(e.nodes))}
		for _, w := range want {
			if !strings.Contains(info, w+"\r\n") {
				return fmt.Errorf("%s: CLUSTER INFO has no %s yet", n.addr, w)
			}
		}
		slots, err := n.admin.ClusterSlots(ctx).Result()
		if err != nil {
			return fmt.Errorf("CLUSTER SLOTS on %s: %w", n.addr, err)
		}
		for _, r := range slots {
			if len(r.Nodes) != 2 {
				return fmt.Errorf("%s: CLUSTER SLOTS shows %d nodes for slots %d-%d", n.addr, len(r.Nodes), r.Start, r.End)
			}
		}
	}
	for _, n := range e.nodes[clusterPrimaries:] {
		repl, err := n.admin.Do(ctx, "INFO", "replication").Text()
		if err != nil {
			return fmt.Errorf("INFO replication on %s: %w", n.addr, err)
		}
		if !strings.Contains(repl, "master_link_status:up\r\n") {
			return fmt.Errorf("replica %s: link to its primary not up yet", n.addr)
		}
	}
	return nil
}

// untilCluster runs step until it returns nil, every clusterPollEvery, until ctx ends: cluster
// state changes by gossip, and redis tells it only when asked.
func (e *Env) untilCluster(ctx context.Context, step func() error) error {
	tick := time.NewTicker(clusterPollEvery)
	defer tick.Stop()
	for {
		err := step()
		if err == nil {
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("cluster not formed: %w (last: %v)", ctx.Err(), err)
		case <-tick.C:
		}
	}
}

// stopClusterLocked stops every running node. The caller holds e.redisMu.
func (e *Env) stopClusterLocked() error {
	var errs []error
	for _, n := range e.nodes {
		errs = append(errs, n.stop())
	}
	return errors.Join(errs...)
}

// stop stops n's process if it runs. The caller holds Env.redisMu.
func (n *clusterNode) stop() error { return stopServer(&n.proc, &n.admin) }

// ClusterNodes returns the addresses of the cluster's nodes as started: primaries first, then
// the replica of each primary in the same order. Nil without Options.Cluster.
func (e *Env) ClusterNodes() []string {
	e.redisMu.Lock()
	defer e.redisMu.Unlock()
	addrs := make([]string, len(e.nodes))
	for i, n := range e.nodes {
		addrs[i] = n.addr
	}
	return addrs
}

// node returns the cluster node at addr. The caller holds e.redisMu.
func (e *Env) node(addr string) (*clusterNode, error) {
	for _, n := range e.nodes {
		if n.addr == addr {
			return n, nil
		}
	}
	return nil, fmt.Errorf("azurefake: no cluster node at %s", addr)
}

// AdminAt runs one command as the admin user on the cluster node at addr (see Admin).
func (e *Env) AdminAt(ctx context.Context, addr string, args ...string) (any, error) {
	e.redisMu.Lock()
	n, err := e.node(addr)
	var c *redis.Client
	if err == nil {
		c = n.admin
	}
	e.redisMu.Unlock()
	if err != nil {
		return nil, err
	}
	if c == nil {
		return nil, fmt.Errorf("azurefake: cluster node %s is stopped", addr)
	}
	a := make([]any, len(args))
	for i, s := range args {
		a[i] = s
	}
	return c.Do(ctx, a...).Result()
}

// StopNode stops the cluster node at addr (SIGTERM, as a crash would look to its clients and
// peers); its replica takes over after the node timeout. StartRedis starts it again.
func (e *Env) StopNode(addr string) error {
	e.redisMu.Lock()
	defer e.redisMu.Unlock()
	n, err := e.node(addr)
	if err != nil {
		return err
	}
	return n.stop()
}

// admins returns the admin connections of every running server: the one server, or each
// running cluster node. The caller holds e.redisMu.
func (e *Env) admins() []*redis.Client {
	if e.nodes == nil {
		if e.admin == nil {
			return nil
		}
		if e.replica != nil && e.replica.admin != nil {
			return []*redis.Client{e.admin, e.replica.admin}
		}
		return []*redis.Client{e.admin}
	}
	var cs []*redis.Client
	for _, n := range e.nodes {
		if n.admin != nil {
			cs = append(cs, n.admin)
		}
	}
	return cs
}

// FreePortRange returns the first of n consecutive loopback ports that were all free a moment
// ago, for a proxy's cluster node listeners. It looks below Linux's ephemeral range (32768 and
// up), where outgoing connections do not take them meanwhile.
func FreePortRange(n int) (int, error) {
	for range 20 {
		first := 20000 + rand.IntN(12000)
		var held []net.Listener
		for p := first; p < first+n; p++ {
			l, err := net.Listen("tcp", net.JoinHostPort("127.0.0.1", strconv.Itoa(p)))
			if err != nil {
				break
			}
			held = append(held, l)
		}
		for _, l := range held {
			l.Close()
		}
		if len(held) == n {
			return first, nil
		}
	}
	return 0, fmt.Errorf("no %d consecutive free ports found in 20000-32000", n)
}
