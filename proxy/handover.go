package proxy

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"net"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/entra-redis-proxy/entra-redis-proxy/resp"
)

// A RESP2 connection in subscribed mode cannot take AUTH, so before its token expires the proxy moves the
// client to a new upstream connection subscribed to the same channels, patterns and shard channels, cutting
// over at a point that both message streams share:
//
//  1. the old connection O subscribes to a private marker channel (the confirmation is hidden);
//  2. a new connection N, authenticated with the new token, subscribes to the marker and to everything the
//     client has;
//  3. a short-lived control connection publishes the marker. Redis delivers one publication to all its
//     subscribers at the same point of the single order of messages;
//  4. the reply loop passes O's messages up to the marker, then reads N, dropping N's messages up to the
//     marker (O delivered them) and passing those after it. Then N unsubscribes the marker (hidden).
//
// Nothing is lost or delivered twice, and order is kept. The client loop reads no client input while this
// runs (a few round trips and two TLS handshakes), so the subscriptions cannot change meanwhile and no
// (un)subscribe confirmation the client sees carries the marker in its count.

// cutover is a handover in progress, shared by the client loop (which sets it up) and the reply loop.
type cutover struct {
	marker         string        // the private channel: unique per handover
	subscribed     chan struct{} // closed by the reply loop: O confirmed the marker subscription
	subscribedOnce sync.Once
	ready          chan struct{} // closed by the client loop: conn and buf are set (or failed is)
	done           chan struct{} // closed by the reply loop: it reads N now (or dropped the handover)
	conn           net.Conn
	buf            *readBuf
	failed         bool // the client loop gave up; the reply loop drops the marker and stays on O
	switched       bool // set by the reply loop before done
	// pattern: the marker is subscribed as a pattern (PSUBSCRIBE of its own name), for an identity that
	// may not SUBSCRIBE. refused: the server refused the marker subscription (set before subscribed closes).
	pattern, refused bool
}

func newCutover(marker string, pattern bool) *cutover {
	return &cutover{marker: marker, pattern: pattern,
		subscribed: make(chan struct{}), ready: make(chan struct{}), done: make(chan struct{})}
}

// verb returns the command that subscribes (or unsubscribes) the marker.
func (c *cutover) verb(subscribe bool) string {
	switch {
	case c.pattern && subscribe:
		return "PSUBSCRIBE"
	case c.pattern:
		return "PUNSUBSCRIBE"
	case subscribe:
		return "SUBSCRIBE"
	}
	return "UNSUBSCRIBE"
}

const handoverTimeout = 10 * time.Second

// markerState is the reply loop's view of a handover: which marker it watches for, and where it is.
type markerState struct {
	cut      *cutover // the handover whose marker is subscribed; nil when none
	seen     bool     // the frame just passed was the marker sent to its channel by name
	skipping bool     // reading N: drop messages up to N's copy of the marker (O delivered them)
}

func (m *markerState) active() bool { return m.cut != nil }

// handover moves a subscriber to a new upstream authenticated with tok: a RESP2 one at a new token or a
// maintenance, a RESP3 one at a maintenance (in RESP3 the confirmations and messages are pushes, and the new
// connection speaks RESP3 too; with nothing else in flight, the same cut applies). It returns an error only
// for a failure of the old connection; other failures leave the client on its old connection and are
// retried (retry: the kind, pokeReauth or pokeMove).
func (s *session) handover(tok Token, retry uint32) error {
	if !s.led.waitIdle(handoverTimeout) {
		s.retryLater(retry) // replies still outstanding: the subscriptions are not known yet
		return nil
	}
	subs := s.subs.snapshot()
	var nonce [12]byte
	rand.Read(nonce[:])
	cut := newCutover("__entra_redis_proxy:handover:"+hex.EncodeToString(nonce[:]), false)
	s.cut.Store(cut)
	defer s.cut.Store(nil)

	// 1. The marker subscription on O: as a channel, or, for an identity that may not SUBSCRIBE, as a pattern.
	ctx, cancel := context.WithTimeout(s.srv.ctx, handoverTimeout)
	defer cancel()
	abort := func(err error) error {
		s.log.Warn("pub/sub handover failed; staying on the current connection and retrying", "err", err)
		cut.failed = true
		close(cut.ready)
		s.retryLater(retry)
		// Drop the marker subscription so the client's subscription counts stay right.
		return s.sendMarker(cut.verb(false), cut.marker)
	}
	for {
		if err := s.sendMarker(cut.verb(true), cut.marker); err != nil {
			return err
		}
		select {
		case <-cut.subscribed:
		case <-ctx.Done():
			return abort(errors.New("no confirmation of the marker subscription"))
		}
		if !cut.refused {
			break
		}
		if cut.pattern {
			return s.handoverRefused(cut)
		}
		cut = newCutover(cut.marker, true)
		s.cut.Store(cut)
	}

	// 2. N, subscribed to the marker and to everything the client has.
	np, buf, err := s.dialSubscriber(ctx, tok, subs, cut)
	if err != nil {
		return abort(err)
	}
	n := np.conn
	if !s.addConn(n) {
		n.Close()
		return errors.New("session closed")
	}
	// 3. The marker, from a connection that is not subscribed, to O's endpoint: O must see it.
	if err := publish(ctx, s.srv, s.cl.upAddr, tok, cut.marker, "cut"); err != nil {
		s.dropConn(n)
		n.Close()
		return abort(err)
	}
	cut.conn, cut.buf = n, buf
	close(cut.ready)

	// 4. The reply loop switches to N when the marker arrives on O.
	select {
	case <-cut.done:
	case <-ctx.Done():
		return errors.New("pub/sub handover: the marker did not arrive")
	}
	if !cut.switched {
		return errors.New("pub/sub handover: dropped")
	}
	old := s.cl.up
	s.cl.up, s.cl.secret, s.cl.writeBy, s.cl.upSince, s.cl.upAddr = n, tok.Secret, time.Time{}, np.opened, np.addr
	s.upID.Store(np.id)
	s.dropConn(old)
	old.Close()
	s.srv.obs.UpstreamClosed()
	// N's marker subscription goes; its confirmation comes after the marker itself, and is hidden.
	if err := s.sendMarker(cut.verb(false), cut.marker); err != nil {
		return err
	}
	s.srv.obs.Mechanism("handover")
	s.log.Info("pub/sub connection handed over to a new upstream", "upstream_client_id", np.id,
		"channels", len(subs[famChannel]), "patterns", len(subs[famPattern]), "shard_channels", len(subs[famShard]))
	return nil
}

// handoverRefused gives up a handover whose marker the server refused to subscribe (a data access policy
// that limits the identity's channels): the subscriber stays on its connection, which the server closes
// when the token expires. It is tried again at the next token, in case the policy changed.
func (s *session) handoverRefused(cut *cutover) error {
	cut.failed = true
	close(cut.ready)
	s.srv.obs.Mechanism("handover_refused")
	s.log.Warn("pub/sub handover refused: this identity may not subscribe to the proxy's handover channel, so this RESP2 subscriber cannot move to the new token and the server will close its connection when the old token expires",
		"remedy", "allow the channels __entra_redis_proxy:* (SUBSCRIBE or PSUBSCRIBE, and PUBLISH) in the cache's data access policy, or have the client use RESP3 (HELLO 3), where the proxy re-authenticates in band")
	return nil
}

// watchMarker reports whether a handover's marker is being watched for, starting to watch for the one in
// progress if need be. The watch of an earlier handover, if one was left (its last confirmation not seen),
// gives way to the current one, except while N is still skipping up to its copy of the earlier marker.
func (s *session) watchMarker() bool {
	m := &s.rl.marker
	if cut := s.cut.Load(); cut != nil && m.cut != cut && (m.cut == nil || !m.skipping) {
		*m = markerState{cut: cut}
	}
	return m.active()
}

// markerConfirmed handles the confirmation of the proxy's own marker (un)subscription, matched to its
// handover by the channel's name: a late confirmation of a handover already given up changes nothing.
func (s *session) markerConfirmed(h *resp.Head) {
	if len(h.Elems) < 2 {
		s.rl.marker = markerState{} // refused: no marker is subscribed
		if cut := s.cut.Load(); cut != nil && h.Type == '-' {
			select {
			case <-cut.subscribed:
			default: // the subscription it was waiting for
				cut.refused = true
				cut.confirmed()
			}
		}
		return
	}
	channel := string(h.Elems[1])
	if equalFold(h.Elems[0], "subscribe") || equalFold(h.Elems[0], "psubscribe") {
		if cut := s.cut.Load(); cut != nil && cut.marker == channel {
			s.rl.marker = markerState{cut: cut}
			cut.confirmed()
		}
		return
	}
	if m := s.rl.marker.cut; m == nil || m.marker == channel {
		s.rl.marker = markerState{} // the marker is unsubscribed: no copy of it can follow
	}
}

// confirmed records that O confirmed the marker subscription (once, whatever arrives).
func (c *cutover) confirmed() { c.subscribedOnce.Do(func() { close(c.subscribed) }) }

// handoverMessage classifies a message while a handover's marker is subscribed: the marker's copies are
// hidden, the one sent to the marker channel by name is the cut point, and on the new connection everything
// before the cut point is dropped (the old connection delivered it).
func (s *session) handoverMessage(p []byte, h *resp.Head) (bool, error) {
	isPattern := equalFold(h.Elems[0], "pmessage")
	want := 2
	if isPattern {
		want = 3
	}
	if ok, err := resp.PeekHead(p, want, h); !ok || err != nil {
		return ok, err
	}
	m := &s.rl.marker
	if len(h.Elems) == want && string(h.Elems[want-1]) == m.cut.marker {
		// The marker's copies are hidden. The cut point is the copy for the marker's own subscription: by
		// name, or by the pattern that is its name; a client's pattern may match it too.
		s.rl.frame.fwd = false
		m.seen = m.seen || isPattern == m.cut.pattern && (!isPattern || string(h.Elems[1]) == m.cut.marker)
		return true, nil
	}
	s.rl.frame.fwd = !m.skipping
	return true, nil
}

// markerPassed is called after each frame: after O's copy of the marker it returns N and N's buffer to
// continue on; nil otherwise (also when the handover was given up).
func (s *session) markerPassed() (net.Conn, *readBuf) {
	m := &s.rl.marker
	if !m.seen {
		return nil, nil
	}
	m.seen = false
	if m.skipping {
		m.skipping = false // N's copy: what follows is new
		return nil, nil
	}
	cut := m.cut
	defer close(cut.done)
	select {
	case <-cut.ready:
	case <-time.After(handoverTimeout):
		return nil, nil
	}
	if cut.failed {
		return nil, nil
	}
	cut.switched, m.skipping = true, true
	return cut.conn, cut.buf
}

// sendMarker (un)subscribes the upstream to the marker, with the confirmation hidden from the client.
func (s *session) sendMarker(verb, marker string) error {
	s.cl.out = resp.AppendCommand(s.cl.out, verb, marker)
	s.cl.entries = append(s.cl.entries, entry{act: actMarker, cmd: cmdOther, start: s.srv.now()})
	return s.flush()
}

// dialSubscriber opens N and subscribes it to the marker and subs. It returns N's buffer holding whatever N
// sent after the confirmations (messages that the reply loop drops up to the marker).
func (s *session) dialSubscriber(ctx context.Context, tok Token, subs [3][]string, cut *cutover) (*pooled, *readBuf, error) {
	start, opened := time.Now(), s.srv.now()
	n, addr, err := s.srv.dial(ctx)
	if err != nil {
		return nil, nil, err
	}
	c := newCtrlConn(n)
	c.skipLarge = true // a large message among the confirmations is read through: O delivers it
	id, _, err := c.handshake(ctx, tok, fixedToken(tok))
	if err != nil {
		n.Close()
		return nil, nil, err
	}
	fail := func(err error) (*pooled, *readBuf, error) {
		n.Close()
		return nil, nil, fmt.Errorf("new upstream: %w", err)
	}
	if s.rl.proto == 3 { // no HELLO reply is owed (the ledger is idle): the reply loop does not change it now
		if err := hello3(ctx, c); err != nil {
			return fail(err)
		}
	}
	// What else the client set on O: once it unsubscribes, its commands run on N. Not CLIENT TRACKING: in
	// RESP2 it redirects to a connection by id, which may be gone (see README: what is not exact).
	st := s.carry.snapshot()
	st.tracking = ""
	if err := carryOver(ctx, c, st); err != nil {
		return fail(err)
	}
	mf := famChannel // the marker's family
	if cut.pattern {
		mf = famPattern
	}
	subs[mf] = append([]string{cut.marker}, subs[mf]...)
	if err := subscribeAll(ctx, c, subs); err != nil {
		return fail(err)
	}
	s.srv.obs.UpstreamOpened(time.Since(start))
	return &pooled{conn: n, id: id, secret: tok.Secret, opened: opened, addr: addr}, pending(c.buffered()), nil
}

// subscribeAll subscribes c to subs, per family, and reads the confirmations. Anything else that arrives
// among them is dropped: messages (a handover's old connection delivers them; for a reconnect they were
// published before the subscriptions were restored, as if during the gap) and, in RESP3, other pushes.
func subscribeAll(ctx context.Context, c *ctrlConn, subs [3][]string) error {
	var cmd []byte
	want := 0
	for f, name := range [3]string{famChannel: "SUBSCRIBE", famPattern: "PSUBSCRIBE", famShard: "SSUBSCRIBE"} {
		if len(subs[f]) > 0 {
			cmd = resp.AppendCommand(cmd, append([]string{name}, subs[f]...)...)
			want += len(subs[f])
		}
	}
	if want == 0 {
		return nil
	}
	if err := c.send(ctx, cmd); err != nil {
		return err
	}
	for want > 0 {
		r, err := c.read(ctx)
		if err != nil {
			return err
		}
		if r.typ == '-' {
			return fmt.Errorf("subscription refused: %s", r.text)
		}
		if len(r.elems) > 0 && slices.ContainsFunc(subscribeKinds, func(k string) bool { return strings.EqualFold(r.elems[0], k) }) {
			want--
		}
	}
	return nil
}

// subscribeKinds are the first elements of subscription confirmations.
var subscribeKinds = []string{"subscribe", "psubscribe", "ssubscribe"}

// carryOver gives the connection c the settings st: the database, the client name, READONLY and CLIENT
// TRACKING (last: once it is on, invalidation pushes may follow its reply).
func carryOver(ctx context.Context, c *ctrlConn, st connSettings) error {
	var cmds []byte
	n := 0
	if st.db != 0 {
		cmds, n = resp.AppendCommand(cmds, "SELECT", strconv.Itoa(st.db)), n+1
	}
	if st.name != "" {
		cmds, n = resp.AppendCommand(cmds, "CLIENT", "SETNAME", st.name), n+1
	}
	if st.readonly {
		cmds, n = resp.AppendCommand(cmds, "READONLY"), n+1
	}
	if st.tracking != "" {
		cmds, n = append(cmds, st.tracking...), n+1
	}
	if n == 0 {
		return nil
	}
	rs, err := c.pipeline(ctx, cmds, n)
	if err != nil {
		return err
	}
	for _, r := range rs {
		if err := r.expect('+'); err != nil {
			return fmt.Errorf("carry the connection's settings over: %w", err)
		}
	}
	return nil
}

// publish sends PUBLISH channel msg from a short-lived connection to srv's endpoint addr.
func publish(ctx context.Context, srv *Server, addr string, tok Token, channel, msg string) error {
	conn, err := srv.dialAt(ctx, addr)
	if err != nil {
		return err
	}
	defer conn.Close()
	c := newCtrlConn(conn)
	if _, _, err := c.handshake(ctx, tok, fixedToken(tok)); err != nil {
		return err
	}
	r, err := c.do(ctx, "PUBLISH", channel, msg)
	if err == nil {
		err = r.expect(':')
	}
	if err == nil && r.num == 0 {
		err = errors.New("no subscriber received it")
	}
	if err != nil {
		return fmt.Errorf("publish marker: %w", err)
	}
	return nil
}

// retryLater pokes the client loop again in a second, for another attempt at a failed rescue. The timer is
// the session's: close stops it.
func (s *session) retryLater(bits uint32) {
	s.connMu.Lock()
	defer s.connMu.Unlock()
	if s.closed {
		return
	}
	s.retryBits |= bits
	if s.retry != nil {
		return // one retry pending carries every kind asked for
	}
	s.retry = time.AfterFunc(time.Second, func() {
		s.connMu.Lock()
		bits := s.retryBits
		s.retry, s.retryBits = nil, 0
		s.connMu.Unlock()
		s.poke(bits)
	})
}
