package proxy_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"testing/synctest"
	"time"

	"github.com/entra-redis-proxy/entra-redis-proxy/proxy"
	"github.com/entra-redis-proxy/entra-redis-proxy/resp"
)

// Deterministic tests of the session machinery without redis: clients and the upstream are net.Pipe ends,
// the upstream is the scripted fakeUpstream (pipefake_test.go), and everything runs in a synctest bubble,
// so deadlines, rotation windows and stall timeouts are exact and instant. They use only the proxy's
// public API. synctest.Wait() reaches quiescence; time.Sleep inside a bubble only moves the fake clock.

const (
	pipeLife   = time.Hour        // lifetime of the tokens the tests mint
	pipeSpread = 10 * time.Second // Options.ReauthSpread: every re-AUTH is poked within this window
	pipeStall  = 10 * time.Second // Options.StallTimeout
)

// pipeEnv is one proxy in front of a fake upstream, inside the calling test's bubble.
type pipeEnv struct {
	t    *testing.T
	fake *fakeUpstream
	toks *pipeTokens
	ln   *pipeListener
	srv  *proxy.Server
	n    int // tokens minted
}

func newPipeEnv(t *testing.T, tweak func(*proxy.Options)) *pipeEnv {
	e := &pipeEnv{t: t, fake: newFakeUpstream(t), ln: newPipeListener()}
	e.toks = &pipeTokens{tok: e.mint(pipeLife), changed: make(chan struct{})}
	logs := &pipeLog{}
	opts := proxy.Options{
		Tokens: e.toks, Dialer: e.fake,
		Logger:       slog.New(slog.NewTextHandler(logs, &slog.HandlerOptions{Level: slog.LevelDebug})),
		ReauthSpread: pipeSpread, StallTimeout: pipeStall, WriteTimeout: time.Minute, DialTimeout: 5 * time.Second,
		ReconnectTimeout: -1, // off unless a test turns it on: a missed re-AUTH must show as a closed client
	}
	if tweak != nil {
		tweak(&opts)
	}
	srv, err := proxy.New(opts)
	if err != nil {
		t.Fatal(err)
	}
	e.srv = srv
	served := make(chan error, 1)
	go func() { served <- srv.Serve(e.ln) }()
	t.Cleanup(func() {
		srv.Close() // cut every connection at once
		if err := <-served; !errors.Is(err, proxy.ErrServerClosed) {
			t.Errorf("Serve: %v", err)
		}
		e.fake.close()
		if t.Failed() {
			t.Logf("fake upstream events: %s", e.fake.Events())
			conns := e.fake.Conns()
			if len(conns) > 8 {
				t.Logf("(%d upstream connections; the last 8:)", len(conns))
				conns = conns[len(conns)-8:]
			}
			for _, c := range conns {
				t.Logf("upstream conn %d received %q (closed by fake: %q)", c.id, c.Commands(), c.ClosedBy())
			}
			t.Logf("proxy log:\n%s", logs.String())
		}
	})
	return e
}

// mint makes a new token, valid at the fake for life from now.
func (e *pipeEnv) mint(life time.Duration) proxy.Token {
	e.n++
	tok := proxy.Token{Username: "oid-1", Secret: "tok-" + strconv.Itoa(e.n), ExpiresOn: time.Now().Add(life)}
	e.fake.accept(tok)
	return tok
}

// rotate makes a new token current (closing the changed channel), then lets the whole re-AUTH window pass.
// It returns the token it replaced.
func (e *pipeEnv) rotate() (old proxy.Token) {
	old, _ = e.toks.Current()
	e.toks.set(e.mint(2 * pipeLife)) // outlives the old one by an hour at least
	time.Sleep(pipeSpread)
	synctest.Wait()
	return old
}

// pastExpiry moves the clock to just after tok expired (when the fake closed the connections still on it).
func (e *pipeEnv) pastExpiry(tok proxy.Token) {
	time.Sleep(time.Until(tok.ExpiresOn) + time.Second)
	synctest.Wait()
}

// connect opens a client connection and waits until the proxy has set its session up.
func (e *pipeEnv) connect(name string) *pipeClient {
	proxySide, ours := pipePair()
	select {
	case e.ln.conns <- proxySide:
	case <-time.After(time.Minute):
		e.t.Fatalf("client %s: the proxy did not accept within a minute", name)
	}
	c := &pipeClient{t: e.t, name: name, c: ours}
	go c.collect()
	synctest.Wait()
	return c
}

// pipeTokens is a TokenSource whose token the test rotates.
type pipeTokens struct {
	mu      sync.Mutex
	tok     proxy.Token
	changed chan struct{}
}

func (p *pipeTokens) Current() (proxy.Token, <-chan struct{}) {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.tok, p.changed
}

func (p *pipeTokens) Refresh(context.Context) (proxy.Token, error) {
	tok, _ := p.Current()
	return tok, nil
}

func (p *pipeTokens) set(tok proxy.Token) {
	p.mu.Lock()
	p.tok = tok
	close(p.changed)
	p.changed = make(chan struct{})
	p.mu.Unlock()
}

// pipeListener is a net.Listener whose Accept returns the proxy's ends of pipePairs.
type pipeListener struct {
	conns chan net.Conn
	done  chan struct{}
	once  sync.Once
}

func newPipeListener() *pipeListener {
	return &pipeListener{conns: make(chan net.Conn), done: make(chan struct{})}
}

func (l *pipeListener) Accept() (net.Conn, error) {
	select {
	case c := <-l.conns:
		return c, nil
	case <-l.done:
		return nil, net.ErrClosed
	}
}

func (l *pipeListener) Close() error {
	l.once.Do(func() { close(l.done) })
	return nil
}

func (l *pipeListener) Addr() net.Addr { return pipeAddr{} }

type pipeAddr struct{}

func (pipeAddr) Network() string { return "pipe" }
func (pipeAddr) String() string  { return "pipe" }

// pipeConn is one end of an emulated TCP connection made of two net.Pipes, one per direction, so either side
// can half-close: CloseWrite closes the sending pipe, the peer's Read returns io.EOF once it has read
// everything sent before, and the other direction keeps working. That is what a proxy sees of a client that
// called shutdown(SHUT_WR).
type pipeConn struct {
	r, w net.Conn
}

// pipePair returns the proxy's end and the test's end of a new connection.
func pipePair() (proxySide, testSide *pipeConn) {
	upR, upW := net.Pipe()     // test -> proxy
	downR, downW := net.Pipe() // proxy -> test
	return &pipeConn{r: upR, w: downW}, &pipeConn{r: downR, w: upW}
}

func (c *pipeConn) Read(p []byte) (int, error)  { return c.r.Read(p) }
func (c *pipeConn) Write(p []byte) (int, error) { return c.w.Write(p) }
func (c *pipeConn) CloseWrite() error           { return c.w.Close() }
func (c *pipeConn) Close() error {
	err1, err2 := c.r.Close(), c.w.Close()
	return errors.Join(err1, err2)
}
func (c *pipeConn) LocalAddr() net.Addr  { return pipeAddr{} }
func (c *pipeConn) RemoteAddr() net.Addr { return pipeAddr{} }
func (c *pipeConn) SetDeadline(t time.Time) error {
	return errors.Join(c.r.SetReadDeadline(t), c.w.SetWriteDeadline(t))
}
func (c *pipeConn) SetReadDeadline(t time.Time) error  { return c.r.SetReadDeadline(t) }
func (c *pipeConn) SetWriteDeadline(t time.Time) error { return c.w.SetWriteDeadline(t) }

// pipeClient is the test's side of a client connection; a goroutine collects every byte the proxy sends.
type pipeClient struct {
	t    *testing.T
	name string
	c    *pipeConn

	mu    sync.Mutex
	buf   []byte
	err   error     // what ended reading: io.EOF when the proxy closed the connection
	endAt time.Time // when
}

func (c *pipeClient) collect() {
	b := make([]byte, 64<<10)
	for {
		n, err := c.c.Read(b)
		c.mu.Lock()
		c.buf = append(c.buf, b[:n]...)
		if err != nil {
			c.err, c.endAt = err, time.Now()
		}
		c.mu.Unlock()
		if err != nil {
			return
		}
	}
}

// send writes the commands in one write (a pipeline). A failed write is an error, not fatal: what the client
// received says more.
func (c *pipeClient) send(cmds ...[]string) {
	c.t.Helper()
	var b []byte
	for _, args := range cmds {
		b = resp.AppendCommand(b, args...)
	}
	if _, err := c.c.Write(b); err != nil {
		c.t.Errorf("client %s: write %q: %v (the proxy had closed the connection)", c.name, b, err)
	}
}

func (c *pipeClient) closeWrite() {
	if err := c.c.CloseWrite(); err != nil {
		c.t.Fatalf("client %s: half-close: %v", c.name, err)
	}
}

func (c *pipeClient) got() string {
	c.mu.Lock()
	defer c.mu.Unlock()
	return string(c.buf)
}

// ended returns what ended the connection (nil while it is open) and when.
func (c *pipeClient) ended() (error, time.Time) {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.err, c.endAt
}

// expect fails the test (with what) unless the client got exactly want.
func (c *pipeClient) expect(what, want string) bool {
	c.t.Helper()
	if d := diffBytes(c.got(), want); d != "" {
		err, at := c.ended()
		end := "connection still open"
		if err != nil {
			end = fmt.Sprintf("connection ended (%v) at %s", err, at.UTC().Format("15:04:05.000"))
		}
		c.t.Errorf("client %s: %s: %s; %s", c.name, what, d, end)
		return false
	}
	return true
}

// expectOpen fails the test unless the proxy kept the connection open.
func (c *pipeClient) expectOpen(what string) bool {
	c.t.Helper()
	if err, at := c.ended(); err != nil {
		c.t.Errorf("client %s: %s: the proxy closed the connection at %s (%v)", c.name, what, at.UTC().Format("15:04:05.000"), err)
		return false
	}
	return true
}

// diffBytes describes how got differs from want, or returns "" when they are equal.
func diffBytes(got, want string) string {
	if got == want {
		return ""
	}
	i := 0
	for i < len(got) && i < len(want) && got[i] == want[i] {
		i++
	}
	return fmt.Sprintf("got %d bytes, want %d; first difference at byte %d: got %q, want %q",
		len(got), len(want), i, excerpt(got, i), excerpt(want, i))
}

func excerpt(s string, i int) string {
	from, to := max(0, i-16), min(len(s), i+48)
	prefix := ""
	if from > 0 {
		prefix = "..."
	}
	return prefix + s[from:to]
}

func cmd(args ...string) []string { return args }

// pipeLog is the proxy's log, printed when a test fails.
type pipeLog struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (l *pipeLog) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.buf.Write(p)
}

func (l *pipeLog) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.buf.String()
}

// expectCommands fails the test unless upstream conn c received exactly want.
func expectCommands(t *testing.T, c *fakeConn, what string, want ...string) {
	t.Helper()
	if got := c.Commands(); strings.Join(got, "\n") != strings.Join(want, "\n") {
		t.Errorf("upstream conn %d: %s:\n got  %q\n want %q", c.id, what, got, want)
	}
}

// handshake is what the proxy sends on every new upstream connection, with token n.
func handshake(n int) []string { return []string{"AUTH oid-1 tok-" + strconv.Itoa(n), "CLIENT ID"} }

// firstHandshake is what the proxy's first upstream connection gets: the handshake, then the probe that
// tells whether blocking commands need leases.
func firstHandshake() []string { return append(handshake(1), "CLIENT UNBLOCK 0") }

// ranges formats sorted ints as "1-4, 7".
func ranges(xs []int) string {
	var parts []string
	for i := 0; i < len(xs); {
		j := i
		for j+1 < len(xs) && xs[j+1] == xs[j]+1 {
			j++
		}
		if i == j {
			parts = append(parts, strconv.Itoa(xs[i]))
		} else {
			parts = append(parts, fmt.Sprintf("%d-%d", xs[i], xs[j]))
		}
		i = j + 1
	}
	return strings.Join(parts, ", ")
}

// splitReply scripts GET split:<k> to answer reply in pieces: the first k bytes, then chunks of step bytes,
// pause apart, so the reply spans several reads with a read boundary after byte k.
func splitReply(f *fakeUpstream, reply string, step int, pause time.Duration) {
	f.handle("GET", func(c *fakeConn, args []string) {
		k, err := strconv.Atoi(strings.TrimPrefix(args[1], "split:"))
		if err != nil {
			c.reply("-ERR bad split key\r\n")
			return
		}
		cuts := []int{k}
		for at := k + step; at < len(reply); at += step {
			cuts = append(cuts, at)
		}
		c.chunked(reply, cuts, pause)
	})
}

// halfCloseAt runs one client that sends GET split:<k> and half-closes at once; it returns a description of
// what went wrong, or "".
func halfCloseAt(e *pipeEnv, k int, reply string) string {
	c := e.connect("k=" + strconv.Itoa(k))
	c.send(cmd("GET", "split:"+strconv.Itoa(k)))
	c.closeWrite()
	time.Sleep(time.Second) // far longer than the reply takes
	synctest.Wait()
	if d := diffBytes(c.got(), reply); d != "" {
		return d
	}
	if err, _ := c.ended(); !errors.Is(err, io.EOF) {
		return fmt.Sprintf("whole reply received, but the connection was not closed after it (%v)", err)
	}
	return ""
}

// (1) A client that half-closes right after sending gets its whole reply, whichever byte boundaries the reply
// arrives in. What the proxy sees: the command, then io.EOF on the client's read side, then the reply, which
// must still be written to the client before it closes the connection.
func TestPipeHalfCloseReplySpansReads(t *testing.T) {
	// A multi-bulk reply larger than a small read buffer, split after every byte in turn.
	value := strings.Repeat("0123456789abcdef", 40) // 640 bytes
	small := "*3\r\n" + bulkOf("hello") + "$-1\r\n" + bulkOf(value)
	t.Run(fmt.Sprintf("every boundary of a %d-byte array", len(small)), func(t *testing.T) {
		synctest.Test(t, func(t *testing.T) {
			e := newPipeEnv(t, nil)
			splitReply(e.fake, small, 200, time.Millisecond)
			var bad []int
			first := ""
			for k := 1; k < len(small); k++ {
				if d := halfCloseAt(e, k, small); d != "" {
					bad = append(bad, k)
					if first == "" {
						first = fmt.Sprintf("split after byte %d: %s", k, d)
					}
				}
			}
			if len(bad) > 0 {
				t.Errorf("half-closed client lost part of its reply at %d of %d split points (%s); first: %s",
					len(bad), len(small)-1, ranges(bad), first)
			}
		})
	})
	// A 40 KiB bulk, split around the proxy's buffer sizes.
	big := strings.Repeat("x", 40<<10)
	large := bulkOf(big)
	head := len("$40960\r\n")
	splits := []int{1, head - 2, head - 1, head, head + 1, 511, 512, 513, 16<<10 - 1, 16 << 10, 16<<10 + 1,
		32 << 10, len(large) - 2, len(large) - 1}
	t.Run("40KiB bulk around buffer sizes", func(t *testing.T) {
		synctest.Test(t, func(t *testing.T) {
			e := newPipeEnv(t, nil)
			splitReply(e.fake, large, 4096, 10*time.Millisecond)
			var bad []int
			first := ""
			for _, k := range splits {
				if d := halfCloseAt(e, k, large); d != "" {
					bad = append(bad, k)
					if first == "" {
						first = fmt.Sprintf("split after byte %d: %s", k, d)
					}
				}
			}
			if len(bad) > 0 {
				t.Errorf("half-closed client lost part of a 40 KiB reply (written in 4 KiB chunks 10ms apart) at split points %v of %v; first: %s",
					bad, splits, first)
			}
		})
	})
}

// (2) With a pool, a client that half-closes while its reply is still arriving must not hand the rest of the
// reply to the next client: the upstream may go back to the pool only once the reply is complete.
func TestPipePoolNoCrossClientLeak(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		e := newPipeEnv(t, func(o *proxy.Options) { o.PoolSize = 1 })
		synctest.Wait() // the pool has dialed its connection
		// A's reply: an array of 3000 bulks "A0000".."A2999" (33 KiB), the header and first element in the first
		// read, then chunks of whole elements 100ms apart, so that whatever follows a cut is a valid frame.
		const n, elem = 3000, len("$5\r\nA0000\r\n")
		var sb strings.Builder
		sb.WriteString("*" + strconv.Itoa(n) + "\r\n")
		head := sb.Len() + elem
		for i := range n {
			sb.WriteString(bulkOf(fmt.Sprintf("A%04d", i)))
		}
		reply := sb.String()
		e.fake.handle("GET", func(c *fakeConn, args []string) {
			cuts := []int{head}
			for at := head + 300*elem; at < len(reply); at += 300 * elem {
				cuts = append(cuts, at)
			}
			c.chunked(reply, cuts, 100*time.Millisecond)
		})
		a := e.connect("A")
		a.send(cmd("GET", "big"))
		a.closeWrite()
		synctest.Wait() // A's reply is part-way through: the fake pauses between chunks

		b := e.connect("B")
		b.send(cmd("PING"))
		time.Sleep(time.Minute)
		synctest.Wait()

		if !b.expect("PING after A half-closed mid-reply", "+PONG\r\n") && strings.Contains(b.got(), "$5\r\nA") {
			t.Errorf("client B received %d elements of client A's GET reply: A's upstream went back to the pool with its reply unfinished",
				strings.Count(b.got(), "$5\r\nA"))
		}
		a.expect("GET of a 3000-element array, half-closed after sending", reply)
	})
}

// (3) The stall timeout bounds a pause inside a reply, not the whole reply: every bit of progress re-arms it.
func TestPipeStallTimeout(t *testing.T) {
	// 9 pieces 0.4x StallTimeout apart: 3.2x StallTimeout in all. (Not StallTimeout/2: a piece would then land
	// at the very instant a timer armed at an earlier piece fires, and the order of the two would be chance.)
	big := bulkOf(strings.Repeat("s", 9000))
	var cuts []int
	for at := 1000; at < 9000; at += 1000 {
		cuts = append(cuts, at)
	}
	pause := pipeStall * 2 / 5
	t.Run("trickle for 3.2x StallTimeout", func(t *testing.T) {
		synctest.Test(t, func(t *testing.T) {
			e := newPipeEnv(t, nil)
			e.fake.handle("GET", func(c *fakeConn, args []string) { c.chunked(big, cuts, pause) })
			c := e.connect("trickle")
			c.send(cmd("GET", "k"))
			time.Sleep(4 * pipeStall)
			synctest.Wait()
			c.expect(fmt.Sprintf("a reply trickling in 9 pieces %v apart (%v in all; StallTimeout %v)", pause, 8*pause, pipeStall), big)
			if c.expectOpen("after a slow but steady reply") {
				c.send(cmd("PING"))
				synctest.Wait()
				c.expect("PING after the trickled reply", big+"+PONG\r\n")
			}
		})
	})
	t.Run("stops mid-frame", func(t *testing.T) {
		synctest.Test(t, func(t *testing.T) {
			e := newPipeEnv(t, nil)
			var mu sync.Mutex
			var last time.Time
			e.fake.handle("GET", func(c *fakeConn, args []string) {
				// Two pieces 6s apart, then nothing: the stall starts at the second piece.
				c.reply(big[:1000])
				time.Sleep(6 * time.Second)
				c.reply(big[1000:2000])
				mu.Lock()
				last = time.Now()
				mu.Unlock()
				<-c.gone
			})
			c := e.connect("stall")
			c.send(cmd("GET", "k"))
			time.Sleep(3 * pipeStall)
			synctest.Wait()
			c.expect("a reply that stopped mid-frame", big[:2000])
			err, at := c.ended()
			mu.Lock()
			want := last.Add(pipeStall)
			mu.Unlock()
			switch {
			case err == nil:
				t.Errorf("the connection is still open %v after the reply stopped mid-frame (StallTimeout %v)", time.Since(last), pipeStall)
			case !at.Equal(want):
				t.Errorf("the connection was closed %v after the last progress of the reply, want exactly StallTimeout (%v): the stall timer is not re-armed by progress",
					at.Sub(last), pipeStall)
			}
			if cs := e.fake.Conns(); len(cs) == 1 {
				select {
				case <-cs[0].gone:
				default:
					t.Errorf("the proxy did not close the stalled upstream connection")
				}
			}
		})
	})
}

// (4) A re-AUTH after a rotation goes between two commands of a pipeline, whatever the position, and its +OK
// never reaches the client.
func TestPipeReauthInPipeline(t *testing.T) {
	const n = 5
	var all [][]string
	want := ""
	for j := range n {
		all = append(all, cmd("ECHO", "m"+strconv.Itoa(j)))
		want += bulkOf("m" + strconv.Itoa(j))
	}
	for i := 0; i <= n; i++ {
		t.Run(fmt.Sprintf("rotation after %d of %d", i, n), func(t *testing.T) {
			synctest.Test(t, func(t *testing.T) {
				e := newPipeEnv(t, nil)
				// Replies come a minute late, split in two reads: the pipeline is still in flight at the rotation.
				e.fake.handle("ECHO", func(c *fakeConn, args []string) {
					time.Sleep(time.Minute)
					c.chunked(bulkOf(args[1]), []int{3}, time.Millisecond)
				})
				c := e.connect("pipeline")
				if i > 0 {
					c.send(all[:i]...)
				}
				synctest.Wait()
				e.rotate()
				if i < n {
					c.send(all[i:]...)
				}
				time.Sleep(time.Duration(n+1) * time.Minute)
				synctest.Wait()
				c.expect("replies of the pipeline", want)
				c.expectOpen("after the pipeline")
				wantCmds := firstHandshake()
				for j := range n {
					if j == i {
						wantCmds = append(wantCmds, "AUTH oid-1 tok-2")
					}
					wantCmds = append(wantCmds, strings.Join(all[j], " "))
				}
				if i == n {
					wantCmds = append(wantCmds, "AUTH oid-1 tok-2")
				}
				expectCommands(t, e.fake.Conns()[0], "the re-AUTH must sit exactly between the commands sent before and after the rotation", wantCmds...)
			})
		})
	}
}

// (5) Inside MULTI an AUTH would be queued and its +OK would land in the EXEC array: it waits for EXEC.
func TestPipeReauthDeferredInMulti(t *testing.T) {
	for _, end := range []string{"EXEC", "DISCARD"} {
		t.Run(end, func(t *testing.T) {
			synctest.Test(t, func(t *testing.T) {
				e := newPipeEnv(t, nil)
				e.fake.handle("SET", func(c *fakeConn, args []string) { c.reply("+OK\r\n") })
				e.fake.handle("INCR", func(c *fakeConn, args []string) { c.reply(":1\r\n") })
				c := e.connect("multi")
				c.send(cmd("MULTI"), cmd("SET", "a", "1"))
				synctest.Wait()
				old := e.rotate()
				up := e.fake.Conns()[0]
				expectCommands(t, up, "no AUTH while the transaction is open", append(firstHandshake(), "MULTI", "SET a 1")...)
				c.send(cmd("INCR", "b"), cmd(end))
				time.Sleep(time.Second)
				synctest.Wait()
				want := "+OK\r\n+QUEUED\r\n+QUEUED\r\n*2\r\n+OK\r\n:1\r\n"
				if end == "DISCARD" {
					want = "+OK\r\n+QUEUED\r\n+QUEUED\r\n+OK\r\n"
				}
				c.expect("the transaction's replies", want)
				expectCommands(t, up, "the re-AUTH right after "+end, append(firstHandshake(), "MULTI", "SET a 1", "INCR b", end, "AUTH oid-1 tok-2")...)
				// The new token took: the connection outlives the old one.
				e.pastExpiry(old)
				c.send(cmd("PING"))
				synctest.Wait()
				c.expect("PING after the old token expired", want+"+PONG\r\n")
			})
		})
	}
}

// (6) CLIENT REPLY SKIP silences the next command: an AUTH sent before that command would take the skip, and
// the client would get the reply it asked not to get.
func TestPipeReauthClientReplySkip(t *testing.T) {
	for _, tc := range []struct {
		desc     string
		separate bool // the skipped command comes in its own write, before the next one
	}{{"skipped and next command together", false}, {"skipped command alone", true}} {
		t.Run(tc.desc, func(t *testing.T) {
			synctest.Test(t, func(t *testing.T) {
				e := newPipeEnv(t, nil)
				c := e.connect("skip")
				c.send(cmd("CLIENT", "REPLY", "SKIP"))
				synctest.Wait()
				e.rotate()
				up := e.fake.Conns()[0]
				// (First the proxy asks, once per process, whether this identity may run CLIENT REPLY.)
				expectCommands(t, up, "no AUTH between CLIENT REPLY SKIP and the command it silences",
					append(firstHandshake(), "CLIENT REPLY ON", "CLIENT REPLY SKIP")...)
				if tc.separate {
					c.send(cmd("ECHO", "skipped"))
					synctest.Wait()
					c.send(cmd("ECHO", "seen"))
				} else {
					c.send(cmd("ECHO", "skipped"), cmd("ECHO", "seen"))
				}
				synctest.Wait()
				c.expect("only the reply after the skipped one", bulkOf("seen"))
				got := up.Commands()
				auth, skipped := -1, -1
				for i, s := range got {
					switch s {
					case "AUTH oid-1 tok-2":
						auth = i
					case "ECHO skipped":
						skipped = i
					}
				}
				if auth < 0 || auth < skipped {
					t.Errorf("upstream got %q: want AUTH oid-1 tok-2 after ECHO skipped (the command CLIENT REPLY SKIP silences)", got)
				}
			})
		})
	}
	// Denied (a data access policy): OFF and SKIP are commands with an error for a reply, and the re-AUTH
	// due meanwhile goes anywhere, its +OK never reaching the client.
	t.Run("CLIENT REPLY denied", func(t *testing.T) {
		synctest.Test(t, func(t *testing.T) {
			e := newPipeEnv(t, nil)
			e.fake.noReply = true
			c := e.connect("denied")
			const noperm = "-NOPERM this user has no permissions to run the 'client|reply' command\r\n"
			c.send(cmd("CLIENT", "REPLY", "SKIP"))
			synctest.Wait()
			e.rotate()
			c.send(cmd("ECHO", "a"), cmd("CLIENT", "REPLY", "OFF"), cmd("ECHO", "b"))
			synctest.Wait()
			c.expect("every reply, the refusals included", noperm+bulkOf("a")+noperm+bulkOf("b"))
			if got := e.fake.Conns()[0].Commands(); !slices.Contains(got, "AUTH oid-1 tok-2") {
				t.Fatalf("no re-AUTH: %q", got)
			}
		})
	})
	t.Run("CLIENT REPLY OFF then ON", func(t *testing.T) {
		synctest.Test(t, func(t *testing.T) {
			e := newPipeEnv(t, nil)
			c := e.connect("off")
			c.send(cmd("CLIENT", "REPLY", "OFF"), cmd("ECHO", "silent"))
			synctest.Wait()
			old := e.rotate()
			c.send(cmd("ECHO", "silent2"), cmd("CLIENT", "REPLY", "ON"), cmd("ECHO", "loud"))
			synctest.Wait()
			c.expect("replies after CLIENT REPLY ON only", "+OK\r\n"+bulkOf("loud"))
			e.pastExpiry(old)
			c.send(cmd("PING"))
			synctest.Wait()
			c.expect("PING after the old token expired (the AUTH sent under CLIENT REPLY OFF took)", "+OK\r\n"+bulkOf("loud")+"+PONG\r\n")
		})
	})
}

// (7) A blocking command with a command pipelined behind it, across a rotation and the old token's expiry:
// the connection survives (the proxy may hold the PING back to rescue the blocked command).
func TestPipeBlockedAcrossExpiry(t *testing.T) {
	for _, tc := range []struct {
		desc    string
		cmds    [][]string
		replies string
	}{
		{"BLPOP alone", [][]string{cmd("BLPOP", "k", "0")}, "*2\r\n" + bulkOf("k") + bulkOf("v")},
		{"BLPOP with a PING pipelined behind it", [][]string{cmd("BLPOP", "k", "0"), cmd("PING")},
			"*2\r\n" + bulkOf("k") + bulkOf("v") + "+PONG\r\n"},
	} {
		t.Run(tc.desc, func(t *testing.T) {
			synctest.Test(t, func(t *testing.T) {
				e := newPipeEnv(t, nil)
				c := e.connect("blocked")
				c.send(tc.cmds...)
				time.Sleep(time.Minute)
				synctest.Wait()
				old := e.rotate()
				e.pastExpiry(old) // the fake closes connections still on it
				synctest.Wait()
				if !c.expectOpen("blocked across the old token's expiry") {
					t.Errorf("fake upstream: %s", e.fake.Events())
					return
				}
				e.fake.push("k", "v")
				time.Sleep(time.Second)
				synctest.Wait()
				c.expect("replies once the list gets a value", tc.replies)
				c.expectOpen("after the replies")
			})
		})
	}
}

// RESP3 pushes pass through in order around a re-AUTH, including one just before the AUTH's +OK.
func TestPipeRESP3PushAroundReauth(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		e := newPipeEnv(t, nil)
		e.fake.pushes = true // set before any connection runs a command
		c := e.connect("resp3")
		c.send(cmd("HELLO", "3"), cmd("ECHO", "a"))
		synctest.Wait()
		e.rotate()
		c.send(cmd("ECHO", "b"))
		synctest.Wait()
		c.expect("HELLO, pushes and replies",
			"%1\r\n+proto\r\n:3\r\n"+pushFrame("before ECHO")+bulkOf("a")+pushFrame("before AUTH")+pushFrame("before ECHO")+bulkOf("b"))
		expectCommands(t, e.fake.Conns()[0], "commands", append(firstHandshake(), "HELLO 3", "ECHO a", "AUTH oid-1 tok-2", "ECHO b")...)
	})
}

// MONITOR lines pass through around a re-AUTH; the AUTH's +OK among them does not.
func TestPipeMonitorAroundReauth(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		e := newPipeEnv(t, nil)
		c := e.connect("monitor")
		c.send(cmd("MONITOR"))
		synctest.Wait()
		up := e.fake.Conns()[0]
		line := func(i int) string {
			return fmt.Sprintf("+1700000000.%06d [0 10.0.0.1:5000] \"get\" \"k%d\"\r\n", i, i)
		}
		up.write([]byte(line(1) + line(2)))
		synctest.Wait()
		e.rotate()
		up.write([]byte(line(3)))
		synctest.Wait()
		c.expect("MONITOR's +OK and the monitor lines", "+OK\r\n"+line(1)+line(2)+line(3))
		expectCommands(t, up, "commands", append(firstHandshake(), "MONITOR", "AUTH oid-1 tok-2")...)
	})
}

// A clean connection goes back to the pool, is re-authenticated there after a rotation, and serves the next
// client with nothing of the previous one.
func TestPipePoolRecycleAcrossRotation(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		e := newPipeEnv(t, func(o *proxy.Options) { o.PoolSize = 1 })
		synctest.Wait()
		e.fake.handle("GET", func(c *fakeConn, args []string) { c.chunked(bulkOf("value"), []int{4}, time.Second) })
		a := e.connect("A")
		a.send(cmd("GET", "k"))
		time.Sleep(time.Minute)
		synctest.Wait()
		a.closeWrite()
		synctest.Wait()
		a.expect("GET", bulkOf("value"))
		old := e.rotate()
		b := e.connect("B")
		b.send(cmd("PING"))
		synctest.Wait()
		b.expect("PING on a recycled connection", "+PONG\r\n")
		for _, up := range e.fake.Conns() {
			cmds := up.Commands()
			if len(cmds) > 0 && cmds[len(cmds)-1] == "PING" && !strings.HasPrefix(cmds[len(cmds)-2], "AUTH oid-1 tok-2") {
				t.Errorf("upstream conn %d served B's PING without the new token: %q", up.id, cmds)
			}
		}
		e.pastExpiry(old)
		b.send(cmd("PING"))
		synctest.Wait()
		b.expect("PING after the old token expired", "+PONG\r\n+PONG\r\n")
	})
}
