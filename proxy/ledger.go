package proxy

import (
	"sync"
	"time"
)

// action says what the reply loop does with the reply (or replies) to one command sent upstream.
type action uint8

const (
	actForward   action = iota // pass the reply to the client
	actAuth                    // our AUTH: consume the reply, record whether the token took
	actDrop                    // our PING, or a replayed command: consume the reply
	actReplace                 // a command the proxy answers, sent as a PING: consume the reply, send text
	actFail                    // a protocol error, sent as a PING: consume the reply, send the error, close
	actHello                   // pass the reply; on success the protocol becomes entry.arg
	actSubscribe               // pass arg confirmations of family fam (arg < 0: one per current subscription)
	actMonitor                 // pass the reply; on +OK the connection streams monitor lines
	actReset                   // pass the reply; on +RESET the connection state is back to defaults
	actMarker                  // the handover marker's (un)subscription: consume the confirmation
	actExecNull                // EXEC of a transaction a rescue aborted, sent as a PING: answer null
	actQuit                    // the client's QUIT, sent as a PING: answer +OK, then end the session
	actExec                    // EXEC of a transaction with settings queued, or with a Cluster: pass the reply, element by element (which settings ran, which addresses to rewrite)
	actMulti                   // MULTI number arg: pass the reply, and tell the client loop whether it was accepted
	actProbe                   // a hidden probe for the fact arg (see facts.go): consume the reply, learn from it
)

// resetHideRefusal (actReset's arg): the client had replies off, so it sees RESET's reply only if it ran.
const resetHideRefusal = 1

// entry is one expected reply (or group of pub/sub confirmations), queued before its command is written.
type entry struct {
	act   action
	fam   family   // pub/sub family, for actSubscribe
	cmd   uint8    // index into CommandNames, or cmdOther
	topo  topoKind // with a Cluster: the reply names cluster nodes
	arg   int32    // actHello: protocol; actSubscribe: confirmations expected; actMulti: its number; actProbe: the probe; actReset: resetHideRefusal or 0
	start int64    // when the command was read, for latency: nanoseconds since the server's epoch
	text  string   // actReplace: the reply to send; actFail: the error line
	blk   *blocked // a blocking command, for a re-issue after an unblock
	quiet bool     // the reply is the proxy's to read (e.g. HELLO under CLIENT REPLY OFF): not passed on
	// optional: the reply may never come. A (P|S)SUBSCRIBE sent under CLIENT REPLY OFF or SKIP has its
	// confirmations pushed, but a refusal (NOPERM) is a reply, which is suppressed: a frame that is not
	// its confirmation settles it unanswered.
	optional bool
	watch    watchEffect
	// sets: what the command changes in the state a handover carries, applied if its reply is not an
	// error; for actExec, the transaction's settings, each applied by its element of the reply.
	sets []setting
	// topos: for actExec with a Cluster, the transaction's topology commands, whose elements are rewritten.
	topos []txTopo
}

// linkState is where a session's upstream connection stands.
type linkState uint8

const (
	linkUp           linkState = iota // the reply loop reads it, the client loop writes it
	linkReconnecting                  // it closed at a safe point: the client loop dials a new one (reconnect.go)
)

// ledger is what a session's upstream still owes: one entry per command written, oldest first. The client
// loop adds entries before it writes their commands; the reply loop settles the oldest when the last byte
// of its reply has been framed, and records when what it framed has been written to the client.
//
// It answers the question every move of a connection depends on, "at a safe point?" (idle): no reply is
// expected, none is half-passed, and every reply asked for has reached the client. The pool, the drain of a
// half-closed client, shutdown, handovers and rescues all use it.
type ledger struct {
	mu      sync.Mutex
	changed sync.Cond // broadcast on settle, delivery, space and close
	q       []entry   // ring buffer; grows by doubling up to maxPending, kept while batches use it (see settle)
	head    int       // index of the oldest entry
	n       int       // entries not settled
	peak    int       // the most entries outstanding since the ring was last empty
	unsent  int       // entries settled whose replies are not yet written to the client
	sent    uint64    // deliveries so far: progress, for waits re-armed on progress
	maybe   int       // entries not settled that are optional (their reply may never come)
	closed  bool      // push and waits return at once
	nudged  bool      // the session was poked: waitIdleOrNudge returns so the client loop can act on it
	link    linkState // reconnecting: push fails until relinked (reconnect.go)
}

// optionalQuiet bounds a wait for a safe point while only optional entries are outstanding: an answer that
// never comes (a refusal under CLIENT REPLY OFF) shows only as silence.
const optionalQuiet = 2 * time.Second

// maxPending bounds the commands in flight on one connection (redis has no such bound, but this is far
// above what any client pipelines and keeps a runaway client's memory bounded): push blocks while it is
// full, which stops reading from the client.
const maxPending = 1 << 16

func newLedger() *ledger {
	l := &ledger{}
	l.changed.L = &l.mu
	return l
}

// push appends es, blocking while the ledger is full. It returns false, appending nothing, while the
// upstream is lost, and once the ledger is closed.
func (l *ledger) push(es []entry) bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.link == linkReconnecting {
		return false
	}
	for _, e := range es {
		for l.n == maxPending && !l.closed {
			l.changed.Wait()
		}
		if l.closed {
			return false
		}
		if l.n == len(l.q) {
			l.grow()
		}
		l.q[(l.head+l.n)%len(l.q)] = e
		l.n++
		l.peak = max(l.peak, l.n)
		if e.optional {
			l.maybe++
		}
	}
	return !l.closed
}

func (l *ledger) grow() {
	size := max(2*len(l.q), 4) // an idle connection after one command keeps a small ring
	q := make([]entry, size)
	for i := range l.n {
		q[i] = l.q[(l.head+i)%len(l.q)]
	}
	l.q, l.head = q, 0
}

// front returns the oldest unsettled entry.
func (l *ledger) front() (entry, bool) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.n == 0 {
		return entry{}, false
	}
	return l.q[l.head], true
}

// setFrontArg updates the oldest entry's arg (the confirmations a pub/sub command still expects).
func (l *ledger) setFrontArg(arg int32) {
	l.mu.Lock()
	if l.n > 0 {
		l.q[l.head].arg = arg
	}
	l.mu.Unlock()
}

// settle removes the oldest entry: its reply has been framed to its last byte.
func (l *ledger) settle() {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.n == 0 {
		return
	}
	l.popLocked()
	l.unsent++
	if l.n == maxPending-1 {
		l.changed.Broadcast()
	}
	if l.n == 0 {
		// Deep pipelines reuse the ring batch after batch; it is dropped once a batch uses under a quarter
		// of it, or at trim.
		if len(l.q) > minRing && 4*l.peak < len(l.q) {
			l.q, l.head = nil, 0
		}
		l.peak = 0
	}
}

// minRing is the ring size a connection may keep while idle.
const minRing = 64

// trim drops a large ring while nothing is outstanding: an idle connection keeps no large ring.
func (l *ledger) trim() {
	l.mu.Lock()
	if l.n == 0 && len(l.q) > minRing {
		l.q, l.head = nil, 0
	}
	l.mu.Unlock()
}

// delivered records that everything framed so far has been written to the client (or consumed).
func (l *ledger) delivered() {
	l.mu.Lock()
	if l.unsent > 0 {
		l.unsent = 0
		l.sent++
		l.changed.Broadcast()
	}
	l.mu.Unlock()
}

// len returns how many replies are still expected.
func (l *ledger) len() int {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.n
}

// idle reports a safe point: nothing expected, nothing settled but unsent. (A frame being passed is
// always an expected entry's, or a push, which the reply loop accounts for itself.)
func (l *ledger) idle() bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.n == 0 && l.unsent == 0
}

// waitIdle waits for a safe point, until the ledger is closed, or until no reply has been delivered for
// quiet (the wait is re-armed on every delivery), or optionalQuiet while only optional entries are
// outstanding. It reports whether the safe point was reached.
func (l *ledger) waitIdle(quiet time.Duration) bool {
	from := time.Now()
	idle, _ := l.wait(quiet, false, &from)
	return idle
}

// waitIdleOrNudge is waitIdle that also returns, with nudged, when the session is poked. *from is when the
// wait for optional entries began, or last made progress: a wait resumed after a nudge goes on from there.
func (l *ledger) waitIdleOrNudge(quiet time.Duration, from *time.Time) (idle, nudged bool) {
	return l.wait(quiet, true, from)
}

// nudge wakes a waitIdleOrNudge (the session was poked).
func (l *ledger) nudge() {
	l.mu.Lock()
	l.nudged = true
	l.changed.Broadcast()
	l.mu.Unlock()
}

func (l *ledger) wait(quiet time.Duration, byNudge bool, from *time.Time) (idle, nudged bool) {
	l.mu.Lock()
	defer l.mu.Unlock()
	for !l.closed && (l.n > 0 || l.unsent > 0) {
		if byNudge && l.nudged {
			l.nudged = false
			return false, true
		}
		seen := l.sent
		timedOut := false
		wait := quiet
		if l.n == l.maybe && l.unsent == 0 {
			wait = min(quiet, optionalQuiet-time.Since(*from))
		}
		t := time.AfterFunc(wait, func() {
			l.mu.Lock()
			timedOut = true
			l.changed.Broadcast()
			l.mu.Unlock()
		})
		for !l.closed && (l.n > 0 || l.unsent > 0) && l.sent == seen && !timedOut && !(byNudge && l.nudged) {
			l.changed.Wait()
		}
		t.Stop()
		if l.sent != seen {
			*from = time.Now() // progress re-arms the wait
		}
		if l.sent == seen && timedOut {
			break
		}
	}
	return l.n == 0 && l.unsent == 0, false
}

// markLost records that the upstream closed, if the ledger is at a safe point: then nothing was owed, and
// until relinked nothing can be added that a new upstream would not answer. It reports whether it did.
// Replies owed only to the proxy's own AUTHs do not count: their outcome does not matter, the new upstream
// is authenticated with the newest token. They are dropped.
func (l *ledger) markLost() bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.closed || l.unsent > 0 {
		return false
	}
	for i := range l.n {
		if l.q[(l.head+i)%len(l.q)].act != actAuth {
			return false
		}
	}
	for l.n > 0 {
		l.popLocked()
	}
	l.link = linkReconnecting
	return true
}

// popLocked removes the oldest entry.
func (l *ledger) popLocked() {
	if l.q[l.head].optional {
		l.maybe--
	}
	l.q[l.head] = entry{}
	l.head = (l.head + 1) % len(l.q)
	l.n--
}

// isLost reports whether markLost was called since the last relinked.
func (l *ledger) isLost() bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.link == linkReconnecting
}

// relinked records that a new upstream took the lost one's place.
func (l *ledger) relinked() {
	l.mu.Lock()
	l.link = linkUp
	l.mu.Unlock()
}

// close wakes every waiter; later pushes fail.
func (l *ledger) close() {
	l.mu.Lock()
	l.closed = true
	l.changed.Broadcast()
	l.mu.Unlock()
}
