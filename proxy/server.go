// Package proxy accepts plaintext Redis connections and serves each over its own TLS connection to Azure Cache
// for Redis, authenticated with Microsoft Entra tokens and re-authenticated on every live connection when the
// token rotates, without the client noticing.
//
// The proxy never reorders or rewrites a client's replies. It knows, for every command it writes upstream,
// what reply (if any) will come back and whether it belongs to the client or to the proxy (see ledger.go);
// it injects its own AUTH only where redis answers it in order with one reply the proxy can consume.
package proxy

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
)

// Options configure a Server. Tokens and Dialer are required.
type Options struct {
	Tokens   TokenSource
	Dialer   Dialer
	Logger   *slog.Logger // default: slog.Default()
	Observer Observer     // default: NopObserver

	MaxConnections int           // client connections at once; 0 = unlimited; ignored when Limit is set
	DialTimeout    time.Duration // dial + TLS + AUTH of an upstream; default 10s
	IdlePing       time.Duration // PING an upstream idle this long; 0 = never
	MaxBulk        int64         // largest bulk a client may send; default 512 MiB
	// Limit, if set, is a connection budget shared with other Servers (the process's); nil: one of
	// MaxConnections for this Server alone.
	Limit *ConnLimit
	// PoolSize is how many authenticated upstream connections are kept ready for new clients; 0 = none.
	PoolSize int
	// PoolMax is how far the pool may grow, from the connect rate it sees, when clients connect per request
	// (see sizer); at most PoolSize (a fixed size) when smaller.
	PoolMax int
	// LocalPassword, if set, must be given by AUTH (or HELLO ... AUTH) before any other command.
	LocalPassword string
	// ReauthSpread bounds the window over which live connections are re-authenticated after a new token
	// arrives, so thousands of AUTHs don't hit the cache at one instant. Default 30s; the window is also at
	// most a tenth of the old token's remaining life.
	ReauthSpread time.Duration
	// WriteTimeout: a write to a client or the upstream that makes no progress this long fails and closes the
	// connection; default 60s. A client that stops reading its replies is closed after it.
	WriteTimeout time.Duration
	// StallTimeout: a reply that stops halfway this long closes the connection; default 30s.
	StallTimeout time.Duration
	// ReconnectTimeout: an upstream connection that closes with no reply outstanding is dialed again, with
	// backoff, for at most this long, and the connection's state restored (reconnect.go); default 30s;
	// negative: never (the client connection is closed, as for a loss with a reply outstanding).
	ReconnectTimeout time.Duration
	// MaintenanceEvents: listen for Azure Cache for Redis's maintenance announcements (AzureRedisEvents) on a
	// control connection of its own, and move sessions to new upstream connections ahead of a node's
	// maintenance (maintenance.go).
	MaintenanceEvents bool
	// MaintNotifications: opt in, on a control connection of its own, to Azure Managed Redis's (Redis
	// Enterprise's) maintenance notifications (CLIENT MAINT_NOTIFICATIONS), and act on them: move sessions
	// to the endpoint a MOVING names (notifications.go). A server that does not know the command turns it
	// off. Not for a clustered cache: its notifications are per node.
	MaintNotifications bool
	// ConnLogLevel is the level of the per-connection open and close lines; the zero value is INFO. Lines
	// about failures, tokens and refusals keep their own levels.
	ConnLogLevel slog.Level
	// Cluster, for a clustered cache, runs the node listeners; the Server rewrites node addresses in
	// its clients' replies to them (cluster.go). Nil: replies pass as they are.
	Cluster *Cluster
}

// ErrServerClosed is returned by Serve once Shutdown or Close has been called, as net/http's is.
var ErrServerClosed = errors.New("proxy: Server closed")

// errCut is the cause a session cut by Close (or by Shutdown's deadline) logs.
var errCut = errors.New("proxy shutting down: connection cut")

// serverState is where a Server is in its life; it only moves forward.
type serverState uint8

const (
	stateServing  serverState = iota // accepting clients
	stateRetired                     // Retire: no new client; sessions go on until their clients or upstreams end them
	stateDraining                    // Shutdown began: no new client; sessions end at their next safe point
	stateStopped                     // Close (or Shutdown's deadline) cut the sessions; background loops stop
)

// Server is the proxy: it accepts clients and runs a session for each.
type Server struct {
	opts  Options
	log   *slog.Logger
	obs   Observer
	epoch time.Time

	nextID  atomic.Uint64
	clients atomic.Int64 // open client connections, counted from accept to close
	limit   *ConnLimit   // Options.Limit, or this Server's own
	// unreachable holds the last upstream dial's failure, nil after a dial that succeeded (readiness).
	unreachable atomic.Pointer[error]
	// tookPokes, if set (by tests), is told each time a session's client loop takes work handed to it:
	// the event tests await instead of a stand-in for it.
	tookPokes atomic.Pointer[func(conn uint64, bits uint32)]
	// maintAt is when the last maintenance that moves sessions was announced (server clock; 0 = never).
	maintAt atomic.Int64
	// maintUntil: stall limits are relaxed until then (server clock), while a maintenance is in progress.
	maintUntil atomic.Int64
	// eventsUp is closed once the AzureRedisEvents subscription is first confirmed: the event tests await.
	eventsUp     chan struct{}
	eventsUpOnce sync.Once
	// maintNode is the address of the node under maintenance, as NodeMaintenanceStart named it, for CLIENT
	// UNBLOCK of the sessions still on it (dialBlockedNode); nil if none was named.
	maintNode atomic.Pointer[string]
	// moving is where new upstream connections go after a MOVING notification, until it expires; nil: the
	// configured address. Set by the notifications loop only.
	moving atomic.Pointer[movingTarget]

	mu        sync.Mutex
	state     serverState
	listeners map[*net.Listener]struct{} // those given to Serve and not yet closed
	conns     map[*session]struct{}      // every client connection, from accept until its goroutine ends
	sessions  map[*session]struct{}      // sessions with an upstream, for re-AUTH and idle pings
	cut       int                        // client connections open when the server stopped
	closeErr  error                      // the first error closing a listener
	closing   chan struct{}              // closed when the state leaves serving: wakes Serve's backoff
	drained   chan struct{}              // closed once the state left serving and conns is empty

	pool     *pool              // nil without Options.PoolSize
	stopPool context.CancelFunc // ends the pool's upkeep (and closes its idle connections); nil without a pool
	// cluster is Options.Cluster; clusterHost the host its upstream connections reach, which an empty
	// host in a redirect means.
	cluster     *Cluster
	clusterHost string
	clusterNode bool  // a node listener's Server (not LISTEN's)
	facts       facts // learned about the server and the identity's policy (facts.go)

	// Repeated events, one log line per interval with a count (tally.go).
	refused     *tally // clients refused at accept (connection limit, shutting down), by reason
	noToken     *tally // clients refused because no valid Entra token is held
	expiryDrops *tally // upstreams closed once the token expired
	authFails   *tally // wrong LOCAL_PASSWORD, by client address

	sessWG sync.WaitGroup // one per client connection
	bgWG   sync.WaitGroup // background loops and helper goroutines
	ctx    context.Context
	cancel context.CancelFunc // stops background loops and cuts open sessions
}

// New returns a Server; call Serve to start it.
func New(opts Options) (*Server, error) {
	if opts.Tokens == nil || opts.Dialer == nil {
		return nil, errors.New("proxy: Options.Tokens and Options.Dialer are required")
	}
	if opts.Logger == nil {
		opts.Logger = slog.Default()
	}
	if opts.Observer == nil {
		opts.Observer = NopObserver{}
	}
	if opts.DialTimeout <= 0 {
		opts.DialTimeout = 10 * time.Second
	}
	if opts.MaxBulk <= 0 {
		opts.MaxBulk = 512 << 20
	}
	if opts.ReauthSpread <= 0 {
		opts.ReauthSpread = 30 * time.Second
	}
	if opts.WriteTimeout <= 0 {
		opts.WriteTimeout = 60 * time.Second
	}
	if opts.StallTimeout <= 0 {
		opts.StallTimeout = 30 * time.Second
	}
	if opts.ReconnectTimeout == 0 {
		opts.ReconnectTimeout = 30 * time.Second
	}
	ctx, cancel := context.WithCancel(context.Background())
	s := &Server{
		opts: opts, log: opts.Logger, obs: opts.Observer, epoch: time.Now(),
		listeners: make(map[*net.Listener]struct{}), conns: make(map[*session]struct{}),
		sessions: make(map[*session]struct{}), closing: make(chan struct{}), drained: make(chan struct{}),
		ctx: ctx, cancel: cancel, eventsUp: make(chan struct{}), cluster: opts.Cluster, limit: opts.Limit,
		refused: newTally(opts.Logger, slog.LevelWarn, "clients refused", refusalEvery, true),
		noToken: newTally(opts.Logger, slog.LevelWarn,
			"clients refused without dialing the cache: no valid Entra token", refusalEvery, true),
		expiryDrops: newTally(opts.Logger, slog.LevelWarn,
			"upstream connections closed by the cache: the Entra token expired", expiryDropWindow, false),
		authFails: newTally(opts.Logger, slog.LevelWarn, "wrong LOCAL_PASSWORD", time.Minute, true),
	}
	if s.limit == nil {
		s.limit = NewConnLimit(opts.MaxConnections)
	}
	if opts.Cluster != nil {
		s.clusterHost = opts.Cluster.cfg.SeedHost
	}
	if opts.PoolSize > 0 {
		s.pool = newPool(s, opts.PoolSize, max(opts.PoolSize, opts.PoolMax))
		pctx, stop := context.WithCancel(ctx) // Retire stops it before Close: no new client will take from it
		s.stopPool = stop
		s.goTracked(func(context.Context) { s.pool.fill(pctx) })
	}
	s.goTracked(s.rotateLoop)
	if opts.IdlePing > 0 {
		s.goTracked(s.idleLoop)
	}
	if opts.MaintenanceEvents {
		s.goTracked(s.eventsLoop)
	}
	if opts.MaintNotifications && opts.Cluster == nil {
		s.goTracked(s.notificationsLoop)
	}
	return s, nil
}

const (
	// refusalEvery is the interval of the lines about refused clients.
	refusalEvery = 10 * time.Second
	// expiryDropWindow gathers the connections the cache closes at a token's expiry into one line: it
	// closes them all at once.
	expiryDropWindow = time.Second
)

// maxHead bounds a reply's head, which the reply loop buffers whole: a pub/sub message or confirmation
// holds its channel name, which may be as long as any bulk a client may send (MaxBulk).
func (s *Server) maxHead() int { return int(s.opts.MaxBulk) + headSlack }

// now is the server's monotonic clock in nanoseconds: cheaper to store and compare than time.Time.
func (s *Server) now() int64 { return int64(time.Since(s.epoch)) }

// goTracked runs f in a goroutine that Close waits for; f must return when ctx is done.
func (s *Server) goTracked(f func(ctx context.Context)) {
	s.bgWG.Add(1)
	go func() {
		defer s.bgWG.Done()
		f(s.ctx)
	}()
}

// Serve accepts clients on ln until Shutdown or Close, then returns ErrServerClosed; it returns at once with
// ErrServerClosed if they were called before. It closes ln when it returns. An Accept error that a retry may
// cure (out of file descriptors, a connection reset before it was accepted) is retried with a backoff, as
// net/http does; any other (ln closed by someone else, the socket shut down) is returned as it is.
func (s *Server) Serve(ln net.Listener) error {
	ln = &onceCloseListener{Listener: ln}
	defer ln.Close()
	if !s.trackListener(&ln, true) {
		return ErrServerClosed
	}
	defer s.trackListener(&ln, false)
	var backoff time.Duration
	for {
		c, err := ln.Accept()
		if err != nil {
			if s.stopping() {
				return ErrServerClosed
			}
			if !temporaryAccept(err) {
				return err
			}
			backoff = min(max(2*backoff, 5*time.Millisecond), time.Second)
			s.log.Warn("accept failed; retrying", "err", err, "retry_in", backoff.String())
			t := time.NewTimer(backoff)
			select {
			case <-t.C:
				continue
			case <-s.closing:
				t.Stop()
				return ErrServerClosed
			}
		}
		backoff = 0
		s.accept(c)
	}
}

// temporaryAccept reports whether an Accept error concerns the system's resources or one connection only, so
// the next Accept may succeed. Linux's accept(2) also passes on a pending network error of the new
// connection, which its manual says to treat as EAGAIN. (Go retries ECONNABORTED and EINTR itself.)
func temporaryAccept(err error) bool {
	var ne net.Error
	if errors.As(err, &ne) && ne.Timeout() {
		return true
	}
	for _, e := range [...]syscall.Errno{syscall.EMFILE, syscall.ENFILE, syscall.ENOBUFS, syscall.ENOMEM,
		syscall.ECONNRESET, syscall.EPERM, syscall.EPROTO, syscall.ENOPROTOOPT, syscall.ENETDOWN,
		syscall.ENETUNREACH, syscall.EHOSTDOWN, syscall.EHOSTUNREACH, syscall.EOPNOTSUPP} {
		if errors.Is(err, e) {
			return true
		}
	}
	return false
}

// onceCloseListener lets Serve's return and Shutdown both close the listener; the first close's error counts.
type onceCloseListener struct {
	net.Listener
	once sync.Once
	err  error
}

func (l *onceCloseListener) Close() error {
	l.once.Do(func() { l.err = l.Listener.Close() })
	return l.err
}

// trackListener adds or removes a listener of Serve; adding fails once the server has stopped serving.
func (s *Server) trackListener(ln *net.Listener, add bool) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if !add {
		delete(s.listeners, ln)
		return true
	}
	if s.state != stateServing {
		return false
	}
	s.listeners[ln] = struct{}{}
	return true
}

// stopping reports whether Shutdown or Close has been called.
func (s *Server) stopping() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.state != stateServing
}

// advanceLocked moves the server to state st (never back), closes its listeners and, once no client
// connection is left, marks it drained. s.mu must be held.
func (s *Server) advanceLocked(st serverState) {
	if s.state == stateServing {
		close(s.closing)
	}
	if st == stateStopped && s.state != stateStopped {
		s.cut = len(s.conns)
	}
	s.state = max(s.state, st)
	for ln := range s.listeners {
		if err := (*ln).Close(); err != nil && s.closeErr == nil {
			s.closeErr = err
		}
		delete(s.listeners, ln)
	}
	s.noteDrainedLocked()
}

func (s *Server) noteDrainedLocked() {
	if s.state == stateServing || len(s.conns) > 0 {
		return
	}
	select {
	case <-s.drained:
	default:
		close(s.drained)
	}
}

func (s *Server) accept(c net.Conn) {
	if !s.limit.acquire() {
		s.reject(c, "max_connections", "-ERR max number of clients reached\r\n",
			"connection limit reached", "max_connections", s.limit.Max())
		return
	}
	id := s.nextID.Add(1)
	sess := newSession(s, c, id)
	s.mu.Lock()
	if s.state != stateServing {
		// Accepted as Shutdown closed the listener: such a client is told why, like one over the limit.
		s.mu.Unlock()
		s.limit.release()
		s.reject(c, "shutting_down", "-ERR entra-redis-proxy: shutting down\r\n", "shutting down")
		return
	}
	s.conns[sess] = struct{}{}
	s.sessWG.Add(1) // under mu: no Add once the state left serving, so Shutdown's wait is final
	s.mu.Unlock()
	s.clients.Add(1)
	s.obs.ClientOpened()
	go func() {
		defer s.sessWG.Done()
		defer s.leave(sess)
		defer s.obs.ClientClosed()
		defer s.limit.release()
		defer s.clients.Add(-1)
		sess.run(s.ctx)
	}()
}

// reject answers a client the server will not serve with a redis error line, then closes it. The log says
// so once per refusalEvery per reason, with a count.
func (s *Server) reject(c net.Conn, reason, line, msg string, attrs ...any) {
	s.obs.ClientRejected(reason)
	s.refused.add(reason, append([]any{"reason", reason, "why", msg, "client", c.RemoteAddr().String()}, attrs...)...)
	c.SetWriteDeadline(time.Now().Add(time.Second))
	c.Write([]byte(line))
	c.Close()
}

// leave forgets a client connection whose session has ended.
func (s *Server) leave(sess *session) {
	s.mu.Lock()
	delete(s.conns, sess)
	s.noteDrainedLocked()
	s.mu.Unlock()
}

// Clients returns the number of open client connections.
func (s *Server) Clients() int { return int(s.clients.Load()) }

// AtLimit reports whether the connection limit (shared with the Servers that share Options.Limit) is
// reached (for readiness).
func (s *Server) AtLimit() bool { return s.limit.AtLimit() }

// Unreachable returns why the last upstream dial failed, or nil when it succeeded or none was made
// yet (for readiness: the pool dials ahead of clients, so this follows the cache without a probe).
func (s *Server) Unreachable() error {
	if p := s.unreachable.Load(); p != nil {
		return *p
	}
	return nil
}

// Retire stops accepting (the listeners given to Serve close, and Serve returns ErrServerClosed)
// but leaves the open sessions alone: they end when their clients or upstreams end them. The
// returned channel is closed once none is left; then the owner calls Close. For a cluster node that
// left the topology: new clients must go elsewhere, existing ones may still finish their work.
func (s *Server) Retire() <-chan struct{} {
	if s.stopPool != nil {
		s.stopPool()
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	s.advanceLocked(stateRetired)
	return s.drained
}

// track adds a session with a live upstream; false means the server has stopped and the session must end.
// While draining it is still tracked (for re-AUTH): Shutdown has asked it to drain already.
func (s *Server) track(sess *session) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.state == stateStopped {
		return false
	}
	s.sessions[sess] = struct{}{}
	return true
}

func (s *Server) untrack(sess *session) {
	s.mu.Lock()
	delete(s.sessions, sess)
	s.mu.Unlock()
}

func (s *Server) each(f func(*session)) {
	s.mu.Lock()
	defer s.mu.Unlock()
	for sess := range s.sessions {
		f(sess)
	}
}

// snapshotLocked returns the open client connections. s.mu must be held.
func (s *Server) snapshotLocked() []*session {
	all := make([]*session, 0, len(s.conns))
	for sess := range s.conns {
		all = append(all, sess)
	}
	return all
}

// Shutdown stops accepting (it closes the listeners given to Serve, which then returns ErrServerClosed) and
// asks every client connection to close at its next safe point: each is served until every reply it asked
// for is delivered, then closed (see session.drain). When all have closed, or when ctx ends, it calls Close,
// which cuts the rest. It returns how many client connections were cut.
func (s *Server) Shutdown(ctx context.Context) (cut int) {
	s.mu.Lock()
	s.advanceLocked(stateDraining)
	all := s.snapshotLocked()
	s.mu.Unlock()
	// Outside mu: a session's drain may need the server. Sessions accepted later are refused (see accept).
	for _, sess := range all {
		sess.drain()
	}
	select {
	case <-s.drained:
	case <-ctx.Done():
	}
	s.Close()
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.cut
}

// Close stops accepting, cuts every client connection at once, stops the background loops and waits for
// every goroutine of the server. It returns the first error closing a listener. It may be called more than
// once, and during a Shutdown (which then returns early, reporting the connections cut).
func (s *Server) Close() error {
	s.mu.Lock()
	s.advanceLocked(stateStopped)
	all := s.snapshotLocked()
	err := s.closeErr
	s.mu.Unlock()
	s.cancel() // aborts dials in progress, stops the loops
	for _, sess := range all {
		sess.close(errCut)
	}
	s.sessWG.Wait()
	s.bgWG.Wait()
	for _, t := range []*tally{s.refused, s.noToken, s.expiryDrops, s.authFails} {
		t.stop()
	}
	return err
}

// waitToken returns the current token of tokens, waiting for the first one, or ctx's error.
func waitToken(ctx context.Context, tokens TokenSource) (Token, error) {
	for {
		tok, changed := tokens.Current()
		if tok.Secret != "" {
			return tok, nil
		}
		select {
		case <-changed:
		case <-ctx.Done():
			return Token{}, fmt.Errorf("no Entra token yet: %w", ctx.Err())
		}
	}
}

// tokenOutage is why no upstream can be authenticated now: no valid Entra token is held.
type tokenOutage struct {
	since time.Time // when the last token expired, or when the proxy started if none came
	last  error     // the token source's last error; nil if it does not say
}

func (e *tokenOutage) Error() string {
	msg := "no valid Entra token since " + e.since.UTC().Format(time.RFC3339)
	if e.last != nil {
		msg += "; last Entra error: " + truncate(oneLine(e.last.Error()), 300)
	}
	return msg
}

// oneLine squeezes azidentity's multi-line error text (with rules of dashes) into one short line.
func oneLine(s string) string {
	words := strings.Fields(s)
	kept := words[:0]
	for _, w := range words {
		if strings.Trim(w, "-") != "" {
			kept = append(kept, w)
		}
	}
	return strings.Join(kept, " ")
}

// outageRemedy is what to check during a token outage, for the log and the client.
const outageRemedy = "check the identity endpoint (managed identity: IMDS or the pod's workload identity webhook; Entra ID " +
	"status) and ENTRA_REDIS_PROXY_CREDENTIAL; the proxy retries every second and serves clients again as soon as a token arrives"

// attrs describe the outage on a log line.
func (e *tokenOutage) attrs() []any {
	a := []any{"no_valid_token_since", e.since.UTC().Format(time.RFC3339), "remedy", outageRemedy}
	if e.last != nil {
		a = append(a, "last_entra_error", e.last.Error())
	}
	return a
}

// outage returns the token outage in progress: the token expired (or none came and an attempt failed). Nil
// while a valid token is held, or while the first is on its way. A token without an expiry never expires.
func (s *Server) outage() *tokenOutage {
	tok, _ := s.opts.Tokens.Current()
	if tok.Secret != "" && (tok.ExpiresOn.IsZero() || time.Now().Before(tok.ExpiresOn)) {
		return nil
	}
	var last error
	if le, ok := s.opts.Tokens.(interface{ LastError() error }); ok {
		last = le.LastError()
	}
	switch {
	case tok.Secret != "":
		return &tokenOutage{since: tok.ExpiresOn, last: last}
	case last != nil:
		return &tokenOutage{since: s.epoch, last: last}
	}
	return nil
}

// dialUpstream opens and authenticates an upstream connection, waiting for the first token if need be.
// Without a valid token it does not dial: the cache would refuse the AUTH anyway.
func (s *Server) dialUpstream(ctx context.Context) (*pooled, error) {
	if o := s.outage(); o != nil {
		return nil, o
	}
	tok, err := waitToken(ctx, s.opts.Tokens)
	if err != nil {
		return nil, err
	}
	start, opened := time.Now(), s.now()
	conn, addr, err := s.dial(ctx)
	if err != nil {
		var de *DialError
		kind := "dial"
		if errors.As(err, &de) {
			kind = de.Stage
		}
		s.obs.UpstreamError(kind)
		if ctx.Err() == nil {
			s.unreachable.Store(&err)
		}
		return nil, err
	}
	s.unreachable.Store(nil)
	cc := newCtrlConn(conn)
	id, tok, err := cc.handshake(ctx, tok, s.opts.Tokens)
	if err != nil {
		conn.Close()
		s.obs.UpstreamError("auth")
		return nil, err
	}
	if s.facts.get(probeUnblock) == factUnknown {
		// Whether blocking commands need leases (rescue.go): learned on the first connection, before any
		// client's command, so that no client waits for it.
		r, err := cc.do(ctx, "CLIENT", "UNBLOCK", "0") // no client has id 0: ":0" where it is allowed
		if err != nil {
			conn.Close()
			s.obs.UpstreamError("closed")
			return nil, fmt.Errorf("CLIENT UNBLOCK 0 (may this identity unblock?): %w", err)
		}
		s.facts.learn(probeUnblock, []byte{r.typ})
	}
	s.obs.UpstreamOpened(time.Since(start))
	return &pooled{conn: conn, id: id, secret: tok.Secret, opened: opened, addr: addr}, nil
}
