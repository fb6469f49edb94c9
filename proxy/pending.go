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
	actDrop                    // our PING: consume the reply
	actReplace                 // the client's AUTH, sent as a PING: consume the reply, answer +OK
	actFail                    // a protocol error, sent as a PING: consume the reply, send the error, close
	actHello                   // pass the reply; on success the protocol becomes entry.arg
	actSubscribe               // pass arg confirmations of family fam (arg < 0: one per current subscription)
	actMonitor                 // pass the reply; on +OK the connection streams monitor lines
	actReset                   // pass the reply; on +RESET the connection state is back to defaults
	actMarker                  // the handover marker's (un)subscription: consume the confirmation
	actExecNull                // EXEC of an aborted transaction, sent as a PING: answer null
)

// entry is one expected reply (or group of pub/sub confirmations), queued before its command is written.
type entry struct {
	act   action
	fam   family   // pub/sub family, for actSubscribe
	cmd   uint8    // index into CommandNames, or cmdOther
	arg   int32    // actHello: protocol; actSubscribe: confirmations expected
	start int64    // when the command was read, for latency: nanoseconds since the server's epoch
	text  string   // actAuth: the token sent; actFail: the error line sent to the client
	blk   *blocked // a blocking command, for a re-issue after an unblock
}

// pending is the FIFO of expected replies between a session's client loop (which pushes, before writing the
// commands upstream) and its reply loop (which pops, as replies arrive). Its length bounds a client's pipeline:
// push blocks while it is full, which stops reading from the client.
type pending struct {
	mu      sync.Mutex
	notFull sync.Cond
	empty   sync.Cond
	q       []entry // ring buffer; grows by doubling up to maxPending
	head    int     // index of the oldest entry
	n       int     // number of entries
	unsent  int     // entries popped whose replies are not yet written to the client
	closed  bool    // set by close; push and wait return at once
}

// maxPending bounds the commands in flight on one connection (redis itself has no such bound, but it is far
// above what any client pipelines in practice and keeps a runaway client's memory bounded).
const maxPending = 1 << 16

func (p *pending) init() {
	p.notFull.L = &p.mu
	p.empty.L = &p.mu
}

// push appends es, blocking while the queue is full. It returns false once the queue is closed.
func (p *pending) push(es []entry) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	for _, e := range es {
		for p.n == maxPending && !p.closed {
			p.notFull.Wait()
		}
		if p.closed {
			return false
		}
		if p.n == len(p.q) {
			p.grow()
		}
		p.q[(p.head+p.n)%len(p.q)] = e
		p.n++
	}
	return !p.closed
}

func (p *pending) grow() {
	size := 2 * len(p.q)
	if size == 0 {
		size = 16
	}
	q := make([]entry, size)
	for i := range p.n {
		q[i] = p.q[(p.head+i)%len(p.q)]
	}
	p.q, p.head = q, 0
}

// front returns the oldest entry without removing it.
func (p *pending) front() (entry, bool) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.n == 0 {
		return entry{}, false
	}
	return p.q[p.head], true
}

// setFrontArg updates the oldest entry's arg (the confirmations still expected of a pub/sub command).
func (p *pending) setFrontArg(arg int32) {
	p.mu.Lock()
	if p.n > 0 {
		p.q[p.head].arg = arg
	}
	p.mu.Unlock()
}

// pop removes the oldest entry.
func (p *pending) pop() {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.n == 0 {
		return
	}
	p.q[p.head] = entry{}
	p.head = (p.head + 1) % len(p.q)
	p.n--
	p.unsent++
	if p.n == maxPending-1 {
		p.notFull.Broadcast()
	}
	if p.n == 0 && len(p.q) > 64 {
		p.q, p.head = nil, 0 // an idle connection keeps no large ring
	}
}

// written records that the replies popped so far have been written to the client.
func (p *pending) written() {
	p.mu.Lock()
	p.unsent = 0
	if p.n == 0 {
		p.empty.Broadcast()
	}
	p.mu.Unlock()
}

// len returns the number of replies still expected.
func (p *pending) len() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.n
}

// waitEmpty waits until every expected reply has been written to the client, the queue is closed, or d has
// passed; it reports whether no reply is expected.
func (p *pending) waitEmpty(d time.Duration) bool {
	t := time.AfterFunc(d, func() {
		p.mu.Lock()
		p.empty.Broadcast()
		p.mu.Unlock()
	})
	defer t.Stop()
	deadline := time.Now().Add(d)
	p.mu.Lock()
	defer p.mu.Unlock()
	for (p.n > 0 || p.unsent > 0) && !p.closed && time.Now().Before(deadline) {
		p.empty.Wait()
	}
	return p.n == 0
}

// close wakes every waiter; later pushes fail.
func (p *pending) close() {
	p.mu.Lock()
	p.closed = true
	p.notFull.Broadcast()
	p.empty.Broadcast()
	p.mu.Unlock()
}
