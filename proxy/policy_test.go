package proxy_test

import (
	"strings"
	"testing"
	"time"

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
	f := newFixture(t, fixtureOpts{lifetime: 3 * time.Second, idlePing: 300 * time.Millisecond,
		userRules: []string{"-client|reply"}})
	sameAsDirect(t, f, func() { f.rotations(t, 1) },
		[]string{"CLIENT REPLY OFF", "SET k v", "GET k", "CLIENT REPLY SKIP", "GET k", "INCR n"},
		[]string{"GET k", "INCR n"},
		[]string{"BLPOP nokey 1.5", "CLIENT REPLY SKIP", "GET k", "PING"}, // a re-AUTH falls due while blocked
		[]string{"CLIENT REPLY ON", "GET k"},
	)
}

// RESET under every reply mode, inside MULTI, and across a rotation matches a direct connection. (ACL rules
// cannot deny RESET; servers without it are tested with it renamed away.)
func TestPolicyReset(t *testing.T) {
	phases := [][]string{
		{"SET k v", "CLIENT REPLY SKIP", "RESET", "AUTH", "GET k", "PING"},
		{"CLIENT REPLY OFF", "RESET", "AUTH", "SET k w", "CLIENT REPLY ON", "GET k"},
		{"MULTI", "RESET", "AUTH", "INCR c", "EXEC"},
		{"GET k"},
	}
	for _, rules := range [][]string{nil} {
		t.Run(strings.Join(append([]string{"+@all"}, rules...), " "), func(t *testing.T) {
			f := newFixture(t, fixtureOpts{lifetime: 3 * time.Second, userRules: rules})
			sameAsDirect(t, f, func() { f.rotations(t, 1) }, phases...)
		})
	}
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
