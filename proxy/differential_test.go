package proxy_test

import (
	"bufio"
	"bytes"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"os"
	"regexp"
	"slices"
	"sort"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/entra-redis-proxy/entra-redis-proxy/internal/azurefake"
	"github.com/entra-redis-proxy/entra-redis-proxy/proxy"
	"github.com/entra-redis-proxy/entra-redis-proxy/resp"
)

// The differential test (issue 9) runs random command sequences twice, once on a TLS connection straight to
// redis-server and once through the proxy while tokens rotate, and requires the two client-visible byte
// streams to be identical.
//
// How a side knows how much to read. Predicting reply counts is exactly what the proxy gets wrong, so the test
// does not count replies. A sequence is a list of steps; each step is one write (a pipeline). A closed step ends
// with a sentinel, `PING ~s<seed>.<step>~`, whose answer ends in "\r\n~s<seed>.<step>~\r\n" in every state the
// test lets the connection be in outside MULTI: a bulk string normally and in RESP3 subscribed mode, and
// `*2 pong <arg>` in RESP2 subscribed mode. Each side is read until that suffix shows up (a deadline is only a
// failure bound), and everything read since the previous sentinel is that step's chunk; chunks are compared.
// Nothing is assumed about what comes before the sentinel, so hidden (CLIENT REPLY OFF/SKIP) and extra (pub/sub
// pushes, EXEC arrays holding pushes) replies need no prediction. Bytes a side sends after a sentinel land in
// the next chunk, and the last step (QUIT, or a half-close) is read to EOF, so extra bytes are caught too.
//
// The sentinel can't answer when replies are off, the next reply is skipped, or MULTI is open (it would be
// queued). The generator keeps a small model of just those states (reply mode, MULTI, protocol, subscriptions)
// and either closes the step with EXEC/DISCARD and `CLIENT REPLY ON` before the PING, or leaves the step open:
// an open step is written but not read, its replies become part of the next closed step's chunk. Open steps
// are how OFF, SKIP, MULTI and blocking commands stay in force across a rotation. The model only decides the
// sentinel; if it is wrong the direct side never answers, and the test says so as a test bug, not a proxy diff.
// It also keeps the connection out of the one state with no way back (RESP2 subscribed mode with replies off,
// where CLIENT REPLY ON is refused silently).
//
// What is not compared: HELLO's "id" field (connection ids differ; both sides are normalized), the user
// named in Redis 7.2's NOPERM errors (each side's token user), and the replies
// the proxy owns: the test's own AUTH on the direct side is read before the stream starts, and after RESET the
// sequence sends AUTH, which redis answers directly and the proxy locally (both +OK).
//
// Rotations (proxy run only). Tokens live diffLifetime, and the token source replaces them at half-life, so a
// new token arrives every diffLifetime/2 and the proxy re-AUTHs each connection within ReauthSpread. A "rotate"
// op waits for the next token, then a random 0-250ms, so re-AUTHs land before, inside or after the next
// pipeline, whatever state the model says it is in. A "hold" op keeps a MULTI or a blocking BLPOP (10s timeout,
// served later by an LPUSH from the control connection) open from before a new token until the old one has
// expired and its ACL user is deleted: the proxy's in-band AUTH can't go out, so only its deadline rescue
// (tx replay, unblock and reissue) keeps the connection alive and the stream exact.
//
// Half-close: redis-server itself drops the replies it has not written yet when it reads EOF (checked on
// redis 7.0: a pipelined GET of 300 KB values is cut short, a BLPOP's reply never comes), so a half-closed
// direct connection is not a deterministic reference. The direct side therefore does not half-close; the
// proxy side writes its last step, calls CloseWrite, and must deliver the same bytes, then EOF: the proxy
// promises a half-closed client the replies to what it sent.
//
// Server versions. The generator speaks the dialect of the server under test (diffDialect): on Redis 6.0, what
// Azure Cache for Redis runs, it sends no RESET (6.2+; the way back is UNSUBSCRIBE, PUNSUBSCRIBE, CLIENT REPLY ON,
// UNWATCH, SELECT 0, HELLO 2 instead), no RPOP count and no HELLO without a version (6.2+), and no CLIENT REPLY
// without an argument as a refused command (6.x queues it inside MULTI, where the model expects an abort). From
// 7.0 on the sequences are exactly those it has always generated.
//
// Seeds: diffDefaultSeeds in CI; PROXY_DIFF_SEEDS=N runs seeds 1..N instead, PROXY_DIFF_SEED=S runs one seed.
// A failure prints the seed, the step, the sequence and the first difference.

const (
	diffLifetime  = 3 * time.Second
	diffReadBound = 3 * time.Second // how long a step may take beyond its own blocking timeouts
	diffHoldBound = 4 * diffLifetime
)

// 1-12, plus 28 and 38, which showed two more kinds of defect (see the report of issue 9).
var diffDefaultSeeds = []uint64{1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 28, 38}

func diffSeeds(t *testing.T) []uint64 {
	if s := os.Getenv("PROXY_DIFF_SEED"); s != "" {
		n, err := strconv.ParseUint(s, 10, 64)
		if err != nil {
			t.Fatalf("PROXY_DIFF_SEED=%q: %v", s, err)
		}
		return []uint64{n}
	}
	if s := os.Getenv("PROXY_DIFF_SEEDS"); s != "" {
		n, err := strconv.Atoi(s)
		if err != nil || n < 1 {
			t.Fatalf("PROXY_DIFF_SEEDS=%q: want a positive count", s)
		}
		seeds := make([]uint64, n)
		for i := range seeds {
			seeds[i] = uint64(i + 1)
		}
		return seeds
	}
	return diffDefaultSeeds
}

// diffDialect is what the generator may send, by server version.
type diffDialect struct {
	reset      bool // RESET (6.2+)
	popCount   bool // RPOP key count (6.2+)
	bareHello  bool // HELLO without a protocol version (6.2+)
	replyArity bool // CLIENT REPLY without an argument is refused while queuing, aborting a MULTI (7.0+)
}

// diff7 is the dialect of Redis 7.0 and newer: everything the generator knows.
var diff7 = diffDialect{reset: true, popCount: true, bareHello: true, replyArity: true}

func diffDialectFor(v azurefake.Version) diffDialect {
	return diffDialect{reset: v.AtLeast(6, 2), popCount: v.AtLeast(6, 2), bareHello: v.AtLeast(6, 2), replyArity: v.AtLeast(7, 0)}
}

func TestDifferential(t *testing.T) {
	obs := &diffObserver{counts: map[string]int{}}
	f := newFixture(t, fixtureOpts{lifetime: diffLifetime, proxyOpt: func(o *proxy.Options) { o.Observer = obs }})
	seeds := diffSeeds(t)
	start := time.Now()
	t.Run("seeds", func(t *testing.T) {
		for _, seed := range seeds {
			t.Run(fmt.Sprintf("seed=%d", seed), func(t *testing.T) {
				t.Parallel()
				runDiffSeed(t, f, seed)
			})
		}
	})
	t.Logf("%d seeds in %v; proxy events: %v", len(seeds), time.Since(start).Round(time.Millisecond), obs.String())
}

// diffObserver counts the proxy's re-AUTHs and rescue mechanisms, to show which paths the seeds ran.
type diffObserver struct {
	proxy.NopObserver
	mu     sync.Mutex
	counts map[string]int
}

func (o *diffObserver) add(k string) {
	o.mu.Lock()
	o.counts[k]++
	o.mu.Unlock()
}

func (o *diffObserver) ReAuth(result string)  { o.add("reauth_" + result) }
func (o *diffObserver) Mechanism(name string) { o.add(name) }

func (o *diffObserver) String() string {
	o.mu.Lock()
	defer o.mu.Unlock()
	keys := make([]string, 0, len(o.counts))
	for k := range o.counts {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	var b strings.Builder
	for _, k := range keys {
		fmt.Fprintf(&b, "%s=%d ", k, o.counts[k])
	}
	return strings.TrimSpace(b.String())
}

// ---- sequences ----

type diffOpKind int

const (
	opStep    diffOpKind = iota // write cmds in one write; if sentinel != "", read this chunk
	opPublish                   // control connection: PUBLISH key value
	opPush                      // control connection: LPUSH key value (serves a held BLPOP)
	opRotate                    // proxy run only: wait for the next token, then delay
	opHold                      // proxy run only: wait for the next token and the old one's expiry
)

type diffOp struct {
	kind     diffOpKind
	cmds     [][]string    // opStep
	sentinel string        // opStep: the PING argument ending the chunk; "" for an open step
	blockFor time.Duration // opStep: the blocking timeouts in cmds, for the read bound
	key, val string        // opPublish, opPush
	delay    time.Duration // opRotate
	why      string        // opHold: what is held open
}

type diffSeq struct {
	seed      uint64
	ops       []diffOp
	halfClose bool // the proxy side ends with CloseWrite instead of QUIT
	steps     int  // closed steps, the last one included
}

// auth placeholders: each side puts in its own credentials.
const (
	diffAuthUser = "\x00oid"
	diffAuthPass = "\x00token"
)

func (s *diffSeq) String() string {
	var b strings.Builder
	fmt.Fprintf(&b, "seed %d (half-close: %v):\n", s.seed, s.halfClose)
	step := 0
	for _, op := range s.ops {
		switch op.kind {
		case opStep:
			kind := "open"
			if op.sentinel != "" {
				kind = fmt.Sprintf("step %d", step)
				step++
			}
			fmt.Fprintf(&b, "  [%s]", kind)
			for _, c := range op.cmds {
				b.WriteString(" " + diffFormatCmd(c) + ";")
			}
			b.WriteString("\n")
		case opPublish:
			fmt.Fprintf(&b, "  (control) PUBLISH %s %s\n", op.key, diffFormatArg(op.val))
		case opPush:
			fmt.Fprintf(&b, "  (control) LPUSH %s %s\n", op.key, diffFormatArg(op.val))
		case opRotate:
			fmt.Fprintf(&b, "  (proxy run) wait for a new token, then %v\n", op.delay)
		case opHold:
			fmt.Fprintf(&b, "  (proxy run) hold %s until the old token expired\n", op.why)
		}
	}
	return b.String()
}

func diffFormatCmd(c []string) string {
	parts := make([]string, len(c))
	for i, a := range c {
		parts[i] = diffFormatArg(a)
	}
	return strings.Join(parts, " ")
}

func diffFormatArg(a string) string {
	switch a {
	case diffAuthUser:
		return "<oid>"
	case diffAuthPass:
		return "<token>"
	}
	if len(a) > 24 {
		return fmt.Sprintf("<%d bytes %q...>", len(a), a[:8])
	}
	if a == "" || strings.ContainsAny(a, " \"\\") || strings.IndexFunc(a, func(r rune) bool { return r < 0x21 || r > 0x7e }) >= 0 {
		return strconv.Quote(a)
	}
	return a
}

// diffModel is what the generator knows of the connection's state: only what decides the sentinel and which
// commands keep the connection out of states with no way back.
type diffModel struct {
	proto     int
	chans     map[string]bool
	pats      map[string]bool
	replyOff  bool
	skipNext  bool
	inMulti   bool
	txAborted bool       // a command was refused while queuing: EXEC will answer EXECABORT
	tx        *diffModel // inside MULTI: the state once EXEC runs the queued commands
	watching  bool
}

func newDiffModel() *diffModel {
	return &diffModel{proto: 2, chans: map[string]bool{}, pats: map[string]bool{}}
}

func (m *diffModel) clone() *diffModel {
	c := *m
	c.chans, c.pats = map[string]bool{}, map[string]bool{}
	for k := range m.chans {
		c.chans[k] = true
	}
	for k := range m.pats {
		c.pats[k] = true
	}
	c.tx = nil
	return &c
}

func (m *diffModel) subscribed() bool { return len(m.chans)+len(m.pats) > 0 }
func (m *diffModel) resp2Sub() bool   { return m.proto == 2 && m.subscribed() }

type diffGen struct {
	r    *rand.Rand
	seed uint64
	d    diffDialect
	m    *diffModel
	// blocking timeouts of the commands generated into the current step
	blockFor time.Duration
	// keys, per sequence so that sequences can run in parallel
	strs, lists, empties, chans, pats []string
}

func diffKeys(seed uint64) (strs, lists, empties, chans, pats []string) {
	p := fmt.Sprintf("d%d:", seed)
	for i := range 3 {
		strs = append(strs, fmt.Sprintf("%ss%d", p, i))
		lists = append(lists, fmt.Sprintf("%sl%d", p, i))
		chans = append(chans, fmt.Sprintf("%sch%d", p, i))
	}
	empties = []string{p + "e0", p + "e1"}
	pats = []string{p + "ch*", p + "c?1", p + "zz*"}
	return
}

func newDiffGen(seed uint64, d diffDialect) *diffGen {
	g := &diffGen{r: rand.New(rand.NewPCG(seed, 0x5eed_d1ff)), seed: seed, d: d, m: newDiffModel()}
	g.strs, g.lists, g.empties, g.chans, g.pats = diffKeys(seed)
	return g
}

func (g *diffGen) pick(xs []string) string { return xs[g.r.IntN(len(xs))] }
func (g *diffGen) chance(p float64) bool   { return g.r.Float64() < p }

const diffAlphabet = "abcdefghijklmnopqrstuvwxyz0123456789"

// value returns a value whose size is sometimes around multiples of 16 KiB (the proxy's and clients' read
// sizes) and sometimes up to 200 KiB.
func (g *diffGen) value(big bool) string {
	var n int
	switch x := g.r.IntN(10); {
	case x == 0:
		n = 0
	case x < 5 || !big:
		n = 1 + g.r.IntN(40)
	case x < 8:
		n = (1+g.r.IntN(3))*16384 + g.r.IntN(9) - 4 - 5 // replies carry "$N\r\n" and "\r\n" around the value
	default:
		n = g.r.IntN(200 << 10)
	}
	b := make([]byte, n)
	for i := range b {
		b[i] = diffAlphabet[g.r.IntN(len(diffAlphabet))]
	}
	if n > 0 && n < 18 && g.chance(0.3) {
		b[0] = '1' + byte(g.r.IntN(9)) // sometimes an integer, for INCR
		for i := 1; i < len(b); i++ {
			b[i] = '0' + byte(g.r.IntN(10))
		}
	}
	return string(b)
}

func (g *diffGen) oddBytes() string {
	b := make([]byte, g.r.IntN(30))
	for i := range b {
		switch g.r.IntN(4) {
		case 0:
			b[i] = byte(g.r.IntN(256))
		case 1:
			b[i] = "\r\n\x00 *$+-:_%>"[g.r.IntN(12)]
		default:
			b[i] = diffAlphabet[g.r.IntN(len(diffAlphabet))]
		}
	}
	return string(b)
}

func (g *diffGen) anyKey() string {
	if g.chance(0.7) {
		return g.pick(g.strs)
	}
	return g.pick(g.lists)
}

// dataCmd is a command whose effect is only on data (or an error): valid anywhere but RESP2 subscribed mode.
func (g *diffGen) dataCmd(inMulti bool) []string {
	switch g.r.IntN(16) {
	case 0, 1:
		return []string{"GET", g.anyKey()}
	case 2, 3:
		return []string{"SET", g.pick(g.strs), g.value(true)}
	case 4:
		return []string{"INCR", g.anyKey()}
	case 5:
		if g.chance(0.5) {
			return []string{"DEL", g.anyKey()}
		}
		return []string{"DEL", g.anyKey(), g.anyKey()}
	case 6:
		v := g.value(false)
		if g.chance(0.1) {
			v = strings.Repeat("a", 20000)
		}
		return []string{"APPEND", g.pick(g.strs), v}
	case 7, 8:
		c := []string{"LPUSH", g.pick(append(g.lists, g.empties[1])), g.value(false)}
		if g.chance(0.3) {
			c = append(c, g.value(true))
		}
		return c
	case 9:
		if g.chance(0.3) {
			c := []string{"RPOP", g.pick(g.lists), strconv.Itoa(1 + g.r.IntN(3))}
			if !g.d.popCount {
				c = c[:2]
			}
			return c
		}
		return []string{"RPOP", g.pick(g.lists)}
	case 10:
		return []string{"STRLEN", g.anyKey()}
	case 11:
		return []string{"EXISTS", g.anyKey(), g.anyKey()}
	case 12:
		return []string{"ECHO", g.oddBytes()}
	case 13:
		if g.chance(0.5) {
			return []string{"PING"}
		}
		return []string{"PING", g.oddBytes()}
	case 14:
		return []string{"SELECT", g.pick([]string{"0", "1", "2", "0", "99", "x"})}
	default:
		if inMulti {
			return []string{"GET", g.anyKey()}
		}
		return []string{"MGET", g.anyKey(), g.anyKey()}
	}
}

// refusedCmd is a command redis refuses before running it: in MULTI it aborts the transaction.
func (g *diffGen) refusedCmd() []string {
	switch g.r.IntN(5) {
	case 0:
		return []string{"NOSUCHCMD", g.value(false)}
	case 1:
		return []string{"GET"}
	case 2:
		return []string{"SET", g.pick(g.strs)}
	case 3:
		return []string{"lpush", g.pick(g.lists)}
	default:
		if !g.d.replyArity {
			return []string{"CLIENT"}
		}
		return []string{"CLIENT", "REPLY"}
	}
}

func (g *diffGen) blockingCmd() []string {
	name := g.pick([]string{"BLPOP", "BRPOP"})
	ms := 50 + g.r.IntN(151)
	g.blockFor += time.Duration(ms) * time.Millisecond
	key := g.empties[0]
	if g.chance(0.5) {
		key = g.pick(g.lists)
	}
	return []string{name, key, strconv.FormatFloat(float64(ms)/1000, 'f', 3, 64)}
}

// subCmd is a pub/sub (un)subscription; it updates st, the model the command takes effect in.
func (g *diffGen) subCmd(st *diffModel) []string {
	switch g.r.IntN(5) {
	case 0, 1:
		c := []string{"SUBSCRIBE", g.pick(g.chans)}
		if g.chance(0.4) {
			c = append(c, g.pick(g.chans))
		}
		for _, ch := range c[1:] {
			st.chans[ch] = true
		}
		return c
	case 2:
		p := g.pick(g.pats)
		st.pats[p] = true
		return []string{"PSUBSCRIBE", p}
	case 3:
		if g.chance(0.4) {
			clear(st.chans)
			return []string{"UNSUBSCRIBE"}
		}
		ch := g.pick(g.chans)
		delete(st.chans, ch)
		return []string{"UNSUBSCRIBE", ch}
	default:
		if g.chance(0.4) {
			clear(st.pats)
			return []string{"PUNSUBSCRIBE"}
		}
		p := g.pick(g.pats)
		delete(st.pats, p)
		return []string{"PUNSUBSCRIBE", p}
	}
}

// next generates one command for the model's state and applies it to the model.
func (g *diffGen) next() [][]string {
	m := g.m
	// Any command, refused or not, takes a pending SKIP.
	m.skipNext = false
	if m.inMulti {
		return g.nextInMulti()
	}
	if m.resp2Sub() {
		// Only (P)(UN)SUBSCRIBE, PING, QUIT and RESET run; others are refused, CLIENT REPLY included.
		switch x := g.r.IntN(10); {
		case x < 4:
			return [][]string{g.subCmd(m)}
		case x < 6:
			return [][]string{{"PING", g.oddBytes()}}
		case x < 7:
			return [][]string{{"PING"}}
		case x < 9:
			return [][]string{g.pick2([][]string{{"GET", g.anyKey()}, {"CLIENT", "REPLY", "OFF"},
				{"CLIENT", "REPLY", "SKIP"}, {"HELLO", "3"}, {"MULTI"}, {"BLPOP", g.empties[0], "0.1"}})}
		default:
			return g.reset()
		}
	}
	switch x := g.r.IntN(100); {
	case x < 40:
		return [][]string{g.dataCmd(false)}
	case x < 44:
		return [][]string{g.refusedCmd()}
	case x < 52:
		m.inMulti, m.txAborted, m.tx = true, false, m.clone()
		return [][]string{{"MULTI"}}
	case x < 54:
		return [][]string{{g.pick([]string{"EXEC", "DISCARD"})}}
	case x < 58:
		m.watching = true
		return [][]string{{"WATCH", g.anyKey()}}
	case x < 60:
		m.watching = false
		return [][]string{{"UNWATCH"}}
	case x < 68:
		switch y := g.r.IntN(10); {
		case y < 3:
			m.replyOff = true
			return [][]string{{"CLIENT", "REPLY", "OFF"}}
		case y < 6:
			m.replyOff = false
			return [][]string{{"CLIENT", "REPLY", "ON"}}
		case y < 9:
			m.skipNext = !m.replyOff
			return [][]string{{"CLIENT", "REPLY", "SKIP"}}
		default:
			return [][]string{{"CLIENT", "REPLY", "MAYBE"}}
		}
	case x < 78:
		var pre [][]string
		if m.proto == 2 && m.replyOff {
			// Subscribed RESP2 with replies off has no way back: turn them on first.
			m.replyOff = false
			pre = append(pre, []string{"CLIENT", "REPLY", "ON"})
		}
		return append(pre, g.subCmd(m))
	case x < 84:
		return [][]string{g.hello(m)}
	case x < 93:
		return [][]string{g.blockingCmd()}
	case x < 95:
		return g.reset()
	default:
		return [][]string{{"ECHO", g.oddBytes()}}
	}
}

func (g *diffGen) pick2(xs [][]string) []string { return xs[g.r.IntN(len(xs))] }

// hello returns HELLO 2/3 (or an erring variant) and applies it to st.
func (g *diffGen) hello(st *diffModel) []string {
	switch x := g.r.IntN(10); {
	case x < 4:
		st.proto = 3
		return []string{"HELLO", "3"}
	case x < 8:
		if st.subscribed() && st.replyOff {
			return g.bareHello() // RESP2 subscribed with replies off would have no way back
		}
		st.proto = 2
		return []string{"HELLO", "2"}
	case x < 9:
		return []string{"HELLO", "4"}
	default:
		return g.bareHello()
	}
}

// bareHello is a HELLO that changes nothing: without arguments where the server allows that.
func (g *diffGen) bareHello() []string {
	if !g.d.bareHello {
		return []string{"HELLO", "4"} // refused when run, like a bare HELLO on 6.0 would be, but not while queuing
	}
	return []string{"HELLO"}
}

// reset returns RESET and the AUTH it needs (the token user is logged out), and applies them. Without RESET
// (6.0) it returns the commands that take the connection back to the state the model starts in.
func (g *diffGen) reset() [][]string {
	m := g.m
	*g.m = *newDiffModel()
	if !g.d.reset {
		var cmds [][]string
		if m.inMulti {
			cmds = append(cmds, []string{"DISCARD"})
		}
		// Unsubscribing first: in RESP2 subscribed mode nothing else runs.
		return append(cmds, []string{"UNSUBSCRIBE"}, []string{"PUNSUBSCRIBE"}, []string{"CLIENT", "REPLY", "ON"},
			[]string{"UNWATCH"}, []string{"SELECT", "0"}, []string{"HELLO", "2"})
	}
	return [][]string{{"RESET"}, {"AUTH", diffAuthUser, diffAuthPass}}
}

func (g *diffGen) nextInMulti() [][]string {
	m := g.m
	switch x := g.r.IntN(100); {
	case x < 55:
		return [][]string{g.dataCmd(true)}
	case x < 60:
		m.txAborted = true
		return [][]string{g.refusedCmd()}
	case x < 64:
		return [][]string{{"MULTI"}} // nested: an error, the transaction goes on
	case x < 67:
		return [][]string{{"WATCH", g.anyKey()}} // inside MULTI: an error, the transaction goes on
	case x < 72:
		return [][]string{{"BLPOP", g.empties[0], "0.2"}} // does not block inside MULTI
	case x < 75:
		if m.tx.replyOff {
			return [][]string{{"ECHO", "on"}}
		}
		// CLIENT REPLY OFF/SKIP inside MULTI make redis 7.0 write an EXEC array with fewer elements than it
		// announces; ON (a no-op here) and a syntax error are what a client can sanely send.
		return [][]string{g.pick2([][]string{{"CLIENT", "REPLY", "ON"}, {"CLIENT", "REPLY", "MAYBE"}})}
	case x < 82:
		if m.watching { // whether EXEC runs them depends on the watched keys: keep the model certain
			return [][]string{g.dataCmd(true)}
		}
		return [][]string{g.hello(m.tx)}
	case x < 88:
		// (P|S)SUBSCRIBE queued inside MULTI are not generated: the proxy does not take EXEC's array apart,
		// so it would not learn the subscriptions they make (a known gap, README "What is not exact").
		return [][]string{g.dataCmd(true)}
	case x < 90:
		return g.reset()
	default:
		return [][]string{g.endTx()}
	}
}

// endTx ends the open MULTI with EXEC or DISCARD.
func (g *diffGen) endTx() []string {
	m := g.m
	name := "DISCARD"
	if g.chance(0.75) {
		name = "EXEC"
		if !m.txAborted {
			// The queued commands ran (the generator queues no state change while watching).
			tx := m.tx
			tx.replyOff, tx.skipNext = m.replyOff, false
			*m = *tx
		}
	}
	m.inMulti, m.txAborted, m.tx, m.watching = false, false, nil, false
	return []string{name}
}

// closeStep appends what makes the sentinel answer, then the sentinel.
func (g *diffGen) closeStep(cmds [][]string, sentinel string) [][]string {
	m := g.m
	if m.inMulti {
		m.skipNext = false
		cmds = append(cmds, g.endTx())
	}
	if m.replyOff || m.skipNext {
		cmds = append(cmds, []string{"CLIENT", "REPLY", "ON"})
		m.replyOff, m.skipNext = false, false
	}
	return append(cmds, []string{"PING", sentinel})
}

func genDiffSeq(seed uint64, d diffDialect) *diffSeq {
	g := newDiffGen(seed, d)
	s := &diffSeq{seed: seed, halfClose: g.chance(0.25)}
	nSteps := 5 + g.r.IntN(12)
	holds := 0
	if g.chance(0.35) {
		holds = 1
	}
	for i := 0; i < nSteps; i++ {
		last := i == nSteps-1
		g.blockFor = 0
		var cmds [][]string
		n := 1 + g.r.IntN(6)
		if g.chance(0.15) {
			n += 6
		}
		for range n {
			cmds = append(cmds, g.next()...)
		}
		// A BLPOP held across the old token's expiry: an open step ending blocked, served later by the control
		// connection.
		if holds > 0 && !last && !g.m.inMulti && !g.m.resp2Sub() && g.chance(0.3) {
			holds--
			g.m.skipNext = false
			cmds = append(cmds, []string{"BLPOP", g.empties[1], "10"})
			s.ops = append(s.ops, diffOp{kind: opStep, cmds: cmds, blockFor: g.blockFor},
				diffOp{kind: opHold, why: "a blocked BLPOP"},
				diffOp{kind: opPush, key: g.empties[1], val: g.value(false)})
			continue
		}
		open := !last && g.chance(0.3)
		if open {
			s.ops = append(s.ops, diffOp{kind: opStep, cmds: cmds, blockFor: g.blockFor})
			switch {
			case holds > 0 && g.m.inMulti && !g.m.watching && g.chance(0.5):
				holds--
				s.ops = append(s.ops, diffOp{kind: opHold, why: "an open MULTI"})
			case g.chance(0.5) && !(g.m.inMulti && g.m.watching):
				// Not with a WATCHed MULTI open: if the rescue deadline comes then, the proxy can't rebuild the
				// WATCH and answers EXEC with a null, by design (rescue.go).
				s.ops = append(s.ops, diffOp{kind: opRotate, delay: time.Duration(g.r.IntN(250)) * time.Millisecond})
			}
			continue
		}
		sentinel := fmt.Sprintf("~s%d.%d~", seed, s.steps)
		s.steps++
		cmds = g.closeStep(cmds, sentinel)
		if last && s.halfClose {
			// The last reply before the half-close is larger than any one read: the sentinel's own, made big (its
			// answer still ends in CRLF, sentinel, CRLF).
			cmds[len(cmds)-1] = []string{"PING", strings.Repeat("h", 100<<10+g.r.IntN(100<<10)) + "\r\n" + sentinel}
		}
		s.ops = append(s.ops, diffOp{kind: opStep, cmds: cmds, sentinel: sentinel, blockFor: g.blockFor})
		if last {
			break
		}
		if g.m.subscribed() {
			for range g.r.IntN(3) {
				ch := g.pick(g.chans)
				if g.chance(0.2) {
					ch = fmt.Sprintf("d%d:zz%d", seed, g.r.IntN(2))
				}
				v := g.value(false)
				if g.chance(0.15) {
					v = strings.Repeat("m", 16384+g.r.IntN(40000))
				}
				s.ops = append(s.ops, diffOp{kind: opPublish, key: ch, val: v})
			}
		}
		if g.chance(0.3) {
			s.ops = append(s.ops, diffOp{kind: opRotate, delay: time.Duration(g.r.IntN(250)) * time.Millisecond})
		}
	}
	return s
}

// ---- running ----

// diffConn is one side's client connection: bytes read but not yet assigned to a chunk are kept.
type diffConn struct {
	c     net.Conn
	rest  []byte
	buf   []byte
	lastW *diffWrite // the last write started; each write waits for the one before
}

type diffWrite struct {
	done chan struct{}
	err  error
}

// readUntil reads until the unassigned bytes contain end, and returns them through end; or, with end nil,
// reads to EOF. ok is false when the deadline came or the connection failed first: got is what came.
func (d *diffConn) readUntil(end []byte, deadline time.Time) (got []byte, ok bool, err error) {
	if d.buf == nil {
		d.buf = make([]byte, 64<<10)
	}
	d.c.SetReadDeadline(deadline)
	for {
		if end != nil {
			if i := bytes.Index(d.rest, end); i >= 0 {
				got = d.rest[:i+len(end)]
				d.rest = slices.Clone(d.rest[i+len(end):])
				return got, true, nil
			}
		}
		n, rerr := d.c.Read(d.buf)
		d.rest = append(d.rest, d.buf[:n]...)
		if rerr != nil {
			got, d.rest = d.rest, nil
			if end == nil && errors.Is(rerr, io.EOF) {
				return got, true, nil
			}
			return got, false, rerr
		}
	}
}

// write writes p from another goroutine, after the previous write, so that a side that stops reading while
// replies pile up can't deadlock the test.
func (d *diffConn) write(p []byte) *diffWrite {
	w, prev := &diffWrite{done: make(chan struct{})}, d.lastW
	d.lastW = w
	go func() {
		defer close(w.done)
		if prev != nil {
			if <-prev.done; prev.err != nil {
				w.err = prev.err
				return
			}
		}
		d.c.SetWriteDeadline(time.Now().Add(diffHoldBound))
		_, w.err = d.c.Write(p)
	}()
	return w
}

// wait returns the error of the last write started, once it has ended.
func (d *diffConn) wait() error {
	if d.lastW == nil {
		return nil
	}
	<-d.lastW.done
	return d.lastW.err
}

// diffControl is a plain admin connection to redis-server for the test's own commands.
type diffControl struct {
	c *tls.Conn
	r *bufio.Reader
}

func diffTLSConfig(t *testing.T, f *fixture) *tls.Config {
	pem, err := os.ReadFile(f.env.CAFile)
	if err != nil {
		t.Fatal(err)
	}
	pool := x509.NewCertPool()
	pool.AppendCertsFromPEM(pem)
	return &tls.Config{ServerName: f.env.ServerName, RootCAs: pool}
}

func dialDiffTLS(t *testing.T, f *fixture) *tls.Conn {
	d := tls.Dialer{Config: diffTLSConfig(t, f), NetDialer: &net.Dialer{Timeout: 5 * time.Second}}
	c, err := d.DialContext(t.Context(), "tcp", f.env.RedisAddr)
	if err != nil {
		t.Fatalf("dial redis-server: %v", err)
	}
	return c.(*tls.Conn)
}

func newDiffControl(t *testing.T, f *fixture) *diffControl {
	c := &diffControl{c: dialDiffTLS(t, f)}
	c.r = bufio.NewReader(c.c)
	t.Cleanup(func() { c.c.Close() })
	user, pass := f.env.AdminCredentials()
	c.do(t, "AUTH", user, pass)
	return c
}

// do runs commands whose replies are one line each, and fails on an error reply.
func (c *diffControl) do(t *testing.T, args ...string) string {
	t.Helper()
	c.c.SetDeadline(time.Now().Add(5 * time.Second))
	if _, err := c.c.Write(resp.AppendCommand(nil, args...)); err != nil {
		t.Fatalf("control %s: %v", args[0], err)
	}
	line, err := c.r.ReadString('\n')
	if err != nil || strings.HasPrefix(line, "-") {
		t.Fatalf("control %s: %q, %v", args[0], line, err)
	}
	return line
}

// flush deletes the sequence's keys in every database it can SELECT.
func (c *diffControl) flush(t *testing.T, seed uint64) {
	strs, lists, empties, _, _ := diffKeys(seed)
	keys := append(append(append([]string{"DEL"}, strs...), lists...), empties...)
	for db := range 3 {
		c.do(t, "SELECT", strconv.Itoa(db))
		c.do(t, keys...)
	}
	c.do(t, "SELECT", "0")
}

// diffChunk is what one closed step (with the open steps before it) produced on one side.
type diffChunk struct {
	step int
	data []byte
	ok   bool // the chunk's end was seen (sentinel, or EOF for the last one)
	err  error
}

// diffRun runs seq on one side and returns its chunks; it stops at the first chunk that did not end.
type diffRun struct {
	t       *testing.T
	f       *fixture
	seq     *diffSeq
	ctl     *diffControl
	proxied bool
	conn    *diffConn
	user    string // AUTH placeholders' values
	pass    string
}

func (r *diffRun) cmdBytes(cmds [][]string) []byte {
	var b []byte
	for _, c := range cmds {
		args := slices.Clone(c)
		for i, a := range args {
			switch a {
			case diffAuthUser:
				args[i] = r.user
			case diffAuthPass:
				args[i] = r.pass
			}
		}
		b = resp.AppendCommand(b, args...)
	}
	return b
}

// run executes the sequence; want (the direct side's chunks) lets the proxy run stop at the first difference.
func (r *diffRun) run(want []diffChunk) []diffChunk {
	t := r.t
	var out []diffChunk
	step := 0
	for _, op := range r.seq.ops {
		switch op.kind {
		case opPublish:
			r.ctl.do(t, "PUBLISH", op.key, op.val)
		case opPush:
			r.ctl.do(t, "LPUSH", op.key, op.val)
		case opRotate:
			if r.proxied {
				r.awaitToken()
				time.Sleep(op.delay) // a chosen point in time for the re-AUTH to land near, not a wait for an event
			}
		case opHold:
			if r.proxied {
				r.hold()
			}
		case opStep:
			r.conn.write(r.cmdBytes(op.cmds))
			if op.sentinel == "" {
				continue
			}
			last := step == r.seq.steps-1
			if last && r.proxied && r.seq.halfClose {
				if err := r.conn.wait(); err != nil {
					out = append(out, diffChunk{step: step, err: fmt.Errorf("write: %w", err)})
					return out
				}
				if err := r.conn.c.(*net.TCPConn).CloseWrite(); err != nil {
					t.Fatalf("CloseWrite: %v", err)
				}
			}
			deadline := time.Now().Add(diffReadBound + op.blockFor)
			var end []byte
			if !(last && r.proxied && r.seq.halfClose) {
				end = []byte("\r\n" + op.sentinel + "\r\n")
			}
			data, ok, err := r.conn.readUntil(end, deadline)
			out = append(out, diffChunk{step: step, data: data, ok: ok, err: err})
			step++
			if !ok || (want != nil && !diffEqual(data, want[len(out)-1].data)) {
				return out
			}
		}
	}
	if err := r.conn.wait(); err != nil {
		out = append(out, diffChunk{step: step, err: fmt.Errorf("write: %w", err)})
		return out
	}
	if !(r.proxied && r.seq.halfClose) {
		// The end: QUIT, read to EOF (catches bytes sent after the last sentinel).
		r.conn.write(resp.AppendCommand(nil, "QUIT"))
		data, ok, err := r.conn.readUntil(nil, time.Now().Add(diffReadBound))
		out = append(out, diffChunk{step: step, data: data, ok: ok, err: err})
	}
	return out
}

// awaitToken waits for the token source's next token.
func (r *diffRun) awaitToken() {
	_, changed := r.f.src.Current()
	select {
	case <-changed:
	case <-time.After(diffHoldBound):
		r.t.Fatalf("no new token within %v", diffHoldBound)
	}
}

// hold waits for a new token, then for the expiry (ACL user deleted) of the one that was current before it,
// which the proxy connection was on: by then the proxy must have rescued the held MULTI or BLPOP.
func (r *diffRun) hold() {
	old, changed := r.f.src.Current()
	select {
	case <-changed:
	case <-time.After(diffHoldBound):
		r.t.Fatalf("no new token within %v", diffHoldBound)
	}
	waitFor(r.t, diffHoldBound, "the old token's expiry", func() bool {
		for _, tok := range r.f.env.Tokens() {
			if tok.OID == old.Username {
				return tok.Deleted
			}
		}
		return true
	})
}

// diffHelloID matches HELLO's connection id, which differs between the sides.
var diffHelloID = regexp.MustCompile(`\r\n\$2\r\nid\r\n:[0-9]+\r\n`)

// diffNoPermUser matches the user that Redis 7.2's NOPERM errors name: each side's token user.
var diffNoPermUser = regexp.MustCompile(`NOPERM User [0-9a-f-]+ `)

func diffNormalize(b []byte) []byte {
	b = diffHelloID.ReplaceAllLiteral(b, []byte("\r\n$2\r\nid\r\n:<id>\r\n"))
	return diffNoPermUser.ReplaceAllLiteral(b, []byte("NOPERM User <oid> "))
}

func diffEqual(a, b []byte) bool { return bytes.Equal(diffNormalize(a), diffNormalize(b)) }

// runDirect runs the sequence on a TLS connection straight to redis-server, authenticated with the current
// token. The connection dies if that token expires first; then the run is repeated with a newer one.
func runDirect(t *testing.T, f *fixture, seq *diffSeq, ctl *diffControl) []diffChunk {
	for attempt := 1; ; attempt++ {
		ctl.flush(t, seq.seed)
		tok, _ := f.src.Current()
		c := dialDiffTLS(t, f)
		c.SetDeadline(time.Now().Add(5 * time.Second))
		if _, err := c.Write(resp.AppendCommand(nil, "AUTH", tok.Username, tok.Secret)); err != nil {
			t.Fatalf("direct AUTH: %v", err)
		}
		d := &diffConn{c: c}
		if got, ok, err := d.readUntil([]byte("\r\n"), time.Now().Add(5*time.Second)); !ok || string(got) != "+OK\r\n" {
			t.Fatalf("direct AUTH: %q, %v", got, err)
		}
		c.SetDeadline(time.Time{})
		r := &diffRun{t: t, f: f, seq: seq, ctl: ctl, conn: d, user: tok.Username, pass: tok.Secret}
		chunks := r.run(nil)
		c.Close()
		lastc := chunks[len(chunks)-1]
		if lastc.ok {
			return chunks
		}
		expired := false
		for _, x := range f.env.Tokens() {
			expired = expired || (x.OID == tok.Username && x.Deleted)
		}
		if expired && attempt < 3 {
			t.Logf("direct run %d outlived its token; again with a newer one", attempt)
			continue
		}
		t.Fatalf("TEST BUG: the direct side did not answer step %d's sentinel (err %v): the generator's model is wrong\n%s\ngot %q",
			lastc.step, lastc.err, seq, diffTail(lastc.data, 400))
	}
}

func runDiffSeed(t *testing.T, f *fixture, seed uint64) {
	runDiffSeedIn(t, f, seed, diffDialectFor(f.env.Version()))
}

// runDiffSeedIn runs seed's sequence in the dialect d.
func runDiffSeedIn(t *testing.T, f *fixture, seed uint64, d diffDialect) {
	seq := genDiffSeq(seed, d)
	ctl := newDiffControl(t, f)
	want := runDirect(t, f, seq, ctl)

	ctl.flush(t, seed)
	c, err := net.Dial("tcp", f.addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	r := &diffRun{t: t, f: f, seq: seq, ctl: ctl, proxied: true, conn: &diffConn{c: c}, user: "client", pass: "secret"}
	got := r.run(want)
	if seq.halfClose {
		want = want[:len(want)-1] // the direct side's QUIT: the proxy side half-closed instead
	}
	for i, g := range got {
		if i >= len(want) {
			break
		}
		w := want[i]
		if g.ok && diffEqual(g.data, w.data) {
			continue
		}
		what := fmt.Sprintf("step %d", g.step)
		if i == len(want)-1 {
			what = "the end (QUIT, or EOF after the half-close)"
		}
		t.Errorf("seed %d differs at %s (chunk %d of %d; proxy side %s)\n%s\n%s\nreproduce: PROXY_DIFF_SEED=%d go test -race -run 'Differential' ./proxy/ -v",
			seed, what, i+1, len(want), diffHow(g), diffExplain(diffNormalize(w.data), diffNormalize(g.data)), seq, seed)
		return
	}
	if len(got) != len(want) {
		t.Errorf("seed %d: proxy run produced %d chunks, direct %d\n%s", seed, len(got), len(want), seq)
	}
}

func diffHow(c diffChunk) string {
	switch {
	case c.ok:
		return "ended the chunk"
	case c.err != nil && errors.Is(c.err, os.ErrDeadlineExceeded):
		return "timed out before the chunk's end"
	case c.err != nil:
		return "failed: " + c.err.Error()
	default:
		return "did not end the chunk"
	}
}

// diffExplain shows where two chunks first differ.
func diffExplain(want, got []byte) string {
	i := 0
	for i < len(want) && i < len(got) && want[i] == got[i] {
		i++
	}
	from := max(0, i-160)
	return fmt.Sprintf("direct %d bytes, proxy %d bytes, first difference at byte %d\n  common: %q\n  direct: %q\n  proxy:  %q",
		len(want), len(got), i, diffClip(want[from:i], 160), diffClip(want[i:], 240), diffClip(got[i:], 240))
}

func diffClip(b []byte, n int) string {
	if len(b) <= n {
		return string(b)
	}
	return string(b[:n]) + fmt.Sprintf("...(%d more)", len(b)-n)
}

func diffTail(b []byte, n int) string {
	if len(b) <= n {
		return string(b)
	}
	return fmt.Sprintf("(%d before)...", len(b)-n) + string(b[len(b)-n:])
}

// TestDifferentialGenerator checks that sequences are deterministic and that the default seeds cover what
// the issue asks for, in both dialects, and that the 6.0 dialect sends nothing 6.0 lacks. (Whether the
// generator's model is right shows in TestDifferential's direct runs.)
func TestDifferentialGenerator(t *testing.T) {
	diff60 := diffDialectFor(azurefake.Version{Major: 6, Minor: 0, Patch: 20})
	if diffDialectFor(azurefake.Version{Major: 7, Minor: 0}) != diff7 || diff60 != (diffDialect{}) {
		t.Fatalf("dialects: 7.0 %+v, 6.0 %+v", diffDialectFor(azurefake.Version{Major: 7, Minor: 0}), diff60)
	}
	common := []string{"half-close", "hold an open MULTI", "hold a blocked BLPOP", "rotate", "publish",
		"open step", "MULTI", "EXEC", "DISCARD", "WATCH", "CLIENT REPLY OFF", "CLIENT REPLY SKIP", "CLIENT REPLY ON",
		"SUBSCRIBE", "PSUBSCRIBE", "UNSUBSCRIBE", "HELLO 2", "HELLO 3", "BLPOP", "BRPOP", "SELECT", "ECHO",
		"NOSUCHCMD", "value over 16 KiB"}
	for _, tc := range []struct {
		name      string
		d         diffDialect
		want, not []string
	}{
		{"7.0+", diff7, append(common, "RESET", "RPOP count", "HELLO", "CLIENT REPLY"), nil},
		{"6.0", diff60, append(common, "UNWATCH", "PUNSUBSCRIBE", "CLIENT", "HELLO 4"), []string{"RESET", "RPOP count", "HELLO", "CLIENT REPLY"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			a, b := genDiffSeq(7, tc.d).String(), genDiffSeq(7, tc.d).String()
			if a != b {
				t.Fatal("the same seed gave two sequences")
			}
			seen := diffCoverage(tc.d)
			for _, k := range tc.want {
				if !seen[k] {
					t.Errorf("the default seeds never generate %s", k)
				}
			}
			for _, k := range tc.not {
				if seen[k] {
					t.Errorf("the default seeds generate %s, which this version lacks", k)
				}
			}
		})
	}
}

// diffCoverage returns what the default seeds generate: command names (CLIENT and HELLO with their argument,
// and "CLIENT REPLY" and "HELLO" without; "RPOP count"), and op kinds.
func diffCoverage(d diffDialect) map[string]bool {
	seen := map[string]bool{}
	for _, seed := range diffDefaultSeeds {
		s := genDiffSeq(seed, d)
		if s.halfClose {
			seen["half-close"] = true
		}
		for _, op := range s.ops {
			switch op.kind {
			case opHold:
				seen["hold "+op.why] = true
			case opRotate:
				seen["rotate"] = true
			case opPublish:
				seen["publish"] = true
			case opStep:
				if op.sentinel == "" {
					seen["open step"] = true
				}
				for _, c := range op.cmds {
					name := strings.ToUpper(c[0])
					switch {
					case name == "CLIENT" && len(c) <= 3 || name == "HELLO" && len(c) == 2:
						name = strings.Join(c, " ")
					case name == "RPOP" && len(c) == 3:
						name = "RPOP count"
					}
					seen[name] = true
					for _, a := range c {
						if len(a) > 16<<10 {
							seen["value over 16 KiB"] = true
						}
					}
				}
			}
		}
	}
	return seen
}
