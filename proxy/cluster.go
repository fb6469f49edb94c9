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
	FirstPort  int         // the node listeners' port range (topology.ParsePortRange), when Ports is nil
	LastPort   int
	// Ports, if set, is the process's allocator of node listener ports, shared by the Clusters of
	// several caches; nil: one of FirstPort..LastPort for this Cluster.
	Ports *NodePorts
	// Name names the cache in port keys (and so must differ between the caches sharing Ports); default
	// SeedHost.
	Name string
	// RefreshEvery is how often the topology is read again once the cache is a cluster, so that nodes
	// that left are seen (new nodes are also found when a reply names one); default DefaultRefreshEvery,
	// negative: never.
	RefreshEvery time.Duration
	// Observer receives topology refreshes and listener counts; nil: none.
	Observer ClusterObserver
	// NodeObserver returns the Observer of the node listener on port; nil: Server.Observer. Called once
	// per listener, so that the hot path does no label lookup.
	NodeObserver func(port int) Observer
	// Server is the options of each node's Server (Tokens, Observer, pool, limits); its Dialer is
	// replaced by one for the node.
	Server Options
}

// nodePoolSize is the warm pool a node listener starts with and shrinks back to, however large POOL_SIZE:
// it grows to POOL_MAX from its own node's connect rate, as LISTEN's does. A cluster client keeps its
// connections to each node (go-redis, Lettuce, Jedis: a pool per node), so most nodes see few connects,
// and a replica none unless clients send READONLY; one connection keeps each node's reachability
// followed (readiness) and serves a node's first connect at once, for one descriptor per node.
const nodePoolSize = 1

// DefaultRefreshEvery is ClusterConfig.RefreshEvery's default: a minute bounds how long a departed
// node's listener keeps accepting clients that would only fail, at one CLUSTER SLOTS a minute.
const DefaultRefreshEvery = time.Minute

// Why a topology was read (ClusterObserver.TopologyRefresh).
const (
	RefreshDetect   = "detect"       // the first read (Detect)
	RefreshUnknown  = "unknown_node" // a reply named a node without a listener
	RefreshPeriodic = "periodic"     // RefreshEvery
)

// ClusterObserver receives a Cluster's events, for metrics; its methods must be safe for concurrent use.
type ClusterObserver interface {
	// TopologyRefresh reports one topology read: reason is RefreshDetect, RefreshUnknown or
	// RefreshPeriodic; err is nil when it was read and applied.
	TopologyRefresh(reason string, err error)
	// NodeListeners reports the node listeners: open (accepting) and departed (their node left the
	// topology; closed to new clients, still serving the sessions opened before).
	NodeListeners(open, departed int)
}

// Cluster follows a clustered cache's topology (Azure Managed Redis with the OSS cluster policy, a
// clustered Premium cache) and runs one local listener per node: a Server like the main one whose
// upstream is that node. Every Server given the Cluster (the main one through Options.Cluster, and
// the nodes') rewrites the node addresses its clients see to these listeners (topology package).
// A node that leaves the topology stops accepting at once; its Server ends with its last session.
type Cluster struct {
	cfg ClusterConfig
	log *slog.Logger
	on  atomic.Bool // the upstream is a cluster (Detect): rewriting is on
	// movedOnce logs, once per process, what to do about a MOVED a client got on LISTEN.
	movedOnce sync.Once
	ports     *NodePorts
	ctx       context.Context // ends the periodic refresh; canceled by Shutdown
	cancel    context.CancelFunc
	loopOnce  sync.Once // the periodic refresh starts with the first successful Detect

	refreshMu sync.Mutex    // one topology read at a time, held across it
	reads     atomic.Uint64 // topology reads started: a Refresh that waited for another's read takes that one

	mu       sync.Mutex            // guards the fields below
	nodes    map[string]*nodeProxy // accepting, by upstream address
	departed map[*nodeProxy]bool   // retired: their node left; until their last session ends
	topo     topology.Topology     // as last read
	closed   bool
	// onState, when set (tests), is called, under mu, when a node listener starts or stops refusing.
	onState func(upstream string, s nodeState)
	wg      sync.WaitGroup // each node's Serve, probe and retirement, and the periodic refresh
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
	if cfg.Name == "" {
		cfg.Name = cfg.SeedHost
	}
	if cfg.RefreshEvery == 0 {
		cfg.RefreshEvery = DefaultRefreshEvery
	}
	ports := cfg.Ports
	if ports == nil {
		ports = NewNodePorts(cfg.FirstPort, cfg.LastPort, 0)
	}
	ctx, cancel := context.WithCancel(context.Background())
	return &Cluster{cfg: cfg, log: log, ports: ports, ctx: ctx, cancel: cancel,
		nodes: map[string]*nodeProxy{}, departed: map[*nodeProxy]bool{}}
}

// Detect reads the topology on a first connection to the seed. A cluster gets its node listeners,
// rewriting turns on and the periodic refresh starts; otherwise it returns ErrNotCluster and the
// Cluster stays idle.
func (c *Cluster) Detect(ctx context.Context) (topology.Topology, error) {
	t, err := c.refresh(ctx, RefreshDetect)
	if err == nil {
		c.on.Store(true)
		c.loopOnce.Do(c.startRefreshLoop)
	}
	return t, err
}

// Refresh reads the topology again because a reply named a node without a listener (RefreshUnknown).
// At a failover many sessions get such a reply at once: one read serves all those that waited for it,
// rather than one read each, in turn, on their reply loops.
func (c *Cluster) Refresh(ctx context.Context) (topology.Topology, error) {
	seen := c.reads.Load()
	c.refreshMu.Lock()
	defer c.refreshMu.Unlock()
	if c.reads.Load() != seen { // a read began after this call did: its topology is as new
		c.mu.Lock()
		defer c.mu.Unlock()
		return c.topo, nil
	}
	return c.readLocked(ctx, RefreshUnknown)
}

// startRefreshLoop reads the topology every RefreshEvery until Shutdown.
func (c *Cluster) startRefreshLoop() {
	if c.cfg.RefreshEvery < 0 {
		return
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closed {
		return
	}
	c.wg.Add(1)
	go func() {
		defer c.wg.Done()
		tick := time.NewTicker(c.cfg.RefreshEvery)
		defer tick.Stop()
		for {
			select {
			case <-c.ctx.Done():
				return
			case <-tick.C:
			}
			if _, err := c.refresh(c.ctx, RefreshPeriodic); err != nil && c.ctx.Err() == nil {
				c.log.Warn("cluster topology refresh failed; node listeners stay as they are", "reason", RefreshPeriodic,
					"err", err, "retry_in", c.cfg.RefreshEvery.String(), "remedy", Remedy(err))
			}
		}
	}()
}

// refresh reads CLUSTER SLOTS from the seed, retires the listeners of nodes that left and opens one
// for each node that has none.
func (c *Cluster) refresh(ctx context.Context, reason string) (topology.Topology, error) {
	c.refreshMu.Lock()
	defer c.refreshMu.Unlock()
	return c.readLocked(ctx, reason)
}

// readLocked is refresh; the caller holds refreshMu.
func (c *Cluster) readLocked(ctx context.Context, reason string) (t topology.Topology, err error) {
	c.reads.Add(1)
	if c.cfg.Observer != nil {
		defer func() {
			if !errors.Is(err, ErrNotCluster) { // a plain cache's answer to detection is not a failure
				c.cfg.Observer.TopologyRefresh(reason, err)
			}
		}()
	}
	raw, err := c.readSlots(ctx)
	if err != nil {
		return topology.Topology{}, err
	}
	t, err = topology.ParseSlots(c.cfg.SeedHost, raw)
	if err != nil {
		return topology.Topology{}, fmt.Errorf("cluster topology: %w", err)
	}
	changed := c.retireDeparted(t)
	for _, n := range t.Nodes {
		opened, err := c.open(n)
		if err != nil {
			c.noteListeners()
			return t, err
		}
		changed = changed || opened
	}
	c.mu.Lock()
	c.topo = t
	c.mu.Unlock()
	c.noteListeners()
	level := slog.LevelDebug // a periodic read that changes nothing is not worth a line a minute
	if changed || reason == RefreshDetect {
		level = slog.LevelInfo
	}
	c.log.Log(ctx, level, "cluster topology", "reason", reason, "nodes", len(t.Nodes), "slots_covered", t.Covered, "listeners", c.listeners())
	return t, nil
}

// readSlots returns the raw CLUSTER SLOTS reply of a new authenticated connection to the seed.
func (c *Cluster) readSlots(ctx context.Context) ([]byte, error) {
	ctx, cancel := context.WithTimeout(ctx, c.cfg.Server.DialTimeout)
	defer cancel()
	tok, err := waitToken(ctx, c.cfg.Server.Tokens)
	if err != nil {
		return nil, fmt.Errorf("cluster topology: %w", err)
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

// open starts n's listener unless it has one (opened: it had none): a port from the range (the same
// for the node id while it exists, and for a hold after it left) on ListenHost, and a Server dialing n
// with the cache's TLS name.
func (c *Cluster) open(n topology.Node) (opened bool, err error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closed || c.nodes[n.Addr] != nil {
		return false, nil
	}
	port, err := c.ports.Assign(c.cfg.Name, n.ID)
	if err != nil {
		return false, err
	}
	local := net.JoinHostPort(c.cfg.ListenHost, strconv.Itoa(port))
	ln, err := net.Listen("tcp", local)
	if err != nil {
		c.ports.release(c.cfg.Name, n.ID)
		return false, fmt.Errorf("listen for cluster node %s on %s (ENTRA_REDIS_PROXY_CLUSTER_PORTS): %w", n.Addr, local, err)
	}
	opts := c.cfg.Server
	opts.Dialer = &TLSDialer{Addr: n.Addr, Config: c.cfg.TLS}
	opts.Logger = c.log.With("node", n.Addr, "node_listen", local)
	opts.Cluster = c
	if opts.PoolSize > 0 {
		opts.PoolSize, opts.PoolMax = min(opts.PoolSize, nodePoolSize), max(opts.PoolSize, opts.PoolMax)
	}
	if c.cfg.NodeObserver != nil {
		opts.Observer = c.cfg.NodeObserver(port)
	}
	srv, err := New(opts)
	if err != nil {
		ln.Close()
		c.ports.release(c.cfg.Name, n.ID)
		return false, err
	}
	srv.clusterHost, _, _ = net.SplitHostPort(n.Addr)
	srv.clusterNode = true
	np := &nodeProxy{id: n.ID, upstream: n.Addr, local: local, srv: srv, ln: ln}
	c.nodes[n.Addr] = np
	c.serve(np)
	return true, nil
}

// serve runs n's Server on n.ln. The caller holds c.mu.
func (c *Cluster) serve(n *nodeProxy) {
	ln := n.ln
	c.wg.Add(1)
	go func() { // owned by the Cluster: Shutdown, refuse, or the node's retirement ends it
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

// retireDeparted closes the listeners of the nodes t no longer names (or names at another address):
// new dials are refused at once, while their open sessions go on until their clients or the node
// end them; each Server is closed after its last session. The port stays held for the node id.
// It reports whether any listener was retired.
func (c *Cluster) retireDeparted(t topology.Topology) (retired bool) {
	present := make(map[string]string, len(t.Nodes)) // address -> node id
	for _, n := range t.Nodes {
		present[n.Addr] = n.ID
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closed {
		return false
	}
	for addr, np := range c.nodes {
		if id, ok := present[addr]; ok && id == np.id {
			continue
		}
		retired = true
		delete(c.nodes, addr)
		c.departed[np] = true
		c.ports.depart(c.cfg.Name, np.id)
		gone := np.srv.Retire()
		c.log.Info("cluster node left the topology: its listener is closed; its open connections go on until they end",
			"node", np.upstream, "node_id", np.id, "node_listen", np.local, "connections", np.srv.Clients(),
			"port_held_for", c.ports.hold.String())
		c.wg.Add(1)
		go func() { // owned by the Cluster: ends with the node's last session, or at Shutdown
			defer c.wg.Done()
			select {
			case <-gone:
			case <-c.ctx.Done():
				return // Shutdown drains and closes it
			}
			np.srv.Close()
			c.mu.Lock()
			delete(c.departed, np)
			c.mu.Unlock()
			c.noteListeners()
			c.log.Info("departed cluster node's listener closed: its last connection ended", "node", np.upstream, "node_listen", np.local)
		}()
	}
	return retired
}

// noteListeners reports the listener counts to the Observer.
func (c *Cluster) noteListeners() {
	if c.cfg.Observer == nil {
		return
	}
	c.mu.Lock()
	open, departed := len(c.nodes), len(c.departed)
	c.mu.Unlock()
	c.cfg.Observer.NodeListeners(open, departed)
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
// from then on too) and opens its listener again, on the same port, once it accepts; it stops when the
// node leaves the topology.
func (c *Cluster) probe(n *nodeProxy) {
	defer c.wg.Done()
	t := time.NewTicker(nodeProbeEvery)
	defer t.Stop()
	d := net.Dialer{Timeout: nodeProbeEvery}
	for {
		select {
		case <-c.ctx.Done():
			return
		case <-t.C:
		}
		c.mu.Lock()
		gone := c.nodes[n.upstream] != n
		c.mu.Unlock()
		if gone { // it left the topology: its listener stays closed
			return
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
	if c.closed || c.nodes[n.upstream] != n { // shut down, or the node left the topology meanwhile
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

// Topology returns the topology as last read and each accepting node listener, by upstream address.
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

// Unreachable returns the first node listener whose last upstream dial failed, for readiness.
func (c *Cluster) Unreachable() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	for _, n := range c.nodes {
		if err := n.srv.Unreachable(); err != nil {
			return fmt.Errorf("cluster node %s: %w", n.upstream, err)
		}
	}
	return nil
}

// Shutdown stops the periodic refresh and drains every node listener's clients, departed ones'
// included (Server.Shutdown), and returns how many were cut.
func (c *Cluster) Shutdown(ctx context.Context) int {
	c.mu.Lock()
	c.closed = true
	nodes := make([]*nodeProxy, 0, len(c.nodes)+len(c.departed))
	for _, n := range c.nodes {
		nodes = append(nodes, n)
	}
	for n := range c.departed {
		nodes = append(nodes, n)
	}
	c.mu.Unlock()
	c.cancel()
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
