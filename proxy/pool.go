package proxy

import (
	"container/list"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"slices"
	"sync"
	"syscall"
	"time"

	"github.com/entra-redis-proxy/entra-redis-proxy/resp"
)

// loanWindow is how long a connection lent to a session still counts against the pool's size. A client that
// connects per request gives its connection back within milliseconds, and counting the loan meanwhile saves
// the pool from dialling a replacement it would have to close. A loan older than this is a long-lived
// client's: waiting for it would leave every later client to dial (TLS and AUTH) for as long as that client
// stays, so the pool dials a replacement and takes the connection back later only if there is room.
const loanWindow = 2 * time.Second

// pool keeps authenticated upstream connections ready, so a new client skips the TLS handshake and AUTH.
// A client's upstream goes back to the pool when the client leaves it provably clean: the client sent none of
// the commands that change a connection's state (see dirties) and no reply is outstanding. Redis 6.0 (Azure
// Cache for Redis) has no RESET to clean a connection, so a dirty one is closed instead.
//
// The pool holds size connections, counting idle ones and loans younger than loanWindow; size follows the
// demand it sees (sizer), between PoolSize and PoolMax. One goroutine
// (fill) owns the upkeep: it dials up to size, stops counting overdue loans, checks idle connections,
// re-authenticates them after a rotation and PINGs those idle for IdlePing. It takes connections out of idle
// while it talks to them, so a session never gets one in use. Sessions only get, put and close.
//
// Whoever holds a connection owns it: idle ones the pool, lent ones the session. The owner closes it, once,
// and the pool reports UpstreamClosed exactly for the closes it makes.
type pool struct {
	srv  *Server
	wake chan struct{} // nudges fill: room appeared, the first loan began, the pool grew, or a token arrived

	mu      sync.Mutex
	sz      sizer         // the pool's size
	idle    []*pooled     // ready connections, most recently returned last
	lent    list.List     // of *loan in loanOut, oldest first: counted against size
	busy    int           // idle connections fill has taken out to PING or re-authenticate
	state   poolState     // poolClosed once fill has stopped: put closes what it is given
	changed chan struct{} // closed (and dropped) at the next change of idle or lent; nil until watch asks
}

type poolState uint8

const (
	poolOpen poolState = iota
	poolClosed
)

type pooled struct {
	conn   net.Conn
	id     int64  // upstream CLIENT ID
	secret string // the token it is authenticated with
	since  int64  // when it went idle (server clock)
	opened int64  // when it was dialed (server clock): one older than a maintenance move reaches the old node
	addr   string // the endpoint it reached ("": the configured address; see Server.dial)
}

type loanState uint8

const (
	loanOut      loanState = iota // within loanWindow: counted against the pool's size
	loanOverdue                   // past loanWindow: no longer counted; the connection may still come back
	loanReturned                  // given back by put: the pool owns the connection again
	loanClosed                    // the session closed the connection
)

// loan is one connection lent by get.
type loan struct {
	at    int64         // when it was lent (server clock)
	state loanState     // guarded by pool.mu
	elem  *list.Element // in pool.lent while loanOut
}

// lentConn is the connection a session gets from the pool. Its loan ends when the session closes it or puts
// it back, so no code path of the session can keep a loan open by forgetting to end it. Once put back, its
// Close does nothing: the connection is the pool's again.
type lentConn struct {
	net.Conn
	pool *pool
	loan *loan
}

// Close ends the loan and closes the connection, unless it was put back. The session reports the close.
func (c *lentConn) Close() error {
	p := c.pool
	p.mu.Lock()
	if c.loan.state == loanReturned || c.loan.state == loanClosed {
		p.mu.Unlock()
		return nil
	}
	counted := p.endLocked(c.loan, loanClosed)
	p.mu.Unlock()
	if counted {
		p.nudge() // room for a replacement
	}
	return c.Conn.Close()
}

func newPool(srv *Server, size, most int) *pool {
	p := &pool{srv: srv, sz: newSizer(size, most), wake: make(chan struct{}, 1)}
	srv.limit.register(p)
	return p
}

// poolWindow is the period over which the pool measures the demand for connections.
const poolWindow = time.Second

// sizer sets the pool's size from the connect rate: in each window of poolWindow, the most connections lent
// at once (each young loan is a client that connects per request) plus the connects that found none ready
// (each would have been served by one more). The size is that plus the minimum, between the minimum
// (PoolSize) and most (PoolMax). It grows at once, at a connect that finds none ready, and shrinks at most by
// half per window, so a burst's connections are given back within seconds once the rate drops.
type sizer struct {
	min, most int
	size      int
	windowEnd int64 // when the current window ends (server clock); 0 before the first connect
	peakOut   int   // the most loans counted at once in this window
	misses    int   // connects in this window that found no connection ready
}

func newSizer(size, most int) sizer { return sizer{min: size, most: most, size: size} }

// connect records a client's connect at now: hit if it got a connection, out the loans counted after it. It
// reports whether the size grew.
func (z *sizer) connect(now int64, hit bool, out int) (grew bool) {
	z.roll(now)
	z.peakOut = max(z.peakOut, out)
	if hit {
		return false
	}
	z.misses++
	if want := z.demand(); want > z.size {
		z.size = want
		return true
	}
	return false
}

// demand is the size this window's connects ask for.
func (z *sizer) demand() int { return min(z.min+z.peakOut+z.misses, z.most) }

// roll closes the windows that ended by now, shrinking the size toward each one's demand, and returns when
// the size may shrink next (0: it is at the minimum).
func (z *sizer) roll(now int64) (next int64) {
	for z.windowEnd != 0 && now >= z.windowEnd && z.size > z.min {
		z.size = max(z.demand(), z.size/2, z.min)
		z.peakOut, z.misses = 0, 0
		z.windowEnd += int64(poolWindow)
	}
	if now >= z.windowEnd {
		z.peakOut, z.misses = 0, 0
		z.windowEnd = now + int64(poolWindow)
	}
	if z.size > z.min {
		return z.windowEnd
	}
	return 0
}

func (p *pool) nudge() {
	select {
	case p.wake <- struct{}{}:
	default:
	}
}

// get lends a ready connection, checked just now to be open and silent, or returns nil when none is ready.
// The session owns the returned connection; closing it or giving it back with put ends the loan.
func (p *pool) get() *pooled {
	for {
		p.mu.Lock()
		n := len(p.idle)
		if n == 0 {
			grew := p.sz.connect(p.srv.now(), false, p.lent.Len())
			p.mu.Unlock()
			if grew {
				p.nudge()
			}
			return nil
		}
		c := p.idle[n-1]
		p.idle[n-1] = nil
		p.idle = p.idle[:n-1]
		l := &loan{at: p.srv.now(), state: loanOut}
		first := p.lent.Len() == 0
		l.elem = p.lent.PushBack(l)
		p.sz.connect(l.at, true, p.lent.Len())
		p.changedLocked()
		p.mu.Unlock()
		p.srv.limit.releasePooled(1) // the client's two descriptors count it now
		if first {
			p.nudge() // fill times the oldest loan's window
		}
		// Checked on loan, so that fill does not dial a replacement for it meanwhile. One dialed before a
		// maintenance move (put back since, or dialed while it was announced) reaches the node that closes.
		stale := c.opened < p.srv.maintAt.Load()
		var err error
		if !stale {
			err = checkIdle(c.conn)
		}
		if stale || err != nil {
			if err != nil {
				p.srv.log.Info("pooled upstream connection lost while idle; closing it", "upstream_client_id", c.id, "err", err)
			}
			p.discard(c)
			p.mu.Lock()
			p.endLocked(l, loanClosed)
			p.mu.Unlock()
			p.nudge()
			continue
		}
		return &pooled{conn: &lentConn{Conn: c.conn, pool: p, loan: l}, id: c.id, secret: c.secret, opened: c.opened, addr: c.addr}
	}
}

// put offers a clean authenticated connection: one from get (or its replacement after a handover), or one the
// session dialled itself (a lent connection carries its loan). The pool keeps it if it
// has room, or closes it (reporting the close). Either way the caller must not use it again. put reports
// whether the connection was kept.
func (p *pool) put(c *pooled) bool {
	p.mu.Lock()
	if lc, ok := c.conn.(*lentConn); ok {
		if lc.loan.state == loanReturned || lc.loan.state == loanClosed {
			// Closed by the session already, or given back twice: nothing is left to pool or close.
			p.mu.Unlock()
			p.srv.log.Error("pool: a lent connection was offered back after it was closed or returned", "upstream_client_id", c.id)
			return false
		}
		p.endLocked(lc.loan, loanReturned)
		c = &pooled{conn: lc.Conn, id: c.id, secret: c.secret, opened: c.opened, addr: c.addr}
	}
	kept := p.admitLocked(c, false)
	p.mu.Unlock()
	if !kept {
		p.discard(c)
	}
	return kept
}

// admitLocked adds c to idle if the pool is open and has room, and the process's budget a descriptor for it.
// charged: c holds one already (dialled by top, or taken out by tend), kept unless clients need it now.
func (p *pool) admitLocked(c *pooled, charged bool) bool {
	if p.state != poolOpen || p.roomLocked() <= 0 {
		return false
	}
	if charged && p.srv.limit.over() || !charged && !p.srv.limit.takePooled() {
		return false
	}
	c.since = p.srv.now()
	p.idle = append(p.idle, c)
	p.changedLocked()
	return true
}

// roomLocked is how many connections the pool may add: size less the idle, the counted loans and the busy.
func (p *pool) roomLocked() int { return p.sz.size - len(p.idle) - p.lent.Len() - p.busy }

// endLocked ends a loan and reports whether it was still counted against the pool's size.
func (p *pool) endLocked(l *loan, to loanState) (counted bool) {
	counted = l.state == loanOut
	if counted {
		p.lent.Remove(l.elem)
		l.elem = nil
		p.changedLocked()
	}
	l.state = to
	return counted
}

// discard closes a connection the pool owns that holds no descriptor of the budget: one that was lent, or
// never admitted. A connection taken out of idle holds one: drop it.
func (p *pool) discard(c *pooled) {
	c.conn.Close()
	p.srv.obs.UpstreamClosed()
}

// drop closes connections that hold a descriptor of the budget, and gives the descriptors back.
func (p *pool) drop(cs ...*pooled) {
	for _, c := range cs {
		p.discard(c)
	}
	p.srv.limit.releasePooled(len(cs))
}

// takeOldestLocked removes up to n idle connections, the longest idle first, and returns them.
func (p *pool) takeOldestLocked(n int) []*pooled {
	n = min(n, len(p.idle))
	if n <= 0 {
		return nil
	}
	out := slices.Clone(p.idle[:n])
	p.idle = slices.Delete(p.idle, 0, n)
	p.changedLocked()
	return out
}

// evict closes up to n idle connections, the longest idle first, giving their descriptors to clients
// (ConnLimit.acquire); it returns how many it closed.
func (p *pool) evict(n int) int {
	p.mu.Lock()
	out := p.takeOldestLocked(n)
	p.mu.Unlock()
	p.drop(out...)
	return len(out)
}

func (p *pool) changedLocked() {
	if p.changed != nil {
		close(p.changed)
		p.changed = nil
	}
}

// watch returns the upstream CLIENT IDs of the idle connections (most recently returned last) and how many
// loans still count, with a channel closed at the pool's next change: tests await a state of the pool through
// it rather than polling a stand-in such as the cache's CLIENT LIST.
func (p *pool) watch() (idle []int64, lent int, changed <-chan struct{}) {
	p.mu.Lock()
	defer p.mu.Unlock()
	for _, c := range p.idle {
		idle = append(idle, c.id)
	}
	if p.changed == nil {
		p.changed = make(chan struct{})
	}
	return idle, p.lent.Len(), p.changed
}

// fill is the pool's upkeep loop; it closes every idle connection when ctx is done.
func (p *pool) fill(ctx context.Context) {
	defer p.drain()
	every := time.Minute // how often idle connections are checked, without a rotation
	if p.srv.opts.IdlePing > 0 {
		every = min(every, p.srv.opts.IdlePing/2)
	}
	timer := time.NewTimer(every)
	defer timer.Stop()
	var (
		tendAt  int64  // when idle connections are checked next (server clock)
		tended  string // the token the last tend brought idle connections to
		retryAt int64  // no dial before this, after a failed one
		backoff time.Duration
	)
	for {
		now := p.srv.now()
		overdueAt := p.expire(now)
		shrinkAt := p.shrink(now)
		tok, tokChanged := p.srv.opts.Tokens.Current()
		if now >= tendAt || tok.Secret != tended {
			p.tend(ctx, tok)
			tendAt, tended = p.srv.now()+int64(every), tok.Secret
		}
		if now >= retryAt {
			if err := p.top(ctx, tok); err != nil {
				backoff = min(max(2*backoff, 100*time.Millisecond), 30*time.Second)
				retryAt = p.srv.now() + int64(backoff)
				p.srv.log.Warn("cannot open a pooled upstream connection; retrying", "err", err, "retry_in", backoff.String())
			} else {
				backoff = 0
			}
		}
		next := tendAt
		for _, at := range []int64{overdueAt, shrinkAt} {
			if at > 0 {
				next = min(next, at)
			}
		}
		if retryAt > now {
			next = min(next, retryAt)
		}
		timer.Reset(time.Duration(next - p.srv.now()))
		select {
		case <-ctx.Done():
			return
		case <-p.wake:
		case <-tokChanged:
		case <-timer.C:
		}
	}
}

// drain closes the idle connections and makes put close what it is given from now on.
func (p *pool) drain() {
	p.mu.Lock()
	p.state = poolClosed
	idle := p.idle
	p.idle = nil
	p.changedLocked()
	p.mu.Unlock()
	p.srv.limit.unregister(p)
	p.drop(idle...)
}

// dropOpenedBefore closes the idle connections dialed before at (a maintenance move), so that no new client
// gets one that is about to close; fill dials their replacements.
func (p *pool) dropOpenedBefore(at int64) {
	p.mu.Lock()
	var stale []*pooled
	p.idle = slices.DeleteFunc(p.idle, func(c *pooled) bool {
		if c.opened < at {
			stale = append(stale, c)
			return true
		}
		return false
	})
	if len(stale) > 0 {
		p.changedLocked()
	}
	p.mu.Unlock()
	p.drop(stale...) // idle ones hold a descriptor of the budget
	p.nudge()
}

// shrink applies the size the demand of past windows allows, closing the idle connections beyond it (the
// longest idle first). It returns when the size may shrink next, or 0.
func (p *pool) shrink(now int64) int64 {
	p.mu.Lock()
	next := p.sz.roll(now)
	extra := p.takeOldestLocked(-p.roomLocked())
	p.mu.Unlock()
	p.drop(extra...)
	return next
}

// expire stops counting loans older than loanWindow, so that top dials their replacements. It returns when
// the oldest loan still counted becomes overdue, or 0 if none is.
func (p *pool) expire(now int64) int64 {
	p.mu.Lock()
	defer p.mu.Unlock()
	for e := p.lent.Front(); e != nil; e = p.lent.Front() {
		l := e.Value.(*loan)
		if due := l.at + int64(loanWindow); due > now {
			return due
		}
		p.endLocked(l, loanOverdue)
	}
	return 0
}

// top dials until the pool is full; it stops at the first failure.
func (p *pool) top(ctx context.Context, tok Token) error {
	if tok.Secret == "" {
		return nil // fill runs again when the first token arrives
	}
	for {
		p.mu.Lock()
		room := p.roomLocked()
		p.mu.Unlock()
		if room <= 0 || !p.srv.limit.takePooled() {
			return nil // full, or the process's descriptors are spent: a client's leaving wakes fill
		}
		dctx, cancel := context.WithTimeout(ctx, p.srv.opts.DialTimeout)
		c, err := p.srv.dialUpstream(dctx)
		cancel()
		if err != nil {
			p.srv.limit.releasePooled(1)
			return fmt.Errorf("open pooled upstream connection: %w", err)
		}
		p.mu.Lock()
		kept := p.admitLocked(c, true)
		p.mu.Unlock()
		if !kept {
			p.drop(c)
			return nil // sessions gave connections back meanwhile
		}
	}
}

// tend closes idle connections that are gone or sent something (checkIdle), re-authenticates those on an old
// token, and PINGs those idle for IdlePing so that Azure's idle timeout does not close them.
func (p *pool) tend(ctx context.Context, tok Token) {
	now := p.srv.now()
	type lost struct {
		c   *pooled
		err error
	}
	var dead []lost
	var work []*pooled
	p.mu.Lock()
	kept := p.idle[:0]
	for _, c := range p.idle {
		stale := tok.Secret != "" && c.secret != tok.Secret
		quiet := p.srv.opts.IdlePing > 0 && now-c.since >= int64(p.srv.opts.IdlePing)
		err := checkIdle(c.conn) // does not block, so it is done under the lock
		switch {
		case err != nil:
			dead = append(dead, lost{c, err})
		case stale || quiet:
			work = append(work, c)
		default:
			kept = append(kept, c)
		}
	}
	clear(p.idle[len(kept):])
	p.idle = kept
	p.busy = len(work)
	if len(dead)+len(work) > 0 {
		p.changedLocked()
	}
	p.mu.Unlock()
	for _, d := range dead {
		p.srv.log.Info("pooled upstream connection lost while idle; closing it", "upstream_client_id", d.c.id, "err", d.err)
		p.drop(d.c)
	}
	for _, c := range work {
		err := p.refresh(ctx, c, tok)
		p.mu.Lock()
		p.busy--
		kept := err == nil && p.admitLocked(c, true)
		if !kept {
			p.changedLocked()
		}
		p.mu.Unlock()
		if err != nil {
			p.srv.log.Info("pooled upstream connection failed its upkeep; closing it", "upstream_client_id", c.id, "err", err)
		}
		if !kept {
			p.drop(c)
		}
	}
}

// refresh sends an idle connection AUTH with tok if it is on an older token, else PING, and checks the reply.
// Anything the upstream sent beyond the reply fails it: its replies no longer line up with commands.
func (p *pool) refresh(ctx context.Context, c *pooled, tok Token) error {
	what, want := "PING", "+PONG"
	cmd := resp.AppendCommand(nil, "PING")
	if tok.Secret != "" && c.secret != tok.Secret {
		what, want = "AUTH", "+OK"
		cmd = appendAuthCmd(nil, tok)
	}
	ctx, cancel := context.WithTimeout(ctx, p.srv.opts.DialTimeout) // bounds a silent upstream
	defer cancel()
	cc := newCtrlConn(c.conn)
	rs, err := cc.pipeline(ctx, cmd, 1)
	switch {
	case err != nil:
		return fmt.Errorf("%s: %w", what, err)
	case len(cc.buffered()) > 0:
		return fmt.Errorf("%s: %w", what, errUnsolicited)
	case string(rs[0].typ)+rs[0].text != want:
		return fmt.Errorf("%s answered %s", what, rs[0])
	}
	c.secret = tok.Secret
	return nil
}

// errUnsolicited: an idle upstream sent bytes no command asked for (a late reply, a push, an alert). Whatever
// they are, the connection's replies no longer line up with commands.
var errUnsolicited = errors.New("upstream sent data while idle")

// checkIdle reports, without blocking, whether an idle connection is still open and has sent nothing. A Read
// with a deadline already passed never reaches the socket (Go fails it before the system call), so the socket
// is peeked at, as go-redis's conn_check does; that Read is still made, for what a TLS connection has already
// taken off the socket (and for connections without a socket, such as net.Pipe in tests).
func checkIdle(c net.Conn) error {
	c.SetReadDeadline(time.Time{}) // a deadline in force would fail the peek
	if err := peekSocket(c); err != nil {
		return err
	}
	c.SetReadDeadline(pokeTime)
	var b [1]byte
	n, err := c.Read(b[:])
	c.SetReadDeadline(time.Time{})
	switch {
	case n > 0:
		return errUnsolicited
	case errors.Is(err, os.ErrDeadlineExceeded):
		return nil
	case err == nil:
		return errors.New("read of an idle connection returned nothing")
	}
	return err
}

// peekSocket looks at c's socket without taking anything from it: io.EOF if the peer closed it, an error if it
// was reset, errUnsolicited if bytes are waiting. A connection without a socket passes.
func peekSocket(c net.Conn) error {
	if tc, ok := c.(*tls.Conn); ok {
		c = tc.NetConn()
	}
	sc, ok := c.(syscall.Conn)
	if !ok {
		return nil
	}
	rc, err := sc.SyscallConn()
	if err != nil {
		return fmt.Errorf("peek: %w", err)
	}
	var n int
	var perr error
	err = rc.Read(func(fd uintptr) bool {
		var b [1]byte
		n, perr = peekFD(syscall.Recvfrom, fd, b[:])
		return true // never wait for data
	})
	switch {
	case err != nil:
		return fmt.Errorf("peek: %w", err)
	case errors.Is(perr, syscall.EAGAIN) || errors.Is(perr, syscall.EWOULDBLOCK):
		return nil
	case errors.Is(perr, errors.ErrUnsupported): // Windows: syscall has no recvfrom there
		return nil
	case perr != nil:
		return os.NewSyscallError("recvfrom", perr)
	case n == 0:
		return io.EOF
	}
	return errUnsolicited
}

// msgPeek is MSG_PEEK, the same on Linux, macOS, the BSDs and Windows (where syscall does not name it). No
// MSG_DONTWAIT is needed: Go puts its sockets in non-blocking mode, so an empty socket answers EAGAIN.
const msgPeek = 0x2

// peekFD calls recvfrom, whose descriptor type differs between Unix (int) and Windows (Handle), with msgPeek.
func peekFD[FD ~int | ~uintptr](recvfrom func(FD, []byte, int) (int, syscall.Sockaddr, error), fd uintptr, b []byte) (int, error) {
	n, _, err := recvfrom(FD(fd), b, msgPeek)
	return n, err
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
