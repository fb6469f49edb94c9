package proxy

import (
	"bytes"
	"sync"
	"sync/atomic"
)

// The small trackers below each own one concern of a connection's state. The client loop owns
// transaction, replyMode and holdBack (they follow the commands it sends); the reply loop owns
// subscriptions (they follow the server's confirmations).

// txState is where a client's MULTI stands.
type txState uint8

const (
	txNone    txState = iota // no MULTI open
	txOpen                   // MULTI sent; commands are queued until EXEC or DISCARD
	txAborted                // a rescue discarded the open MULTI: the proxy answers until EXEC/DISCARD
	// txWatchLost: keys were WATCHed on an upstream that closed (reconnect.go), so the next transaction
	// can't have the guarantee: the proxy answers its MULTI and it is aborted (EXEC answers null).
	txWatchLost
)

// maxTxBytes bounds the queued commands kept for a replay; a larger transaction is aborted instead.
const maxTxBytes = 1 << 20

// transaction tracks MULTI: whether an AUTH may be injected (not while queued), and what a rescue at the
// token deadline must replay, byte for byte.
type transaction struct {
	state    txState
	queued   []byte // every byte of the commands queued since MULTI, in order
	count    int    // how many commands queued holds
	overflow bool   // queued exceeded maxTxBytes: a rescue must abort, not replay
	nullExec bool   // txAborted with WATCH active: EXEC answers null (else EXECABORT)
	gen      uint32 // numbers the MULTIs that opened a transaction, to match the server's answers to them
	answered bool   // the server accepted this MULTI (until then it might refuse it: NOPERM, subscribed mode)
	// settings are the queued commands that change what a handover carries (SELECT, CLIENT SETNAME, HELLO):
	// EXEC's reply says, element by element, which of them ran.
	settings []setting
	topos    []txTopo // the queued topology commands, whose elements of EXEC's reply are rewritten (Cluster)
}

// open reports whether a MULTI is open upstream, so that an AUTH would be queued.
func (t *transaction) open() bool { return t.state == txOpen }

// multi records a MULTI sent (a nested one is an error that changes nothing).
func (t *transaction) multi() {
	if t.state == txNone {
		t.state, t.queued, t.count, t.overflow, t.settings, t.topos = txOpen, t.queued[:0], 0, false, nil, nil
		t.gen, t.answered = t.gen+1, false
	}
}

// answer records the server's answer to MULTI number gen: a refusal means no transaction was opened, and
// the commands sent since ran as they came.
func (t *transaction) answer(gen uint32, accepted bool) {
	if t.state != txOpen || t.answered || gen != t.gen {
		return
	}
	if accepted {
		t.answered = true
		return
	}
	t.end()
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
	t.state, t.count, t.overflow, t.nullExec, t.settings, t.topos = txNone, 0, false, false, nil, nil
	if cap(t.queued) > 64<<10 {
		t.queued = nil // a large transaction's buffer is not kept by an idle connection
	}
	t.queued = t.queued[:0]
}

// canReplay reports whether a rescue can rebuild the open transaction exactly on a re-authenticated
// connection: not with keys watched (the guarantee can't be moved), not when the queued bytes were not all
// kept.
func (t *transaction) canReplay(watching bool) bool { return !watching && !t.overflow }

// loseWatch records that the watched keys were lost with the upstream, outside MULTI.
func (t *transaction) loseWatch() { t.state = txWatchLost }

// abort records that a rescue discarded the open transaction upstream; with keys watched, its EXEC answers
// as if one had changed.
func (t *transaction) abort(watching bool) {
	t.state, t.nullExec = txAborted, watching
	t.queued, t.count, t.settings, t.topos = nil, 0, nil, nil
}

// watchEffect is what a command's reply may do to the connection's watched keys.
type watchEffect uint8

const (
	watchNone watchEffect = iota
	watchAdds             // WATCH: +OK means keys are watched
	watchEnds             // UNWATCH, DISCARD: +OK ends the watches (+QUEUED, or an error, does not)
	watchExec             // EXEC: the transaction's answer ends them, even EXECABORT; other errors do not
)

// watches follows WATCH as the server's replies show it: whether a rescue of an open transaction would
// lose a guarantee. The reply loop writes; the client loop reads at a safe point.
type watches struct{ on atomic.Bool }

// reply applies a reply of type typ (line: its text, for + and -) to a command with effect eff.
func (w *watches) reply(eff watchEffect, typ byte, line []byte) {
	switch eff {
	case watchAdds:
		if typ == '+' {
			w.on.Store(true)
		}
	case watchEnds:
		if typ == '+' && string(line) == "OK" {
			w.on.Store(false)
		}
	case watchExec:
		if typ != '-' || bytes.HasPrefix(line, []byte("EXECABORT")) {
			w.on.Store(false)
		}
	}
}

// queueSetting records that the command being queued (the next one queue counts) changes set.
func (t *transaction) queueSetting(set setting) {
	if t.state == txOpen {
		set.at = t.count
		t.settings = append(t.settings, set)
	}
}

// queueTopo records that the command being queued (the next one queue counts) is a topology command.
func (t *transaction) queueTopo(kind topoKind) {
	t.topos = append(t.topos, txTopo{at: t.count, kind: kind})
}

// txTopo is a topology command queued in MULTI: its element of EXEC's reply names cluster nodes.
type txTopo struct {
	at   int // its place in the transaction
	kind topoKind
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

// holding reports whether later commands must wait: until the command is answered, and a leased one until
// the client loop took its outcome (it may be sent again).
func (h *holdBack) holding() bool {
	return h.cmd != nil && (h.cmd.leased || !h.cmd.answered.Load())
}

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

// setting is what one command changes in the state a handover carries (see carried), if the server
// accepts it.
type setting struct {
	at    int    // queued in MULTI: the command's place in the transaction, so its element of EXEC's reply
	db    int    // SELECT: the database; -1 when unchanged
	name  string // CLIENT SETNAME, HELLO SETNAME: the name, when named
	named bool
	proto int // HELLO queued in MULTI: the protocol; 0 when unchanged
	ro    roEffect
	// CLIENT TRACKING: the command as sent (RESP), "" for OFF; tracked marks the setting as present.
	track   string
	tracked bool
}

// roEffect is what READONLY or READWRITE does to a connection's reads from a cluster replica.
type roEffect uint8

const (
	roSame roEffect = iota
	roOn            // READONLY
	roOff           // READWRITE
)

var noSetting = setting{db: -1}

// carried is what a new upstream connection must be given to take a session over (a handover, a
// reconnect), as the server's replies set it. The reply loop writes; a handover or a reconnect reads.
type carried struct {
	mu sync.Mutex
	st connSettings
}

// connSettings are the settings of a connection that carried follows.
type connSettings struct {
	db       int
	name     string
	readonly bool
	tracking string // the CLIENT TRACKING command that turned tracking on, as sent; "" when off
}

// apply records a setting the server accepted.
func (c *carried) apply(set setting) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if set.db >= 0 {
		c.st.db = set.db
	}
	if set.named {
		c.st.name = set.name
	}
	if set.ro != roSame {
		c.st.readonly = set.ro == roOn
	}
	if set.tracked {
		c.st.tracking = set.track
	}
}

// reset records RESET: database 0, no name, READWRITE, tracking off.
func (c *carried) reset() {
	c.mu.Lock()
	c.st = connSettings{}
	c.mu.Unlock()
}

// snapshot returns the settings.
func (c *carried) snapshot() connSettings {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.st
}
