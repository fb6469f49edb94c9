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
// user) and through the proxy, each on an empty database, with between() run between the proxy's phases, and compares the replies.
func sameAsDirect(t *testing.T, f *fixture, between func(), phases ...[]string) {
	t.Helper()
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
			for _, cmd := range phase {
				b = resp.AppendCommand(b, strings.Fields(cmd)...)
			}
			b = resp.AppendCommand(b, "PING", "~end~")
			c.write(b)
			got, ok, err := c.readUntil([]byte("~end~\r\n"), time.Now().Add(20*time.Second))
			if !ok {
				t.Fatalf("phase %d %q: got %q, %v", i, phase, got, err)
			}
			out = append(out, string(got))
		}
		return out
	}
	tok, _ := f.src.Current()
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
