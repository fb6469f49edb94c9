package proxy

import (
	"context"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"strings"
	"syscall"
	"time"

	"github.com/entra-redis-proxy/entra-redis-proxy/resp"
)

// An upstream connection can close under a session through no act of the client: a failover, a patch, a
// CLIENT KILL, a restart. If it closes with nothing owed (the ledger at a safe point: every reply asked for
// was delivered), no command's outcome is in doubt: the session dials a new upstream through the pool's
// path (dial, TLS, AUTH), gives it what the server's replies established on the old one, and goes on. The
// client sees only the delay.
//
//   - Restored: the protocol (HELLO 3), the database, the client name, READONLY, CLIENT TRACKING (RESP3
//     without REDIRECT; a flush-all invalidation push then tells the client's cache to drop everything, as
//     invalidations were lost in the gap), the subscriptions of every family, an open MULTI with its queued
//     commands (replayed, replies hidden; with WATCH active, or over 1 MiB queued, aborted as a rescue
//     does: EXEC answers null, or EXECABORT), WATCH outside MULTI (the keys are not known: the next
//     transaction is aborted, txWatchLost), and a CLIENT REPLY SKIP not yet spent.
//   - Lost: messages published before the new connection's last subscription confirmation.
//   - Not restored (the client connection is closed, as without a reconnect): a reply outstanding (a
//     blocked command, anything in flight: its outcome is unknown, and it is never sent again), MONITOR,
//     CLIENT REPLY OFF or a command whose reply SKIP suppressed with no reply asked for after it (nothing
//     shows it ran), CLIENT REPLY queued in MULTI, RESP3 subscriptions with MULTI open, CLIENT TRACKING
//     with REDIRECT or in RESP2 (the target would miss the gap's invalidations), a pub/sub handover in
//     progress.
//
// The reply loop sees the close between frames. It marks the ledger lost, which works only at a safe
// point and makes every later push fail, so nothing is sent on the dead connection unaccounted; then it
// pokes the client loop and waits. The client loop, the upstream's only writer, reconnects at its next turn
// (or at the push that failed), hands the new connection to the reply loop, and sends what waited. Commands
// that arrive meanwhile wait in the client loop's read buffer and the socket, as behind a slow upstream,
// for at most ReconnectTimeout.

const (
	reconnectFirstWait = 50 * time.Millisecond // the backoff before the second attempt; doubled each time
	reconnectMaxWait   = 2 * time.Second
)

// invalidateAll is the RESP3 push redis sends a tracking client when any key may have changed (FLUSHALL).
const invalidateAll = ">2\r\n$10\r\ninvalidate\r\n_\r\n"

// upstreamLost ends a reply loop whose upstream closed between frames (the session may reconnect), or that
// left it for a maintenance move (moved).
type upstreamLost struct {
	err   error
	moved bool
}

func (e *upstreamLost) Error() string { return e.err.Error() }
func (e *upstreamLost) Unwrap() error { return e.err }

// relinked is a reconnect's new upstream, handed by the client loop to the reply loop.
type relinked struct {
	conn net.Conn
	buf  *readBuf // what to handle before reading conn
}

// closedByPeer reports whether a read error means the upstream closed the connection (FIN or reset).
func closedByPeer(err error) bool {
	return errors.Is(err, io.EOF) || errors.Is(err, syscall.ECONNRESET)
}

// awaitRelink is the reply loop's side of a reconnect: it returns the new upstream to read, or nil and the
// session's cause when the connection can't be restored or the session ends meanwhile.
func (s *session) awaitRelink(lost *upstreamLost) (net.Conn, *readBuf, error) {
	closed := fmt.Errorf("upstream closed the connection (%w)", lost.err)
	switch {
	case lost.moved: // the client loop has the new upstream ready
	case s.rl.monitor:
		return nil, nil, s.notRestored(closed, "MONITOR")
	case s.rl.marker.active() || s.cut.Load() != nil:
		return nil, nil, s.notRestored(closed, "a pub/sub handover was in progress")
	case !s.led.markLost():
		if s.led.len() == 0 {
			return nil, nil, lost.err // the session is closing
		}
		s.srv.obs.Mechanism("reconnect_outstanding")
		return nil, nil, s.lost("closed", fmt.Errorf("%w with a reply outstanding: its command's outcome is unknown, so it is not sent again", closed))
	default:
		s.poke(pokeRelink)
	}
	select {
	case r := <-s.relink:
		return r.conn, r.buf, nil
	case <-s.done:
		return nil, nil, lost.err
	}
}

// notRestored counts and logs a lost upstream whose session can't be restored, and returns the cause.
func (s *session) notRestored(err error, why string) error {
	s.srv.obs.Mechanism("reconnect_unrestorable")
	return s.lost("closed", fmt.Errorf("%w; not reconnected, as its state can't be restored exactly (%s)", err, why))
}

// relinkIfLost is the client loop's side of a reconnect: if the reply loop marked the upstream lost, it
// dials a new one, restores the session's state on it and hands it to the reply loop, retrying with backoff
// for ReconnectTimeout. It returns the session's cause when that fails. pending says a batch of commands
// waits to be sent (the loss was found by its push).
func (s *session) relinkIfLost(pending bool) error {
	if !s.led.isLost() {
		return nil
	}
	c := &s.cl
	oldID := s.upID.Load()
	s.dropConn(c.up)
	c.up.Close()
	s.srv.obs.UpstreamClosed()
	if c.drain != drainNone {
		s.closeWriteAndWait()
		return errDrained // it would close at this safe point anyway
	}
	if why := s.unrestorable(pending); why != "" {
		return s.notRestored(errUpstreamGone, why)
	}
	start := time.Now()
	deadline := start.Add(s.srv.opts.ReconnectTimeout)
	wait := reconnectFirstWait
	for attempt := 1; ; attempt++ {
		p, buf, err := s.redial(deadline)
		if err == nil {
			if err := s.takeOver(p, buf); err != nil {
				return err
			}
			s.srv.obs.UpstreamError("closed")
			s.srv.obs.Mechanism("reconnect_restored")
			s.log.Warn("upstream connection lost with no reply outstanding; reconnected and restored its state",
				"upstream_client_id", p.id, "old_upstream_client_id", oldID, "attempts", attempt,
				"took", time.Since(start).Round(time.Millisecond).String())
			return nil
		}
		left := time.Until(deadline)
		if left <= 0 {
			s.srv.obs.Mechanism("reconnect_failed")
			return s.lost("closed", fmt.Errorf("%w; reconnecting failed for %s (%d attempts): %w", errUpstreamGone,
				s.srv.opts.ReconnectTimeout, attempt, err))
		}
		s.log.Debug("reconnect attempt failed", "attempt", attempt, "err", err)
		t := time.NewTimer(min(wait/2+rand.N(wait/2+1), left)) // jittered, so a failover's sessions spread
		select {
		case <-t.C:
		case <-s.done:
			t.Stop()
			return errUpstreamGone
		}
		wait = min(2*wait, reconnectMaxWait)
	}
}

// unrestorable says why the session's state can't be restored on a new upstream, or "" when it can.
// pending: see relinkIfLost.
func (s *session) unrestorable(pending bool) string {
	c := &s.cl
	s.syncTx(false)
	tracking := s.carry.snapshot().tracking
	switch {
	case pending && (c.batchDirty || c.tx.state != txNone):
		// The client loop's state already includes the batch's commands, which the old upstream never got.
		return "the close came as commands that change the connection's state were being sent"
	case c.mode == replyOff || c.proof != proofShown:
		return "CLIENT REPLY OFF or SKIP: nothing shows whether the last commands reached the server"
	case c.replyUnknown:
		return "CLIENT REPLY was queued in MULTI"
	case c.tx.open() && s.rl.proto == 3 && s.subs.total() > 0:
		return "MULTI open with RESP3 subscriptions"
	case tracking != "" && (s.rl.proto != 3 || strings.Contains(strings.ToLower(tracking), "\r\nredirect\r\n")):
		return "CLIENT TRACKING with REDIRECT or in RESP2: the target would miss the gap's invalidations"
	}
	return ""
}

// redial dials and authenticates a new upstream and restores the session's state on it, within deadline
// and DialTimeout.
func (s *session) redial(deadline time.Time) (*pooled, *readBuf, error) {
	if d := time.Now().Add(s.srv.opts.DialTimeout); d.Before(deadline) {
		deadline = d
	}
	ctx, cancel := context.WithDeadline(s.srv.ctx, deadline)
	defer cancel()
	p, err := s.srv.dialUpstream(ctx)
	if err != nil {
		return nil, nil, err
	}
	buf, err := s.restore(ctx, newCtrlConn(p.conn))
	if err != nil {
		p.conn.Close()
		s.srv.obs.UpstreamClosed()
		return nil, nil, fmt.Errorf("restore the connection's state: %w", err)
	}
	return p, buf, nil
}

// restore gives the new upstream c the session's state (see above). It returns what c sent after the last
// reply, after an invalidate-all push when tracking was restored: the reply loop handles it first.
func (s *session) restore(ctx context.Context, c *ctrlConn) (*readBuf, error) {
	c.skipLarge = true // a large message among the confirmations is read through, and dropped
	if s.rl.proto == 3 {
		if err := hello3(ctx, c); err != nil {
			return nil, err
		}
	}
	if err := carryOver(ctx, c, s.carry.snapshot()); err != nil {
		return nil, err
	}
	if err := subscribeAll(ctx, c, s.subs.snapshot()); err != nil {
		return nil, err
	}
	if tx := &s.cl.tx; tx.open() && tx.canReplay(s.watch.on.Load()) {
		if err := replayTx(ctx, c, tx); err != nil {
			return nil, err
		}
	}
	if s.cl.mode == replySkip {
		if err := c.send(ctx, resp.AppendCommand(nil, "CLIENT", "REPLY", "SKIP")); err != nil {
			return nil, err
		}
	}
	var flush []byte
	if s.carry.snapshot().tracking != "" {
		flush = []byte(invalidateAll)
	}
	return pending(flush, c.buffered()), nil
}

// hello3 switches c to RESP3, as the session's client did on its old connection.
func hello3(ctx context.Context, c *ctrlConn) error {
	r, err := c.do(ctx, "HELLO", "3")
	if err == nil {
		err = r.expect('%')
	}
	if err != nil {
		return fmt.Errorf("HELLO 3: %w", err)
	}
	return nil
}

// replayTx opens the transaction tx again on c with every command queued in it, and reads their replies
// (+OK, +QUEUED, or the errors the client saw already). Pushes among them (tracking) are dropped.
func replayTx(ctx context.Context, c *ctrlConn, tx *transaction) error {
	if err := c.send(ctx, append(resp.AppendCommand(nil, "MULTI"), tx.queued...)); err != nil {
		return err
	}
	for want := tx.count + 1; want > 0; {
		r, err := c.read(ctx)
		if err != nil {
			return fmt.Errorf("replay MULTI: %w", err)
		}
		if r.typ == '>' {
			continue
		}
		if want == tx.count+1 {
			if err := r.expect('+'); err != nil {
				return fmt.Errorf("replay MULTI: %w", err)
			}
		}
		want--
	}
	return nil
}

// takeOver makes p the session's upstream and hands it to the reply loop, once the reply loop has left the
// old one.
func (s *session) takeOver(p *pooled, buf *readBuf) error {
	if !s.addConn(p.conn) {
		p.conn.Close()
		s.srv.obs.UpstreamClosed()
		return errUpstreamGone // the session is closing
	}
	c := &s.cl
	c.up, c.secret, c.writeBy, c.upSince, c.upAddr = p.conn, p.secret, time.Time{}, p.opened, p.addr
	s.upID.Store(p.id)
	s.lastSent.Store(s.srv.now())
	switch watching := s.watch.on.Load(); {
	case c.tx.open() && c.tx.canReplay(watching):
		s.srv.obs.Mechanism("tx_replay")
	case c.tx.open():
		c.tx.abort(watching)
		s.srv.obs.Mechanism("tx_abort")
	case watching:
		c.tx.loseWatch() // the next transaction is aborted
	}
	select {
	case s.relink <- relinked{conn: p.conn, buf: buf}:
	case <-s.done:
		return errUpstreamGone
	}
	s.led.relinked()
	return nil
}

// pending returns a read buffer holding a copy of ps, for a reply loop to handle before it reads.
func pending(ps ...[]byte) *readBuf {
	b := &readBuf{}
	for _, p := range ps {
		b.buf = append(b.buf, p...)
	}
	b.w = len(b.buf)
	return b
}
