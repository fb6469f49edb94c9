// Package proxy accepts plaintext Redis connections and serves each over its own TLS connection to Azure Cache
// for Redis, authenticated with Microsoft Entra tokens and re-authenticated on every live connection when the
// token rotates, without the client noticing.
//
// The proxy never reorders or rewrites a client's replies. It knows, for every command it writes upstream,
// what reply (if any) will come back and whether it belongs to the client or to the proxy (see pending.go);
// it injects its own AUTH only where redis answers it in order with one reply the proxy can consume.
package proxy

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"sync"
	"sync/atomic"
	"time"
)

// Options configure a Server. Tokens and Dialer are required.
type Options struct {
	Tokens   TokenSource
	Dialer   Dialer
	Logger   *slog.Logger // default: slog.Default()
	Observer Observer     // default: NopObserver

	MaxConnections int           // client connections at once; 0 = unlimited
	DialTimeout    time.Duration // dial + TLS + AUTH of an upstream; default 10s
	IdlePing       time.Duration // PING an upstream idle this long; 0 = never
	MaxBulk        int64         // largest bulk a client may send; default 512 MiB
	// PoolSize is how many authenticated upstream connections are kept ready for new clients; 0 = none.
	PoolSize int
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
}

// Server is the proxy: it accepts clients and runs a session for each.
type Server struct {
	opts  Options
	log   *slog.Logger
	obs   Observer
	epoch time.Time

	nextID  atomic.Uint64
	clients atomic.Int64 // open client connections, counted from accept to close

	mu       sync.Mutex
	sessions map[*session]struct{} // sessions with an upstream, for re-AUTH and idle pings
	closed   bool                  // Close has cut the sessions: no new one may start

	pool *pool // nil without Options.PoolSize

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
	ctx, cancel := context.WithCancel(context.Background())
	s := &Server{
		opts: opts, log: opts.Logger, obs: opts.Observer, epoch: time.Now(),
		sessions: make(map[*session]struct{}), ctx: ctx, cancel: cancel,
	}
	if opts.PoolSize > 0 {
		s.pool = newPool(s, opts.PoolSize)
		s.goTracked(s.pool.fill)
	}
	s.goTracked(s.rotateLoop)
	if opts.IdlePing > 0 {
		s.goTracked(s.idleLoop)
	}
	return s, nil
}

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

// Serve accepts clients on ln until ln is closed (by the caller, to stop accepting) or Close is called.
func (s *Server) Serve(ln net.Listener) error {
	stop := context.AfterFunc(s.ctx, func() { ln.Close() })
	defer stop()
	var backoff time.Duration
	for {
		c, err := ln.Accept()
		if err != nil {
			if errors.Is(err, net.ErrClosed) {
				return nil
			}
			// Out of file descriptors and the like: wait a little, as net/http does.
			backoff = min(max(2*backoff, 5*time.Millisecond), time.Second)
			s.log.Warn("accept failed; retrying", "err", err, "retry_in", backoff.String())
			select {
			case <-time.After(backoff):
				continue
			case <-s.ctx.Done():
				return nil
			}
		}
		backoff = 0
		s.accept(c)
	}
}

func (s *Server) accept(c net.Conn) {
	if max := s.opts.MaxConnections; max > 0 && s.clients.Load() >= int64(max) {
		s.obs.ClientRejected("max_connections")
		s.log.Warn("client refused: connection limit reached", "client", c.RemoteAddr().String(), "max_connections", max)
		c.SetWriteDeadline(time.Now().Add(time.Second))
		c.Write([]byte("-ERR max number of clients reached\r\n"))
		c.Close()
		return
	}
	s.clients.Add(1)
	s.obs.ClientOpened()
	id := s.nextID.Add(1)
	sess := &session{id: id, srv: s, client: c, opened: time.Now(), log: s.log.With("conn", id)}
	s.sessWG.Add(1)
	go func() {
		defer s.sessWG.Done()
		defer s.obs.ClientClosed()
		defer s.clients.Add(-1)
		sess.run(s.ctx)
	}()
}

// Clients returns the number of open client connections.
func (s *Server) Clients() int { return int(s.clients.Load()) }

// AtLimit reports whether the connection limit is reached (for readiness).
func (s *Server) AtLimit() bool {
	return s.opts.MaxConnections > 0 && s.clients.Load() >= int64(s.opts.MaxConnections)
}

// track adds a session with a live upstream; false means the server is closing and the session must end.
func (s *Server) track(sess *session) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
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

// Close waits until every client has disconnected or ctx is done, then cuts the remaining connections and
// stops the background loops. It returns how many connections were cut. Stop accepting first by closing the
// listener given to Serve.
func (s *Server) Close(ctx context.Context) (cut int) {
	done := make(chan struct{})
	go func() { s.sessWG.Wait(); close(done) }()
	select {
	case <-done:
	case <-ctx.Done():
		cut = s.Clients()
	}
	s.cancel()
	s.mu.Lock()
	s.closed = true
	s.mu.Unlock()
	s.each(func(sess *session) { sess.close(errors.New("proxy shutting down")) })
	<-done
	s.bgWG.Wait()
	return cut
}

// waitToken returns the current token, waiting for the first one.
func (s *Server) waitToken(ctx context.Context) (Token, error) {
	for {
		tok, changed := s.opts.Tokens.Current()
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

// dialUpstream opens and authenticates an upstream connection, waiting for the first token if need be.
func (s *Server) dialUpstream(ctx context.Context) (*pooled, error) {
	tok, err := s.waitToken(ctx)
	if err != nil {
		return nil, err
	}
	start := time.Now()
	conn, err := s.opts.Dialer.DialContext(ctx)
	if err != nil {
		var de *DialError
		kind := "dial"
		if errors.As(err, &de) {
			kind = de.Stage
		}
		s.obs.UpstreamError(kind)
		return nil, err
	}
	id, tok, err := handshake(ctx, conn, tok, s.opts.Tokens)
	if err != nil {
		conn.Close()
		s.obs.UpstreamError("auth")
		return nil, err
	}
	s.obs.UpstreamOpened(time.Since(start))
	return &pooled{conn: conn, id: id, secret: tok.Secret}, nil
}
