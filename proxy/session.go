package proxy

import (
	"context"
	"crypto/subtle"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"strconv"
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
)

const (
	maxInlineBuf = 128 << 10       // an inline command (at most 64 KiB in redis) must be buffered whole
	maxHeadBuf   = 1 << 20         // a reply's head (e.g. a pub/sub channel name) must be buffered whole
	drainOnEOF   = 5 * time.Second // how long a client that closed its side waits for its replies
)

// pokeTime is a read deadline in the past: it wakes a blocked Read at once.
var pokeTime = time.Unix(1, 0)

// session is one client connection and its own upstream connection.
//
// Two goroutines run it. The client loop reads commands from the client and is the only writer to the
// upstream: it forwards commands, rewrites the few that touch authentication, and injects AUTH and PING where
// the connection's state allows. The reply loop reads the upstream and is the only writer to the client: it
// matches every reply with the entry the client loop queued for it (pending), passes the client's replies on
// and consumes the proxy's own. Other goroutines hand work to the client loop through pokes.
type session struct {
	id     uint64
	srv    *Server
	log    *slog.Logger
	client net.Conn
	up     net.Conn // the upstream the client loop writes to; replaced by a handover
	upID   int64    // upstream CLIENT ID; 0 when unknown
	opened time.Time
	pend   pending

	pokes    atomic.Uint32
	lastSent atomic.Int64 // when the client loop last wrote upstream (server clock)
	resp2Sub atomic.Bool  // RESP2 subscribed mode, where redis refuses AUTH (set by the reply loop)
	bytesIn  atomic.Int64
	bytesOut atomic.Int64

	// Owned by the client loop: what the commands sent so far did to the connection.
	fromPool      bool     // the upstream came from the pool, which counts it until it returns
	dirty         bool     // the client changed the connection state (see dirties): not for the pool
	authed        bool     // the client gave LOCAL_PASSWORD, or none is set
	inMulti       bool     // MULTI sent, EXEC/DISCARD not yet: an AUTH would be queued
	skipNext      bool     // CLIENT REPLY SKIP sent: the next command gets no reply
	replyOff      bool     // CLIENT REPLY OFF: no command gets a reply
	streaming     bool     // in the middle of forwarding a command too large to buffer
	streamDiscard bool     // ... which is answered by the proxy, not forwarded
	wantAuth      bool     // a re-AUTH is due at the next safe point
	wantPing      bool     // an idle PING is due at the next safe point
	wantDeadline  bool     // the old token's deadline came
	lastBlk       *blocked // the last command sent, if it is a blocking one
	watching      bool     // WATCH sent, not yet ended by EXEC/DISCARD/UNWATCH/RESET
	txCmds        [][]byte // the commands queued in the open MULTI, for a replay
	txBytes       int
	txOverflow    bool      // too many queued commands to keep: a rescue aborts instead
	txAborted     bool      // the open MULTI was aborted by a rescue: answer locally until EXEC/DISCARD
	sentSecret    string    // the token last sent upstream
	upWriteBy     time.Time // the upstream write deadline in force
	out           []byte    // commands to write upstream
	entries       []entry
	parser        resp.CommandParser
	cmdScan       resp.Scanner

	// Owned by the reply loop: the connection's state as the replies show it.
	proto         int
	monitor       bool
	subs          [3]map[string]struct{} // per family: what the client is subscribed to
	cur           entry                  // the entry of the frame being passed
	curFwd        bool                   // whether the frame being passed goes to the client
	curReply      bool                   // whether the frame is a reply (not a push or monitor line)
	clientWriteBy time.Time              // the client write deadline in force
	outv          [][]byte               // what to write to the client after this read
	wbuf          net.Buffers
	quitting      bool   // a local error was sent: close once written
	markerSeen    bool   // the frame just passed was a handover's marker, sent to it by name
	markerChan    string // a handover's marker channel, while subscribed: its messages are hidden
	skipToMarker  bool   // on a new connection after a handover: drop messages up to the marker
	authRetried   bool   // a refused token was already retried with a fresh one

	// Shared by both loops.
	forceAuth atomic.Bool             // send the token even if it was sent before (the retry after WRONGPASS)
	cut       atomic.Pointer[cutover] // a pub/sub handover in progress
	recycling atomic.Bool             // the upstream goes back to the pool: the reply loop must not close it
	subsMu    sync.Mutex              // guards subs: the reply loop writes, a handover reads

	connMu    sync.Mutex
	conns     []net.Conn // upstream connections to close with the session
	closed    bool
	closeOnce sync.Once
	closeErr  error // the first cause of the close
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
	s.pend.init()
	s.proto = 2
	s.log.Info("client connected", "client", s.client.RemoteAddr().String())

	if err := s.connect(ctx); err != nil {
		if s.fromPool {
			s.srv.pool.release()
		}
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

	var wg sync.WaitGroup
	var rerr error
	wg.Add(1)
	go func() {
		defer wg.Done()
		rerr = s.replyLoop(s.up)
		if !s.recycling.Load() {
			s.close(rerr)
		}
	}()
	cerr := s.clientLoop()
	defer func() {
		if s.fromPool { // a pooled connection that did not go back: the pool may replace it
			s.srv.pool.release()
		}
	}()
	if !s.recyclable(cerr) {
		s.close(cerr)
		wg.Wait()
		s.finish()
		return
	}
	// The client left its upstream clean: stop the reply loop without closing the upstream, and pool it.
	up := s.up
	s.dropConn(up)
	s.recycling.Store(true)
	s.close(cerr)
	up.SetReadDeadline(pokeTime)
	wg.Wait()
	up.SetReadDeadline(time.Time{})
	if errors.Is(rerr, os.ErrDeadlineExceeded) {
		s.srv.pool.put(&pooled{conn: up, id: s.upID, secret: s.sentSecret}, s.fromPool)
		s.fromPool = false
	} else {
		up.Close()
		s.srv.obs.UpstreamClosed()
	}
	s.finish()
}

// recyclable reports whether the client left its upstream in the state a pooled connection has.
func (s *session) recyclable(cerr error) bool {
	return s.srv.pool != nil && errors.Is(cerr, errClientQuit) && !s.dirty && !s.streaming &&
		s.pend.len() == 0 && !s.resp2Sub.Load() && s.cut.Load() == nil
}

// finish logs the connection's end and releases what it held.
func (s *session) finish() {
	cause := "client closed"
	if s.closeErr != nil && !errors.Is(s.closeErr, io.EOF) && !errors.Is(s.closeErr, errClientQuit) {
		cause = s.closeErr.Error()
	}
	s.log.Info("client disconnected", "duration", time.Since(s.opened).Round(time.Millisecond).String(),
		"bytes_in", s.bytesIn.Load(), "bytes_out", s.bytesOut.Load(), "cause", cause)
}

var (
	errClientQuit   = errors.New("client closed the connection")
	errUpstreamGone = errors.New("upstream closed the connection")
)

// close closes both connections once, keeping the first cause; both loops then return.
func (s *session) close(cause error) {
	s.closeOnce.Do(func() {
		s.closeErr = cause
		s.pend.close()
		s.client.Close()
		s.connMu.Lock()
		s.closed = true
		conns := s.conns
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
	s.client.SetReadDeadline(pokeTime)
}

// connect dials and authenticates the upstream.
func (s *session) connect(ctx context.Context) error {
	ctx, cancel := context.WithTimeout(ctx, s.srv.opts.DialTimeout)
	defer cancel()
	var c *pooled
	if s.srv.pool != nil {
		c = s.srv.pool.get()
	}
	if c != nil {
		s.fromPool = true
		s.srv.obs.Mechanism("pool_reuse")
	} else {
		var err error
		if c, err = s.srv.dialUpstream(ctx); err != nil {
			return err
		}
	}
	if !s.addConn(c.conn) {
		c.conn.Close()
		return errors.New("proxy shutting down")
	}
	s.up, s.upID, s.sentSecret = c.conn, c.id, c.secret
	s.lastSent.Store(s.srv.now())
	s.log = s.log.With("upstream_client_id", c.id)
	s.log.Debug("upstream ready", "pooled", s.fromPool)
	if tok, _ := s.srv.opts.Tokens.Current(); tok.Secret != c.secret {
		s.poke(pokeReauth) // authenticated before the last rotation: catch up at once
	}
	return nil
}

// refuse tells a client whose upstream could not be set up why, as the reply to its first command.
func (s *session) refuse(err error) {
	s.log.Error("cannot serve client", "err", err, "remedy", Remedy(err))
	s.client.SetDeadline(time.Now().Add(5 * time.Second))
	var b [512]byte
	s.client.Read(b[:]) // the client's first command, so the error is its reply rather than a reset
	s.client.Write(resp.AppendError(nil, clientMessage(err)))
	s.close(err)
}

// clientLoop reads the client's commands and writes them upstream until either side fails.
func (s *session) clientLoop() error {
	var b readBuf
	defer b.release()
	s.cmdScan = resp.Scanner{Commands: true, MaxBulk: s.srv.opts.MaxBulk}
	s.authed = s.srv.opts.LocalPassword == ""
	s.parser.MaxBulk = s.srv.opts.MaxBulk
	for {
		if b.full() && !s.streaming {
			if _, ok := resp.CommandName(b.buf[b.r:b.w]); ok && b.buf[b.r] == '*' {
				// A multibulk command larger than the buffer: forward it as it arrives.
				if err := s.startStream(&b); err != nil {
					return err
				}
				if err := s.handleCommands(&b); err != nil {
					return err
				}
			} else if !b.grow(maxInlineBuf) {
				// Parse reports lines over 64 KiB, so this cannot happen with a correct parser.
				return errors.New("client command line does not fit the buffer")
			}
		}
		n, err := b.readFrom(s.client)
		if n > 0 {
			s.bytesIn.Add(int64(n))
			s.srv.obs.BytesIn(n)
		}
		if perr := s.handleCommands(&b); perr != nil {
			return perr
		}
		if err != nil {
			if errors.Is(err, os.ErrDeadlineExceeded) {
				s.client.SetReadDeadline(time.Time{})
				s.takePokes()
			} else {
				if errors.Is(err, io.EOF) {
					// A client that half-closed still gets the replies to what it sent.
					s.pend.waitEmpty(drainOnEOF)
					return errClientQuit
				}
				return fmt.Errorf("read client: %w", err)
			}
		}
		if s.wantAuth || s.wantPing || s.wantDeadline {
			if err := s.inject(); err != nil {
				return err
			}
		}
		if err := s.flush(); err != nil {
			return err
		}
	}
}

// takePokes moves work handed over by other goroutines into the client loop's own state.
func (s *session) takePokes() {
	p := s.pokes.Swap(0)
	s.wantAuth = s.wantAuth || p&pokeReauth != 0
	s.wantPing = s.wantPing || p&pokePing != 0
	s.wantDeadline = s.wantDeadline || p&pokeDeadline != 0
}

// inject adds the proxy's own AUTH or PING to the commands going upstream, where that is safe: not inside
// MULTI (it would be queued), not after CLIENT REPLY SKIP (it would take the client's skip), not inside a
// command being streamed. Under CLIENT REPLY OFF it is sent without expecting a reply.
func (s *session) inject() error {
	if s.skipNext || s.streaming {
		return nil
	}
	if s.wantDeadline {
		s.wantDeadline = false
		if tok, _ := s.srv.opts.Tokens.Current(); tok.Secret != "" && tok.Secret != s.sentSecret {
			switch {
			case s.inMulti && !s.txAborted: // (after an abort the upstream is not in MULTI)
				s.rescueMulti(tok)
			case s.tailBlocked():
				if err := s.flush(); err != nil {
					return err
				}
				if err := s.unblock(tok); err != nil {
					return err
				}
			}
		}
	}
	if s.inMulti && !s.txAborted {
		return nil
	}
	now := s.srv.now()
	// Behind an unanswered blocking command an AUTH would wait: it stays due (the deadline rescue unblocks).
	if s.wantAuth && !s.tailBlocked() {
		s.wantAuth = false
		force := s.forceAuth.Swap(false)
		tok, _ := s.srv.opts.Tokens.Current()
		switch {
		case tok.Secret == "" || (tok.Secret == s.sentSecret && !force):
		case s.resp2Sub.Load():
			// RESP2 subscribed mode refuses AUTH: move to a new connection instead.
			if err := s.flush(); err != nil {
				return err
			}
			if err := s.handover(tok); err != nil {
				return err
			}
		default:
			s.appendAuth(tok, now)
		}
	}
	if s.wantPing {
		s.wantPing = false
		if len(s.out) == 0 && now-s.lastSent.Load() >= int64(s.srv.opts.IdlePing) {
			s.out = resp.AppendCommand(s.out, "PING")
			s.expect(entry{act: actDrop, cmd: cmdOther, start: now})
			s.srv.obs.Mechanism("idle_ping")
		}
	}
	return nil
}

// appendAuth adds the proxy's AUTH with tok to the commands going upstream; its reply is consumed.
func (s *session) appendAuth(tok Token, now int64) {
	s.out = resp.AppendCommand(s.out, "AUTH", tok.Username, tok.Secret)
	s.expect(entry{act: actAuth, cmd: cmdOther, start: now, text: tok.Secret})
	s.sentSecret = tok.Secret
}

// tailBlocked reports whether the last command sent is a blocking one still waiting for its reply.
func (s *session) tailBlocked() bool { return s.lastBlk != nil && !s.lastBlk.answered.Load() }

// expect queues the entry for the next command's reply, unless CLIENT REPLY OFF/SKIP means none comes.
func (s *session) expect(e entry) {
	if s.replyOff {
		return
	}
	if s.skipNext {
		s.skipNext = false
		return
	}
	s.entries = append(s.entries, e)
}

// flush queues the expected replies, then writes the commands upstream in one write.
func (s *session) flush() error {
	// Entries first, even with nothing in out: a streamed command's entry precedes its bytes.
	if len(s.entries) > 0 {
		if !s.pend.push(s.entries) {
			return errUpstreamGone
		}
		clear(s.entries)
		s.entries = s.entries[:0]
	}
	if len(s.out) == 0 {
		return nil
	}
	err := s.writeUp(s.out)
	if cap(s.out) > 4*bigBufSize {
		s.out = nil // a burst's large batch is not kept by an idle connection
	} else {
		s.out = s.out[:0]
	}
	return err
}

// armWrite gives writes on c a deadline of timeout, re-arming it only once half of it is used: a timer
// update on every write would cost more than the write's bookkeeping.
func armWrite(c net.Conn, until *time.Time, timeout time.Duration) {
	if now := time.Now(); until.Sub(now) < timeout/2 {
		*until = now.Add(timeout)
		c.SetWriteDeadline(*until)
	}
}

func (s *session) writeUp(p []byte) error {
	armWrite(s.up, &s.upWriteBy, s.srv.opts.WriteTimeout)
	if _, err := s.up.Write(p); err != nil {
		return fmt.Errorf("write upstream: %w", err)
	}
	s.lastSent.Store(s.srv.now())
	return nil
}

// handleCommands handles every complete command in b, and streams a command too large to buffer.
func (s *session) handleCommands(b *readBuf) error {
	now := s.srv.now()
	for b.r < b.w {
		if s.streaming {
			if err := s.continueStream(b); err != nil {
				return err
			}
			continue
		}
		cmd, n, err := s.parser.Parse(b.buf[b.r:b.w])
		if errors.Is(err, resp.ErrIncomplete) {
			return nil
		}
		if err != nil {
			var pe *resp.ProtocolError
			if !errors.As(err, &pe) {
				return err
			}
			// Like redis: the replies to the commands before it, then the error, then close.
			s.out = resp.AppendCommand(s.out, "PING")
			s.entries = append(s.entries, entry{act: actFail, cmd: cmdOther, start: now, text: "ERR " + pe.Error()})
			b.r = b.w
			if ferr := s.flush(); ferr != nil {
				return ferr
			}
			s.pend.waitEmpty(s.srv.opts.WriteTimeout)
			return fmt.Errorf("client protocol error: %w", err)
		}
		b.r += n
		if len(cmd.Args) > 0 {
			s.handleCommand(cmd, now)
		}
	}
	return nil
}

// handleCommand forwards one complete command, tracking what it does to the connection's state.
func (s *session) handleCommand(cmd resp.Command, now int64) {
	args := cmd.Args
	info := lookup(args[0])
	s.dirty = s.dirty || dirties(info, args)
	if s.txAborted {
		s.abortedTx(info, now)
		return
	}
	if !s.authed && info.sp != spAuth && info.sp != spHello && info.sp != spQuit {
		s.local(entry{cmd: info.idx, start: now, text: "-NOAUTH Authentication required.\r\n"})
		return
	}
	e := entry{act: actForward, cmd: info.idx, start: now}
	s.lastBlk = nil
	if s.inMulti && info.sp != spExec && info.sp != spMulti && info.sp != spReset {
		s.keepTxCmd(cmd.Raw)
	}
	switch info.sp {
	case spAuth:
		// The client's credentials never reach Azure: the proxy answers.
		switch {
		case len(args) != 2 && len(args) != 3:
			e.text = "-ERR wrong number of arguments for 'auth' command\r\n"
		case s.localAuth(args[len(args)-1]):
			e.text = "+OK\r\n"
		default:
			e.text = wrongPass
		}
		s.local(e)
		return
	case spHello:
		if i := helloAuthAt(args); i > 0 && !s.localAuth(args[i+2]) {
			e.text = wrongPass
			s.local(e)
			return
		} else if i < 0 && !s.authed {
			e.text = "-NOAUTH HELLO must be called with the client already authenticated, otherwise the HELLO <proto> AUTH <user> <pass> option can be used to authenticate the client and select the RESP protocol version at the same time\r\n"
			s.local(e)
			return
		}
		e.act, e.arg = actHello, int32(helloProto(args))
		s.out = appendHello(s.out, args)
		s.expect(e)
		return
	case spReset:
		// RESET turns replies back on before it answers.
		s.inMulti, s.skipNext, s.replyOff, s.watching = false, false, false, false
		s.out = append(s.out, cmd.Raw...)
		e.act = actReset
		s.expect(e)
		// RESET logs the connection out: authenticate again before anything else runs.
		if tok, _ := s.srv.opts.Tokens.Current(); tok.Secret != "" {
			s.appendAuth(tok, now)
		}
		return
	case spMulti:
		if !s.inMulti && len(args) == 1 {
			s.inMulti, s.txCmds, s.txBytes, s.txOverflow = true, s.txCmds[:0], 0, false
		}
	case spExec:
		s.inMulti, s.watching = false, false
	case spWatch:
		s.watching = s.watching || !s.inMulti
	case spUnwatch:
		s.watching = s.watching && s.inMulti
	case spBlock:
		if !s.inMulti { // inside MULTI a blocking command does not block
			e.blk = newBlocked(args, info, s.srv.epoch.Add(time.Duration(now)))
			s.lastBlk = e.blk
		}
	case spClient:
		if len(args) == 3 && equalFold(args[1], "reply") {
			s.out = append(s.out, cmd.Raw...)
			switch {
			case equalFold(args[2], "on"):
				s.replyOff, s.skipNext = false, false
				s.entries = append(s.entries, e) // ON is answered even when replies were off
			case equalFold(args[2], "off"):
				s.replyOff = true
			case equalFold(args[2], "skip"):
				if !s.replyOff {
					s.skipNext = true // the SKIP itself gets no reply either
				}
			default:
				s.expect(e) // an error
			}
			return
		}
	case spSub, spUnsub:
		e.act, e.fam, e.arg = actSubscribe, info.fam, int32(len(args)-1)
		if info.sp == spUnsub && len(args) == 1 {
			e.arg = -1 // one confirmation per current subscription, counted when the reply comes
		}
	case spMonitor:
		e.act = actMonitor
	}
	s.out = append(s.out, cmd.Raw...)
	s.expect(e)
}

// keepTxCmd keeps a command queued in MULTI for a replay, within a bound.
func (s *session) keepTxCmd(raw []byte) {
	if s.txOverflow {
		return
	}
	if s.txBytes+len(raw) > maxTxBytes {
		s.txOverflow, s.txCmds = true, nil
		return
	}
	s.txBytes += len(raw)
	s.txCmds = append(s.txCmds, append([]byte(nil), raw...))
}

const wrongPass = "-WRONGPASS invalid username-password pair or user is disabled.\r\n"

// local answers a command with e.text instead of running it; a PING holds the reply's place, so the answer
// comes in order and follows the connection's reply mode.
func (s *session) local(e entry) {
	e.act = actReplace
	s.out = resp.AppendCommand(s.out, "PING")
	s.expect(e)
}

// localAuth checks a password a client gave against LOCAL_PASSWORD, in constant time; without one, any
// password is accepted (the proxy authenticates the upstream itself).
func (s *session) localAuth(password []byte) bool {
	want := s.srv.opts.LocalPassword
	if want == "" {
		return true
	}
	ok := subtle.ConstantTimeCompare(password, []byte(want)) == 1
	s.authed = s.authed || ok
	if !ok {
		s.srv.obs.ClientRejected("local_auth")
	}
	return ok
}

// helloAuthAt returns the index of HELLO's AUTH option (followed by username and password), or -1.
func helloAuthAt(args [][]byte) int {
	for i := 2; i+2 < len(args); i++ {
		if equalFold(args[i], "auth") {
			return i
		}
	}
	return -1
}

// helloProto returns the protocol HELLO asks for, or 0 when it keeps the current one (or errs).
func helloProto(args [][]byte) int {
	if len(args) < 2 {
		return 0
	}
	p, err := strconv.Atoi(string(args[1]))
	if err != nil {
		return 0
	}
	return p
}

// appendHello appends HELLO without its AUTH option: the proxy authenticates the upstream, and the client's
// credentials never reach it.
func appendHello(dst []byte, args [][]byte) []byte {
	kept := make([]string, 0, len(args))
	for i := 0; i < len(args); i++ {
		if i >= 2 && equalFold(args[i], "auth") && i+2 < len(args) {
			i += 2
			continue
		}
		kept = append(kept, string(args[i]))
	}
	return resp.AppendCommand(dst, kept...)
}

// startStream begins forwarding a command too large for the buffer, as it arrives.
func (s *session) startStream(b *readBuf) error {
	p := b.buf[b.r:b.w]
	name, _ := resp.CommandName(p)
	info := lookup(name)
	s.dirty = s.dirty || dirties(info, nil)
	e := entry{act: actForward, cmd: info.idx, start: s.srv.now()}
	switch info.sp {
	case spAuth, spHello:
		// Credentials are never forwarded, and no real AUTH or HELLO is this long: answer, don't forward.
		e.act, e.text = actReplace, "-ERR entra-redis-proxy: "+string(name)+" command too long\r\n"
		s.out = resp.AppendCommand(s.out, "PING")
		s.streamDiscard = true
	case spSub, spUnsub:
		e.act, e.fam = actSubscribe, info.fam
		e.arg = int32(multibulkCount(p) - 1)
	case spMulti:
		s.inMulti = true
	case spExec:
		s.inMulti = false
	}
	s.expect(e)
	if err := s.flush(); err != nil {
		return err
	}
	s.streaming = true
	s.cmdScan.Reset()
	return nil
}

// continueStream forwards the next part of a command being streamed.
func (s *session) continueStream(b *readBuf) error {
	n, done, err := s.cmdScan.Scan(b.buf[b.r:b.w])
	if err != nil {
		return fmt.Errorf("client protocol error: %w", err)
	}
	if !s.streamDiscard {
		if err := s.writeUp(b.buf[b.r : b.r+n]); err != nil {
			return err
		}
	}
	b.r += n
	if done {
		s.streaming, s.streamDiscard = false, false
	}
	return nil
}

// multibulkCount reads N from a "*N\r\n" header.
func multibulkCount(p []byte) int {
	n := 0
	for i := 1; i < len(p) && p[i] >= '0' && p[i] <= '9' && n < 1<<30; i++ {
		n = n*10 + int(p[i]-'0')
	}
	return n
}
