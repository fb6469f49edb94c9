package proxy

import "sync"

// The small trackers below each own one concern of a connection's state. The client loop owns
// transaction, replyMode and holdBack (they follow the commands it sends); the reply loop owns
// subscriptions (they follow the server's confirmations).

// txState is where a client's MULTI stands.
type txState uint8

const (
	txNone    txState = iota // no MULTI open
	txOpen                   // MULTI sent; commands are queued until EXEC or DISCARD
	txAborted                // a rescue discarded the open MULTI: the proxy answers until EXEC/DISCARD
)

// maxTxBytes bounds the queued commands kept for a replay; a larger transaction is aborted instead.
const maxTxBytes = 1 << 20

// transaction tracks MULTI and WATCH: whether an AUTH may be injected (not while queued), and what a rescue
// at the token deadline must replay, byte for byte.
type transaction struct {
	state    txState
	watching bool   // WATCH sent and not ended by EXEC, DISCARD, UNWATCH or RESET
	queued   []byte // every byte of the commands queued since MULTI, in order
	count    int    // how many commands queued holds
	overflow bool   // queued exceeded maxTxBytes: a rescue must abort, not replay
	nullExec bool   // txAborted with WATCH active: EXEC answers null (else EXECABORT)
	// helloQueued: a HELLO is queued, so EXEC may change the protocol.
	helloQueued bool
}

// open reports whether a MULTI is open upstream, so that an AUTH would be queued.
func (t *transaction) open() bool { return t.state == txOpen }

// multi records a MULTI sent (a nested one is an error that changes nothing).
func (t *transaction) multi() {
	if t.state == txNone {
		t.state, t.queued, t.count, t.overflow = txOpen, t.queued[:0], 0, false
	}
}

// queue records a command sent inside MULTI. part is the whole command, or a piece of a streamed one; first
// marks the command's first piece.
func (t *transaction) queue(part []byte, first bool) {
	if t.state != txOpen || t.overflow {
		return
	}
	if len(t.queued)+len(part) > maxTxBytes {
		t.overflow, t.queued = true, nil
		return
	}
	t.queued = append(t.queued, part...)
	if first {
		t.count++
	}
}

// end records EXEC or DISCARD: the transaction and its watches end.
func (t *transaction) end() {
	t.state, t.watching, t.count, t.overflow, t.nullExec, t.helloQueued = txNone, false, 0, false, false, false
	if cap(t.queued) > 64<<10 {
		t.queued = nil // a large transaction's buffer is not kept by an idle connection
	}
	t.queued = t.queued[:0]
}

// watch records WATCH (outside MULTI; inside it is an error) and unwatch UNWATCH (which inside MULTI is
// queued and runs at EXEC, where the watches end anyway).
func (t *transaction) watch()   { t.watching = t.watching || t.state == txNone }
func (t *transaction) unwatch() { t.watching = t.watching && t.state != txNone }

// canReplay reports whether a rescue can rebuild the open transaction exactly on a re-authenticated
// connection: not with WATCH (the guarantee can't be moved), not when the queued bytes were not all kept.
func (t *transaction) canReplay() bool { return !t.watching && !t.overflow }

// abort records that a rescue discarded the open transaction upstream.
func (t *transaction) abort() {
	t.state, t.nullExec = txAborted, t.watching
	t.watching, t.queued, t.count = false, nil, 0
}

// replyMode is the client's CLIENT REPLY setting, as far as the commands sent so far set it.
type replyMode uint8

const (
	replyOn   replyMode = iota
	replyOff            // no command gets a reply
	replySkip           // the next command gets no reply
)

// takes reports whether the next command's reply will come, and consumes a SKIP.
func (m *replyMode) takes() bool {
	switch *m {
	case replyOff:
		return false
	case replySkip:
		*m = replyOn
		return false
	}
	return true
}

// holdBack is a blocking command in flight (BLPOP, XREAD BLOCK, WAIT...). Redis runs nothing behind a
// blocked command until it returns, so the client loop sends nothing behind it either: the commands wait in
// its read buffer. That keeps the unblock-and-reissue rescue possible and the order exact.
type holdBack struct{ cmd *blocked }

// holding reports whether later commands must wait.
func (h *holdBack) holding() bool { return h.cmd != nil && !h.cmd.answered.Load() }

// subscriptions are what the connection is subscribed to, per family, as the server confirmed. The reply
// loop writes; a handover reads a snapshot.
type subscriptions struct {
	mu   sync.Mutex
	sets [3]map[string]struct{}
	n    int // total over the families
}

// confirm applies one (un)subscribe confirmation of family f for name (nil: an UNSUBSCRIBE with nothing
// subscribed) and returns the total count.
func (s *subscriptions) confirm(f family, subscribe bool, name []byte) int {
	s.mu.Lock()
	defer s.mu.Unlock()
	if name != nil {
		set := s.sets[f]
		if subscribe {
			if set == nil {
				set = make(map[string]struct{})
				s.sets[f] = set
			}
			set[string(name)] = struct{}{}
		} else {
			delete(set, string(name))
		}
	}
	s.n = len(s.sets[famChannel]) + len(s.sets[famPattern]) + len(s.sets[famShard])
	return s.n
}

// count returns how many subscriptions family f has.
func (s *subscriptions) count(f family) int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.sets[f])
}

// total returns how many subscriptions there are over all families.
func (s *subscriptions) total() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.n
}

// reset forgets every subscription (RESET).
func (s *subscriptions) reset() {
	s.mu.Lock()
	s.sets, s.n = [3]map[string]struct{}{}, 0
	s.mu.Unlock()
}

// snapshot copies the subscriptions, per family.
func (s *subscriptions) snapshot() [3][]string {
	s.mu.Lock()
	defer s.mu.Unlock()
	var out [3][]string
	for f, set := range s.sets {
		for name := range set {
			out[f] = append(out[f], name)
		}
	}
	return out
}

// isConfirm reports whether kind is the confirmation of a (un)subscribe command of family f, and which.
func isConfirm(kind []byte, f family) (ok, subscribe bool) {
	switch {
	case equalFold(kind, confirmKinds[f][0]):
		return true, true
	case equalFold(kind, confirmKinds[f][1]):
		return true, false
	}
	return false, false
}
