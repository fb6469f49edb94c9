package proxy

import (
	"bytes"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"strconv"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/entra-redis-proxy/entra-redis-proxy/resp"
	"github.com/entra-redis-proxy/entra-redis-proxy/topology"
)

// ErrNotCluster: the upstream refused CLUSTER SLOTS ("cluster support disabled", or a cache whose
// cluster policy hides the cluster).
var ErrNotCluster = errors.New("the upstream is not a Redis Cluster")

// ClusterConfig configures a Cluster.
type ClusterConfig struct {
	Seed       Dialer      // the cache's own endpoint (UPSTREAM), where the topology is read
	SeedHost   string      // its host: what a node address with an empty host means
	TLS        *tls.Config // for the nodes: ServerName is the cache's host name, since node addresses are IPs
	ListenHost string      // where node listeners listen (LISTEN's host)
	FirstPort  int         // the node listeners' port range (topology.ParsePortRange)
	LastPort   int
	// Server is the options of each node's Server (Tokens, Observer, pool, limits); its Dialer is
	// replaced by one for the node.
	Server Options
}

// Cluster follows a clustered cache's topology (Azure Managed Redis with the OSS cluster policy, a
// clustered Premium cache) and runs one local listener per node: a Server like the main one whose
// upstream is that node. Every Server given the Cluster (the main one through Options.Cluster, and
// the nodes') rewrites the node addresses its clients see to these listeners (topology package).
type Cluster struct {
	cfg ClusterConfig
	log *slog.Logger
	on  atomic.Bool // the upstream is a cluster (Detect): rewriting is on
	// movedOnce logs, once per process, what to do about a MOVED a client got on LISTEN.
	movedOnce sync.Once

	refreshMu sync.Mutex // one topology read at a time, held across it

	mu     sync.Mutex // guards the fields below
	ports  *topology.Ports
	nodes  map[string]*nodeProxy // by upstream address
	topo   topology.Topology     // as last read
	closed bool
	done   chan struct{} // closed by Shutdown: ends the probes of refusing nodes
	// onState, when set (tests), is called, under mu, when a node listener starts or stops refusing.
	onState func(upstream string, s nodeState)
	wg      sync.WaitGroup // each node's Serve and probe
}

// nodeProxy is one node's local listener.
type nodeProxy struct {
	id, upstream, local string
	srv                 *Server
	ln                  net.Listener // while serving; guarded by Cluster.mu, like state
	state               nodeState
}

// nodeState is where a node listener stands.
type nodeState uint8

const (
	nodeServing nodeState = iota // its listener accepts clients
	// nodeRefusing: the node refused a connection (it is down), so the listener is closed and clients
	// are refused at once, as the node itself refuses a direct client, until a probe reaches the node.
	// A cluster client then fails, backs off and reloads its topology exactly as it does directly (a
	// listener that accepted and then closed made go-redis fail faster and count several times the
	// errors of a direct client until the failover).
	nodeRefusing
)

// nodeProbeEvery paces the connects to a refusing node: how late after the node is back its clients are
// let in again.
const nodeProbeEvery = 100 * time.Millisecond

// NewCluster returns a Cluster with no node yet; Detect reads the topology.
func NewCluster(cfg ClusterConfig) *Cluster {
	log := cfg.Server.Logger
	if log == nil {
		log = slog.Default()
	}
	return &Cluster{cfg: cfg, log: log, ports: topology.NewPorts(cfg.FirstPort, cfg.LastPort), nodes: map[string]*nodeProxy{},
		done: make(chan struct{})}
}

// Detect reads the topology on a first connection to the seed. A cluster gets its node listeners
// and rewriting turns on; otherwise it returns ErrNotCluster and the Cluster stays idle.
func (c *Cluster) Detect(ctx context.Context) (topology.Topology, error) {
	t, err := c.Refresh(ctx)
	if err == nil {
		c.on.Store(true)
	}
	return t, err
}

// Refresh reads CLUSTER SLOTS from the seed and opens a listener for each node that has none.
func (c *Cluster) Refresh(ctx context.Context) (topology.Topology, error) {
	c.refreshMu.Lock()
	defer c.refreshMu.Unlock()
	raw, err := c.readSlots(ctx)
	if err != nil {
		return topology.Topology{}, err
	}
	t, err := topology.ParseSlots(c.cfg.SeedHost, raw)
	if err != nil {
		return topology.Topology{}, fmt.Errorf("cluster topology: %w", err)
	}
	for _, n := range t.Nodes {
		if err := c.open(n); err != nil {
			return t, err
		}
	}
	c.mu.Lock()
	c.topo = t
	c.mu.Unlock()
	c.log.Info("cluster topology", "nodes", len(t.Nodes), "slots_covered", t.Covered, "listeners", c.listeners())
	return t, nil
}

// readSlots returns the raw CLUSTER SLOTS reply of a new authenticated connection to the seed.
func (c *Cluster) readSlots(ctx context.Context) ([]byte, error) {
	ctx, cancel := context.WithTimeout(ctx, c.cfg.Server.DialTimeout)
	defer cancel()
	tok, changed := c.cfg.Server.Tokens.Current()
	for tok.Secret == "" {
		select {
		case <-changed:
			tok, changed = c.cfg.Server.Tokens.Current()
		case <-ctx.Done():
			return nil, fmt.Errorf("cluster topology: no Entra token yet: %w", ctx.Err())
		}
	}
	return readSlots(ctx, c.cfg.Seed, tok, c.cfg.Server.Tokens)
}

// readSlots dials d, authenticates with tok and returns the raw reply to CLUSTER SLOTS.
func readSlots(ctx context.Context, d Dialer, tok Token, tokens TokenSource) ([]byte, error) {
	conn, err := d.DialContext(ctx)
	if err != nil {
		return nil, fmt.Errorf("cluster topology: %w", err)
	}
	defer conn.Close()
	cc := newCtrlConn(conn)
	if _, _, err := cc.handshake(ctx, tok, tokens); err != nil {
		return nil, fmt.Errorf("cluster topology: %w", err)
	}
	r, err := cc.do(ctx, "CLUSTER", "SLOTS")
	if err != nil {
		return nil, fmt.Errorf("cluster topology: CLUSTER SLOTS: %w", err)
	}
	if r.err() != nil { // "cluster support disabled"; Enterprise's cluster policy blocks CLUSTER commands
		return nil, fmt.Errorf("%w (CLUSTER SLOTS: %s)", ErrNotCluster, r.text)
	}
	return bytes.Clone(cc.frame), nil
}

// ReadTopology reads the topology of the cache at d (whose host is seedHost) with tok, for the
// check command; ErrNotCluster when it is not a cluster.
func ReadTopology(ctx context.Context, d Dialer, seedHost string, tok Token) (topology.Topology, error) {
	raw, err := readSlots(ctx, d, tok, fixedToken(tok))
	if err != nil {
		return topology.Topology{}, err
	}
	return topology.ParseSlots(seedHost, raw)
}

// open starts n's listener unless it has one: a port from the range (the same for the node id
// while it exists) on ListenHost, and a Server dialing n with the cache's TLS name.
func (c *Cluster) open(n topology.Node) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closed || c.nodes[n.Addr] != nil {
		return nil
	}
	port, err := c.ports.Assign(n.ID)
	if err != nil {
		return err
	}
	local := net.JoinHostPort(c.cfg.ListenHost, strconv.Itoa(port))
	ln, err := net.Listen("tcp", local)
	if err != nil {
		c.ports.Release(n.ID)
		return fmt.Errorf("listen for cluster node %s on %s (ENTRA_REDIS_PROXY_CLUSTER_PORTS): %w", n.Addr, local, err)
	}
	opts := c.cfg.Server
	opts.Dialer = &TLSDialer{Addr: n.Addr, Config: c.cfg.TLS}
	opts.Logger = c.log.With("node", n.Addr, "node_listen", local)
	opts.Cluster = c
	srv, err := New(opts)
	if err != nil {
		ln.Close()
		c.ports.Release(n.ID)
		return err
	}
	srv.clusterHost, _, _ = net.SplitHostPort(n.Addr)
	srv.clusterNode = true
	np := &nodeProxy{id: n.ID, upstream: n.Addr, local: local, srv: srv, ln: ln}
	c.nodes[n.Addr] = np
	c.serve(np)
	return nil
}

// serve runs n's Server on n.ln. The caller holds c.mu.
func (c *Cluster) serve(n *nodeProxy) {
	ln := n.ln
	c.wg.Add(1)
	go func() { // owned by the Cluster: Shutdown, or refuse, ends it
		defer c.wg.Done()
		err := n.srv.Serve(ln)
		c.mu.Lock()
		closed := n.ln != ln // refuse closed it
		c.mu.Unlock()
		if !errors.Is(err, ErrServerClosed) && !closed {
			c.log.Error("cluster node listener failed", "node", n.upstream, "listen", n.local, "err", err)
		}
	}()
}

// refuse closes the listener of srv's node, which refused a connection, until a probe reaches the node
// again (nodeRefusing).
func (c *Cluster) refuse(srv *Server) {
	c.mu.Lock()
	defer c.mu.Unlock()
	var n *nodeProxy
	for _, x := range c.nodes {
		if x.srv == srv {
			n = x
		}
	}
	if n == nil || c.closed || n.state == nodeRefusing {
		return
	}
	n.state = nodeRefusing
	n.ln.Close()
	n.ln = nil
	if c.onState != nil {
		c.onState(n.upstream, n.state)
	}
	c.log.Warn("cluster node refuses connections: its listener refuses clients until the node accepts again",
		"node", n.upstream, "listen", n.local)
	c.wg.Add(1)
	go c.probe(n) // owned by the Cluster: ends when the node is back, or at Shutdown
}

// probe connects to a refusing node every nodeProbeEvery (TCP only: a direct client's connect succeeds
// from then on too) and opens its listener again, on the same port, once it accepts.
func (c *Cluster) probe(n *nodeProxy) {
	defer c.wg.Done()
	t := time.NewTicker(nodeProbeEvery)
	defer t.Stop()
	d := net.Dialer{Timeout: nodeProbeEvery}
	for {
		select {
		case <-c.done:
			return
		case <-t.C:
		}
		conn, err := d.Dial("tcp", n.upstream)
		if err != nil {
			continue
		}
		conn.Close()
		if c.reopen(n) {
			return
		}
	}
}

// reopen listens on n's port again; false when it cannot yet (the port is taken meanwhile).
func (c *Cluster) reopen(n *nodeProxy) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closed {
		return true
	}
	ln, err := net.Listen("tcp", n.local)
	if err != nil {
		c.log.Warn("cluster node accepts again but its listener cannot reopen; retrying", "node", n.upstream, "listen", n.local, "err", err)
		return false
	}
	n.ln, n.state = ln, nodeServing
	c.serve(n)
	if c.onState != nil {
		c.onState(n.upstream, n.state)
	}
	c.log.Info("cluster node accepts again: its listener is open", "node", n.upstream, "listen", n.local)
	return true
}

// listeners describes the node listeners for a log line: upstream=local, in topology order.
func (c *Cluster) listeners() []string {
	c.mu.Lock()
	defer c.mu.Unlock()
	var out []string
	for _, n := range c.topo.Nodes {
		if p := c.nodes[n.Addr]; p != nil {
			out = append(out, p.upstream+"="+p.local)
		}
	}
	return out
}

// Topology returns the topology as last read and each node's local listener, by upstream address.
func (c *Cluster) Topology() (topology.Topology, map[string]string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	m := make(map[string]string, len(c.nodes))
	for a, n := range c.nodes {
		m[a] = n.local
	}
	return c.topo, m
}

// clustered reports whether s rewrites node addresses: it has a Cluster, and the upstream is one.
func (s *Server) clustered() bool { return s.cluster != nil && s.cluster.on.Load() }

func (c *Cluster) local(upstream string) (string, bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if n := c.nodes[upstream]; n != nil {
		return n.local, true
	}
	return "", false
}

// Shutdown drains every node listener's clients (Server.Shutdown) and returns how many were cut.
func (c *Cluster) Shutdown(ctx context.Context) int {
	c.mu.Lock()
	if !c.closed {
		close(c.done)
	}
	c.closed = true
	nodes := make([]*nodeProxy, 0, len(c.nodes))
	for _, n := range c.nodes {
		nodes = append(nodes, n)
	}
	c.mu.Unlock()
	var cut atomic.Int64
	var wg sync.WaitGroup
	for _, n := range nodes {
		wg.Add(1)
		go func() { defer wg.Done(); cut.Add(int64(n.srv.Shutdown(ctx))) }()
	}
	wg.Wait()
	c.wg.Wait()
	return int(cut.Load())
}

// movedRemedy is logged once when a client of LISTEN gets MOVED.
const movedRemedy = "a client on LISTEN got MOVED: the cache is a cluster (OSS cluster policy). A cluster-aware client follows it to the node listener named in it; a client that is not cluster-aware fails for keys on other shards: use a cluster-aware client (e.g. redis-py RedisCluster, go-redis ClusterClient, Lettuce or Jedis cluster, StackExchange.Redis), or give the cache the Enterprise cluster policy (one endpoint)"

// topoKind marks a command whose reply names cluster nodes (entry.topo).
type topoKind uint8

const (
	topoNone   topoKind = iota
	topoSlots           // CLUSTER SLOTS
	topoShards          // CLUSTER SHARDS
	topoNodes           // CLUSTER NODES, REPLICAS, SLAVES
)

// topoCommand classifies a client command for the reply rewriting.
func topoCommand(args [][]byte) topoKind {
	if len(args) < 2 || !equalFold(args[0], "cluster") {
		return topoNone
	}
	switch {
	case equalFold(args[1], "slots"):
		return topoSlots
	case equalFold(args[1], "shards"):
		return topoShards
	case equalFold(args[1], "nodes"), equalFold(args[1], "replicas"), equalFold(args[1], "slaves"):
		return topoNodes
	}
	return topoNone
}

// clusterRewrites says whether the reply at p, to entry e, may name cluster nodes: an error to a
// command whose reply the client gets (a (S)SUBSCRIBE's, a blocking command's and EXEC's MOVED
// included), or a topology reply. (A redirect is no timeout reply: the unblock logic, blockedReply,
// passes it.)
func (s *session) clusterRewrites(p []byte, e entry) bool {
	if e.quiet {
		return false
	}
	return p[0] == '-' && (e.act == actForward || e.act == actSubscribe || e.act == actExec) ||
		e.topo != topoNone && e.act == actForward
}

// clusterReply rewrites the node addresses in a reply on its way to the client: a -MOVED/-ASK
// error, or the reply of a topology command, held whole (up to the read buffer's bound, maxHeadBuf).
// A node not known yet is looked up by a topology refresh first. ok is false while the reply is
// not all here.
func (s *session) clusterReply(p []byte, h *resp.Head, e entry) (ok bool, err error) {
	frame, ok, err := clusterFrame(p, h, e.topo)
	if frame == nil || err != nil {
		return ok, err
	}
	if out, changed := s.clusterRewrite(e.topo, frame); changed {
		s.rl.frame.fwd = false // the reply loop frames the original; the client gets out
		s.emit(out)
	}
	return true, nil
}

// clusterElement is clusterReply for element f.at of a transaction's reply (actExec): a topology
// command queued in MULTI answers there, and a redirect there is rewritten too (OSS redis answers a
// transaction on a moved slot with one MOVED for EXEC itself, but nothing in the protocol says a
// server may not put one in the array).
func (s *session) clusterElement(p []byte) (ok bool, err error) {
	f := &s.rl.frame
	kind := topoNone
	for _, t := range f.e.topos {
		if t.at == f.at {
			kind = t.kind
		}
	}
	if kind == topoNone && p[0] != '-' {
		return true, nil
	}
	var h resp.Head
	frame, ok, err := clusterFrame(p, &h, kind)
	if frame == nil || err != nil {
		return ok, err
	}
	if out, changed := s.clusterRewrite(kind, frame); changed {
		f.replaced = true
		s.emit(out)
	}
	return true, nil
}

// clusterFrame returns the whole frame at p's start that may name cluster nodes: a topology reply
// (kind), or, for any other reply, an error line (a redirect); nil when it is neither, or while it is
// not all here (ok false).
func clusterFrame(p []byte, h *resp.Head, kind topoKind) (frame []byte, ok bool, err error) {
	if kind == topoNone {
		if ok, err := resp.PeekHead(p, 0, h); !ok || err != nil || h.Type != '-' {
			return nil, ok, err
		}
		return p[:bytes.IndexByte(p, '\n')+1], true, nil
	}
	var sc resp.Scanner
	n, done, err := sc.Scan(p)
	if err != nil || !done {
		return nil, false, err
	}
	return p[:n], true, nil
}

// clusterRewrite returns frame with its node addresses rewritten, and whether any changed.
func (s *session) clusterRewrite(kind topoKind, frame []byte) ([]byte, bool) {
	c := s.srv.cluster
	out := c.rewrite(s.srv.ctx, s.srv.clusterHost, kind, frame)
	if kind == topoNone && !s.srv.clusterNode && bytes.HasPrefix(frame, []byte("-MOVED ")) {
		// A cluster-aware client asks the topology first and goes to the right node; one that is not
		// gets MOVED for most keys.
		c.movedOnce.Do(func() {
			s.log.Warn(movedRemedy)
		})
	}
	return out, &out[0] != &frame[0]
}

// rewrite returns frame with its node addresses replaced (frame itself when nothing changed),
// refreshing the topology once when it names a node without a listener.
func (c *Cluster) rewrite(ctx context.Context, connected string, kind topoKind, frame []byte) []byte {
	m := topology.Map{Connected: connected, Local: c.local}
	for attempt := 0; ; attempt++ {
		var res topology.Result
		var err error
		switch kind {
		case topoNone:
			out, unknown, _ := topology.Redirect(m, frame)
			res.Out = out
			if unknown != "" {
				res.Unknown = []string{unknown}
			}
		case topoSlots:
			res, err = topology.Slots(m, frame)
		case topoShards:
			res, err = topology.Shards(m, frame)
		case topoNodes:
			res, err = topology.Nodes(m, frame)
		}
		if err != nil {
			c.log.Warn("cluster reply not rewritten: passed on as the server sent it", "err", err)
			return frame
		}
		if len(res.Unknown) == 0 {
			return res.Out
		}
		if attempt > 0 {
			c.log.Warn("cluster nodes without a local listener after a topology refresh: their addresses pass unchanged", "nodes", res.Unknown)
			return res.Out
		}
		if _, err := c.Refresh(ctx); err != nil {
			c.log.Warn("cluster topology refresh failed", "err", err, "nodes", res.Unknown)
			return res.Out
		}
	}
}

// nodeDown closes, without a reply, a node listener's client whose node cannot be reached: a
// direct client would see the connection fail, and a cluster client takes a failed connection,
// not an error reply, as the sign to reload the topology and move to the node's replacement. A node
// that refused the connection has its listener closed until it accepts again (nodeRefusing); one that
// timed out keeps it, as a direct client's connect would time out too.
func (s *session) nodeDown(err error) bool {
	var de *DialError
	if !s.srv.clusterNode || !errors.As(err, &de) || de.Stage != "dial" {
		return false
	}
	s.srv.refused.add("node_unreachable", "reason", "node_unreachable", "why", "cluster node unreachable: "+
		"closing its clients' connections", "err", err.Error()) // a dead node's clients make a line per interval
	if errors.Is(err, syscall.ECONNREFUSED) {
		s.srv.cluster.refuse(s.srv)
	}
	s.close(err)
	return true
}
