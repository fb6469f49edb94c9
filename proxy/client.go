package proxy

import (
	"crypto/subtle"
	"errors"
	"fmt"
	"io"
	"net"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/entra-redis-proxy/entra-redis-proxy/resp"
)

// clientLoop reads the client's commands and writes them upstream until either side fails or the client
// leaves (QUIT, EOF), after every reply it asked for has reached it.
func (s *session) clientLoop() error {
	b := &s.cl.in // holds what the client sent after its AUTH, if preAuth ran; finish releases it
	c := &s.cl
	c.stream.scan = resp.Scanner{Commands: true, MaxBulk: s.srv.opts.MaxBulk}
	c.authed = c.authed || s.srv.opts.LocalPassword == ""
	c.parser.MaxBulk = s.srv.opts.MaxBulk
	eof := false
	for {
		if s.led.isLost() { // before handling what was read: nothing is pending for the new upstream
			if err := s.relinkIfLost(false); err != nil {
				return err
			}
		}
		if c.want.move {
			if err := s.move(); err != nil {
				return err
			}
		}
		if err := s.handleCommands(b); err != nil {
			return err
		}
		if c.want.auth || c.want.ping || c.want.deadline {
			if err := s.inject(); err != nil {
				return err
			}
		}
		if err := s.flush(); err != nil {
			return err
		}
		switch {
		case c.quit:
			s.led.waitIdle(drainQuiet)
			s.closeWriteAndWait() // what the client sent after QUIT is not run, and must not cause a reset
			return errClientQuit
		case c.drain == drainDone && !c.hold.holding() && !c.stream.active:
			// Every command read so far was sent: deliver its replies, then close. The server cuts a
			// drain that outlasts its shutdown delay by closing the session, which ends this wait.
			s.led.waitIdle(forever)
			s.closeWriteAndWait()
			return errDrained
		case eof && !c.hold.holding():
			// A client that half-closed still gets the replies to what it sent, however long they
			// take to stream, as long as they make progress.
			s.led.waitIdle(drainQuiet)
			return errClientQuit
		case eof || (c.drain == drainDone && !c.stream.active) || (c.hold.holding() && b.full()):
			// Nothing (more) to read: wait for the blocked command's answer, then send what waited.
			switch s.waitWake(drainQuiet) {
			case wakeClosed:
				return errUpstreamGone
			case wakeTimeout:
				if eof {
					return errClientQuit
				}
			}
			s.takePokes()
			continue
		}
		if c.drain == drainReading {
			// A drain serves what already waits in the socket, and reads nothing after it.
			s.client.SetReadDeadline(time.Time{}) // (a deadline in force would fail the peek)
			switch waiting, ok := inputWaiting(s.client); {
			case ok && !waiting:
				c.drain = drainDone
				continue
			case !ok: // no socket to look at (tests over net.Pipe): a read that barely waits
				s.client.SetReadDeadline(time.Now().Add(drainReadWait))
			}
		}
		n, err := b.readFrom(s.client)
		if n > 0 {
			s.bytesIn.Add(int64(n))
			s.srv.obs.BytesIn(n)
		}
		switch {
		case err == nil:
		case isDeadline(err):
			if c.drain == drainReading && n == 0 && s.pokes.Load() == 0 {
				c.drain = drainDone // nothing more was waiting
			}
			s.client.SetReadDeadline(time.Time{})
			s.takePokes()
		case errors.Is(err, io.EOF):
			eof = true
		default:
			return fmt.Errorf("read client: %w", err)
		}
	}
}

// drainState is where a session is in a drain.
type drainState uint8

const (
	drainNone    drainState = iota
	drainReading            // asked to drain: reading only what already waits in the socket
	drainDone               // reading nothing more: close at the next safe point
)

// drainReadWait is how long a drain's read waits for input where the socket can't be looked at.
const drainReadWait = time.Millisecond

// inputWaiting reports whether the client sent bytes (or closed its side) that are not read yet, so that a
// read returns at once; ok is false when the connection has no socket to look at. A read with a deadline
// can't tell: a deadline that passed before the read started never reaches the socket.
func inputWaiting(c net.Conn) (waiting, ok bool) {
	if _, ok := c.(syscall.Conn); !ok {
		return false, false
	}
	return peekSocket(c) != nil, true // bytes, EOF or an error: each a read reports at once
}

// forever is a wait bounded only by the session's close.
const forever = 1 << 62

type wakeReason uint8

const (
	wakePoke wakeReason = iota
	wakeClosed
	wakeTimeout
)

// waitWake waits for a poke, the session's close, or d.
func (s *session) waitWake(d time.Duration) wakeReason {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-s.wake:
		return wakePoke
	case <-s.done:
		return wakeClosed
	case <-t.C:
		return wakeTimeout
	}
}

// takePokes moves work handed over by other goroutines into the client loop's own state.
func (s *session) takePokes() {
	p := s.pokes.Swap(0)
	if h := s.srv.tookPokes.Load(); h != nil && p != 0 {
		(*h)(s.id, p)
	}
	w := &s.cl.want
	w.auth = w.auth || p&pokeReauth != 0
	w.ping = w.ping || p&pokePing != 0
	if p&pokePing != 0 {
		s.led.trim() // quiet for IdlePing: a ring grown by deep pipelines is given back
	}
	w.deadline = w.deadline || p&pokeDeadline != 0
	w.move = w.move || p&pokeMove != 0
	if p&pokeDrain != 0 && s.cl.drain == drainNone {
		s.cl.drain = drainReading
	}
}

// handleCommands handles every complete command in b, and streams a command too large to buffer. Behind
// an unanswered blocking command nothing is handled: the bytes wait in b.
func (s *session) handleCommands(b *readBuf) error {
	c := &s.cl
	if err := s.renewLease(); err != nil {
		return err
	}
	now := s.srv.now()
	for b.r < b.w && !c.quit {
		if c.stream.active {
			if err := s.continueStream(b); err != nil {
				return err
			}
			continue
		}
		if c.hold.holding() {
			return nil
		}
		cmd, n, pe, err := parseCommand(&c.parser, b)
		if err != nil {
			return err
		}
		if pe != nil {
			return s.protocolError(pe, now)
		}
		if n == 0 {
			break
		}
		b.r += n
		if len(cmd.Args) > 0 {
			s.handleCommand(cmd, now)
		}
	}
	if b.full() && !c.stream.active && !c.hold.holding() && !c.quit && c.drain != drainDone {
		if _, ok := resp.CommandName(b.buf[b.r:b.w]); ok && b.buf[b.r] == '*' {
			// A multibulk command larger than the buffer: forward it as it arrives.
			if err := s.startStream(b); err != nil {
				return err
			}
			return s.handleCommands(b)
		}
		if !b.grow(maxInlineBuf) {
			if b.buf[b.r] == '*' {
				// Parse found its header lines valid (it reports those over 64 KiB): the command's name is
				// longer than the buffer, so it is none the proxy knows. It goes to the server as it arrives,
				// and the server answers that it does not know it, as to a direct client.
				if err := s.startStream(b); err != nil {
					return err
				}
				return s.handleCommands(b)
			}
			// Parse reports lines over 64 KiB, so this cannot happen with a correct parser.
			return errors.New("client command line does not fit the buffer")
		}
	}
	return nil
}

// parseCommand parses the command at the start of b's unhandled bytes. n is 0 while it is incomplete; a
// client protocol error is returned as pe (err is for anything else).
func parseCommand(p *resp.CommandParser, b *readBuf) (cmd resp.Command, n int, pe *resp.ProtocolError, err error) {
	cmd, n, err = p.Parse(b.buf[b.r:b.w])
	switch {
	case errors.Is(err, resp.ErrIncomplete):
		return cmd, 0, nil, nil
	case errors.As(err, &pe):
		return cmd, 0, pe, nil
	}
	return cmd, n, nil, err
}

// protocolError answers a malformed command like redis: the replies to the commands before it, then the
// error, then the connection closes.
func (s *session) protocolError(pe *resp.ProtocolError, now int64) error {
	s.cl.out = resp.AppendCommand(s.cl.out, "PING")
	s.cl.entries = append(s.cl.entries, entry{act: actFail, cmd: cmdOther, start: now, text: "ERR " + pe.Error()})
	if err := s.flush(); err != nil {
		return err
	}
	s.led.waitIdle(s.srv.opts.WriteTimeout)
	s.closeWriteAndWait()
	return fmt.Errorf("client protocol error: %w", pe)
}

// lingerTime is how long a connection the proxy ends waits for the client's unread input before closing:
// closing a socket with input unread sends a reset, which can destroy replies the client has not read yet.
const lingerTime = 500 * time.Millisecond

// closeWriteAndWait ends the proxy's side of a client connection with a FIN after the last reply, then reads
// and discards the client's input for a moment (as net/http does), so the close that follows is clean.
func (s *session) closeWriteAndWait() {
	cw, ok := s.client.(interface{ CloseWrite() error })
	if !ok || cw.CloseWrite() != nil {
		return
	}
	s.client.SetReadDeadline(time.Now().Add(lingerTime))
	io.Copy(io.Discard, s.client)
}

// A handler forwards (or answers) one complete command of its kind; e is its reply's entry so far.
type handler func(s *session, cmd resp.Command, e entry)

// handlers maps each kind of command to its handler (set in init: some handlers refer to the table).
var handlers [spCount]handler

func init() {
	handlers = [spCount]handler{
		spNone: (*session).forward,
		spAuth: (*session).onAuth, spHello: (*session).onHello, spReset: (*session).onReset,
		spQuit: (*session).onQuit, spMulti: (*session).onMulti, spExec: (*session).onExec,
		spDiscard: (*session).onExec, spClient: (*session).onClient, spSub: (*session).onSubscribe,
		spUnsub: (*session).onSubscribe, spMonitor: (*session).onMonitor, spBlock: (*session).onBlocking,
		spWatch: (*session).onWatch, spUnwatch: (*session).onUnwatch, spSelect: (*session).onSelect,
		spRefused: (*session).onRefused, spState: (*session).onState,
	}
}

// handleCommand forwards one complete command, tracking what it does to the connection's state.
func (s *session) handleCommand(cmd resp.Command, now int64) {
	c := &s.cl
	info := lookup(cmd.Args[0])
	c.dirty = c.dirty || dirties(info, cmd.Args)
	c.batchDirty = c.batchDirty || info.sp != spNone || c.tx.state != txNone || c.mode != replyOn
	e := entry{act: actForward, cmd: info.idx, start: now}
	if s.srv.cluster != nil {
		e.topo = topoCommand(cmd.Args)
	}
	// Inside MULTI a (un)subscribe gets one reply, +QUEUED; after a refused MULTI, one per channel.
	s.syncTx(info.sp == spSub || info.sp == spUnsub)
	switch {
	case c.tx.state == txAborted && info.sp != spReset && info.sp != spQuit:
		s.abortedTx(info, e)
		return
	case c.tx.state == txWatchLost && info.sp == spMulti && len(cmd.Args) == 1 && c.authed:
		c.tx.abort(true) // answered here; its EXEC answers null, as if a watched key had changed
		s.srv.obs.Mechanism("tx_abort")
		e.text = "+OK\r\n"
		s.local(e)
		return
	case !c.authed && info.sp != spAuth && info.sp != spHello && info.sp != spQuit:
		e.text = noAuth
		s.local(e)
		return
	}
	// Inside MULTI redis queues every command but these; what the proxy sent for it is kept for a replay.
	queued := c.tx.open() && !oneOfSp(info.sp, spExec, spDiscard, spMulti, spWatch, spReset, spQuit)
	if queued && e.topo != topoNone {
		c.tx.queueTopo(e.topo) // its reply now is +QUEUED; its element of EXEC's reply names the nodes
		e.topo = topoNone
	}
	mark := len(c.out)
	handlers[info.sp](s, cmd, e)
	if queued {
		c.tx.queue(c.out[mark:], true)
	}
}

func oneOfSp(sp special, of ...special) bool {
	for _, x := range of {
		if sp == x {
			return true
		}
	}
	return false
}

// forward sends the command as it came, its reply going to the client.
func (s *session) forward(cmd resp.Command, e entry) {
	s.cl.out = append(s.cl.out, cmd.Raw...)
	s.expect(e)
}

// onAuth answers the client's AUTH itself: the client's credentials never reach Azure.
func (s *session) onAuth(cmd resp.Command, e entry) {
	e.text = s.authReply(cmd.Args)
	s.local(e)
}

const authOK = "+OK\r\n"

// authReply is the answer to a client's AUTH, as redis words it.
func (s *session) authReply(args [][]byte) string {
	switch {
	case len(args) < 2:
		return "-ERR wrong number of arguments for 'auth' command\r\n"
	case len(args) > 3:
		return "-ERR syntax error\r\n"
	case s.localAuth(args[len(args)-1]):
		return authOK
	}
	return wrongPass
}

// onHello forwards HELLO without its AUTH option; the reply sets the protocol.
func (s *session) onHello(cmd resp.Command, e entry) {
	args := cmd.Args
	if i := helloAuthAt(args); i > 0 && !s.localAuth(args[i+2]) {
		e.text = wrongPass
		s.local(e)
		return
	} else if i < 0 && !s.cl.authed {
		e.text = noAuthHello
		s.local(e)
		return
	}
	c := &s.cl
	c.subSent = true // the protocol decides whether subscriptions refuse AUTH
	name, named := helloName(args)
	if c.tx.open() {
		// Queued: EXEC's reply says whether it ran.
		c.tx.queueSetting(setting{db: -1, proto: helloProto(args), name: name, named: named})
		c.out = appendHello(c.out, args)
		s.expect(e)
		return
	}
	e.act, e.arg = actHello, int32(helloProto(args))
	if named {
		e.sets = []setting{{db: -1, name: name, named: true}}
	}
	s.sendSeen(appendHello(nil, args), e)
}

// sendSeen sends a command whose reply the proxy must see, because it changes state the proxy tracks (the
// protocol, the database, the name). Under CLIENT REPLY OFF or SKIP that reply would not come: replies are
// turned on around the command, its reply is hidden, and the mode is put back (a SKIP is spent on it).
func (s *session) sendSeen(cmd []byte, e entry) {
	c := &s.cl
	if c.mode == replyOn || s.knowSubscribed() {
		c.out = append(c.out, cmd...)
		s.expect(e)
		return
	}
	was := c.mode
	c.out = resp.AppendCommand(c.out, "CLIENT", "REPLY", "ON")
	c.entries = append(c.entries, entry{act: actDrop, cmd: cmdOther, start: e.start})
	c.out = append(c.out, cmd...)
	e.quiet = true
	c.entries = append(c.entries, e)
	c.mode = replyOn
	if was == replyOff {
		c.out = resp.AppendCommand(c.out, "CLIENT", "REPLY", "OFF")
		c.mode = replyOff
	}
}

// onSelect forwards SELECT; its reply says whether the database changed, which a handover carries.
func (s *session) onSelect(cmd resp.Command, e entry) {
	set := noSetting
	if len(cmd.Args) == 2 {
		if db, err := strconv.Atoi(string(cmd.Args[1])); err == nil && db >= 0 {
			set.db = db // applied only if the server accepts it, so Atoi's leniency does not matter
		}
	}
	s.sendSetting(cmd, e, set)
}

// sendSetting forwards a command that changes set, if the server accepts it.
func (s *session) sendSetting(cmd resp.Command, e entry, set setting) {
	switch {
	case set == noSetting:
		s.forward(cmd, e)
	case s.cl.tx.open():
		s.cl.tx.queueSetting(set)
		s.forward(cmd, e)
	default:
		e.sets = []setting{set}
		s.sendSeen(cmd.Raw, e)
	}
}

// onState forwards a command that changes the connection's state; READONLY's and READWRITE's replies say
// whether reads from a replica are allowed, which a handover or a reconnect carries.
func (s *session) onState(cmd resp.Command, e entry) {
	set := noSetting
	switch {
	case equalFold(cmd.Args[0], "readonly"):
		set.ro = roOn
	case equalFold(cmd.Args[0], "readwrite"):
		set.ro = roOff
	}
	s.sendSetting(cmd, e, set)
}

// knowSubscribed reports whether the connection is in RESP2 subscribed mode, where redis refuses CLIENT
// and HELLO. After a command that may have changed that, it first waits for every reply to come (a round
// trip, for the rare client that mixes CLIENT REPLY with pub/sub), so the answer is the server's.
func (s *session) knowSubscribed() bool {
	c := &s.cl
	if c.subSent {
		if s.flush() == nil {
			s.awaitReplies()
		}
		c.subSent = s.resp2Sub.Load()
	}
	return s.resp2Sub.Load()
}

// awaitReplies waits for every reply to come. Under CLIENT REPLY OFF a refused (un)subscribe has no answer
// at all, so the wait can last the ledger's optionalQuiet (2 s); a new token that comes meanwhile is sent at
// once there (under OFF an AUTH needs no reply), so that such a wait never outlasts the old token.
func (s *session) awaitReplies() {
	c := &s.cl
	from := time.Now()
	for {
		if _, nudged := s.led.waitIdleOrNudge(forever, &from); !nudged {
			return
		}
		s.takePokes()
		if c.want.auth && c.mode == replyOff && !c.tx.open() && !c.hold.holding() && !s.resp2Sub.Load() {
			c.want.auth = false
			if s.reauth() != nil || s.flush() != nil {
				return
			}
		}
	}
}

// onReset forwards RESET, which turns replies back on before it answers and logs the connection out: the
// proxy authenticates again before anything else runs. Whether it ran is the server's to say (a policy may
// deny it, Redis 6.0 and Enterprise lack it), so the client loop waits for its answer.
func (s *session) onReset(cmd resp.Command, e entry) {
	c := &s.cl
	if s.know(probeReset) == factNo {
		s.forward(cmd, e) // an unknown command here: an error, and nothing changes
		return
	}
	was := c.mode
	e.act = actReset
	if was != replyOn && !s.knowSubscribed() {
		// RESET turns replies on only if it runs (and a SKIP still applies to its own reply): turn them on
		// first, so that its answer comes either way, and pass it on only as the client would have seen it.
		c.out = resp.AppendCommand(c.out, "CLIENT", "REPLY", "ON")
		c.entries = append(c.entries, entry{act: actDrop, cmd: cmdOther, start: e.start})
		c.mode = replyOn
		e.quiet = was == replySkip
		e.arg = resetHideRefusal // under OFF the client sees +RESET, but not a refusal
	}
	c.out = append(c.out, cmd.Raw...)
	c.entries = append(c.entries, e)
	s.resetRan.Store(false)
	if s.flush() == nil {
		s.led.waitIdle(forever)
	}
	if !s.resetRan.Load() {
		if was == replyOff {
			c.out = resp.AppendCommand(c.out, "CLIENT", "REPLY", "OFF") // no reply
			c.mode = replyOff
		}
		return // refused: nothing else changed (a SKIP was spent on it, as it would have been)
	}
	c.tx.end()
	c.mode, c.replyUnknown = replyOn, false
	if tok, _ := s.srv.opts.Tokens.Current(); tok.Secret != "" {
		s.appendAuth(tok, e.start)
	}
}

// onRefused answers a replication command: what follows SYNC is a replication stream, not replies, which
// the proxy cannot frame (and Azure refuses these commands anyway). The connection stays usable.
func (s *session) onRefused(cmd resp.Command, e entry) {
	e.text = "-ERR entra-redis-proxy: " + strings.ToUpper(string(cmd.Args[0])) +
		" is not supported through the proxy (replication cannot be proxied; Azure Cache for Redis refuses it too)\r\n"
	s.local(e)
}

// onQuit answers QUIT itself (+OK, then the session ends): the upstream stays open and clean for the pool.
func (s *session) onQuit(_ resp.Command, e entry) {
	e.act = actQuit
	s.cl.out = resp.AppendCommand(s.cl.out, "PING")
	s.expect(e)
	s.cl.quit = true
}

// onMulti opens a transaction, as far as the client loop can tell before the server answers (see syncTx).
func (s *session) onMulti(cmd resp.Command, e entry) {
	if tx := &s.cl.tx; len(cmd.Args) == 1 && tx.state == txNone {
		tx.multi()
		e.act, e.arg = actMulti, int32(tx.gen)
	}
	s.forward(cmd, e)
}

// syncTx makes the open transaction follow the server's answer to its MULTI, which may have refused it
// (NOPERM under a data access policy, RESP2 subscribed mode). With wait, when the answer has not come, it
// first waits for every reply (a round trip, for decisions that must not guess: a rescue, a subscription).
// Under CLIENT REPLY OFF the answer never comes and the transaction is taken as open.
// It flushes: call it before a command is added to what goes upstream.
func (s *session) syncTx(wait bool) {
	tx := &s.cl.tx
	if !tx.open() || tx.answered {
		return
	}
	v := s.multiAns.Load()
	if uint32(v>>1) != tx.gen && wait && s.flush() == nil {
		s.led.waitIdle(forever)
		v = s.multiAns.Load()
	}
	tx.answer(uint32(v>>1), v&1 == 1)
}

// onExec handles EXEC and DISCARD, which end an open transaction (without one they are errors that leave
// the watches in place).
func (s *session) onExec(cmd resp.Command, e entry) {
	c := &s.cl
	e.watch = watchEnds
	if lookup(cmd.Args[0]).sp == spExec {
		e.watch = watchExec
	}
	if c.tx.open() {
		if lookup(cmd.Args[0]).sp == spExec && (len(c.tx.settings) > 0 || s.srv.clustered()) {
			// end drops the slices: they are the entry's now
			e.act, e.sets, e.topos = actExec, c.tx.settings, c.tx.topos
		}
		c.tx.end()
	}
	s.forward(cmd, e)
}

// onWatch and onUnwatch forward WATCH and UNWATCH; their replies say whether keys are watched.
func (s *session) onWatch(cmd resp.Command, e entry) {
	e.watch = watchAdds
	s.forward(cmd, e)
}

func (s *session) onUnwatch(cmd resp.Command, e entry) {
	if s.cl.tx.state == txWatchLost {
		s.cl.tx.state = txNone // the keys lost with an upstream are not watched any more
	}
	e.watch = watchEnds
	s.forward(cmd, e)
}

// onClient tracks CLIENT REPLY, which decides which commands get replies, and CLIENT SETNAME and CLIENT
// TRACKING, which a handover or a reconnect carries.
func (s *session) onClient(cmd resp.Command, e entry) {
	c := &s.cl
	args := cmd.Args
	switch {
	case len(args) == 3 && equalFold(args[1], "setname"):
		s.sendSetting(cmd, e, setting{db: -1, name: string(args[2]), named: true})
		return
	case len(args) >= 3 && equalFold(args[1], "tracking"):
		set := setting{db: -1, tracked: true}
		if !equalFold(args[2], "off") {
			strs := make([]string, len(args))
			for i, a := range args {
				strs[i] = string(a)
			}
			set.track = string(resp.AppendCommand(nil, strs...))
		}
		s.sendSetting(cmd, e, set)
		return
	case len(args) >= 3 && equalFold(args[1], "maint_notifications") && equalFold(args[2], "on"):
		// Sent as OFF: the server answers as it would, and no push reaches the client (notifications.go).
		c.out = resp.AppendCommand(c.out, string(args[0]), string(args[1]), "OFF")
		s.expect(e)
		return
	case len(args) == 3 && equalFold(args[1], "reply") && c.tx.open():
		c.replyUnknown = true // EXEC's reply would say whether it ran; the proxy does not follow it
	}
	if len(args) != 3 || !equalFold(args[1], "reply") || c.tx.open() || s.knowSubscribed() {
		s.forward(cmd, e) // (in RESP2 subscribed mode it is refused: an error, and no change)
		return
	}
	if !equalFold(args[2], "on") && s.know(probeClientReply) == factNo {
		s.expect(e) // refused: the error is its reply, and the mode stays
		c.out = append(c.out, cmd.Raw...)
		return
	}
	c.out = append(c.out, cmd.Raw...)
	switch {
	case equalFold(args[2], "on"):
		c.mode = replyOn
		c.entries = append(c.entries, e) // ON is answered even when replies were off
	case equalFold(args[2], "off"):
		c.mode = replyOff
	case equalFold(args[2], "skip"):
		if c.mode != replyOff {
			c.mode = replySkip // the SKIP itself gets no reply either
		}
	default:
		s.expect(e) // an error
	}
}

// onSubscribe handles the (P|S)(UN)SUBSCRIBE family: one confirmation per channel, or for a bare
// unsubscribe one per current subscription (counted when the replies come).
func (s *session) onSubscribe(cmd resp.Command, e entry) {
	info := lookup(cmd.Args[0])
	e.act, e.fam, e.arg = actSubscribe, info.fam, int32(len(cmd.Args)-1)
	if info.sp == spUnsub && len(cmd.Args) == 1 {
		e.arg = -1
	}
	s.cl.subSent = true
	s.cl.out = append(s.cl.out, cmd.Raw...)
	if s.cl.tx.open() {
		s.expect(e) // queued
		return
	}
	// Confirmations are pushed even under CLIENT REPLY OFF or SKIP (which the command still spends); an
	// error is not.
	e.optional = s.cl.mode != replyOn
	s.cl.mode.takes()
	s.cl.entries = append(s.cl.entries, e)
}

func (s *session) onMonitor(cmd resp.Command, e entry) {
	e.act = actMonitor
	s.forward(cmd, e)
}

// onBlocking forwards a command that may block; until it is answered nothing is sent behind it.
func (s *session) onBlocking(cmd resp.Command, e entry) {
	c := &s.cl
	if !c.tx.open() && c.mode == replyOn { // inside MULTI it does not block; without a reply it can't be tracked
		now := s.srv.epoch.Add(time.Duration(e.start))
		e.blk = newBlocked(cmd.Args, lookup(cmd.Args[0]), now)
		c.hold.cmd = e.blk
		if e.blk != nil && s.srv.facts.get(probeUnblock) == factNo {
			if args := s.lease(e.blk, now); args != nil {
				c.out = resp.AppendCommand(c.out, args...)
				s.expect(e)
				return
			}
		}
	}
	s.forward(cmd, e)
}

// expect queues the entry for the next command's reply, unless CLIENT REPLY OFF/SKIP means none comes: then
// nothing shows that the command ran until a later command's reply is asked for (see sentProof).
func (s *session) expect(e entry) {
	c := &s.cl
	if !c.mode.takes() {
		c.proof = proofBlind
		return
	}
	c.entries = append(c.entries, e)
	if c.proof == proofBlind {
		c.proof = proofPending
	}
}

// local answers a command with e.text instead of running it; a PING holds the reply's place, so the answer
// comes in order and follows the connection's reply mode.
func (s *session) local(e entry) {
	e.act = actReplace
	s.cl.out = resp.AppendCommand(s.cl.out, "PING")
	s.expect(e)
}

const wrongPass = "-WRONGPASS invalid username-password pair or user is disabled.\r\n"

// localAuth checks a password a client gave against LOCAL_PASSWORD, in constant time; without one, any
// password is accepted (the proxy authenticates the upstream itself). A wrong one is counted, and logged
// once a minute per client address.
func (s *session) localAuth(password []byte) bool {
	want := s.srv.opts.LocalPassword
	if want == "" {
		return true
	}
	ok := subtle.ConstantTimeCompare(password, []byte(want)) == 1
	s.cl.authed = s.cl.authed || ok
	if !ok {
		s.srv.obs.ClientRejected("local_auth")
		s.srv.authFails.add(clientHost(s.client), "client", s.client.RemoteAddr().String())
	}
	return ok
}

// flush queues the expected replies, then writes the commands upstream in one write.
func (s *session) flush() error {
	c := &s.cl
	// Entries first, even with nothing in out: a streamed command's entry precedes its bytes.
	if len(c.entries) > 0 {
		if !s.led.push(c.entries) {
			// The upstream closed with nothing owed: reconnect first, then send the batch there.
			if err := s.relinkIfLost(true); err != nil {
				return err
			}
			if !s.led.push(c.entries) {
				return errUpstreamGone
			}
		}
		clear(c.entries)
		c.entries = c.entries[:0]
		if c.proof == proofPending {
			c.proof = proofShown
		}
	}
	c.batchDirty = false
	if len(c.out) == 0 {
		return nil
	}
	err := s.writeUp(c.out)
	if cap(c.out) > 4*bigBufSize {
		c.out = nil // a burst's large batch is not kept by an idle connection
	} else {
		c.out = c.out[:0]
	}
	return err
}

// armWrite gives writes on c a deadline of timeout, re-arming it only once half of it is used: a timer
// update on every write would cost more than the write's bookkeeping.
func armWrite(c interface{ SetWriteDeadline(time.Time) error }, until *time.Time, timeout time.Duration) {
	if now := time.Now(); until.Sub(now) < timeout/2 {
		*until = now.Add(timeout)
		c.SetWriteDeadline(*until)
	}
}

func (s *session) writeUp(p []byte) error {
	armWrite(s.cl.up, &s.cl.writeBy, s.srv.opts.WriteTimeout)
	if _, err := s.cl.up.Write(p); err != nil {
		err = fmt.Errorf("write upstream: %w", err)
		if s.led.isLost() { // commands whose replies CLIENT REPLY suppressed, written after the close
			return s.notRestored(err, "commands without replies were sent after the close")
		}
		return err
	}
	s.lastSent.Store(s.srv.now())
	return nil
}

// startStream begins forwarding a command too large for the buffer, as it arrives.
func (s *session) startStream(b *readBuf) error {
	c := &s.cl
	p := b.buf[b.r:b.w]
	name, _ := resp.CommandName(p)
	info := lookup(name)
	c.dirty = c.dirty || dirties(info, nil)
	c.batchDirty = true
	e := entry{act: actForward, cmd: info.idx, start: s.srv.now()}
	c.stream.discard = false
	switch info.sp {
	case spAuth, spHello:
		// Credentials are never forwarded, and no real AUTH or HELLO is this long: answer, don't forward.
		e.act, e.text = actReplace, "-ERR entra-redis-proxy: "+string(name)+" command too long\r\n"
		c.out = resp.AppendCommand(c.out, "PING")
		c.stream.discard = true
		if c.tx.open() {
			c.tx.queue(c.out[len(c.out)-len("*1\r\n$4\r\nPING\r\n"):], true)
		}
	case spSub, spUnsub:
		e.act, e.fam = actSubscribe, info.fam
		e.arg = int32(multibulkCount(p) - 1)
	}
	s.expect(e)
	if err := s.flush(); err != nil {
		return err
	}
	c.stream.active = true
	c.stream.scan.Reset()
	return nil
}

// continueStream forwards the next part of a command being streamed; inside MULTI its bytes are kept for a
// replay like any queued command's.
func (s *session) continueStream(b *readBuf) error {
	c := &s.cl
	first := !c.stream.scan.InFrame()
	n, done, err := c.stream.scan.Scan(b.buf[b.r:b.w])
	var pe *resp.ProtocolError
	switch {
	case errors.As(err, &pe) && c.stream.discard:
		b.r += n
		c.stream.active = false
		return s.protocolError(pe, s.srv.now())
	case errors.As(err, &pe):
		// The command's start is upstream already, where it can be neither taken back nor completed: the
		// rest goes too, up to the end of the bad line, so that the server answers the error itself, as to
		// a direct client, and closes (with nothing of ours unread: not a reset, which could destroy its
		// answer). The client gets the replies before it and that error, then a FIN.
		s.clientFault.Store(true)
		s.writeUp(b.buf[b.r : b.r+n]) // (n ends the bad line; if the server closed first, it answered already)
		b.r = b.w
		// (A server whose limits differ from MaxBulk's may not close: then the client waits this long.)
		s.led.waitIdle(drainQuiet)
		s.closeWriteAndWait()
		return fmt.Errorf("client protocol error: %w", pe)
	case err != nil:
		return fmt.Errorf("client protocol error: %w", err)
	}
	if !c.stream.discard {
		part := b.buf[b.r : b.r+n]
		if c.tx.open() {
			c.tx.queue(part, first)
		}
		if err := s.writeUp(part); err != nil {
			return err
		}
	}
	b.r += n
	if done {
		c.stream.active, c.stream.discard = false, false
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

// helloAuthAt returns the index of HELLO's AUTH option (followed by username and password), or -1.
func helloAuthAt(args [][]byte) int {
	for i := 2; i+2 < len(args); i++ {
		if equalFold(args[i], "auth") {
			return i
		}
	}
	return -1
}

// helloName returns the name HELLO's SETNAME option gives, if it has one.
func helloName(args [][]byte) (name string, named bool) {
	for i := 2; i < len(args); i++ {
		switch {
		case equalFold(args[i], "auth") && i+2 < len(args):
			i += 2
		case equalFold(args[i], "setname") && i+1 < len(args):
			i++
			name, named = string(args[i]), true // the last one counts, as in redis
		default:
			return "", false // an error: nothing changes
		}
	}
	return name, named
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
