package proxy_test

import (
	"slices"
	"strconv"
	"strings"
	"testing"
	"testing/synctest"
	"time"
)

// An identity that may not run CLIENT UNBLOCK (Azure's Data Contributor policy) cannot be rescued while
// blocked, so its blocking commands go on a lease: the timeout capped before the connection's token nears
// expiry, the lease's timeout reply hidden, the command sent again on the newest token. The client sees
// exactly what a direct connection would: nothing until data comes or its own timeout passes.
func TestPipeLeaseWhenUnblockDenied(t *testing.T) {
	for _, tc := range []struct {
		desc    string
		timeout string        // the client's BLPOP timeout, in seconds
		endAt   time.Duration // when the client's own timeout passes (0: never; a push ends it)
		want    string
	}{
		{"BLPOP 0 across two expiries, then a push", "0", 0, "*2\r\n" + bulkOf("k") + bulkOf("v") + "+PONG\r\n"},
		{"BLPOP for 2.5 hours times out once, at its own time", "9000", 150 * time.Minute, "*-1\r\n+PONG\r\n"},
	} {
		t.Run(tc.desc, func(t *testing.T) {
			synctest.Test(t, func(t *testing.T) {
				e, obs, _ := unblockEnv(t, &unblockScript{})
				denyUnblock(e.fake)
				c := e.connect("blocked")
				sent := time.Now()
				c.send(cmd("BLPOP", "k", tc.timeout), cmd("PING"))
				synctest.Wait()
				up := e.fake.Conns()[0]
				if got := up.Commands(); !slices.Contains(got, "CLIENT UNBLOCK 0") || !slices.Contains(got, "BLPOP k 3060.000") {
					t.Fatalf("want the probe, then BLPOP on a lease of 85%% of the token's hour: %q", got)
				}
				for range 2 {
					old := e.rotate()
					e.pastExpiry(old) // the fake closes connections still on it
					if !c.expectOpen("blocked across the old token's expiry") || !c.expect("while blocked", "") {
						return
					}
				}
				if tc.endAt == 0 {
					e.fake.push("k", "v")
				} else {
					time.Sleep(time.Until(sent.Add(tc.endAt)) - time.Second)
					synctest.Wait()
					c.expect("a second before the client's own timeout", "")
					time.Sleep(2 * time.Second)
				}
				synctest.Wait()
				c.expect("the one reply, then the pipelined PING's", tc.want)
				c.expectOpen("after the replies")
				got := up.Commands()
				for _, want := range []string{"AUTH oid-1 tok-2", "AUTH oid-1 tok-3"} {
					if !slices.Contains(got, want) {
						t.Errorf("no %q on the connection: %q", want, got)
					}
				}
				if n := len(e.fake.Conns()); n != 1 {
					t.Errorf("%d upstream connections; a lease needs no control connection", n)
				}
				if n := obs.count("lease_renewed"); n < 2 {
					t.Errorf("lease_renewed counted %d times, want at least 2 (one per expiry)", n)
				}
				obs.expect(t, nil) // no unblock_* mechanism
			})
		})
	}
}

// Where CLIENT UNBLOCK is allowed, a blocking command goes as the client sent it (the rescue unblocks it).
func TestPipeNoLeaseWhenUnblockAllowed(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		e := newPipeEnv(t, nil)
		c := e.connect("blocked")
		c.send(cmd("BLPOP", "k", "0"))
		synctest.Wait()
		if got := e.fake.Conns()[0].Commands(); !slices.Contains(got, "BLPOP k 0") {
			t.Fatalf("want BLPOP as sent: %q", got)
		}
	})
}

func (o *mechObserver) count(name string) int {
	o.mu.Lock()
	defer o.mu.Unlock()
	return o.counts[name]
}

// denyUnblock makes the fake refuse CLIENT UNBLOCK, as Azure's Data Contributor policy does, and answer
// CLIENT ID.
func denyUnblock(f *fakeUpstream) {
	f.handle("CLIENT", func(c *fakeConn, args []string) {
		if strings.EqualFold(args[1], "UNBLOCK") {
			c.reply("-NOPERM User oid-1 has no permissions to run the 'client|unblock' command\r\n")
			return
		}
		c.reply(":" + strconv.FormatInt(c.id, 10) + "\r\n")
	})
}
