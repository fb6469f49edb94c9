package proxy

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"github.com/entra-redis-proxy/entra-redis-proxy/resp"
)

// Pokes other goroutines hand to a session's client loop, which owns the upstream's write side.
const (
	pokeReauth   uint32 = 1 << iota // a newer token should be sent
	pokePing                        // the upstream has been idle: keep it alive
	pokeDeadline                    // the old token nears expiry: rescue a blocked or MULTI connection
	pokeResume                      // a blocking command was answered: send what waited behind it
	pokeDrain                       // the server shuts down: close at the next safe point
	pokeRelink                      // the upstream closed with nothing owed: reconnect (reconnect.go)
	pokeMove                        // a maintenance was announced: move to a new upstream (maintenance.go)
)

const (
	maxInlineBuf = 128 << 10       // an inline command (at most 64 KiB in redis) must be buffered whole
	headSlack    = 64 << 10        // a reply's head beyond its longest bulk (a pub/sub channel name): types, lengths, count
	drainQuiet   = 5 * time.Second // a client that closed its side waits this long for a reply to progress
)

// pokeTime is a read deadline in the past: it wakes a blocked Read at once.
var pokeTime = time.Unix(1, 0)

// session is one client connection and its own upstream connection.
//
//	client --commands--> [client loop] --commands, AUTH, PING--> upstream
//	client <--replies--- [reply loop]  <--replies, pushes------- upstream
//	                          \-- ledger: one entry per reply owed, oldest first --/
//
// The client loop reads commands and is the only writer to the upstream; the reply loop reads the upstream
// and is the only writer to the client. The ledger between them knows, for every reply, whose it is and when
// it has reached the client, and so when the connection is at a safe point. Other goroutines (rotation, idle
// pings, shutdown) hand work to the client loop through pokes; it acts at the next point where redis
// answers an injected command in order with one reply the proxy can consume.
type session struct {
	id     uint64
	srv    *Server
	log    *slog.Logger // carries the connection id
	client net.Conn
	opened time.Time
	led    *ledger
	subs   subscriptions // written by the reply loop, read by a handover
	carry  carried       // likewise
	watch  watches       // written by the reply loop, read by a rescue at a safe point

	pokes    atomic.Uint32
	wake     chan struct{} // a poke, for a client loop waiting without reading (holding back commands)
	done     chan struct{} // closed by close
	lastSent atomic.Int64  // when the client loop last wrote upstream (server clock)
	upID     atomic.Int64  // the current upstream's CLIENT ID (0 when unknown), for logs
	resp2Sub atomic.Bool   // RESP2 subscribed mode, where redis refuses AUTH (set by the reply loop)
	multiAns atomic.Uint64 // the server's last answer to a MULTI: its number << 1 | accepted
	resetRan atomic.Bool   // the server's last answer to a RESET was +RESET
	bytesIn  atomic.Int64
	bytesOut atomic.Int64

	forceAuth atomic.Bool             // send the token even if it was sent before (the retry after WRONGPASS)
	cut       atomic.Pointer[cutover] // a pub/sub handover in progress
	relink    chan relinked           // a reconnect's new upstream, from the client loop to the reply loop
	moving    atomic.Bool             // a maintenance move: the reply loop leaves the old upstream between frames
	recycling atomic.Bool             // the upstream goes back to the pool: the reply loop must not close it
	// clientFault: the client broke the protocol inside a streamed command; the server answers it and
	// closes, and the client loop (not the reply loop) then closes the client, with a FIN.
	clientFault atomic.Bool

	cl clientSide // owned by the client loop
	rl replySide  // owned by the reply loop

	connMu    sync.Mutex
	conns     []net.Conn  // upstream connections to close with the session
	retry     *time.Timer // a rescue's retry, pending (see retryLater)
	retryBits uint32      // the pokes it will make
	closed    bool
	closeOnce sync.Once
	closeErr  error // the first cause of the close
}

// clientSide is the client loop's state: what the commands it sent did to the connection.
type clientSide struct {
	up      net.Conn   // the upstream it writes to; replaced by a handover, a reconnect or a move
	upSince int64      // when up was dialed (server clock): a move asked for since is still due
	upAddr  string     // the endpoint up reached ("": the configured address): CLIENT UNBLOCK goes there
	secret  string     // the token last sent on up
	writeBy time.Time  // up's write deadline in force
	dirty   bool       // the client changed the connection state (see dirties): not for the pool
	authed  bool       // the client gave LOCAL_PASSWORD, or none is set
	in      readBuf    // the client's input
	quit    bool       // the client sent QUIT: nothing after it is read
	subSent bool       // a command that may change RESP2 subscribed mode was sent since it was last known
	drain   drainState // the server shuts down: close at the next safe point
	tx      transaction
	mode    replyMode
	hold    holdBack
	stream  stream
	want    struct{ auth, ping, deadline, move bool } // work due at the next safe point
	out     []byte                                    // commands to write upstream
	entries []entry                                   // their expected replies, pushed before the write
	parser  resp.CommandParser

	proof        sentProof
	replyUnknown bool // a CLIENT REPLY was queued in MULTI: the mode is not followed (until RESET)
	// batchDirty: a command in the batch not yet flushed changed the state above, or ran inside MULTI or
	// under CLIENT REPLY OFF/SKIP: a reconnect would restore a state that includes what was never sent.
	batchDirty bool
}

// sentProof says whether every command sent is known to have reached the server: a reply to it, or to a
// later command, came. A lost upstream can be replaced silently only then.
type sentProof uint8

const (
	proofShown   sentProof = iota // every command sent has a reply asked for, at or after it
	proofBlind                    // a command was sent whose reply CLIENT REPLY suppressed, and none asked for since
	proofPending                  // ... then one was asked for, in the batch not yet flushed
)

// stream is a command too large to buffer, forwarded as it arrives.
type stream struct {
	active  bool
	discard bool // answered by the proxy, not forwarded
	scan    resp.Scanner
}

// replySide is the reply loop's state: the connection as the server's replies show it.
type replySide struct {
	proto       int
	monitor     bool
	frame       frame
	writeBy     time.Time // the client's write deadline in force
	outv        [][]byte  // what to write to the client after this read
	wbuf        net.Buffers
	done        doneRun // the commands answered in this read, for latency
	closing     error   // set when the connection must end once this read's output is written
	authRetried bool    // a refused token was already retried with a fresh one
	marker      markerState
}

// doneRun is a run of answered commands of one name that were read together: reported to the Observer as
// one, after their replies are written.
type doneRun struct {
	cmd   uint8
	start int64
	n     int
}

// frame is what the reply loop decided, from its head, about the frame it is passing.
type frame struct {
	e     entry
	fwd   bool // its bytes go to the client
	reply bool // it answers the ledger's oldest entry (not a push, message or monitor line)
	last  bool // ... and is the last frame of that answer: settle the entry when it ends
	// A transaction's reply (actExec) is scanned element by element, to see which settings took:
	headLen int   // its header line, still to pass
	elems   int64 // its elements still to end
	at      int   // the element being passed
	// replaced: the element being passed went to the client rewritten (clusterElement): its own bytes are
	// framed, not passed.
	replaced bool
}

// addConn registers an upstream connection to be closed with the session; false if it is closed already.
func (s *session) addConn(c net.Conn) bool {
	s.connMu.Lock()
	defer s.connMu.Unlock()
	if s.closed {
		return false
	}
	s.conns = append(s.conns, c)
	return true
}

func (s *session) dropConn(c net.Conn) {
	s.connMu.Lock()
	defer s.connMu.Unlock()
	for i, x := range s.conns {
		if x == c {
			s.conns = append(s.conns[:i], s.conns[i+1:]...)
			return
		}
	}
}

// run serves the client until either side closes. It owns the session's goroutines and waits for them.
func (s *session) run(ctx context.Context) {
	s.log.Log(ctx, s.srv.opts.ConnLogLevel, "client connected", "client", s.client.RemoteAddr().String())

	// With LOCAL_PASSWORD, no upstream is opened for a client before it has given it.
	if s.srv.opts.LocalPassword != "" {
		if err := s.preAuth(); err != nil {
			s.close(err)
			s.finish()
			return
		}
	}
	if err := s.connect(ctx); err != nil {
		s.refuse(err)
		s.finish()
		return
	}
	if !s.srv.track(s) {
		s.close(errors.New("proxy shutting down"))
		s.finish()
		return
	}
	defer s.srv.untrack(s)
	s.serve()
}

// serve runs the two loops on the connected upstream until the session ends, then pools the upstream if
// the client left it clean.
func (s *session) serve() {
	var wg sync.WaitGroup
	var rerr error
	wg.Add(1)
	go func() {
		defer wg.Done()
		up, buf := s.cl.up, &readBuf{}
		for {
			rerr = s.replyLoop(up, buf)
			var lost *upstreamLost
			if !errors.As(rerr, &lost) {
				break
			}
			if up, buf, rerr = s.awaitRelink(lost); up == nil {
				break
			}
		}
		switch {
		case errors.Is(rerr, errRecycled):
		case s.clientFault.Load():
			s.led.close() // the client loop closes the client, after the server's answer to its fault
		default:
			s.close(rerr)
		}
	}()
	cerr := s.clientLoop()
	if !s.recyclable(cerr) {
		s.close(cerr)
		wg.Wait()
		s.finish()
		return
	}
	// The client left its upstream clean and at a safe point: stop the reply loop between frames without
	// closing the upstream, and pool it. The reply loop says whether it stopped with nothing half-read.
	up := s.cl.up
	s.dropConn(up)
	s.recycling.Store(true)
	s.close(cerr)
	up.SetReadDeadline(pokeTime)
	wg.Wait()
	up.SetReadDeadline(time.Time{})
	if errors.Is(rerr, errRecycled) {
		s.srv.pool.put(&pooled{conn: up, id: s.upID.Load(), secret: s.cl.secret, opened: s.cl.upSince, addr: s.cl.upAddr})
	} else {
		up.Close()
		s.srv.obs.UpstreamClosed()
	}
	s.finish()
}

// newSession returns a session for the client connection c, ready to be poked before it runs.
func newSession(srv *Server, c net.Conn, id uint64) *session {
	s := &session{id: id, srv: srv, client: c, opened: time.Now(), log: srv.log.With("conn", id)}
	s.init()
	return s
}

func (s *session) init() {
	s.led = newLedger()
	s.wake, s.done = make(chan struct{}, 1), make(chan struct{})
	s.relink = make(chan relinked)
	s.rl.proto = 2
}

// recyclable reports whether the client left its upstream in the state a pooled connection has.
func (s *session) recyclable(cerr error) bool {
	return s.srv.pool != nil && errors.Is(cerr, errClientQuit) && !s.cl.dirty && !s.cl.stream.active &&
		s.led.idle() && !s.resp2Sub.Load() && s.cut.Load() == nil
}

// stopping reports whether the reply loop is asked to leave its upstream between frames (for the pool
// or a maintenance move): a deadline it sets must not undo that stop.
func (s *session) stopping() bool { return s.recycling.Load() || s.moving.Load() }

// finish logs the connection's end and releases what it held.
func (s *session) finish() {
	s.cl.in.release()
	cause := "client closed"
	if s.closeErr != nil && !errors.Is(s.closeErr, io.EOF) && !errors.Is(s.closeErr, errClientQuit) {
		cause = s.closeErr.Error()
	}
	s.log.Log(context.Background(), s.srv.opts.ConnLogLevel, "client disconnected", "upstream_client_id", s.upID.Load(),
		"duration", time.Since(s.opened).Round(time.Millisecond).String(),
		"bytes_in", s.bytesIn.Load(), "bytes_out", s.bytesOut.Load(), "cause", cause)
}

var (
	errClientQuit   = errors.New("client closed the connection")
	errUpstreamGone = errors.New("upstream closed the connection")
	errRecycled     = errors.New("upstream stopped between replies for the pool")
	errDrained      = errors.New("proxy shutting down: closed at a safe point")
)

// close closes both connections once, keeping the first cause; both loops then return.
func (s *session) close(cause error) {
	s.closeOnce.Do(func() {
		s.closeErr = cause
		close(s.done)
		s.led.close()
		s.client.Close()
		s.connMu.Lock()
		s.closed = true
		conns := s.conns
		if s.retry != nil {
			s.retry.Stop()
		}
		s.connMu.Unlock()
		for _, c := range conns {
			c.Close()
			s.srv.obs.UpstreamClosed()
		}
	})
}

// poke hands work to the client loop: it wakes up from its Read, sees the bits and acts at a safe point.
func (s *session) poke(bits uint32) {
	s.pokes.Or(bits)
	select {
	case s.wake <- struct{}{}:
	default:
	}
	s.led.nudge()
	s.client.SetReadDeadline(pokeTime)
}

// connect takes a pooled upstream or dials and authenticates a new one. Without a valid token it fails at
// once: a pooled upstream is on the expired token too.
func (s *session) connect(ctx context.Context) error {
	if o := s.srv.outage(); o != nil {
		return o
	}
	ctx, cancel := context.WithTimeout(ctx, s.srv.opts.DialTimeout)
	defer cancel()
	var c *pooled
	if s.srv.pool != nil {
		c = s.srv.pool.get()
	}
	pooled := c != nil
	if pooled {
		s.srv.obs.Mechanism("pool_reuse")
	} else {
		var err error
		if c, err = s.srv.dialUpstream(ctx); err != nil {
			return err
		}
	}
	if !s.addConn(c.conn) {
		c.conn.Close()
		s.srv.obs.UpstreamClosed()
		return errors.New("proxy shutting down")
	}
	s.cl.up, s.cl.secret, s.cl.upSince, s.cl.upAddr = c.conn, c.secret, c.opened, c.addr
	s.upID.Store(c.id)
	s.lastSent.Store(s.srv.now())
	s.log.Debug("upstream ready", "upstream_client_id", c.id, "pooled", pooled)
	if tok, _ := s.srv.opts.Tokens.Current(); tok.Secret != c.secret {
		s.poke(pokeReauth) // authenticated before the last rotation: catch up at once
	}
	return nil
}

// refuse tells a client whose upstream could not be set up why, as the reply to its first command.
func (s *session) refuse(err error) {
	if o := (*tokenOutage)(nil); errors.As(err, &o) {
		s.srv.obs.ClientRejected("no_token")
		s.srv.noToken.add("", append(o.attrs(), "client", s.client.RemoteAddr().String())...)
		err = fmt.Errorf("%w; %s", err, outageRemedy)
	} else if s.nodeDown(err) {
		return
	} else {
		s.log.Error("cannot serve client", "err", err, "remedy", Remedy(err))
	}
	s.client.SetDeadline(time.Now().Add(5 * time.Second))
	if in := &s.cl.in; in.r == in.w {
		var b [512]byte
		s.client.Read(b[:]) // the client's first command, so the error is its reply rather than a reset
	}
	s.client.Write(resp.AppendError(nil, clientMessage(err)))
	s.close(err)
}

// isDeadline reports whether a read error is a deadline (a poke, or a stall guard) rather than a failure.
func isDeadline(err error) bool { return errors.Is(err, os.ErrDeadlineExceeded) }
