package proxy_test

import (
	"errors"
	"io"
	"log/slog"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"testing/synctest"
	"time"

	"github.com/entra-redis-proxy/entra-redis-proxy/proxy"
)

// Redis Enterprise does not share CLIENT IDs between its proxy nodes: a control connection that lands on
// another node gets CLIENT UNBLOCK's 0 for a client that is blocked. These tests script CLIENT UNBLOCK's
// answers on the fake upstream and check what the client receives, byte for byte, and what the proxy logs
// and counts.

// unblockScript answers CLIENT on every connection of f: CLIENT ID as the fake does, CLIENT UNBLOCK with
// misses 0s first (without unblocking), then as the fake does (misses < 0: always 0). onUnblock, if set, runs
// at each CLIENT UNBLOCK before it is answered, with its number (from 1).
type unblockScript struct {
	mu        sync.Mutex
	misses    int
	onUnblock func(n int)
	n         int
	okAt      time.Time // when the CLIENT UNBLOCK that unblocked was run
}

func (u *unblockScript) install(f *fakeUpstream) {
	f.handle("CLIENT", func(c *fakeConn, args []string) {
		switch {
		case len(args) == 2 && strings.EqualFold(args[1], "ID"):
			c.reply(":" + strconv.FormatInt(c.id, 10) + "\r\n")
		case len(args) == 3 && strings.EqualFold(args[1], "UNBLOCK") && args[2] == "0":
			c.reply(":0\r\n") // the proxy's probe: may it run CLIENT UNBLOCK? (not a rescue's attempt)
		case len(args) >= 3 && strings.EqualFold(args[1], "UNBLOCK"):
			u.mu.Lock()
			u.n++
			n, miss, hook := u.n, u.misses < 0 || u.n <= u.misses, u.onUnblock
			if !miss {
				u.okAt = time.Now()
			}
			u.mu.Unlock()
			if hook != nil {
				hook(n)
			}
			if miss {
				c.reply(":0\r\n")
				return
			}
			c.unblock(args)
		default:
			c.reply("-ERR CLIENT " + args[1] + " not scripted\r\n")
		}
	})
}

func (u *unblockScript) count() int {
	u.mu.Lock()
	defer u.mu.Unlock()
	return u.n
}

// mechObserver counts Observer.Mechanism calls by name.
type mechObserver struct {
	proxy.NopObserver
	mu     sync.Mutex
	counts map[string]int
}

func (o *mechObserver) Mechanism(name string) {
	o.mu.Lock()
	if o.counts == nil {
		o.counts = map[string]int{}
	}
	o.counts[name]++
	o.mu.Unlock()
}

// expect fails t unless the unblock mechanisms were counted exactly as want says (absent = 0).
func (o *mechObserver) expect(t *testing.T, want map[string]int) {
	t.Helper()
	o.mu.Lock()
	defer o.mu.Unlock()
	for _, name := range []string{"unblock_retry", "unblock_missed", "unblock_reissue"} {
		if o.counts[name] != want[name] {
			t.Errorf("mechanism %s counted %d times, want %d (all: %v)", name, o.counts[name], want[name], o.counts)
		}
	}
}

// unblockEnv is a pipeEnv with the CLIENT script, the observer and a log the test reads.
func unblockEnv(t *testing.T, u *unblockScript) (*pipeEnv, *mechObserver, *pipeLog) {
	obs, logs := &mechObserver{}, &pipeLog{}
	e := newPipeEnv(t, func(o *proxy.Options) {
		o.Observer = obs
		o.Logger = slog.New(slog.NewTextHandler(logs, &slog.HandlerOptions{Level: slog.LevelDebug}))
	})
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("proxy log (this test's):\n%s", logs.String())
		}
	})
	u.install(e.fake)
	return e, obs, logs
}

var missWarn = regexp.MustCompile(`(?m)^.*level=WARN.*CLIENT UNBLOCK found no blocked client.*$`)

// CLIENT UNBLOCK answered 0 (the id unknown where the control connection landed) is sent again from a new
// control connection; the second one unblocks, and the command is re-issued after the re-AUTH with the time
// it had left.
func TestUnblockRetriedAfterZero(t *testing.T) {
	for _, tc := range []struct {
		desc    string
		timeout string // BLPOP's
	}{
		{"BLPOP forever", "0"},
		{"BLPOP with a timeout past the old token's expiry", "7200"},
	} {
		t.Run(tc.desc, func(t *testing.T) {
			synctest.Test(t, func(t *testing.T) {
				u := &unblockScript{misses: 1}
				e, obs, logs := unblockEnv(t, u)
				c := e.connect("blocked")
				sent := time.Now()
				c.send(cmd("BLPOP", "k", tc.timeout))
				time.Sleep(time.Minute)
				synctest.Wait()
				old := e.rotate()
				e.pastExpiry(old)
				if !c.expectOpen("blocked across the old token's expiry") {
					return
				}
				if got := u.count(); got != 2 {
					t.Errorf("CLIENT UNBLOCK sent %d times, want 2 (a 0, then a 1)", got)
				}
				reissued := "BLPOP k 0"
				if tc.timeout != "0" {
					u.mu.Lock()
					left := 7200*time.Second - u.okAt.Sub(sent)
					u.mu.Unlock()
					reissued = "BLPOP k " + strconv.FormatFloat(left.Seconds(), 'f', 3, 64)
				}
				conns := e.fake.Conns()
				if len(conns) != 3 {
					t.Fatalf("%d upstream connections, want 3 (the client's, two control connections)", len(conns))
				}
				expectCommands(t, conns[0], "the client's upstream",
					append(firstHandshake(), "BLPOP k "+tc.timeout, "AUTH oid-1 tok-2", reissued)...)
				for _, ctl := range conns[1:] {
					expectCommands(t, ctl, "a control connection", append(handshake(2), "CLIENT UNBLOCK 1 TIMEOUT")...)
				}
				e.fake.push("k", "v")
				time.Sleep(time.Second)
				synctest.Wait()
				c.expect("the re-issued BLPOP's reply only", "*2\r\n"+bulkOf("k")+bulkOf("v"))
				c.expectOpen("after the reply")
				obs.expect(t, map[string]int{"unblock_retry": 1, "unblock_reissue": 1})
				if n := len(missWarn.FindAllString(logs.String(), -1)); n != 0 {
					t.Errorf("%d miss WARN lines, want none", n)
				}
			})
		})
	}
}

// CLIENT UNBLOCK always answers 0: after three tries the rescue gives up, with one WARN line and one count,
// and the connection is as without a rescue: its reply passes exactly if it comes before the old token
// expires (then the re-AUTH follows), else the server closes the connection at expiry and the client sees
// the close, with no stray bytes.
func TestUnblockMissedFallsBack(t *testing.T) {
	for _, tc := range []struct {
		desc  string
		data  bool // a value arrives after the rescue gave up, before the old token expires
		reply string
	}{
		{"closed at expiry", false, ""},
		{"answered before expiry", true, "*2\r\n" + bulkOf("k") + bulkOf("v")},
	} {
		t.Run(tc.desc, func(t *testing.T) {
			synctest.Test(t, func(t *testing.T) {
				u := &unblockScript{misses: -1}
				e, obs, logs := unblockEnv(t, u)
				c := e.connect("blocked")
				c.send(cmd("BLPOP", "k", "0"))
				time.Sleep(time.Minute)
				synctest.Wait()
				old := e.rotate()
				time.Sleep(time.Until(old.ExpiresOn) - 5*time.Minute) // the rescue (at 85%) is over
				synctest.Wait()
				if got := u.count(); got != 3 {
					t.Errorf("CLIENT UNBLOCK sent %d times, want 3", got)
				}
				warns := missWarn.FindAllString(logs.String(), -1)
				if len(warns) != 1 || !regexp.MustCompile(`\bconn=\d+\b`).MatchString(warns[0]) ||
					!strings.Contains(warns[0], "upstream_client_id=1") {
					t.Errorf("miss WARN lines %q, want one with the connection id and upstream_client_id=1", warns)
				}
				obs.expect(t, map[string]int{"unblock_retry": 2, "unblock_missed": 1})
				if !c.expectOpen("after the rescue gave up") {
					return
				}
				up := e.fake.Conns()[0]
				// What missed once misses again: a blocking command sent now goes on a lease, 85% of the time
				// left to the new token (it expires at 02:01; it is 00:55): 3366 s.
				later := e.connect("blocked later")
				later.send(cmd("BLPOP", "other", "0"))
				synctest.Wait()
				if n := len(e.fake.Conns()); n != 5 {
					t.Fatalf("%d upstream connections, want 5 (two clients', three control connections)", n)
				}
				if got := e.fake.Conns()[4].Commands(); !slices.Contains(got, "BLPOP other 3366.000") {
					t.Errorf("the later client's upstream got %q, want BLPOP on a lease", got)
				}
				if tc.data {
					e.fake.push("k", "v")
					synctest.Wait()
				}
				e.pastExpiry(old)
				c.expect("the client's replies", tc.reply)
				err, _ := c.ended()
				switch {
				case tc.data:
					c.expectOpen("re-authenticated once the command returned")
					expectCommands(t, up, "the client's upstream", append(firstHandshake(), "BLPOP k 0", "AUTH oid-1 tok-2")...)
				case !errors.Is(err, io.EOF):
					t.Errorf("client connection: %v, want closed (io.EOF) once the old token expired", err)
				default:
					expectCommands(t, up, "the client's upstream", append(firstHandshake(), "BLPOP k 0")...)
				}
			})
		})
	}
}

// A 0 because the command was answered just before (data won the race) is not a miss: the data passes, the
// re-AUTH follows, nothing is retried or re-issued. Whether the data comes with the first 0 or during the
// retries.
func TestUnblockZeroAfterAnswer(t *testing.T) {
	for _, tc := range []struct {
		desc    string
		pushAt  int           // the CLIENT UNBLOCK (from 1) that makes the data arrive
		delay   time.Duration // after it
		retries int
	}{
		{"data just before the first CLIENT UNBLOCK", 1, 0, 0},
		{"data between two retries", 2, 50 * time.Millisecond, 1},
	} {
		t.Run(tc.desc, func(t *testing.T) {
			synctest.Test(t, func(t *testing.T) {
				u := &unblockScript{misses: -1}
				e, obs, logs := unblockEnv(t, u)
				u.onUnblock = func(n int) {
					if n == tc.pushAt {
						time.AfterFunc(tc.delay, func() { e.fake.push("k", "v") })
					}
				}
				c := e.connect("blocked")
				c.send(cmd("BLPOP", "k", "0"), cmd("PING"))
				time.Sleep(time.Minute)
				synctest.Wait()
				old := e.rotate()
				e.pastExpiry(old)
				c.expect("BLPOP's data, then PING", "*2\r\n"+bulkOf("k")+bulkOf("v")+"+PONG\r\n")
				c.expectOpen("past the old token's expiry")
				if got := u.count(); got != tc.pushAt {
					t.Errorf("CLIENT UNBLOCK sent %d times, want %d", got, tc.pushAt)
				}
				obs.expect(t, map[string]int{"unblock_retry": tc.retries})
				if n := len(missWarn.FindAllString(logs.String(), -1)); n != 0 {
					t.Errorf("%d miss WARN lines, want none", n)
				}
				expectCommands(t, e.fake.Conns()[0], "the client's upstream",
					append(firstHandshake(), "BLPOP k 0", "AUTH oid-1 tok-2", "PING")...)
			})
		})
	}
}
