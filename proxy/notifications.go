package proxy

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"strconv"
	"time"

	"github.com/entra-redis-proxy/entra-redis-proxy/resp"
)

// Azure Managed Redis runs Redis Enterprise, whose "smart client handoffs" tell a client ahead of a
// maintenance, by RESP3 pushes on each connection that opted in with CLIENT MAINT_NOTIFICATIONS ON:
//
//	MOVING <seq> <time> <endpoint>   this endpoint closes its connections within <time> seconds; reconnect
//	                                 to <endpoint> (null: to the same address, after <time>/2)
//	MIGRATING / FAILING_OVER <seq> ...  a shard is migrating or failing over: replies may pause
//	MIGRATED / FAILED_OVER <seq> ...    it is over
//
// The proxy opts in on one control connection of its own (notificationsLoop), not on the sessions'
// upstream connections: pushes need RESP3, which a RESP2 session's connection does not speak, and a push
// on a session's connection would reach its client. Every connection on the endpoint gets the same
// notification, so one connection is enough to hear it. On MOVING, new upstream connections (the pool's,
// reconnects, moves, handovers) go to the endpoint for 2 × <time>, with the cache's host name kept for TLS,
// and every session moves there at its next safe point, as at NodeMaintenanceStart (maintenance.go); the
// control connection moves at once. MIGRATING and FAILING_OVER relax the stall limit as Starting does.
//
// An app's own CLIENT MAINT_NOTIFICATIONS ON is sent upstream as OFF (onClient): the server answers it as
// it would (+OK, or the error of a server without it), and no push ever reaches the app, whose endpoint,
// the proxy, never moves.

// Maintenance notification types: reported to the Observer by name (AnnouncementTypes).
const (
	notifMoving      = "MOVING"
	notifMigrating   = "MIGRATING"
	notifMigrated    = "MIGRATED"
	notifFailingOver = "FAILING_OVER"
	notifFailedOver  = "FAILED_OVER"
)

// movingTarget is where new upstream connections go after a MOVING, until it expires.
type movingTarget struct {
	addr  string
	until int64 // server clock
}

// errNoNotifications: the cache refused HELLO 3 or CLIENT MAINT_NOTIFICATIONS (Redis OSS: Azure Cache
// for Redis). Notifications stay off.
type errNoNotifications struct{ err error }

func (e *errNoNotifications) Error() string {
	return "maintenance notifications refused: " + e.err.Error()
}
func (e *errNoNotifications) Unwrap() error { return e.err }

// errMoved ends a control connection whose endpoint a MOVING left: the next one dials the new endpoint.
var errMoved = errors.New("endpoint moving")

// dial opens a raw connection to the upstream: to the endpoint of a MOVING that holds, else to the
// configured address (""). It returns the address it reached.
func (s *Server) dial(ctx context.Context) (net.Conn, string, error) {
	m := s.moving.Load()
	if m == nil || s.now() >= m.until {
		conn, err := s.opts.Dialer.DialContext(ctx)
		return conn, "", err
	}
	conn, err := s.dialAt(ctx, m.addr)
	return conn, m.addr, err
}

// dialAt opens a raw connection to addr, or to the configured address when addr is "" (or the Dialer can
// reach no other).
func (s *Server) dialAt(ctx context.Context, addr string) (net.Conn, error) {
	if ed, ok := s.opts.Dialer.(EndpointDialer); ok && addr != "" {
		return ed.DialEndpoint(ctx, addr)
	}
	return s.opts.Dialer.DialContext(ctx)
}

// endpointType is the moving-endpoint-type the proxy asks for: an IP address, which it dials with the
// cache's host name kept for TLS; an internal one when the configured address is itself a private IP (a
// private endpoint).
func endpointType(d Dialer) string {
	if td, ok := d.(*TLSDialer); ok {
		host, _, _ := net.SplitHostPort(td.Addr)
		if ip, err := netip.ParseAddr(host); err == nil && (ip.IsPrivate() || ip.IsLoopback()) {
			return "internal-ip"
		}
	}
	return "external-ip"
}

// notificationsLoop keeps one control connection opted in to maintenance notifications until ctx ends (see
// keepControl). A cache that refuses them (Redis OSS) turns them off: one DEBUG line.
func (s *Server) notificationsLoop(ctx context.Context) {
	s.keepControl(ctx, "maintenance notifications", s.listenNotifications, func(err error) bool {
		var refused *errNoNotifications
		if errors.As(err, &refused) {
			s.log.Debug("maintenance notifications off: the cache does not send them", "err", err)
		}
		return refused != nil
	})
}

// listenNotifications runs a control connection opted in to maintenance notifications. A new token is sent
// on it (RESP3 allows AUTH at any time); its reply and PING's come among the pushes.
func (s *Server) listenNotifications(ctx, setup context.Context, p *pooled, c *ctrlConn, changed <-chan struct{}) error {
	opt := resp.AppendCommand(nil, "HELLO", "3")
	opt = resp.AppendCommand(opt, "CLIENT", "MAINT_NOTIFICATIONS", "ON", "moving-endpoint-type", endpointType(s.opts.Dialer))
	rs, err := c.pipeline(setup, opt, 2)
	if err != nil {
		return fmt.Errorf("opt in to maintenance notifications: %w", err)
	}
	if err := rs[0].expect('%'); err != nil {
		return &errNoNotifications{fmt.Errorf("HELLO 3: %w", err)}
	}
	if err := rs[1].expect('+'); err != nil {
		return &errNoNotifications{fmt.Errorf("CLIENT MAINT_NOTIFICATIONS ON: %w", err)}
	}
	s.log.Debug("maintenance notifications: opted in", "upstream_client_id", p.id, "endpoint", p.addr)
	var sameAt time.Time // a MOVING without an endpoint moves the sessions then
	return s.listenPushes(ctx, c, changed, func(elems []string) error {
		if s.notified(elems, &sameAt) {
			return errMoved
		}
		return nil
	}, func() time.Time { return sameAt }, func() {
		sameAt = time.Time{}
		s.moveSessions("")
	})
}

// listenPushes reads a RESP3 control connection until ctx ends or push returns an error, handing it each
// push. It takes each new token by AUTH in place (RESP3 allows it, subscribed too: the connection is never
// closed for a token, so no push is missed at one) and PINGs after eventsPing without a frame; their
// replies come among the pushes, and an error reply ends the connection. When due returns a time (not
// zero), alarm runs then.
func (s *Server) listenPushes(ctx context.Context, c *ctrlConn, changed <-chan struct{}, push func([]string) error,
	due func() time.Time, alarm func()) error {
	for {
		wait, at := eventsPing, time.Time{}
		if due != nil {
			at = due()
		}
		if !at.IsZero() {
			wait = min(wait, time.Until(at))
		}
		r, err := readOrChange(ctx, c, wait, changed)
		switch {
		case err == nil && r.typ == '>':
			if err := push(r.elems); err != nil {
				return err
			}
		case err == nil:
			if err := r.err(); err != nil { // the answer to a PING or an AUTH
				return fmt.Errorf("control connection: %w", err)
			}
		case errors.Is(err, errTokenChanged):
			var tok Token
			tok, changed = s.opts.Tokens.Current()
			if err := c.send(ctx, appendAuthCmd(nil, tok)); err != nil {
				return err
			}
		case errors.Is(err, context.DeadlineExceeded) && ctx.Err() == nil:
			if !at.IsZero() && !time.Now().Before(at) {
				alarm()
				continue
			}
			if err := c.send(ctx, resp.AppendCommand(nil, "PING")); err != nil {
				return err
			}
		default:
			return err
		}
	}
}

// readOrChange reads the next reply on c for at most wait (context.DeadlineExceeded, with nothing
// consumed, when none came), or returns errTokenChanged once changed is closed. A reply that was read
// whole comes first: the next call reports the change.
func readOrChange(ctx context.Context, c *ctrlConn, wait time.Duration, changed <-chan struct{}) (reply, error) {
	rctx, stop := context.WithTimeout(ctx, wait)
	go func() { // ends with the read
		select {
		case <-changed:
			stop()
		case <-rctx.Done():
		}
	}()
	r, err := c.read(rctx)
	stop()
	if err == nil {
		return r, nil
	}
	select {
	case <-changed:
		return reply{}, errTokenChanged
	default:
	}
	return r, err
}

// notified handles one maintenance notification push. It reports whether the control connection's own
// endpoint is moving (it is then dialed again at the new one); *sameAt is set for a MOVING without one.
func (s *Server) notified(elems []string, sameAt *time.Time) (moved bool) {
	if len(elems) < 2 {
		return false
	}
	kind := elems[0]
	s.obs.Announcement(announcementLabel(kind))
	switch kind {
	case notifMigrating, notifFailingOver:
		s.maintUntil.Store(s.now() + int64(maintenanceWindow))
	case notifMigrated, notifFailedOver:
		s.maintUntil.Store(0)
	case notifMoving:
		return s.onMoving(elems, sameAt)
	}
	s.log.Info("maintenance notification", "type", kind, "seq", elems[1])
	return false
}

// onMoving handles MOVING <seq> <time> <endpoint>: see above.
func (s *Server) onMoving(elems []string, sameAt *time.Time) (moved bool) {
	var seq, secs int64
	err := errors.New("too few elements")
	if len(elems) >= 3 {
		seq, err = strconv.ParseInt(elems[1], 10, 64)
		if err == nil {
			secs, err = strconv.ParseInt(elems[2], 10, 64)
		}
	}
	if err != nil || secs < 0 {
		s.log.Warn("maintenance notification not understood", "push", truncate(fmt.Sprint(elems), 120))
		return false
	}
	endpoint := ""
	if len(elems) > 3 {
		endpoint = elems[3] // "" for a null: the same endpoint
	}
	window := time.Duration(secs) * time.Second
	// Relaxed stalls, as from NodeMaintenanceStarting: the old endpoint's replies may pause until it closes.
	s.maintUntil.Store(s.now() + int64(max(window, maintenanceWindow)))
	if endpoint == "" {
		// The same address reaches the new place only later: move at half the time, as go-redis does.
		*sameAt = time.Now().Add(window / 2)
		s.log.Info("maintenance notification", "type", notifMoving, "seq", seq, "time_s", secs, "endpoint", "same")
		return false
	}
	// Reconnects after the old endpoint's close (at about <time>) must still reach the new one.
	s.moving.Store(&movingTarget{addr: endpoint, until: s.now() + int64(2*window)})
	n := s.moveSessions("")
	s.log.Info("maintenance notification", "type", notifMoving, "seq", seq, "time_s", secs, "endpoint", endpoint,
		"sessions_to_move", n)
	return true
}

// moveSessions asks every session to move to a new upstream connection at its next safe point (session.move)
// and drops the pooled connections opened before now. node is the address of the node under maintenance,
// if an announcement named it (dialBlockedNode). It returns how many sessions were asked.
func (s *Server) moveSessions(node string) int {
	if node == "" {
		s.maintNode.Store(nil)
	} else {
		s.maintNode.Store(&node)
	}
	s.maintAt.Store(max(s.now(), 1)) // 0 means never
	if s.pool != nil {
		s.pool.dropOpenedBefore(s.maintAt.Load())
	}
	n := 0
	s.each(func(sess *session) {
		n++
		sess.poke(pokeMove)
	})
	return n
}
