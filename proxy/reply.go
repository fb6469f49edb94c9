package proxy

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"strings"
	"time"

	"github.com/entra-redis-proxy/entra-redis-proxy/resp"
)

var queued = []byte("+QUEUED\r")

// pubsubMessages are the first elements of pub/sub messages: pushed by the server, never replies.
var pubsubMessages = []string{"message", "pmessage", "smessage"}

// replyLoop reads the upstream up and passes replies to the client until either side fails.
func (s *session) replyLoop(up net.Conn) error {
	b := &readBuf{}
	defer func() { b.release() }()
	sc := resp.Scanner{MaxBulk: 1 << 40, MaxDepth: 128}
	var h resp.Head
	inFrame, switched, stallArmed := false, false, false
	for {
		if b.full() && !inFrame && !b.grow(maxHeadBuf) {
			s.srv.obs.UpstreamError("protocol")
			return errors.New("upstream reply head too large")
		}
		var rerr error
		if !switched { // after a handover, first handle what the new upstream already sent
			var n int
			n, rerr = b.readFrom(up)
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
			}
			k, done, err := sc.Scan(b.buf[b.r:b.w])
			if err != nil {
				s.srv.obs.UpstreamError("protocol")
				return fmt.Errorf("upstream protocol error: %w", err)
			}
			if s.curFwd {
				s.emit(b.buf[b.r : b.r+k])
			}
			b.r += k
			if done {
				inFrame = false
				s.frameDone()
				if s.markerSeen {
					s.markerSeen = false
					if s.skipToMarker {
						s.skipToMarker = false // N's copy: what follows is new
					} else if n, nb := s.switchUpstream(); n != nil {
						// O's copy: everything O sent before it was passed; continue on N after N's copy.
						b.release()
						up, b, rerr, switched, s.skipToMarker, stallArmed = n, nb, nil, true, true, false
						break
					}
				}
			}
		}
		if err := s.writeClient(); err != nil {
			return err
		}
		// A reply that stops halfway is an upstream fault, not a slow command: close rather than hang.
		if mid := inFrame || b.r < b.w; mid != stallArmed {
			stallArmed = mid
			deadline := time.Time{}
			if mid {
				deadline = time.Now().Add(s.srv.opts.StallTimeout)
			}
			up.SetReadDeadline(deadline)
		}
		if s.quitting {
			return errClientProtocol
		}
		if rerr != nil {
			if errors.Is(rerr, io.EOF) {
				s.srv.obs.UpstreamError("closed")
				return errUpstreamGone
			}
			return fmt.Errorf("read upstream: %w", rerr)
		}
	}
}

var errClientProtocol = errors.New("closed after a client protocol error")

// switchUpstream waits for the handover's new connection and takes it over, with the bytes it already sent.
func (s *session) switchUpstream() (net.Conn, *readBuf) {
	cut := s.cut.Load()
	defer close(cut.done)
	select {
	case <-cut.ready:
	case <-time.After(handoverTimeout):
		return nil, nil
	}
	if cut.failed {
		return nil, nil
	}
	cut.switched = true
	return cut.conn, cut.buf
}

// emit queues p for the client, merging it with the previous piece when they are adjacent in the buffer.
func (s *session) emit(p []byte) {
	if n := len(s.outv); n > 0 {
		last := s.outv[n-1]
		if cap(last) > len(last) && len(p) > 0 && &last[:len(last)+1][len(last)] == &p[0] {
			s.outv[n-1] = last[:len(last)+len(p)]
			return
		}
	}
	s.outv = append(s.outv, p)
}

// writeClient writes what this read produced for the client, in one system call where it can.
func (s *session) writeClient() error {
	if len(s.outv) == 0 {
		s.pend.written() // replies the proxy consumed count as handled
		return nil
	}
	armWrite(s.client, &s.clientWriteBy, s.srv.opts.WriteTimeout)
	var err error
	if len(s.outv) == 1 {
		_, err = s.client.Write(s.outv[0])
	} else {
		s.wbuf = s.outv
		_, err = s.wbuf.WriteTo(s.client)
	}
	clear(s.outv)
	s.outv = s.outv[:0]
	if err != nil {
		return fmt.Errorf("write client: %w", err)
	}
	s.pend.written()
	return nil
}

// classify decides, from the head of the frame at the start of p, whether it is a reply and to what, and
// whether it goes to the client. It returns false when more bytes are needed to decide.
func (s *session) classify(p []byte, h *resp.Head) (bool, error) {
	s.curFwd, s.curReply = true, false
	switch t := p[0]; {
	case t == '>':
		// A RESP3 push: not a reply, unless it confirms the (un)subscribe command whose reply is due.
		if ok, err := resp.PeekHead(p, 1, h); !ok || err != nil {
			return ok, err
		}
		if e, ok := s.pend.front(); ok && e.act == actSubscribe && len(h.Elems) == 1 && isConfirm(h.Elems[0], e.fam) {
			return s.confirm(p, h, e)
		}
		return true, nil
	case t == '*' && s.resp2Sub.Load():
		// RESP2 subscribed mode: messages arrive between replies.
		if ok, err := resp.PeekHead(p, 1, h); !ok || err != nil {
			return ok, err
		}
		if len(h.Elems) == 1 && oneOf(h.Elems[0], pubsubMessages) {
			if cut := s.cut.Load(); cut != nil && s.markerChan == "" {
				s.markerChan = cut.marker
			}
			if s.markerChan != "" {
				return s.handoverMessage(p, h)
			}
			return true, nil
		}
	case t == '+' && s.monitor:
		if len(p) < 2 {
			return false, nil
		}
		if '0' <= p[1] && p[1] <= '9' {
			return true, nil // a monitor line ("+1700000000.123456 [0 ...] ...")
		}
	}

	e, ok := s.pend.front()
	if !ok {
		// Nothing is expected (a CLIENT REPLY state the proxy could not foresee): the client may be.
		s.log.Debug("reply with no command waiting; passing it on")
		return true, nil
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
			if len(h.Elems) == 1 && isConfirm(h.Elems[0], e.fam) {
				return s.confirm(p, h, e)
			}
		}
	case actAuth:
		if ok, err := resp.PeekHead(p, 0, h); !ok || err != nil {
			return ok, err
		}
		s.authResult(h, e)
		s.curFwd = false
	case actDrop, actFail, actExecNull:
		s.curFwd = false
	case actReplace:
		if len(p) < len(queued) && bytes.HasPrefix(queued, p) {
			return false, nil
		}
		if bytes.HasPrefix(p, queued) {
			e.act = actForward // inside MULTI the client expects its AUTH to be queued
		} else {
			s.curFwd = false
		}
	case actMarker:
		if ok, err := resp.PeekHead(p, 1, h); !ok || err != nil {
			return ok, err
		}
		s.curFwd = false
		if len(h.Elems) == 1 && equalFold(h.Elems[0], "subscribe") {
			if cut := s.cut.Load(); cut != nil {
				close(cut.subscribed)
			}
		} else {
			s.markerChan = "" // the marker is unsubscribed: no copy of it can follow
		}
	case actHello, actMonitor, actReset:
		if ok, err := resp.PeekHead(p, 0, h); !ok || err != nil {
			return ok, err
		}
		s.stateReply(h, e)
	}
	s.pend.pop()
	s.cur, s.curReply = e, true
	return true, nil
}

// blockedReply handles the reply to a blocking command. After a CLIENT UNBLOCK by the proxy, a timeout
// reply with time left is hidden and the client loop re-issues the command; every outcome is reported to it.
func (s *session) blockedReply(p []byte, e entry) (bool, error) {
	b := e.blk
	// Set answered before reading unblocking; the client loop does the opposite (see unblock).
	b.answered.Store(true)
	var res unblockResult
	if b.unblocking.Load() {
		timeout, ok := b.isTimeoutReply(p)
		if !ok {
			return false, nil
		}
		if timeout {
			res.remaining, res.reissue = b.remaining(time.Now())
		}
	}
	b.result <- res // buffered: one reply per blocking command
	s.pend.pop()
	if res.reissue {
		s.curFwd = false
		s.cur, s.curReply = entry{}, false
		return true, nil
	}
	s.cur, s.curReply = e, true
	return true, nil
}

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
	if len(h.Elems) == want && string(h.Elems[want-1]) == s.markerChan {
		s.curFwd = false
		s.markerSeen = s.markerSeen || !isPattern
		return true, nil
	}
	s.curFwd = !s.skipToMarker
	return true, nil
}

// confirm handles one pub/sub (un)subscribe confirmation for the entry e: the reply to its command, or part of it.
func (s *session) confirm(p []byte, h *resp.Head, e entry) (bool, error) {
	if ok, err := resp.PeekHead(p, 3, h); !ok || err != nil {
		return ok, err
	}
	remaining := e.arg
	if remaining < 0 { // UNSUBSCRIBE with no arguments: one per current subscription, or one if none
		remaining = int32(max(1, len(s.subs[e.fam])))
	}
	if len(h.Elems) >= 2 && h.Elems[1] != nil {
		s.subsMu.Lock()
		defer s.subsMu.Unlock()
		if equalFold(h.Elems[0], confirmKinds[e.fam][1]) {
			delete(s.subs[e.fam], string(h.Elems[1]))
		} else {
			if s.subs[e.fam] == nil {
				s.subs[e.fam] = make(map[string]struct{})
			}
			s.subs[e.fam][string(h.Elems[1])] = struct{}{}
		}
	}
	s.updateSubscribed()
	remaining--
	if remaining > 0 {
		s.pend.setFrontArg(remaining)
		s.cur, s.curReply = entry{act: actForward, cmd: cmdOther}, false
		return true, nil
	}
	s.pend.pop()
	s.cur, s.curReply = e, true
	return true, nil
}

// updateSubscribed records whether the connection is in RESP2 subscribed mode, where redis refuses AUTH, and
// asks for a re-AUTH when it leaves it (one may have been refused meanwhile).
func (s *session) updateSubscribed() {
	n := len(s.subs[famChannel]) + len(s.subs[famPattern]) + len(s.subs[famShard])
	now := s.proto == 2 && n > 0
	if was := s.resp2Sub.Swap(now); was && !now {
		s.poke(pokeReauth)
	}
}

// authResult handles the reply to the proxy's own AUTH.
func (s *session) authResult(h *resp.Head, e entry) {
	if h.Type == '+' {
		s.authRetried = false
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
	if s.authRetried {
		s.log.Error("upstream refused a freshly fetched token; closing the connection", "error", msg, "remedy", remedyFor(msg))
		s.close(fmt.Errorf("re-AUTH refused: %s", msg))
		return
	}
	s.authRetried = true
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
		if h.Type != '-' && e.arg != 0 {
			s.proto = int(e.arg)
			s.updateSubscribed()
		}
	case actMonitor:
		s.monitor = s.monitor || h.Type == '+'
	case actReset:
		if h.Type == '+' {
			s.proto, s.monitor = 2, false
			s.subsMu.Lock()
			s.subs = [3]map[string]struct{}{}
			s.subsMu.Unlock()
			s.updateSubscribed()
		}
	}
}

// frameDone finishes the frame just passed: local replies, latency.
func (s *session) frameDone() {
	if !s.curReply {
		return
	}
	e := s.cur
	switch e.act {
	case actReplace:
		s.outv = append(s.outv, []byte(e.text))
	case actFail:
		s.outv = append(s.outv, resp.AppendError(nil, e.text))
		s.quitting = true
	case actExecNull:
		if s.proto == 3 {
			s.outv = append(s.outv, []byte("_\r\n"))
		} else {
			s.outv = append(s.outv, []byte("*-1\r\n"))
		}
	}
	if e.act != actAuth && e.act != actDrop && e.act != actFail {
		s.srv.obs.CommandDone(commandName(e.cmd), time.Duration(s.srv.now()-e.start))
	}
	s.cur = entry{}
}

// isConfirm reports whether kind is the confirmation of a (un)subscribe command of family f.
func isConfirm(kind []byte, f family) bool {
	return equalFold(kind, confirmKinds[f][0]) || equalFold(kind, confirmKinds[f][1])
}

func oneOf(b []byte, words []string) bool {
	for _, w := range words {
		if equalFold(b, w) {
			return true
		}
	}
	return false
}
