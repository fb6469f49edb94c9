package proxy

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"strconv"
	"strings"
	"time"

	"github.com/entra-redis-proxy/entra-redis-proxy/resp"
)

var queued = []byte("+QUEUED\r")

// pubsubMessages are the first elements of pub/sub messages: pushed by the server, never replies.
var pubsubMessages = []string{"message", "pmessage", "smessage"}

// replyLoop reads the upstream up and passes replies to the client until either side fails. Each frame is
// classified from its head (whose is it, does it go to the client), then streamed through to its last byte;
// only then is its entry settled, and only once written is it delivered. b is up's buffer, holding what
// was read from up already, if anything (after a reconnect).
func (s *session) replyLoop(up net.Conn, b *readBuf) error {
	defer func() { b.release() }()
	sc := resp.Scanner{MaxBulk: 1 << 40}
	var h resp.Head
	inFrame, switched := false, b.r < b.w
	hold := false         // an element of a transaction's reply to rewrite is not all here yet
	var stallBy time.Time // the read deadline guarding a reply that stopped halfway; zero when none
	for {
		if b.full() && (!inFrame || hold) && !b.grow(s.srv.maxHead()) {
			s.srv.obs.UpstreamError("protocol")
			return errors.New("upstream reply head too large")
		}
		var rerr error
		if !switched { // after a handover, first handle what the new upstream already sent
			var n int
			n, rerr = b.readFrom(up)
			if rerr == nil && b.filled && b.isSmall() {
				// More of this batch is likely here already: take it now, so the client gets it in one write.
				var more int
				more, rerr = b.readNow(up, stallBy)
				if s.stopping() {
					up.SetReadDeadline(pokeTime) // the stop for the pool or a move came meanwhile: don't undo it
				}
				n += more
			}
			if n > 0 {
				s.bytesOut.Add(int64(n))
				s.srv.obs.BytesOut(n)
			}
		}
		switched = false
		for b.r < b.w {
			if !inFrame {
				ok, err := s.classify(b.buf[b.r:b.w], &h)
				if err != nil {
					s.srv.obs.UpstreamError("protocol")
					return fmt.Errorf("upstream protocol error: %w", err)
				}
				if !ok {
					break // the head is not all here yet
				}
				inFrame = true
				sc.Reset()
				if n := s.rl.frame.headLen; n > 0 {
					// An EXEC reply taken apart: its header line, then its elements one by one.
					if s.rl.frame.fwd {
						s.emit(b.buf[b.r : b.r+n])
					}
					b.r += n
					s.rl.frame.headLen = 0
					continue
				}
			}
			if s.rl.frame.elems > 0 && !sc.InFrame() {
				ok, err := s.execElement(b.buf[b.r:b.w])
				if err != nil {
					s.srv.obs.UpstreamError("protocol")
					return fmt.Errorf("upstream protocol error: %w", err)
				}
				if hold = !ok; hold {
					break
				}
			}
			k, done, err := sc.Scan(b.buf[b.r:b.w])
			if err != nil {
				s.srv.obs.UpstreamError("protocol")
				return fmt.Errorf("upstream protocol error: %w", err)
			}
			if s.rl.frame.fwd && !s.rl.frame.replaced {
				s.emit(b.buf[b.r : b.r+k])
			}
			b.r += k
			if !done {
				continue
			}
			if f := &s.rl.frame; f.elems > 0 {
				f.replaced = false
				if f.elems, f.at = f.elems-1, f.at+1; f.elems > 0 {
					continue
				}
			}
			inFrame = false
			s.frameDone()
			if n, nb := s.markerPassed(); n != nil {
				// O's copy of the marker: everything O sent before it was passed; continue on N, after
				// N's own copy of the marker.
				b.release()
				up, b, rerr, switched, stallBy = n, nb, nil, true, time.Time{}
				break
			}
		}
		if err := s.writeClient(); err != nil {
			return err
		}
		// A reply that makes no progress for StallTimeout is an upstream fault, not a slow command: close
		// rather than hang. The guard is re-armed while bytes flow, so a long reply is never cut.
		if mid := inFrame || b.r < b.w; mid {
			if now, stall := time.Now(), s.srv.stallTimeout(); stallBy.Sub(now) < stall/2 {
				stallBy = now.Add(stall)
				up.SetReadDeadline(stallBy)
				if s.stopping() {
					up.SetReadDeadline(pokeTime)
				}
			}
		} else if !stallBy.IsZero() {
			stallBy = time.Time{}
			up.SetReadDeadline(stallBy)
			if s.stopping() {
				up.SetReadDeadline(pokeTime) // the stop for the pool or a move came meanwhile: don't undo it
			}
		}
		if s.rl.closing != nil {
			return s.rl.closing
		}
		if rerr != nil {
			return s.upstreamReadError(rerr, inFrame || b.r < b.w)
		}
	}
}

// upstreamReadError turns the error that ended the reply loop's read into the session's cause.
func (s *session) upstreamReadError(err error, mid bool) error {
	switch {
	case isDeadline(err) && s.recycling.Load():
		if mid {
			return errors.New("upstream sent unsolicited bytes: not reusable")
		}
		return errRecycled
	case isDeadline(err) && s.moving.Load():
		if mid {
			return errors.New("upstream sent a push while the session moved to a new upstream")
		}
		return &upstreamLost{err: err, moved: true}
	case !mid && s.srv.opts.ReconnectTimeout > 0 && closedByPeer(err) && !s.clientFault.Load() &&
		s.srv.outage() == nil: // (without a valid token the cache closed it at expiry: no new one would take)
		return &upstreamLost{err: err} // counted by its outcome: restored, or lost
	case errors.Is(err, io.EOF):
		return s.lost("closed", errUpstreamGone)
	case isDeadline(err):
		return s.lost("stalled", fmt.Errorf("upstream reply stalled for %s", s.srv.stallTimeout()))
	}
	return s.lost("closed", fmt.Errorf("read upstream: %w", err))
}

// lost reports a connection the proxy is about to lose through no act of the client: always a warning, with
// what might explain it, and a metric of its kind. The cache closes every connection when the token expires:
// those make one line together.
func (s *session) lost(kind string, err error) error {
	if s.clientFault.Load() {
		return err // the server closed after answering the client's protocol error, as it should
	}
	select {
	case <-s.done:
		s.srv.obs.UpstreamError(kind)
		return err // the session was already closing (client gone, shutdown): not a loss
	default:
	}
	o := s.srv.outage()
	if o != nil && kind == "closed" {
		kind = "token_expired"
	}
	s.srv.obs.UpstreamError(kind)
	if kind == "token_expired" {
		s.srv.expiryDrops.add("", o.attrs()...)
		return fmt.Errorf("%w: %w", err, o)
	}
	tok, _ := s.srv.opts.Tokens.Current()
	s.log.Warn("upstream connection lost; closing the client connection", "err", err,
		"upstream_client_id", s.upID.Load(), "replies_outstanding", s.led.len(),
		"current_token_expires_on", tok.ExpiresOn.UTC().Format(time.RFC3339))
	return err
}

// emit queues p for the client, merging it with the previous piece when they are adjacent in the buffer.
func (s *session) emit(p []byte) {
	if n := len(s.rl.outv); n > 0 {
		last := s.rl.outv[n-1]
		if cap(last) > len(last) && len(p) > 0 && &last[:len(last)+1][len(last)] == &p[0] {
			s.rl.outv[n-1] = last[:len(last)+len(p)]
			return
		}
	}
	s.rl.outv = append(s.rl.outv, p)
}

// writeClient writes what this read produced for the client, in one system call where it can, and then
// records the replies it completed as delivered.
func (s *session) writeClient() error {
	r := &s.rl
	if len(r.outv) == 0 {
		s.led.delivered() // replies the proxy consumed count as handled
		s.reportDone()
		return nil
	}
	armWrite(s.client, &r.writeBy, s.srv.opts.WriteTimeout)
	var err error
	if len(r.outv) == 1 {
		_, err = s.client.Write(r.outv[0])
	} else {
		r.wbuf = r.outv
		_, err = r.wbuf.WriteTo(s.client)
	}
	clear(r.outv)
	r.outv = r.outv[:0]
	if err != nil {
		return fmt.Errorf("write client: %w", err)
	}
	s.led.delivered()
	s.reportDone()
	return nil
}

// classify decides, from the head of the frame at the start of p, whether it is a reply and to what, and
// whether it goes to the client. It returns false when more bytes are needed to decide.
func (s *session) classify(p []byte, h *resp.Head) (bool, error) {
	f := &s.rl.frame
	*f = frame{fwd: true}
	switch p[0] {
	case '>':
		return s.classifyPush(p, h)
	case '*':
		if s.resp2Sub.Load() {
			if ok, handled, err := s.classifyMessage(p, h); handled || !ok || err != nil {
				return ok, err
			}
		}
	case '+':
		if s.rl.monitor {
			if len(p) < 2 {
				return false, nil
			}
			if '0' <= p[1] && p[1] <= '9' {
				return true, nil // a monitor line ("+1700000000.123456 [0 ...] ...")
			}
		}
	}
	e, ok := s.led.front()
	for ok && e.optional {
		if len(p) < 2 {
			return false, nil
		}
		if p[0] == '*' {
			if ok, err := resp.PeekHead(p, 1, h); !ok || err != nil {
				return ok, err
			}
			if len(h.Elems) == 1 {
				if confirm, _ := isConfirm(h.Elems[0], e.fam); confirm {
					break
				}
			}
		}
		s.led.settle() // refused under CLIENT REPLY OFF or SKIP: its answer was suppressed
		e, ok = s.led.front()
	}
	if !ok {
		// Nothing is expected (a CLIENT REPLY state the proxy could not foresee): the client may be.
		s.log.Debug("reply with no command waiting; passing it on")
		return true, nil
	}
	f.e, f.reply, f.last = e, true, true
	if s.srv.clustered() && s.clusterRewrites(p, e) {
		if ok, err := s.clusterReply(p, h, e); !ok || err != nil {
			return ok, err
		}
	}
	if e.watch != watchNone {
		if p[0] == '+' || p[0] == '-' {
			if ok, err := resp.PeekHead(p, 0, h); !ok || err != nil {
				return ok, err
			}
		}
		s.watch.reply(e.watch, p[0], h.Line)
	}
	if len(e.sets) > 0 && e.act != actExec && p[0] != '-' {
		s.applySetting(e.sets[0]) // (again if classify is called again for this frame: no matter)
	}
	if e.blk != nil {
		return s.blockedReply(p, e)
	}
	switch e.act {
	case actSubscribe:
		if p[0] != '-' {
			if ok, err := resp.PeekHead(p, 1, h); !ok || err != nil {
				return ok, err
			}
			if len(h.Elems) == 1 {
				if ok, _ := isConfirm(h.Elems[0], e.fam); ok {
					return s.confirm(p, h, e)
				}
			}
		}
	case actAuth:
		if ok, err := resp.PeekHead(p, 0, h); !ok || err != nil {
			return ok, err
		}
		s.authResult(h)
		f.fwd = false
	case actDrop, actFail, actExecNull, actQuit:
		f.fwd = false
	case actReplace:
		if len(p) < len(queued) && bytes.HasPrefix(queued, p) {
			return false, nil
		}
		if bytes.HasPrefix(p, queued) {
			f.e.act = actForward // inside MULTI the client expects its command to be queued
		} else {
			f.fwd = false
		}
	case actMarker:
		if ok, err := resp.PeekHead(p, 2, h); !ok || err != nil {
			return ok, err
		}
		f.fwd = false
		s.markerConfirmed(h)
	case actProbe:
		if !s.srv.facts.learn(probe(e.arg), p) {
			return false, nil
		}
		f.fwd = false
	case actMulti:
		accepted := uint64(0)
		if p[0] != '-' {
			accepted = 1
		}
		s.multiAns.Store(uint64(uint32(e.arg))<<1 | accepted)
	case actExec:
		if ok, err := resp.PeekHead(p, 0, h); !ok || err != nil {
			return ok, err
		}
		if h.Type == '*' && h.Len > 0 && h.AttrLen == 0 {
			// The transaction ran: its elements say which of its settings took.
			f.elems, f.headLen = h.Len, bytes.IndexByte(p, '\n')+1
		}
	case actHello, actMonitor, actReset:
		elems := 0
		if e.arg < 0 {
			elems = 6 // a bare HELLO: server, redis, version, v, proto, N
		}
		if ok, err := resp.PeekHead(p, elems, h); !ok || err != nil {
			return ok, err
		}
		s.stateReply(h, e)
		if e.act == actReset && e.arg == resetHideRefusal && h.Type == '-' {
			f.fwd = false
		}
	}
	if e.quiet {
		f.fwd = false
	}
	return true, nil
}

// classifyPush handles a RESP3 push: not a reply, unless it confirms the (un)subscribe command whose reply
// is due.
func (s *session) classifyPush(p []byte, h *resp.Head) (bool, error) {
	if ok, err := resp.PeekHead(p, 1, h); !ok || err != nil {
		return ok, err
	}
	if len(h.Elems) != 1 {
		return true, nil
	}
	e, ok := s.led.front()
	switch {
	case ok && e.act == actSubscribe:
		if ok, _ := isConfirm(h.Elems[0], e.fam); ok {
			s.rl.frame = frame{fwd: true, reply: true, last: true, e: e}
			return s.confirm(p, h, e)
		}
	case ok && e.act == actMarker && isMarkerConfirm(h.Elems[0]):
		// A RESP3 subscriber's handover (at a maintenance): the marker's confirmation, hidden. Nothing else
		// is in flight while the marker's (un)subscription is (the client loop waits), so it is this one.
		if ok, err := resp.PeekHead(p, 2, h); !ok || err != nil {
			return ok, err
		}
		s.rl.frame = frame{reply: true, last: true, e: e}
		s.markerConfirmed(h)
	case oneOf(h.Elems[0], pubsubMessages) && s.watchMarker():
		return s.handoverMessage(p, h)
	}
	return true, nil
}

// isMarkerConfirm reports whether kind is that of a confirmation of a handover marker's (un)subscription:
// the marker is a channel, or a pattern.
func isMarkerConfirm(kind []byte) bool {
	ch, _ := isConfirm(kind, famChannel)
	pat, _ := isConfirm(kind, famPattern)
	return ch || pat
}

// classifyMessage recognises a RESP2 pub/sub message (handled reports it was one).
func (s *session) classifyMessage(p []byte, h *resp.Head) (ok, handled bool, err error) {
	if ok, err := resp.PeekHead(p, 1, h); !ok || err != nil {
		return ok, true, err
	}
	if len(h.Elems) != 1 || !oneOf(h.Elems[0], pubsubMessages) {
		return true, false, nil
	}
	if s.watchMarker() {
		ok, err := s.handoverMessage(p, h)
		return ok, true, err
	}
	return true, true, nil
}

// blockedReply handles the reply to a blocking command. After a CLIENT UNBLOCK by the proxy, or when its
// lease ran out, a timeout reply with time left is hidden and the client loop re-issues the command; every
// outcome is reported to it. Either way the commands held back behind it may go now.
func (s *session) blockedReply(p []byte, e entry) (bool, error) {
	b := e.blk
	var res unblockResult
	if b.leased || b.unblocking.Load() {
		timeout, ok := b.isTimeoutReply(p)
		if !ok {
			return false, nil
		}
		if timeout {
			res.remaining, res.reissue = b.remaining(time.Now())
		}
	}
	b.answered.Store(true)
	b.result <- res // buffered: one reply per blocking command; a rescue in progress waits for it
	if res.reissue {
		s.rl.frame.fwd = false
		s.rl.frame.e.act = actDrop // its place goes to the re-issued command
	}
	if !res.reissue || b.leased { // (an unblock rescue waits for the result itself)
		s.poke(pokeResume)
	}
	return true, nil
}

// confirm handles one pub/sub (un)subscribe confirmation for the entry e: the reply to its command, or part
// of it.
func (s *session) confirm(p []byte, h *resp.Head, e entry) (bool, error) {
	if ok, err := resp.PeekHead(p, 3, h); !ok || err != nil {
		return ok, err
	}
	remaining := e.arg
	if remaining < 0 { // UNSUBSCRIBE with no arguments: one per current subscription, or one if none
		remaining = int32(max(1, s.subs.count(e.fam)))
	}
	if len(h.Elems) >= 2 {
		_, sub := isConfirm(h.Elems[0], e.fam)
		s.subs.confirm(e.fam, sub, h.Elems[1])
	}
	s.updateSubscribed()
	if remaining--; remaining > 0 {
		s.led.setFrontArg(remaining)
		s.rl.frame.last = false
	}
	return true, nil
}

// updateSubscribed records whether the connection is in RESP2 subscribed mode, where redis refuses AUTH, and
// asks for a re-AUTH when it leaves it (one may have been refused meanwhile).
func (s *session) updateSubscribed() {
	now := s.rl.proto == 2 && s.subs.total() > 0
	if was := s.resp2Sub.Swap(now); was && !now {
		s.poke(pokeReauth)
	}
}

// authResult handles the reply to the proxy's own AUTH.
func (s *session) authResult(h *resp.Head) {
	if h.Type == '+' {
		s.rl.authRetried = false
		s.srv.obs.ReAuth("ok")
		s.log.Debug("re-authenticated")
		return
	}
	s.srv.obs.ReAuth("error")
	msg := string(h.Line)
	switch {
	case s.resp2Sub.Load():
		// Refused in RESP2 subscribed mode: the AUTH is sent again once the client leaves it.
		s.log.Debug("re-AUTH deferred: connection is in RESP2 subscribed mode")
	case strings.HasPrefix(msg, "WRONGPASS"):
		s.retryAuth(msg)
	default:
		s.log.Warn("upstream refused re-AUTH", "error", msg, "remedy", remedyFor(msg))
	}
}

// retryAuth fetches a fresh token after Azure refused one, and has the client loop send it. A second refusal
// of a fresh token closes the connection: the identity has lost access.
func (s *session) retryAuth(msg string) {
	if s.rl.authRetried {
		s.log.Error("upstream refused a freshly fetched token; closing the connection", "error", msg, "remedy", remedyFor(msg))
		s.rl.closing = fmt.Errorf("re-AUTH refused: %s", msg)
		return
	}
	s.rl.authRetried = true
	s.log.Warn("upstream refused the token; fetching a fresh one", "error", msg)
	s.srv.goTracked(func(ctx context.Context) {
		ctx, cancel := context.WithTimeout(ctx, s.srv.opts.DialTimeout)
		defer cancel()
		if _, err := s.srv.opts.Tokens.Refresh(ctx); err != nil {
			s.log.Warn("token refresh after WRONGPASS failed", "err", err)
		}
		s.forceAuth.Store(true)
		s.poke(pokeReauth)
	})
}

// stateReply updates the connection state from the reply to a command that changes it.
func (s *session) stateReply(h *resp.Head, e entry) {
	switch e.act {
	case actHello:
		switch {
		case h.Type == '-':
		case e.arg > 0:
			s.rl.proto = int(e.arg)
		case e.arg < 0 && len(h.Elems) == 6 && equalFold(h.Elems[4], "proto"):
			if p, err := strconv.Atoi(string(h.Elems[5])); err == nil {
				s.rl.proto = p
			}
		}
		s.updateSubscribed()
	case actMonitor:
		s.rl.monitor = s.rl.monitor || h.Type == '+'
	case actReset:
		s.resetRan.Store(h.Type == '+')
		if h.Type == '+' {
			s.rl.proto, s.rl.monitor = 2, false
			s.subs.reset()
			s.carry.reset()
			s.watch.on.Store(false)
			s.updateSubscribed()
		}
	}
}

// execElement looks at element f.at of a transaction's reply, at p's start: unless it is an error, the
// settings queued at that place took. With a Cluster, a topology reply or a redirect there is rewritten
// first (clusterElement); ok is false while such an element is not all here.
func (s *session) execElement(p []byte) (ok bool, err error) {
	f := &s.rl.frame
	if s.srv.clustered() && f.fwd {
		if ok, err := s.clusterElement(p); !ok || err != nil {
			return ok, err
		}
	}
	if p[0] == '-' {
		return true, nil
	}
	for _, set := range f.e.sets {
		if set.at == f.at {
			s.applySetting(set)
		}
	}
	return true, nil
}

// applySetting records a setting the server accepted.
func (s *session) applySetting(set setting) {
	s.carry.apply(set)
	if set.proto > 0 {
		s.rl.proto = set.proto
		s.updateSubscribed()
	}
}

// frameDone finishes the frame just passed: the proxy's own answers, latency, and the entry's settlement.
func (s *session) frameDone() {
	f := &s.rl.frame
	if !f.reply || !f.last {
		return
	}
	e := f.e
	switch e.act {
	case actReplace:
		s.rl.outv = append(s.rl.outv, []byte(e.text))
	case actFail:
		s.rl.outv = append(s.rl.outv, resp.AppendError(nil, e.text)) // the client loop then closes
	case actExecNull:
		if s.rl.proto == 3 {
			s.rl.outv = append(s.rl.outv, []byte("_\r\n"))
		} else {
			s.rl.outv = append(s.rl.outv, []byte("*-1\r\n"))
		}
	case actQuit:
		s.rl.outv = append(s.rl.outv, []byte("+OK\r\n"))
	}
	s.led.settle()
	switch e.act {
	case actAuth, actDrop, actFail, actMarker:
	default:
		if r := &s.rl.done; r.n > 0 && (r.cmd != e.cmd || r.start != e.start) {
			s.reportDone()
		}
		s.rl.done = doneRun{cmd: e.cmd, start: e.start, n: s.rl.done.n + 1}
	}
	*f = frame{}
}

// reportDone reports the run of answered commands to the Observer.
func (s *session) reportDone() {
	if r := &s.rl.done; r.n > 0 {
		s.srv.obs.CommandsDone(commandName(r.cmd), time.Duration(s.srv.now()-r.start), r.n)
		*r = doneRun{}
	}
}

func oneOf(b []byte, words []string) bool {
	for _, w := range words {
		if equalFold(b, w) {
			return true
		}
	}
	return false
}
