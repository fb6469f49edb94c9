package proxy

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"net"
	"strings"
	"time"

	"github.com/entra-redis-proxy/entra-redis-proxy/resp"
)

// Azure Cache for Redis announces planned maintenance on the pub/sub channel AzureRedisEvents
// (Azure/AzureCacheForRedis, AzureRedisEvents.md): NodeMaintenanceScheduled (10-15 min ahead), Starting
// (~20 s), Start (< 5 s, when the node's connections are about to close), FailoverComplete, Ended.
//
// The server keeps one control connection subscribed to it (eventsLoop). Every announcement is one log line
// and a metric. From Starting to Ended the stall limit is relaxed (stallTimeout). At NodeMaintenanceStart for a primary, every session moves to a new upstream connection at
// its next safe point, before the node closes the old one:
//
//   - a subscriber by the pub/sub handover (handover.go), so no message is lost or doubled: a RESP2 one at
//     once, a RESP3 one once no reply is owed (its replies would interleave with the cut's pushes);
//   - any other session at a safe point with nothing that pushes (no subscriptions, tracking or MONITOR):
//     the client loop dials and restores a new upstream as a reconnect does (reconnect.go), then stops the
//     reply loop on the old one between frames (a read deadline, as for the pool) and hands it the new one;
//     only then is the old one closed. Commands that arrive meanwhile wait in the read buffer;
//   - a blocked session by CLIENT UNBLOCK, the move, and its command again on the new connection
//     (moveBlocked); a session inside MULTI after EXEC, if the close has not come first; sessions that can't
//     move (a blocked RESP3 subscriber, tracking, MONITOR, CLIENT REPLY OFF) are left to the reconnect
//     after the close.
//
// Moving at Starting would not help: a connection opened then still reaches the node under maintenance.

// azureEventsChannel is the channel Azure Cache for Redis announces maintenance on.
const azureEventsChannel = "AzureRedisEvents"

// AnnouncementTypes are the AzureRedisEvents notification types and the maintenance notification pushes
// (notifications.go) reported to the Observer by name; any other is reported as "other".
var AnnouncementTypes = []string{"NodeMaintenanceScheduled", "NodeMaintenanceStarting", "NodeMaintenanceStart",
	"NodeMaintenanceFailoverComplete", "NodeMaintenanceEnded",
	notifMoving, notifMigrating, notifMigrated, notifFailingOver, notifFailedOver}

// azureEvent is one AzureRedisEvents message:
// NotificationType|<type>|StartTimeInUTC|<time>|IsReplica|<bool>|IPAddress|<ip>|SSLPort|<port>|NonSSLPort|<port>.
type azureEvent struct {
	kind    string
	start   string // StartTimeInUTC as sent (empty for Start and FailoverComplete)
	replica bool
	ip      string
	sslPort string
}

// parseAzureEvent parses an AzureRedisEvents message: pairs of field name and value, separated by '|'.
// Unknown fields are ignored; NotificationType is required.
func parseAzureEvent(msg string) (azureEvent, error) {
	parts := strings.Split(msg, "|")
	if len(parts)%2 != 0 {
		return azureEvent{}, fmt.Errorf("AzureRedisEvents message %q: not name|value pairs", truncate(msg, 80))
	}
	var ev azureEvent
	for i := 0; i < len(parts); i += 2 {
		v := parts[i+1]
		switch parts[i] {
		case "NotificationType":
			ev.kind = v
		case "StartTimeInUTC":
			ev.start = v
		case "IsReplica":
			ev.replica = strings.EqualFold(v, "true")
		case "IPAddress":
			ev.ip = v
		case "SSLPort":
			ev.sslPort = v
		}
	}
	if ev.kind == "" {
		return azureEvent{}, fmt.Errorf("AzureRedisEvents message %q: no NotificationType", truncate(msg, 80))
	}
	return ev, nil
}

// announcementLabel is the Observer's label for a notification type: a bounded set.
func announcementLabel(kind string) string {
	for _, k := range AnnouncementTypes {
		if k == kind {
			return k
		}
	}
	return "other"
}

// errTokenChanged reports a new token to a control connection's read (readOrChange), which then sends it.
var errTokenChanged = errors.New("token changed")

const (
	// maintenanceStall multiplies StallTimeout from NodeMaintenanceStarting to NodeMaintenanceEnded: a node
	// being failed over may pause mid-reply longer than usual, and its connections are closed anyway.
	maintenanceStall = 4
	// maintenanceWindow bounds the relaxed stall limit when NodeMaintenanceEnded does not come.
	maintenanceWindow = 15 * time.Minute
)

// stallTimeout is how long a reply may stop halfway before its connection is closed: StallTimeout, relaxed
// while a maintenance is in progress.
func (s *Server) stallTimeout() time.Duration {
	if s.now() < s.maintUntil.Load() {
		return maintenanceStall * s.opts.StallTimeout
	}
	return s.opts.StallTimeout
}

// eventsPing is how often the control connection PINGs when no message came (Azure closes idle connections).
const eventsPing = 2 * time.Minute

// eventsLoop keeps one control connection subscribed to AzureRedisEvents until ctx ends (see keepControl).
func (s *Server) eventsLoop(ctx context.Context) {
	s.keepControl(ctx, "maintenance announcements", s.listenEvents, func(err error) bool {
		var refused *replyError
		if !errors.As(err, &refused) {
			return false
		}
		s.log.Warn("maintenance announcements off: the cache refused SUBSCRIBE "+azureEventsChannel, "err", err,
			"remedy", "allow the channel "+azureEventsChannel+" (SUBSCRIBE) in the identity's data access policy")
		return true
	})
}

// controlRun runs a control connection: p, dialed and authenticated, read through c. setup is ctx bounded
// by DialTimeout, for its first exchange; changed is closed at the next token. It returns why it ended.
type controlRun func(ctx, setup context.Context, p *pooled, c *ctrlConn, changed <-chan struct{}) error

// keepControl runs a control connection (listen) until ctx ends or stop says its error ends it for good: a
// new one at once after a move of the endpoint, else after a jittered backoff.
func (s *Server) keepControl(ctx context.Context, what string, listen controlRun, stop func(error) bool) {
	wait := reconnectFirstWait
	for ctx.Err() == nil {
		err := s.runControl(ctx, listen)
		switch {
		case ctx.Err() != nil || stop(err):
			return
		case errors.Is(err, errMoved):
			wait = reconnectFirstWait
			continue
		}
		s.log.Debug(what+": control connection ended; dialing again", "err", err)
		t := time.NewTimer(wait/2 + rand.N(wait/2+1))
		select {
		case <-t.C:
		case <-ctx.Done():
			t.Stop()
			return
		}
		wait = min(2*wait, reconnectMaxWait)
	}
}

// runControl dials a control connection, runs listen on it, and closes it.
func (s *Server) runControl(ctx context.Context, listen controlRun) error {
	_, changed := s.opts.Tokens.Current()
	setup, cancel := context.WithTimeout(ctx, s.opts.DialTimeout)
	defer cancel()
	p, err := s.dialUpstream(setup)
	if err != nil {
		return err
	}
	defer func() {
		p.conn.Close()
		s.obs.UpstreamClosed()
	}()
	return listen(ctx, setup, p, newCtrlConn(p.conn), changed)
}

// listenEvents runs a control connection subscribed to AzureRedisEvents. It speaks RESP3 (HELLO 3: Redis 6
// and later), so it takes each new token by AUTH while subscribed instead of being dialed again: an
// announcement published at a token change is not missed (listenPushes).
func (s *Server) listenEvents(ctx, setup context.Context, p *pooled, c *ctrlConn, changed <-chan struct{}) error {
	rs, err := c.pipeline(setup, resp.AppendCommand(resp.AppendCommand(nil, "HELLO", "3"), "SUBSCRIBE", azureEventsChannel), 2)
	if err != nil {
		return fmt.Errorf("SUBSCRIBE %s: %w", azureEventsChannel, err)
	}
	if rs[0].typ != '%' { // not a refusal of the channel: dialed again with backoff
		return fmt.Errorf("HELLO 3 for the %s connection (Redis 6 or later needed): unexpected reply %s", azureEventsChannel, rs[0])
	}
	r := rs[1]
	if err := r.err(); err != nil {
		return fmt.Errorf("SUBSCRIBE %s: %w", azureEventsChannel, err)
	}
	if r.typ != '>' || len(r.elems) == 0 || r.elems[0] != "subscribe" {
		return fmt.Errorf("SUBSCRIBE %s: unexpected reply %s", azureEventsChannel, r)
	}
	s.log.Debug("maintenance announcements: subscribed", "upstream_client_id", p.id)
	s.eventsUpOnce.Do(func() { close(s.eventsUp) })
	return s.listenPushes(ctx, c, changed, func(elems []string) error {
		if len(elems) == 3 && elems[0] == "message" && elems[1] == azureEventsChannel {
			s.announce(elems[2])
		}
		return nil
	}, nil, nil)
}

// announce handles one AzureRedisEvents message.
func (s *Server) announce(msg string) {
	ev, err := parseAzureEvent(msg)
	if err != nil {
		s.obs.Announcement("other")
		s.log.Warn("maintenance announcement not understood", "err", err)
		return
	}
	s.obs.Announcement(announcementLabel(ev.kind))
	switch ev.kind {
	case "NodeMaintenanceStarting", "NodeMaintenanceStart":
		s.maintUntil.Store(s.now() + int64(maintenanceWindow))
	case "NodeMaintenanceEnded":
		s.maintUntil.Store(0)
	}
	n := 0
	if ev.kind == "NodeMaintenanceStart" && !ev.replica {
		node := ""
		if ev.ip != "" && ev.sslPort != "" {
			node = net.JoinHostPort(ev.ip, ev.sslPort)
		}
		n = s.moveSessions(node)
	}
	s.log.Info("maintenance announced", "type", ev.kind, "start_time_utc", ev.start, "is_replica", ev.replica,
		"ip", ev.ip, "ssl_port", ev.sslPort, "sessions_to_move", n)
}

// move moves the session to a new upstream connection at its next safe point, ahead of an announced close
// (see above). It returns an error only for a failure of the old connection; a session that can't move
// stays, and one that can't move yet (MULTI open, replies before a blocked command) tries again a second
// later.
func (s *session) move() error {
	c := &s.cl
	c.want.move = false
	if c.upSince > s.srv.maintAt.Load() {
		return nil // on a connection opened since the announcement (a reconnect after the close came first)
	}
	tok, _ := s.srv.opts.Tokens.Current()
	switch {
	case c.hold.holding():
		return s.moveBlocked(tok)
	case c.tx.open() || c.stream.active:
		s.retryLater(pokeMove) // after EXEC
		return nil
	case s.subs.total() > 0 && s.maintenanceNode() != "":
		// The handover's marker must reach both connections, which may now be on different nodes.
		s.srv.obs.Mechanism("maintenance_unmoved")
		s.log.Debug("not moved ahead of the maintenance; the reconnect after the close will handle it",
			"reason", "subscriptions on a node the load balancer may have left")
		return nil
	case s.resp2Sub.Load():
		s.srv.obs.Mechanism("maintenance_handover")
		return s.handover(tok, pokeMove)
	case !s.led.waitIdle(handoverTimeout):
		return nil // replies still flowing: left to the reconnect after the close
	case s.subs.total() > 0:
		// A RESP3 subscriber, with nothing in flight: by the handover too, so that the messages published
		// while it moves are neither lost nor doubled.
		if !s.canMove(true) {
			return nil
		}
		s.srv.obs.Mechanism("maintenance_handover")
		return s.handover(tok, pokeMove)
	case !s.canMove(false):
		return nil
	}
	return s.switchUpstream()
}

// moveBlocked moves a session blocked in a command: CLIENT UNBLOCK ... TIMEOUT from a control connection, as
// at a token's deadline (rescue.go); if the command timed out rather than got data, the session moves and
// the same command is sent again on the new upstream with the time that was left (on the old one if the
// move failed). If data won the race, the client gets it, and the move is tried again at the next turn.
func (s *session) moveBlocked(tok Token) error {
	c := &s.cl
	b := c.hold.cmd
	if s.led.len() != 1 {
		s.retryLater(pokeMove) // replies before it still due
		return nil
	}
	if !s.canMove(false) {
		return nil
	}
	if b.leased {
		return nil // CLIENT UNBLOCK is denied (rescue.go): it stays blocked, and the close ends it
	}
	ctx, cancel := context.WithTimeout(s.srv.ctx, handoverTimeout)
	defer cancel()
	res, ok := s.awaitUnblock(ctx, tok, b)
	switch {
	case !ok:
		return nil // logged: it stays blocked, and the close ends it
	case !res.reissue:
		c.want.move = true // the reply passes to the client; then the safe point comes
		return nil
	}
	s.led.waitIdle(handoverTimeout) // the hidden timeout reply settles
	if err := s.switchUpstream(); err != nil {
		return err
	}
	nb := b.again(res.remaining)
	s.reissue(nb, nb.args, s.srv.now())
	s.srv.obs.Mechanism("unblock_reissue")
	return s.flush()
}

// maintenanceNode returns the address of the node under maintenance when the session's upstream is on it
// and the endpoint may no longer lead there: behind Azure's load balancer (the configured address), once
// a NodeMaintenanceStart named a node (IPAddress, SSLPort) other than that address, and the connection
// predates it, until NodeMaintenanceEnded. The balancer may already send new connections to the node taking
// over. "" otherwise.
func (s *session) maintenanceNode() string {
	c := &s.cl
	node := s.srv.maintNode.Load()
	if node == nil || c.upAddr != "" || c.upSince >= s.srv.maintAt.Load() || s.srv.now() >= s.srv.maintUntil.Load() {
		return ""
	}
	if td, ok := s.srv.opts.Dialer.(*TLSDialer); ok && td.Addr == *node {
		return "" // the node is the endpoint: no balancer between
	}
	return *node
}

// dialBlockedNode opens a connection to the node where the session's blocked command waits, for CLIENT
// UNBLOCK (whose CLIENT ID means nothing elsewhere): the node under maintenance (maintenanceNode), else,
// or if that can't be reached directly, the upstream's endpoint.
func (s *session) dialBlockedNode(ctx context.Context) (net.Conn, error) {
	if node := s.maintenanceNode(); node != "" {
		conn, err := s.srv.dialAt(ctx, node)
		if err == nil {
			return conn, nil
		}
		s.log.Debug("could not reach the node under maintenance directly; CLIENT UNBLOCK goes through the endpoint",
			"node", node, "err", err)
	}
	return s.srv.dialAt(ctx, s.cl.upAddr)
}

// canMove reports whether the session's state allows a move (logged and counted when not); byHandover: by
// the pub/sub handover, which alone moves subscriptions.
func (s *session) canMove(byHandover bool) bool {
	why := s.unmovable(byHandover)
	if why != "" {
		s.srv.obs.Mechanism("maintenance_unmoved")
		s.log.Debug("not moved ahead of the maintenance; the reconnect after the close will handle it", "reason", why)
	}
	return why == ""
}

// switchUpstream moves the session, at a safe point with nothing that pushes, to a new upstream with its
// state restored; the old one is closed after the reply loop left it. When no new upstream can be set up
// (logged), the session stays on the old one.
func (s *session) switchUpstream() error {
	c := &s.cl
	p, buf, err := s.redial(time.Now().Add(s.srv.opts.DialTimeout))
	if err != nil {
		s.srv.obs.Mechanism("maintenance_unmoved")
		s.log.Warn("could not move ahead of the maintenance; the reconnect after the close will handle it", "err", err)
		return nil
	}
	if !s.led.markLost() { // only the client loop adds entries, and it waited for them: cannot happen
		p.conn.Close()
		s.srv.obs.UpstreamClosed()
		return errors.New("maintenance move: not at a safe point")
	}
	// The reply loop stops reading the old connection between frames, then takes the new one.
	old, oldID := c.up, s.upID.Load()
	s.moving.Store(true)
	old.SetReadDeadline(pokeTime)
	err = s.takeOver(p, buf)
	s.moving.Store(false)
	s.dropConn(old)
	old.Close()
	s.srv.obs.UpstreamClosed()
	if err != nil {
		return err
	}
	s.srv.obs.Mechanism("maintenance_move")
	s.log.Debug("moved to a new upstream ahead of the maintenance", "upstream_client_id", p.id, "old_upstream_client_id", oldID)
	return nil
}

// unmovable says why a session at a safe point can't move ahead of a maintenance, or "" when it can: the
// old connection must be silent while the reply loop leaves it (or, byHandover, send only messages the
// handover cuts), and the state restorable.
func (s *session) unmovable(byHandover bool) string {
	switch {
	case s.rl.monitor:
		return "MONITOR"
	case s.subs.total() > 0 && !byHandover:
		return "RESP3 subscriptions with a command in flight"
	case s.carry.snapshot().tracking != "":
		return "CLIENT TRACKING"
	}
	return s.unrestorable(false)
}
