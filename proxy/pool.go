package proxy

import (
	"context"
	"net"
	"sync"
	"time"

	"github.com/entra-redis-proxy/entra-redis-proxy/resp"
)

// pool keeps authenticated upstream connections ready, so a new client skips the TLS handshake and AUTH.
// A client's upstream goes back to the pool when the client leaves it provably clean: the client sent none of
// the commands that change a connection's state (see dirties) and no reply is outstanding. Redis 6.0 (Azure
// Cache for Redis) has no RESET to clean a connection, so a dirty one is closed instead.
//
// One goroutine (fill) owns the pool's upkeep: it dials up to size connections, re-authenticates idle ones
// after a rotation and PINGs those idle for IdlePing. Connections are taken out of the pool while it works on
// them, so a session never gets one in use.
type pool struct {
	srv  *Server
	size int
	wake chan struct{} // nudges fill: a connection was taken, or a token arrived

	mu   sync.Mutex
	idle []*pooled // most recently used last
	out  int       // connections taken by sessions, which may come back: the pool dials only idle+out < size
}

type pooled struct {
	conn   net.Conn
	id     int64  // upstream CLIENT ID
	secret string // the token it is authenticated with
	since  int64  // when it went idle (server clock)
}

func newPool(srv *Server, size int) *pool {
	return &pool{srv: srv, size: size, wake: make(chan struct{}, 1)}
}

func (p *pool) nudge() {
	select {
	case p.wake <- struct{}{}:
	default:
	}
}

// get takes a ready connection, or returns nil.
func (p *pool) get() *pooled {
	p.mu.Lock()
	defer p.mu.Unlock()
	n := len(p.idle)
	if n == 0 {
		return nil
	}
	c := p.idle[n-1]
	p.idle[n-1] = nil
	p.idle = p.idle[:n-1]
	p.out++
	return c
}

// release tells the pool that a connection taken by get is gone or about to be offered back by put.
func (p *pool) release() {
	p.mu.Lock()
	p.out--
	p.mu.Unlock()
	p.nudge()
}

// put offers a connection, returning its loan when it was taken by get (in the same step, so that the
// filler does not dial a replacement first); it is closed when the pool is full or closed.
func (p *pool) put(c *pooled, loaned bool) bool {
	p.mu.Lock()
	if loaned {
		p.out--
	}
	if len(p.idle)+p.out < p.size && p.srv.ctx.Err() == nil {
		c.since = p.srv.now()
		p.idle = append(p.idle, c)
		p.mu.Unlock()
		return true
	}
	p.mu.Unlock()
	c.conn.Close()
	p.srv.obs.UpstreamClosed()
	return false
}

// fill is the pool's upkeep loop; it closes every pooled connection when ctx is done.
func (p *pool) fill(ctx context.Context) {
	defer func() {
		p.mu.Lock()
		for _, c := range p.idle {
			c.conn.Close()
			p.srv.obs.UpstreamClosed()
		}
		p.idle = nil
		p.mu.Unlock()
	}()
	every := time.Minute
	if p.srv.opts.IdlePing > 0 {
		every = min(every, p.srv.opts.IdlePing/2)
	}
	var backoff time.Duration
	for {
		p.tend(ctx)
		if err := p.top(ctx); err != nil {
			backoff = min(max(2*backoff, 100*time.Millisecond), 30*time.Second)
			p.srv.log.Warn("cannot open a pooled upstream connection; retrying", "err", err, "retry_in", backoff.String())
		} else {
			backoff = 0
		}
		wait := every
		if backoff > 0 {
			wait = backoff
		}
		select {
		case <-ctx.Done():
			return
		case <-p.wake:
		case <-time.After(wait):
		}
	}
}

// top dials until the pool is full.
func (p *pool) top(ctx context.Context) error {
	for {
		p.mu.Lock()
		full := len(p.idle)+p.out >= p.size
		p.mu.Unlock()
		if full {
			return nil
		}
		dctx, cancel := context.WithTimeout(ctx, p.srv.opts.DialTimeout)
		c, err := p.srv.dialUpstream(dctx)
		cancel()
		if err != nil {
			return err
		}
		p.put(c, false)
	}
}

// tend re-authenticates idle connections on an old token and PINGs those idle too long; a connection that
// fails either is closed.
func (p *pool) tend(ctx context.Context) {
	tok, _ := p.srv.opts.Tokens.Current()
	p.mu.Lock()
	var work []*pooled
	kept := p.idle[:0]
	now := p.srv.now()
	for _, c := range p.idle {
		stale := tok.Secret != "" && c.secret != tok.Secret
		quiet := p.srv.opts.IdlePing > 0 && now-c.since >= int64(p.srv.opts.IdlePing)
		if stale || quiet {
			work = append(work, c)
		} else {
			kept = append(kept, c)
		}
	}
	p.idle = kept
	p.mu.Unlock()
	for _, c := range work {
		cmd := resp.AppendCommand(nil, "PING")
		if tok.Secret != "" && c.secret != tok.Secret {
			cmd = resp.AppendCommand(nil, "AUTH", tok.Username, tok.Secret)
		}
		c.conn.SetDeadline(time.Now().Add(p.srv.opts.DialTimeout))
		_, err := c.conn.Write(cmd)
		var replies []string
		if err == nil {
			replies, err = readReplies(c.conn, 1)
		}
		c.conn.SetDeadline(time.Time{})
		if err != nil || replies[0][0] == '-' || ctx.Err() != nil {
			c.conn.Close()
			p.srv.obs.UpstreamClosed()
			continue
		}
		if tok.Secret != "" {
			c.secret = tok.Secret
		}
		p.put(c, false)
	}
}

// dirties reports whether a command changes the connection's state in a way the next client must not
// inherit: database, name, protocol, transaction, watches, subscriptions, reply mode, tracking, monitor.
func dirties(info cmdInfo, args [][]byte) bool {
	switch info.sp {
	case spNone, spAuth, spQuit:
		return false
	case spClient:
		// Subcommands that only read.
		return len(args) < 2 || !oneOf(args[1], []string{"id", "info", "getname", "list", "getredir", "trackinginfo"})
	}
	return true
}
