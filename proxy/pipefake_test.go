package proxy_test

import (
	"context"
	"errors"
	"fmt"
	"net"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/entra-redis-proxy/entra-redis-proxy/proxy"
	"github.com/entra-redis-proxy/entra-redis-proxy/resp"
)

// fakeUpstream is a tiny scripted redis behind net.Pipe, for tests inside a synctest bubble. It is also the
// proxy's Dialer: every dial is a new connection served by two goroutines, one reading (as a kernel would
// buffer: the proxy's writes never wait for a command to finish) and one running the commands in order.
//
// It answers what the proxy itself sends (AUTH, CLIENT ID, CLIENT UNBLOCK, PING) and a few commands with
// redis semantics the session machinery depends on: MULTI/EXEC/DISCARD queueing (a queued AUTH's +OK lands
// in the EXEC array), CLIENT REPLY ON/OFF/SKIP, BLPOP blocking the connection (later commands wait behind
// it), HELLO 3, MONITOR, ECHO. Like Azure, it closes a connection when the token it authenticated with
// expires. Tests script any other command (see handle), and read back every command each connection
// received, in order.
type fakeUpstream struct {
	t testing.TB

	mu       sync.Mutex
	nextID   int64
	conns    []*fakeConn
	valid    map[string]proxy.Token // accepted tokens by secret; each until its ExpiresOn
	scripts  map[string]fakeHandler // upper-case command name -> handler, before the built-in commands
	lists    map[string][]string    // for BLPOP
	changed  chan struct{}          // closed and replaced when a list changes or an unblock is asked
	events   []string               // what the fake did on its own (expiry closes), for failure messages
	pushes   bool                   // on RESP3 connections, send a push before every reply
	noReply  bool                   // CLIENT REPLY is denied (a data access policy): -NOPERM
	down     bool                   // dials fail (a failover in progress, a restart)
	execCut  int                    // > 0: EXEC's reply is written in two pieces, cut there
	execErr  string                 // set: EXEC answers this error line, the transaction discarded (a moved slot)
	shutdown bool
}

// fakeHandler runs one command on c; it writes its reply with c.reply (or c.chunked).
type fakeHandler func(c *fakeConn, args []string)

func newFakeUpstream(t testing.TB) *fakeUpstream {
	return &fakeUpstream{
		t: t, valid: make(map[string]proxy.Token), scripts: make(map[string]fakeHandler),
		lists: make(map[string][]string), changed: make(chan struct{}),
	}
}

// accept makes the fake accept tok in AUTH until tok.ExpiresOn.
func (f *fakeUpstream) accept(tok proxy.Token) {
	f.mu.Lock()
	f.valid[tok.Secret] = tok
	f.mu.Unlock()
}

// handle scripts the command name (any case) on every connection.
func (f *fakeUpstream) handle(name string, h fakeHandler) {
	f.mu.Lock()
	f.scripts[strings.ToUpper(name)] = h
	f.mu.Unlock()
}

// push appends v to list key (RPUSH), waking a BLPOP on it.
func (f *fakeUpstream) push(key, v string) {
	f.mu.Lock()
	f.lists[key] = append(f.lists[key], v)
	f.broadcastLocked()
	f.mu.Unlock()
}

func (f *fakeUpstream) broadcastLocked() {
	close(f.changed)
	f.changed = make(chan struct{})
}

func (f *fakeUpstream) event(format string, args ...any) {
	f.mu.Lock()
	f.events = append(f.events, time.Now().UTC().Format("15:04:05.000")+" "+fmt.Sprintf(format, args...))
	f.mu.Unlock()
}

// Events returns what the fake did on its own, one line each.
func (f *fakeUpstream) Events() string {
	f.mu.Lock()
	defer f.mu.Unlock()
	if len(f.events) == 0 {
		return "(none)"
	}
	return strings.Join(f.events, "; ")
}

// Conns returns the connections dialed so far, in dial order.
func (f *fakeUpstream) Conns() []*fakeConn {
	f.mu.Lock()
	defer f.mu.Unlock()
	return append([]*fakeConn(nil), f.conns...)
}

// DialContext implements proxy.Dialer.
func (f *fakeUpstream) DialContext(ctx context.Context) (net.Conn, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.shutdown {
		return nil, errors.New("fake upstream: shut down")
	}
	if f.down {
		return nil, errors.New("fake upstream: connection refused")
	}
	f.nextID++
	proxySide, ours := net.Pipe()
	c := &fakeConn{f: f, id: f.nextID, nc: ours, wake: make(chan struct{}, 1), done: make(chan struct{}),
		gone: make(chan struct{}), proto: 2}
	f.conns = append(f.conns, c)
	go c.readLoop()
	go c.runLoop()
	return proxySide, nil
}

// setDown makes dials fail (down) or work again.
func (f *fakeUpstream) setDown(down bool) {
	f.mu.Lock()
	f.down = down
	f.mu.Unlock()
}

// close closes every connection and refuses new dials.
func (f *fakeUpstream) close() {
	f.mu.Lock()
	f.shutdown = true
	conns := append([]*fakeConn(nil), f.conns...)
	f.mu.Unlock()
	for _, c := range conns {
		c.close()
	}
}

// fakeConn is one upstream connection of the fake.
type fakeConn struct {
	f    *fakeUpstream
	id   int64 // CLIENT ID
	nc   net.Conn
	wake chan struct{} // a command was queued, or the reader stopped
	done chan struct{} // closed by close
	gone chan struct{} // closed when the proxy closed its end (the reader got an error)

	mu        sync.Mutex
	cmds      []string   // every command received, "NAME arg ...", in order of receipt
	queue     [][]string // received, not yet run
	eof       bool       // the reader stopped
	closeOnce sync.Once
	closedBy  string // why the fake closed it, if it did

	wmu sync.Mutex // one writer at a time: the runner, or a test writing pushes/monitor lines

	// Owned by the runner goroutine.
	proto    int
	user     string      // authenticated user, "" before AUTH
	secret   string      // the token it authenticated with
	expiry   *time.Timer // closes the connection when that token expires
	inMulti  bool
	txq      [][]string
	replyOff bool
	skipNext bool
	suppress bool    // the command being run gets no reply (CLIENT REPLY OFF/SKIP)
	capture  *[]byte // inside EXEC: replies go into the EXEC array

	// Guarded by f.mu: BLPOP state, visible to CLIENT UNBLOCK on other connections.
	blocked   bool
	unblockTO bool
}

// Commands returns every command the connection received so far, in order.
func (c *fakeConn) Commands() []string {
	c.mu.Lock()
	defer c.mu.Unlock()
	return append([]string(nil), c.cmds...)
}

// ClosedBy says why the fake closed the connection ("" if it did not).
func (c *fakeConn) ClosedBy() string {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.closedBy
}

func (c *fakeConn) closeWith(why string) {
	c.mu.Lock()
	if c.closedBy == "" {
		c.closedBy = why
	}
	c.mu.Unlock()
	c.close()
}

func (c *fakeConn) close() {
	c.closeOnce.Do(func() {
		close(c.done)
		c.nc.Close()
	})
}

func (c *fakeConn) readLoop() {
	var p resp.CommandParser
	var buf []byte
	tmp := make([]byte, 4096)
	for {
		n, err := c.nc.Read(tmp)
		buf = append(buf, tmp[:n]...)
		for len(buf) > 0 {
			cmd, k, perr := p.Parse(buf)
			if errors.Is(perr, resp.ErrIncomplete) {
				break
			}
			if perr != nil {
				c.f.t.Errorf("fake upstream conn %d: the proxy sent a malformed command: %v (bytes %q)", c.id, perr, trimmed(buf, 80))
				c.close()
				err = perr
				break
			}
			if len(cmd.Args) > 0 {
				args := make([]string, len(cmd.Args))
				for i, a := range cmd.Args {
					args[i] = string(a)
				}
				c.mu.Lock()
				c.cmds = append(c.cmds, strings.Join(args, " "))
				c.queue = append(c.queue, args)
				c.mu.Unlock()
				c.signal()
			}
			buf = append(buf[:0], buf[k:]...)
		}
		if err != nil {
			close(c.gone)
			c.mu.Lock()
			c.eof = true
			c.mu.Unlock()
			c.signal()
			return
		}
	}
}

func (c *fakeConn) signal() {
	select {
	case c.wake <- struct{}{}:
	default:
	}
}

func (c *fakeConn) runLoop() {
	defer func() {
		if c.expiry != nil {
			c.expiry.Stop()
		}
		c.close()
	}()
	for {
		c.mu.Lock()
		if len(c.queue) > 0 {
			args := c.queue[0]
			c.queue = c.queue[1:]
			c.mu.Unlock()
			c.run(args)
			continue
		}
		eof := c.eof
		c.mu.Unlock()
		if eof {
			return
		}
		<-c.wake
	}
}

// write sends p to the proxy, whatever the reply mode; it reports false once the connection is closed.
func (c *fakeConn) write(p []byte) bool {
	c.wmu.Lock()
	defer c.wmu.Unlock()
	_, err := c.nc.Write(p)
	return err == nil
}

// reply writes (part of) the reply of the command being run, honouring CLIENT REPLY and EXEC.
func (c *fakeConn) reply(p string) bool {
	switch {
	case c.suppress:
		return true
	case c.capture != nil:
		*c.capture = append(*c.capture, p...)
		return true
	}
	return c.write([]byte(p))
}

// chunked writes reply in pieces ending at cuts (ascending offsets inside reply), with pause before each
// piece after the first: a reply that spans several reads of the proxy, each boundary a read boundary.
func (c *fakeConn) chunked(reply string, cuts []int, pause time.Duration) {
	prev := 0
	for _, cut := range append(cuts, len(reply)) {
		if cut <= prev {
			continue
		}
		if prev > 0 {
			time.Sleep(pause)
		}
		if !c.reply(reply[prev:cut]) {
			return
		}
		prev = cut
	}
}

func (c *fakeConn) nullReply() string {
	if c.proto == 3 {
		return "_\r\n"
	}
	return "*-1\r\n"
}

// run runs one command with redis's reply-mode and transaction rules around it.
func (c *fakeConn) run(args []string) {
	name := strings.ToUpper(args[0])
	sub := ""
	if len(args) > 1 {
		sub = strings.ToUpper(args[1])
	}
	c.f.mu.Lock()
	noReply := c.f.noReply
	c.f.mu.Unlock()
	if name == "CLIENT" && sub == "REPLY" && len(args) == 3 && !noReply {
		switch strings.ToUpper(args[2]) {
		case "ON":
			c.replyOff, c.skipNext = false, false
			c.suppress = false
			c.reply("+OK\r\n")
		case "OFF":
			c.replyOff = true
		case "SKIP":
			c.skipNext = !c.replyOff
		}
		return
	}
	c.suppress = c.replyOff || c.skipNext
	c.skipNext = false
	defer func() { c.suppress = false }()

	if c.proto == 3 && c.capture == nil {
		c.f.mu.Lock()
		pushes := c.f.pushes
		c.f.mu.Unlock()
		if pushes {
			// Not a reply: CLIENT REPLY does not silence it.
			c.write([]byte(pushFrame("before " + name)))
		}
	}
	if c.user == "" && name != "AUTH" && name != "HELLO" && name != "QUIT" {
		c.reply("-NOAUTH Authentication required.\r\n")
		return
	}
	if c.inMulti {
		switch name {
		case "EXEC":
			c.exec()
		case "DISCARD":
			c.inMulti, c.txq = false, nil
			c.reply("+OK\r\n")
		case "MULTI":
			c.reply("-ERR MULTI calls can not be nested\r\n")
		default:
			c.txq = append(c.txq, args)
			c.reply("+QUEUED\r\n")
		}
		return
	}
	c.command(name, sub, args, false)
}

// exec runs the queued transaction; the replies go into one array.
func (c *fakeConn) exec() {
	c.f.mu.Lock()
	refusal := c.f.execErr
	c.f.mu.Unlock()
	if refusal != "" {
		c.inMulti, c.txq = false, nil
		c.reply(refusal)
		return
	}
	var replies []byte
	c.capture = &replies
	for _, q := range c.txq {
		n := strings.ToUpper(q[0])
		s := ""
		if len(q) > 1 {
			s = strings.ToUpper(q[1])
		}
		c.command(n, s, q, true)
	}
	c.capture = nil
	n := len(c.txq)
	c.inMulti, c.txq = false, nil
	c.f.mu.Lock()
	cut := c.f.execCut
	c.f.mu.Unlock()
	c.chunked("*"+strconv.Itoa(n)+"\r\n"+string(replies), []int{cut}, time.Millisecond)
}

// command runs one command outside MULTI (or inside EXEC: inTx, where blocking commands do not block).
func (c *fakeConn) command(name, sub string, args []string, inTx bool) {
	c.f.mu.Lock()
	h := c.f.scripts[name]
	c.f.mu.Unlock()
	if h != nil {
		h(c, args)
		return
	}
	switch {
	case name == "AUTH":
		c.auth(args)
	case name == "HELLO":
		c.hello(args)
	case name == "PING":
		if len(args) > 1 {
			c.reply(bulkOf(args[1]))
		} else {
			c.reply("+PONG\r\n")
		}
	case name == "ECHO" && len(args) == 2:
		c.reply(bulkOf(args[1]))
	case name == "QUIT":
		c.reply("+OK\r\n")
		c.close()
	case name == "MULTI":
		c.inMulti, c.txq = true, nil
		c.reply("+OK\r\n")
	case name == "EXEC" || name == "DISCARD":
		c.reply("-ERR " + name + " without MULTI\r\n")
	case name == "MONITOR":
		c.reply("+OK\r\n")
	case name == "CLIENT" && sub == "REPLY":
		c.reply("-NOPERM this user has no permissions to run the 'client|reply' command\r\n")
	case name == "CLIENT" && sub == "ID":
		c.reply(":" + strconv.FormatInt(c.id, 10) + "\r\n")
	case name == "CLIENT" && sub == "UNBLOCK" && len(args) >= 3:
		c.unblock(args)
	case name == "BLPOP" && len(args) >= 3:
		c.blpop(args, inTx)
	case name == "GET":
		c.reply("$-1\r\n")
	default:
		c.reply("-ERR unknown command '" + args[0] + "' (not scripted in the fake upstream)\r\n")
	}
}

func (c *fakeConn) auth(args []string) {
	if len(args) != 3 {
		c.reply("-ERR fake upstream wants AUTH <user> <token>\r\n")
		return
	}
	c.f.mu.Lock()
	tok, ok := c.f.valid[args[2]]
	c.f.mu.Unlock()
	if !ok || tok.Username != args[1] || !time.Now().Before(tok.ExpiresOn) {
		c.reply("-WRONGPASS invalid username-password pair or user is disabled.\r\n")
		return
	}
	c.user, c.secret = args[1], args[2]
	if c.expiry != nil {
		c.expiry.Stop()
	}
	// Like Azure: the connection is closed when the token it last authenticated with expires.
	c.expiry = time.AfterFunc(time.Until(tok.ExpiresOn), func() {
		why := fmt.Sprintf("its token %s expired", tok.Secret)
		c.f.event("closed upstream conn %d: %s", c.id, why)
		c.closeWith(why)
	})
	c.reply("+OK\r\n")
}

func (c *fakeConn) hello(args []string) {
	proto := c.proto
	if len(args) > 1 {
		p, err := strconv.Atoi(args[1])
		if err != nil || (p != 2 && p != 3) {
			c.reply("-NOPROTO unsupported protocol version\r\n")
			return
		}
		proto = p
	}
	if c.user == "" {
		c.reply("-NOAUTH HELLO must be called with the client already authenticated\r\n")
		return
	}
	c.proto = proto
	if proto == 3 {
		c.reply("%1\r\n+proto\r\n:3\r\n")
	} else {
		c.reply("*2\r\n$5\r\nproto\r\n:2\r\n")
	}
}

// blpop pops the first element of the first non-empty list, or blocks the connection until a push, a
// CLIENT UNBLOCK or the timeout (0 = forever). Commands behind it wait, as in redis.
func (c *fakeConn) blpop(args []string, inTx bool) {
	keys := args[1 : len(args)-1]
	secs, err := strconv.ParseFloat(args[len(args)-1], 64)
	if err != nil || secs < 0 {
		c.reply("-ERR timeout is not a float or out of range\r\n")
		return
	}
	var timeout <-chan time.Time
	if secs > 0 {
		t := time.NewTimer(time.Duration(secs * float64(time.Second)))
		defer t.Stop()
		timeout = t.C
	}
	for {
		c.f.mu.Lock()
		for _, k := range keys {
			if l := c.f.lists[k]; len(l) > 0 {
				c.f.lists[k] = l[1:]
				c.blocked, c.unblockTO = false, false
				c.f.mu.Unlock()
				c.reply("*2\r\n" + bulkOf(k) + bulkOf(l[0]))
				return
			}
		}
		if inTx || c.unblockTO {
			c.blocked, c.unblockTO = false, false
			c.f.mu.Unlock()
			c.reply(c.nullReply())
			return
		}
		c.blocked = true
		ch := c.f.changed
		c.f.mu.Unlock()
		select {
		case <-ch:
		case <-timeout:
			c.f.mu.Lock()
			c.blocked = false
			c.f.mu.Unlock()
			c.reply(c.nullReply())
			return
		case <-c.done:
			return
		}
	}
}

func (c *fakeConn) unblock(args []string) {
	id, err := strconv.ParseInt(args[2], 10, 64)
	if err != nil {
		c.reply("-ERR value is not an integer or out of range\r\n")
		return
	}
	c.f.mu.Lock()
	n := 0
	for _, o := range c.f.conns {
		if o.id == id && o.blocked {
			o.unblockTO = true
			c.f.broadcastLocked()
			n = 1
		}
	}
	c.f.mu.Unlock()
	c.reply(":" + strconv.Itoa(n) + "\r\n")
}

func bulkOf(s string) string { return "$" + strconv.Itoa(len(s)) + "\r\n" + s + "\r\n" }

// pushFrame is a RESP3 pub/sub message push carrying payload.
func pushFrame(payload string) string {
	return ">3\r\n" + bulkOf("message") + bulkOf("ch") + bulkOf(payload)
}

func trimmed(b []byte, n int) []byte {
	if len(b) > n {
		return b[:n]
	}
	return b
}
