package proxy_test

import (
	"context"
	"io"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/entra-redis-proxy/entra-redis-proxy/internal/azurefake"
	"github.com/entra-redis-proxy/entra-redis-proxy/proxy"
	"github.com/entra-redis-proxy/entra-redis-proxy/resp"
)

// Tests under Azure's data access policies: the token's user may be denied any command (NOPERM), and the
// proxy's view of the connection must follow the server's replies, not the commands it forwards. Each
// compares, byte for byte, what a client gets through the proxy with what the same bytes get straight from
// redis-server under the same policy.

// sameAsDirect sends each phase's commands straight to redis-server (authenticated as the current token's
// user) and through the proxy, each on an empty database, with between() run between the proxy's phases,
// and compares the replies. A phase ends with PING ~end~, whose reply ends its replies; in a phase that
// leaves a MULTI open (see openMulti) that PING is queued, so the phase ends after a count of replies.
// "AUTH" alone stands for an AUTH with the token's credentials (after a RESET).
func sameAsDirect(t *testing.T, f *fixture, between func(), phases ...[]string) {
	t.Helper()
	tok, _ := f.src.Current()
	run := func(c *diffConn) []string {
		if _, err := f.env.Admin(t.Context(), "FLUSHALL"); err != nil {
			t.Fatal(err)
		}
		var out []string
		for i, phase := range phases {
			if i > 0 && between != nil && c != nil {
				between()
			}
			var b []byte
			frames := 0
			for _, cmd := range phase {
				switch cmd {
				case openMultiMark:
					frames = len(phase) // the commands but the mark, and the PING
					continue
				case "AUTH":
					cmd = "AUTH " + tok.Username + " " + tok.Secret
				}
				b = resp.AppendCommand(b, strings.Fields(cmd)...)
			}
			b = resp.AppendCommand(b, "PING", "~end~")
			c.write(b)
			var got []byte
			var ok bool
			var err error
			if frames > 0 {
				got, ok, err = c.readFrames(frames, time.Now().Add(20*time.Second))
			} else {
				got, ok, err = c.readUntil([]byte("~end~\r\n"), time.Now().Add(20*time.Second))
			}
			if !ok {
				t.Fatalf("phase %d %q: got %q, %v", i, phase, got, err)
			}
			out = append(out, strings.ReplaceAll(string(got), tok.Secret, "<token>"))
		}
		return out
	}
	d := &diffConn{c: dialDiffTLS(t, f)}
	d.write(resp.AppendCommand(nil, "AUTH", tok.Username, tok.Secret))
	if got, ok, _ := d.readUntil([]byte("\r\n"), time.Now().Add(5*time.Second)); !ok || string(got) != "+OK\r\n" {
		t.Fatalf("direct AUTH: %q", got)
	}
	saved := between
	between = nil
	direct := run(d)
	d.c.Close()
	between = saved
	r := f.raw(t)
	proxied := run(&diffConn{c: r.c})
	// Redis 7.2 names the user in NOPERM errors, and the two sides run as different token users once tokens
	// rotate: user names are compared as "<oid>".
	for _, tok := range f.env.Tokens() {
		for i := range phases {
			direct[i] = strings.ReplaceAll(direct[i], tok.OID, "<oid>")
			proxied[i] = strings.ReplaceAll(proxied[i], tok.OID, "<oid>")
		}
	}
	for i := range phases {
		if direct[i] != proxied[i] {
			t.Errorf("phase %d %q:\n direct %q\n proxy  %q", i, phases[i], direct[i], proxied[i])
		}
	}
}

const openMultiMark = "~open multi~"

// openMulti marks a phase that leaves a MULTI open.
func openMulti(cmds ...string) []string { return append(cmds, openMultiMark) }

// readFrames reads until n whole replies have come.
func (d *diffConn) readFrames(n int, deadline time.Time) ([]byte, bool, error) {
	var got []byte
	var sc resp.Scanner
	for n > 0 {
		if len(d.rest) == 0 {
			d.c.SetReadDeadline(deadline)
			buf := make([]byte, 64<<10)
			k, err := d.c.Read(buf)
			if err != nil {
				return got, false, err
			}
			d.rest = buf[:k]
		}
		k, done, err := sc.Scan(d.rest)
		if err != nil {
			return got, false, err
		}
		got, d.rest = append(got, d.rest[:k]...), d.rest[k:]
		if done {
			n--
		}
	}
	return got, true, nil
}

// A policy without MULTI: the refused MULTI opens no transaction, so nothing is replayed at the token's
// deadline (INCR ran once), and with WATCH active later commands run instead of being answered +QUEUED.
func TestPolicyRefusedMulti(t *testing.T) {
	f := newFixture(t, fixtureOpts{lifetime: 3 * time.Second, userRules: []string{"-multi"}})
	sameAsDirect(t, f, func() { f.rotations(t, 2) },
		[]string{"DEL c", "MULTI", "INCR c"},
		[]string{"INCR c", "WATCH c", "MULTI", "INCR c"},
		[]string{"GET c", "EXEC", "UNWATCH"},
	)
}

// A policy without CLIENT REPLY: OFF and SKIP are refused with an error each, and nothing else shifts; the
// proxy's own re-AUTH and idle PING replies never reach the client.
func TestPolicyClientReplyDenied(t *testing.T) {
	rules := []string{"-client|reply"}
	if !serverVersion(t).AtLeast(7, 0) {
		rules = []string{"-client"} // 6.0 cannot take a subcommand away
	}
	f := newFixture(t, fixtureOpts{lifetime: 3 * time.Second, idlePing: 300 * time.Millisecond, userRules: rules})
	sameAsDirect(t, f, func() { f.rotations(t, 1) },
		[]string{"CLIENT REPLY OFF", "SET k v", "GET k", "CLIENT REPLY SKIP", "GET k", "INCR n"},
		[]string{"GET k", "INCR n"},
		[]string{"BLPOP nokey 1.5", "CLIENT REPLY SKIP", "GET k", "PING"}, // a re-AUTH falls due while blocked
		[]string{"CLIENT REPLY ON", "GET k"},
	)
}

// RESET under every reply mode, inside MULTI, and across a rotation matches a direct connection: where it
// exists, and where it does not (Redis 6.0 and Enterprise; emulated on 6.2+ by renaming it away). ACL rules
// cannot deny RESET.
func TestPolicyReset(t *testing.T) {
	phases := [][]string{
		{"SET k v", "CLIENT REPLY SKIP", "RESET", "AUTH", "GET k", "PING"},
		{"CLIENT REPLY OFF", "RESET", "AUTH", "SET k w", "CLIENT REPLY ON", "GET k"},
		{"MULTI", "RESET", "AUTH", "INCR c", "EXEC"},
		{"CLIENT REPLY OFF", "RESET", "AUTH", "CLIENT REPLY ON", "PING", "PING", "ECHO a"},
		{"GET k"},
	}
	cases := map[string]map[string]string{"without RESET": nil}
	if serverVersion(t).AtLeast(6, 2) {
		cases = map[string]map[string]string{"with RESET": nil, "without RESET": {"RESET": ""}}
	}
	for name, renames := range cases {
		t.Run(name, func(t *testing.T) {
			f := newFixture(t, fixtureOpts{lifetime: 3 * time.Second, renames: renames})
			sameAsDirect(t, f, func() { f.rotations(t, 1) }, phases...)
		})
	}
}

// serverVersion is the version of the redis-server the fixtures run.
func serverVersion(t *testing.T) azurefake.Version {
	v, err := azurefake.ServerVersion(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	return v
}

// A policy without WATCH: the refused WATCH watches nothing, so a MULTI held past the token's deadline is
// replayed and EXEC runs it, as it does on a direct connection.
func TestPolicyWatchDenied(t *testing.T) {
	f := newFixture(t, fixtureOpts{lifetime: 3 * time.Second, userRules: []string{"-watch"}})
	sameAsDirect(t, f, func() { f.rotations(t, 2) },
		openMulti("DEL c", "WATCH c", "MULTI", "INCR c"),
		[]string{"EXEC", "GET c"},
	)
}

// mechanisms counts the proxy's mechanisms and signals each use.
type mechanisms struct {
	proxy.NopObserver
	mu    sync.Mutex
	n     map[string]int
	event chan string
}

func newMechanisms() *mechanisms {
	return &mechanisms{n: map[string]int{}, event: make(chan string, 1024)}
}

func (m *mechanisms) Mechanism(name string) {
	m.mu.Lock()
	m.n[name]++
	m.mu.Unlock()
	select {
	case m.event <- name:
	default:
	}
}

func (m *mechanisms) count(name string) int {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.n[name]
}

// await waits for the next use of the mechanism name.
func (m *mechanisms) await(t *testing.T, name string, within time.Duration) {
	t.Helper()
	deadline := time.After(within)
	for {
		select {
		case got := <-m.event:
			if got == name {
				return
			}
		case <-deadline:
			t.Fatalf("no %s within %v", name, within)
		}
	}
}

// An identity that may PSUBSCRIBE but not SUBSCRIBE: the handover subscribes its marker as a pattern, and a
// RESP2 pattern subscriber gets every message once, in order, across token expiries.
func TestPolicyHandoverAsPattern(t *testing.T) {
	obs := newMechanisms()
	f := newFixture(t, fixtureOpts{lifetime: 3 * time.Second, userRules: []string{"-subscribe"},
		proxyOpt: func(o *proxy.Options) { o.Observer = obs }})
	ctx := t.Context()
	sub := f.client(t, 2).PSubscribe(ctx, "news.*")
	if _, err := sub.Receive(ctx); err != nil {
		t.Fatal(err)
	}
	msgs := sub.Channel(redis.WithChannelSize(1 << 16))
	stop := make(chan struct{})
	published := make(chan int, 1)
	go func() {
		i := 0
		for ; ; i++ {
			select {
			case <-stop:
				f.env.Admin(context.Background(), "PUBLISH", "news.a", "end")
				published <- i
				return
			default:
			}
			if _, err := f.env.Admin(context.Background(), "PUBLISH", "news.a", strconv.Itoa(i)); err != nil {
				t.Error(err)
			}
			time.Sleep(time.Millisecond) // a steady stream, not a flood
		}
	}()
	f.rotations(t, 2)
	close(stop)
	n := <-published
	for i := 0; ; i++ {
		m := <-msgs
		if m.Payload == "end" {
			if i != n {
				t.Fatalf("%d messages, want %d", i, n)
			}
			break
		}
		if m.Payload != strconv.Itoa(i) || m.Pattern != "news.*" {
			t.Fatalf("message %d: %q by %q: lost, duplicated or reordered", i, m.Payload, m.Pattern)
		}
	}
	if obs.count("handover") < 2 {
		t.Fatalf("%d handovers across 2 expiries", obs.count("handover"))
	}
}

// An identity limited to its own channels (Redis 7 channel rules): the marker is refused both ways, so the
// handover gives up at once, says so (WARN, handover_refused), and the client is not stalled; its connection
// ends when the old token expires, as it would without the proxy's help.
func TestPolicyHandoverRefused(t *testing.T) {
	if !serverVersion(t).AtLeast(7, 0) {
		t.Skip("Redis 6.0 has no channel permissions: any identity may subscribe to the marker, so it is never refused")
	}
	obs := newMechanisms()
	f := newFixture(t, fixtureOpts{lifetime: 3 * time.Second, userRules: []string{"resetchannels", "&news.*"},
		proxyOpt: func(o *proxy.Options) { o.Observer = obs }})
	r := f.raw(t)
	r.send("SUBSCRIBE news.a")
	r.expect("*3\r\n$9\r\nsubscribe\r\n$6\r\nnews.a\r\n:1\r\n")
	obs.await(t, "handover_refused", 20*time.Second)
	// The old code stalled the client 10 s per try; raw.expect's own 10 s deadline would not tell.
	r.send("PING x")
	want := "*2\r\n$4\r\npong\r\n$1\r\nx\r\n"
	r.c.SetReadDeadline(time.Now().Add(5 * time.Second))
	got := make([]byte, len(want))
	if _, err := io.ReadFull(r.r, got); err != nil || string(got) != want {
		t.Fatalf("PING after the refused handover: got %q, %v; want %q within 5 s", got, err, want)
	}
	if n := obs.count("handover"); n != 0 {
		t.Fatalf("%d handovers", n)
	}
}

// A SUBSCRIBE refused under CLIENT REPLY OFF: its error is suppressed, so no answer ever comes; the proxy
// must not wait for one forever (it did: the client loop hung before CLIENT REPLY ON).
func TestPolicySubscribeRefusedRepliesOff(t *testing.T) {
	f := newFixture(t, fixtureOpts{lifetime: time.Minute, userRules: []string{"-subscribe"}})
	sameAsDirect(t, f, nil,
		[]string{"CLIENT REPLY OFF", "SUBSCRIBE x", "CLIENT REPLY ON", "PING", "SET k v", "GET k"},
		[]string{"CLIENT REPLY SKIP", "SUBSCRIBE x", "PING", "GET k"},
	)
}

// Azure's Data Contributor policy (+@all -@dangerous) denies CLIENT UNBLOCK, so a blocked connection cannot
// be rescued; its blocking commands go on leases instead (rescue.go). Every kind stays blocked across token
// expiries and gets its element once; no rescue was attempted. (XREAD "$" is not leased: it reads past a
// fixed ID here.)
func TestPolicyLeaseWhenUnblockDenied(t *testing.T) {
	obs := newMechanisms()
	f := newFixture(t, fixtureOpts{lifetime: 3 * time.Second, userRules: []string{"-@dangerous"},
		proxyOpt: func(o *proxy.Options) { o.Observer = obs }})
	blockedAcrossRotations(t, f, "0-0")
	if n := obs.count("lease_renewed"); n < 3*5 {
		t.Errorf("lease_renewed counted %d times, want at least one per blocked client and expiry (15)", n)
	}
	for _, name := range []string{"unblock_reissue", "unblock_retry", "unblock_missed"} {
		if n := obs.count(name); n != 0 {
			t.Errorf("%s counted %d times: a rescue was attempted", name, n)
		}
	}
}
