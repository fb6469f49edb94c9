package proxy

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"slices"
	"strconv"
	"strings"
	"sync/atomic"
	"time"

	"github.com/entra-redis-proxy/entra-redis-proxy/resp"
)

// Two states hold an in-band AUTH back until the client moves on: a blocking command (the AUTH would wait
// behind it) and an open MULTI (the AUTH would be queued). When a session is still on the old token at the
// deadline (85% of its life), the client loop rescues the connection:
//
//   - blocked: from a short-lived control connection it runs CLIENT UNBLOCK <id> TIMEOUT. If the command's
//     reply is then the timeout (null) reply, the reply loop hides it, and the client loop sends AUTH and the
//     same command again with the time that was left. If data won the race, the data goes to the client and
//     nothing is re-issued. For XREAD with "$", the IDs are pinned to the streams' last IDs first, read while
//     the client is still blocked (so nothing arrived since it blocked).
//     CLIENT UNBLOCK answering 0 while the command is unanswered means the id is unknown where the control
//     connection landed (Redis Enterprise's proxies do not share CLIENT IDs): it is sent again from new
//     control connections, a few times, then the rescue gives up and the connection stays on the old
//     token, as without a rescue (the server closes it at expiry unless the command returns first).
//   - MULTI: the proxy discards the transaction, authenticates, and opens it again with the queued commands
//     (their replies hidden), so EXEC runs them. If the client had WATCHed keys, the guarantee cannot be
//     rebuilt: EXEC will answer as if a watched key changed (null), and until then the proxy answers the
//     client's commands itself (+QUEUED), running nothing.

// blocked is a blocking command in flight, kept so that it can be sent again after an unblock.
type blocked struct {
	args      []string
	timeoutAt int       // index of the timeout argument in args
	ms        bool      // the timeout is in milliseconds
	deadline  time.Time // when it times out on its own; zero = never
	answered  atomic.Bool
	// leased: sent with its timeout capped at a lease (see lease), so a timeout reply with time left is the
	// lease running out: the reply loop hides it and the client loop sends the command again.
	leased bool
	// unblocking is set by the client loop before CLIENT UNBLOCK; the reply loop then reports on result
	// whether it hid a timeout reply (reissue) or passed the reply on.
	unblocking atomic.Bool
	result     chan unblockResult
}

type unblockResult struct {
	reissue   bool
	remaining time.Duration // 0 with reissue: block forever
}

// newBlocked records a blocking command, or returns nil when it will not block (XREAD without BLOCK) or its
// timeout is malformed (redis answers the error).
func newBlocked(args [][]byte, info cmdInfo, now time.Time) *blocked {
	at := int(info.blockArg)
	switch {
	case at < 0:
		at = len(args) - 1
	case at == 0: // XREAD/XREADGROUP: the argument after BLOCK
		at = -1
		for i := 1; i+1 < len(args); i++ {
			if equalFold(args[i], "block") {
				at = i + 1
				break
			}
			if equalFold(args[i], "streams") {
				break
			}
		}
	}
	if at < 1 || at >= len(args) {
		return nil
	}
	t, err := strconv.ParseFloat(string(args[at]), 64)
	if err != nil || t < 0 {
		return nil
	}
	b := &blocked{timeoutAt: at, ms: info.blockMS, result: make(chan unblockResult, 1)}
	if t > 0 {
		unit := time.Second
		if b.ms {
			unit = time.Millisecond
		}
		b.deadline = now.Add(time.Duration(t * float64(unit)))
	}
	b.args = make([]string, len(args))
	for i, a := range args {
		b.args[i] = string(a)
	}
	return b
}

// remaining returns the time left before the command would time out on its own (0 = forever), and false
// when that time has passed.
func (b *blocked) remaining(now time.Time) (time.Duration, bool) {
	if b.deadline.IsZero() {
		return 0, true
	}
	d := b.deadline.Sub(now)
	return d, d > time.Millisecond
}

// withdraw takes unblocking back after CLIENT UNBLOCKs that unblocked nothing (each answered 0, or none was
// sent), so that b's own reply (data, its timeout) passes to the client. If b was answered meanwhile, the
// reply loop reports on result right after setting answered: withdraw returns that result.
// (A reply that the reply loop read while unblocking was still set is hidden only if it is a timeout with
// time left, which nothing but a CLIENT UNBLOCK causes.)
func (b *blocked) withdraw() (unblockResult, bool) {
	b.unblocking.Store(false)
	if !b.answered.Load() {
		return unblockResult{}, false
	}
	return <-b.result, true
}

// again returns the command with its timeout set to d (0 = forever).
func (b *blocked) again(d time.Duration) *blocked {
	return &blocked{args: b.argsWith(d), timeoutAt: b.timeoutAt, ms: b.ms, deadline: b.deadline,
		result: make(chan unblockResult, 1)}
}

// argsWith returns b's arguments with the timeout set to d (0 = forever).
func (b *blocked) argsWith(d time.Duration) []string {
	args := append([]string(nil), b.args...)
	switch {
	case d == 0:
		args[b.timeoutAt] = "0"
	case b.ms:
		args[b.timeoutAt] = strconv.FormatInt(max(d.Milliseconds(), 1), 10)
	default:
		args[b.timeoutAt] = strconv.FormatFloat(max(d.Seconds(), 0.001), 'f', 3, 64)
	}
	return args
}

// readsNewEntries reports whether b is an XREAD for entries after "$": sent again after its own timeout,
// it would miss those added in between, so it is never leased.
func (b *blocked) readsNewEntries() bool {
	return (strings.EqualFold(b.args[0], "xread") || strings.EqualFold(b.args[0], "xreadgroup")) &&
		slices.Contains(b.args[b.timeoutAt:], "$")
}

// isTimeoutReply reports whether the frame at p is what a blocking command answers when it times out: a
// null, or for WAIT fewer replicas than asked. ok is false when more bytes are needed.
func (b *blocked) isTimeoutReply(p []byte) (timeout, ok bool) {
	if bytes.HasPrefix(p, []byte("_\r")) { // RESP3 null
		return true, true
	}
	if len(p) < 4 {
		return false, bytes.IndexByte(p, '\n') >= 0
	}
	switch {
	case bytes.HasPrefix(p, []byte("*-1\r")), bytes.HasPrefix(p, []byte("$-1\r")):
		return true, true
	case p[0] == ':' && strings.EqualFold(b.args[0], "wait"):
		i := bytes.IndexByte(p, '\r')
		if i < 0 {
			return false, false
		}
		got, err1 := strconv.Atoi(string(p[1:i]))
		want, err2 := strconv.Atoi(b.args[1])
		return err1 == nil && err2 == nil && got < want, true
	}
	return false, true
}

const (
	// unblockAttempts bounds the CLIENT UNBLOCKs of one rescue, each from a new control connection. Redis
	// Enterprise does not share CLIENT IDs between its proxy nodes (multi-proxy policies): a control
	// connection that lands on another node finds no such client and gets 0; the next may land on ours.
	unblockAttempts = 3
	// unblockPause is how long a rescue waits for the command's own reply after a 0, before the next
	// attempt: a reply sent just before the CLIENT UNBLOCK (data, its own timeout) also explains a 0.
	unblockPause = 100 * time.Millisecond
)

// unblock rescues a connection blocked past the deadline (see above).
func (s *session) unblock(tok Token) error {
	b := s.cl.hold.cmd
	if b == nil || b.answered.Load() || s.led.len() != 1 {
		s.retryLater(pokeDeadline) // replies before it still due: it is not the only one outstanding yet
		return nil
	}
	ctx, cancel := context.WithTimeout(s.srv.ctx, handoverTimeout)
	defer cancel()
	res, ok := s.awaitUnblock(ctx, tok, b)
	if !ok {
		return nil
	}
	now := s.srv.now()
	s.appendAuth(tok, now)
	if res.reissue {
		nb := b.again(res.remaining)
		s.reissue(nb, nb.args, now)
		s.srv.obs.Mechanism("unblock_reissue")
		s.log.Debug("blocked command re-issued after re-AUTH", "command", b.args[0])
	}
	return s.flush()
}

// reissue sends the blocking command nb, as args, and holds what follows behind it.
func (s *session) reissue(nb *blocked, args []string, now int64) {
	s.cl.out = resp.AppendCommand(s.cl.out, args...)
	s.expect(entry{act: actForward, cmd: lookup([]byte(args[0])).idx, start: now, blk: nb})
	s.cl.hold.cmd = nb
}

// An identity that may not run CLIENT UNBLOCK (Azure's Data Contributor policy: it is @dangerous) cannot be
// rescued while blocked. Its blocking commands are sent on a lease instead: with the timeout capped so that
// the command returns while the connection's token has 15% of its life left. A timeout reply with the
// client's own time left is the lease running out: the reply loop hides it, and the client loop sends the
// newest token and the command again with the time left, on a new lease. Data that arrives meanwhile waits
// in the server (a list, a sorted set, a stream past a fixed ID) for the next issue. XREAD "$" is never
// leased: "$" sent again would skip the entries added between the lease's end and the new issue.

// minLease is the shortest lease worth taking: nearer a token's expiry the command is sent as it is. Without
// a newer token, each lease is 85% of the time left, so a few leases reach it.
const minLease = 100 * time.Millisecond

// lease returns the arguments to send for b on a lease, after sending the newest token if the connection
// is not on it yet; nil when b returns by itself before the lease would end, or cannot be leased.
func (s *session) lease(b *blocked, now time.Time) []string {
	tok, _ := s.srv.opts.Tokens.Current()
	if tok.Secret == "" || tok.ExpiresOn.IsZero() || b.readsNewEntries() {
		return nil
	}
	d := tok.ExpiresOn.Sub(now) * 85 / 100
	if s.srv.now() < s.srv.maintUntil.Load() {
		d = min(d, maintenanceLease) // it comes back soon, and can move then (renewLease)
	}
	if rem, _ := b.remaining(now); d < minLease || (rem != 0 && rem <= d) {
		return nil
	}
	s.authNewest(s.srv.now())
	b.leased = true
	return b.argsWith(d)
}

// authNewest sends the newest token if the connection is not on it yet.
func (s *session) authNewest(now int64) {
	if tok, _ := s.srv.opts.Tokens.Current(); tok.Secret != "" && tok.Secret != s.cl.secret {
		s.appendAuth(tok, now)
	}
}

// maintenanceLease caps a lease taken while a maintenance is in progress: a blocked command that CLIENT
// UNBLOCK can't end moves at the end of its lease.
const maintenanceLease = time.Second

// renewLease sends a leased command again after its lease ran out (the reply loop hid its timeout reply),
// on the newest token and a new lease. If a maintenance move is due, the session moves first: the timeout
// reply shows that the command took nothing, so it can run on the new upstream.
func (s *session) renewLease() error {
	b := s.cl.hold.cmd
	if b == nil || !b.leased || !b.answered.Load() {
		return nil
	}
	s.cl.hold.cmd = nil
	res := <-b.result // sent right after answered
	if !res.reissue {
		return nil
	}
	if at := s.srv.maintAt.Load(); at != 0 && s.cl.upSince <= at && s.led.waitIdle(handoverTimeout) && s.canMove(false) {
		if err := s.switchUpstream(); err != nil {
			return err
		}
	}
	now := s.srv.now()
	s.authNewest(now)
	nb := b.again(res.remaining)
	args := s.lease(nb, s.srv.epoch.Add(time.Duration(now)))
	if args == nil {
		args = nb.args
	}
	s.reissue(nb, args, now)
	s.srv.obs.Mechanism("lease_renewed")
	s.log.Debug("blocked command's lease renewed", "command", b.args[0], "leased", nb.leased)
	return nil
}

// awaitUnblock sends CLIENT UNBLOCK for b until b is answered, and returns b's result. It returns false when
// the rescue gives up (logged): b stays blocked on the old token, as without a rescue, and its reply goes to
// the client whenever it comes.
func (s *session) awaitUnblock(ctx context.Context, tok Token, b *blocked) (unblockResult, bool) {
	id := s.upID.Load()
	if id == 0 {
		s.srv.obs.Mechanism("unblock_missed")
		s.log.Warn("cannot unblock the connection for re-AUTH: its CLIENT ID is unknown; it stays blocked on " +
			"the old token, and the server closes it when that token expires unless the command returns first")
		return unblockResult{}, false
	}
	for attempt := 1; ; attempt++ {
		n, err := s.sendUnblock(ctx, tok, b, id)
		var refused *replyError
		switch {
		case errors.As(err, &refused): // NOPERM, say: another connection would be refused too
			if res, ok := b.withdraw(); ok {
				return res, true
			}
			s.srv.obs.Mechanism("unblock_missed")
			s.srv.facts.set(probeUnblock, factNo)
			s.log.Warn("CLIENT UNBLOCK refused: the connection stays blocked on the old token, and the server "+
				"closes it when that token expires unless the command returns first; blocking commands sent from "+
				"now on are leased instead", "err", err)
			return unblockResult{}, false
		case err != nil:
			if res, ok := b.withdraw(); ok {
				return res, true
			}
			s.log.Warn("cannot unblock the connection for re-AUTH; retrying", "err", err)
			s.retryLater(pokeDeadline)
			return unblockResult{}, false
		case n != 0: // unblocked, or answered before CLIENT UNBLOCK was sent (-1): the result is due
			select {
			case res := <-b.result:
				return res, true
			case <-ctx.Done():
			}
			if res, ok := b.withdraw(); ok {
				return res, true
			}
			s.srv.obs.Mechanism("unblock_missed") // (Enterprise: another proxy's client with the same id?)
			s.srv.facts.set(probeUnblock, factNo)
			s.log.Warn("blocked command did not return after CLIENT UNBLOCK answered 1; its reply goes to the "+
				"client as it comes, and the connection stays on the old token; blocking commands sent from now on "+
				"are leased instead", "upstream_client_id", id)
			return unblockResult{}, false
		}
		// 0: no client blocked with that id where the control connection landed. Unless b's reply is on
		// its way, the id is unknown there.
		wait := time.NewTimer(unblockPause)
		select {
		case res := <-b.result:
			wait.Stop()
			return res, true
		case <-wait.C:
		case <-ctx.Done():
			wait.Stop()
		}
		if attempt < unblockAttempts && ctx.Err() == nil {
			s.srv.obs.Mechanism("unblock_retry")
			s.log.Debug("CLIENT UNBLOCK answered 0; retrying from a new control connection",
				"upstream_client_id", id, "attempt", attempt)
			continue
		}
		if res, ok := b.withdraw(); ok {
			return res, true
		}
		s.srv.obs.Mechanism("unblock_missed")
		// What missed once misses again (Redis Enterprise's proxies don't share CLIENT IDs): later blocking
		// commands go on leases, which need no CLIENT UNBLOCK.
		s.srv.facts.set(probeUnblock, factNo)
		s.log.Warn("CLIENT UNBLOCK found no blocked client with the connection's id (Redis Enterprise does not "+
			"share CLIENT IDs between its proxies): the connection stays blocked on the old token, and the server "+
			"closes it when that token expires unless the command returns first; blocking commands sent from now "+
			"on are leased instead", "upstream_client_id", id, "attempts", attempt)
		return unblockResult{}, false
	}
}

// sendUnblock sends CLIENT UNBLOCK id TIMEOUT for b from a new control connection, and returns the reply's
// count: 1 unblocked, 0 no client blocked with that id there, or -1 when b was answered first and nothing
// was sent. An error reply is a *replyError.
func (s *session) sendUnblock(ctx context.Context, tok Token, b *blocked, id int64) (int64, error) {
	conn, err := s.dialBlockedNode(ctx)
	if err != nil {
		return 0, fmt.Errorf("dial control connection: %w", err)
	}
	defer conn.Close()
	c := newCtrlConn(conn)
	if _, _, err := c.handshake(ctx, tok, fixedToken(tok)); err != nil {
		return 0, fmt.Errorf("control connection: %w", err)
	}
	if err := pinStreamIDs(ctx, c, b); err != nil {
		return 0, err
	}
	// The reply loop sets answered, then reports on result; this sets unblocking, then reads answered: the
	// reply loop sees unblocking for any reply the CLIENT UNBLOCK caused.
	b.unblocking.Store(true)
	if b.answered.Load() {
		return -1, nil
	}
	r, err := c.do(ctx, "CLIENT", "UNBLOCK", strconv.FormatInt(id, 10), "TIMEOUT")
	if err == nil {
		err = r.expect(':')
	}
	if err != nil {
		return 0, fmt.Errorf("CLIENT UNBLOCK: %w", err)
	}
	return r.num, nil
}

// pinStreamIDs replaces "$" in a blocked XREAD with each stream's last ID, read on c while the client is
// still blocked, so that entries added between the unblock and the re-issue are not missed.
func pinStreamIDs(ctx context.Context, c *ctrlConn, b *blocked) error {
	if !strings.EqualFold(b.args[0], "xread") && !strings.EqualFold(b.args[0], "xreadgroup") {
		return nil
	}
	streams := -1
	for i, a := range b.args {
		if strings.EqualFold(a, "streams") {
			streams = i + 1
		}
	}
	if streams < 0 || (len(b.args)-streams)%2 != 0 {
		return nil
	}
	n := (len(b.args) - streams) / 2
	for i := range n {
		if b.args[streams+n+i] != "$" {
			continue
		}
		key := b.args[streams+i]
		r, err := c.do(ctx, "XINFO", "STREAM", key)
		if err != nil {
			return fmt.Errorf("XINFO STREAM: %w", err)
		}
		id, ok := r.field("last-generated-id")
		switch {
		case r.typ == '-':
			id = "0-0" // no such key: "$" means 0-0
		case !ok:
			return fmt.Errorf("XINFO STREAM %s: no last-generated-id in %s", key, r)
		}
		b.args[streams+n+i] = id
	}
	return nil
}

// rescueMulti re-authenticates a connection inside MULTI (see above).
func (s *session) rescueMulti(tok Token) {
	c := &s.cl
	if s.flush() == nil {
		s.led.waitIdle(forever) // every reply in: whether keys are watched is the server's answer
	}
	watching := s.watch.on.Load()
	now := s.srv.now()
	c.out = resp.AppendCommand(c.out, "DISCARD")
	s.expect(entry{act: actDrop, cmd: cmdOther, start: now})
	s.appendAuth(tok, now)
	if !c.tx.canReplay(watching) {
		c.tx.abort(watching)
		s.srv.obs.Mechanism("tx_abort")
		s.log.Info("transaction held open past the token's deadline cannot be rebuilt (WATCH, or over 1 MiB queued): EXEC will fail")
		return
	}
	c.out = resp.AppendCommand(c.out, "MULTI")
	s.expect(entry{act: actDrop, cmd: cmdOther, start: now})
	c.out = append(c.out, c.tx.queued...)
	for range c.tx.count {
		s.expect(entry{act: actDrop, cmd: cmdOther, start: now})
	}
	s.srv.obs.Mechanism("tx_replay")
	s.log.Debug("transaction replayed on the re-authenticated connection", "commands", c.tx.count)
}

// abortedTx answers a command of a transaction that was aborted by rescueMulti, without running it.
func (s *session) abortedTx(info cmdInfo, e entry) {
	e.text = "+QUEUED\r\n"
	if info.sp == spExec || info.sp == spDiscard {
		e.watch = watchExec // its stand-in's reply ends the watches in the model, as EXEC and DISCARD would
	}
	switch info.sp {
	case spExec:
		if s.cl.tx.nullExec {
			e.act = actExecNull // as if a watched key had changed
		} else {
			e.text = "-EXECABORT Transaction discarded because of previous errors.\r\n"
		}
		s.cl.tx.end()
	case spDiscard:
		e.text = "+OK\r\n"
		s.cl.tx.end()
	case spMulti:
		e.text = "-ERR MULTI calls can not be nested\r\n"
	case spWatch:
		e.text = "-ERR WATCH inside MULTI is not allowed\r\n"
	}
	if e.act == actExecNull {
		s.cl.out = resp.AppendCommand(s.cl.out, "PING")
		s.expect(e)
		return
	}
	s.local(e)
}
