package proxy_test

import (
	"errors"
	"io"
	"slices"
	"strconv"
	"strings"
	"testing"
	"testing/synctest"
	"time"

	"github.com/entra-redis-proxy/entra-redis-proxy/proxy"
)

// Deterministic tests of the reconnect after an unplanned upstream close (reconnect.go), over the scripted
// fake upstream: the fake closes the session's upstream connection (as CLIENT KILL or a failover would),
// and the client must see exactly what it would have seen had that not happened, or, where that can't be
// promised, have its connection closed as before, counted.

// reconnectEnv is a pipeEnv whose fake also answers the commands whose state a reconnect restores.
func reconnectEnv(t *testing.T) (*pipeEnv, *diffObserver) {
	obs := &diffObserver{counts: map[string]int{}}
	e := newPipeEnv(t, func(o *proxy.Options) { o.Observer, o.ReconnectTimeout = obs, 30*time.Second })
	scriptReconnect(e.fake)
	return e, obs
}

// reconnectApp is a reconnectEnv with one client, which sent before and got the replies.
func reconnectApp(t *testing.T, before [][]string) (*pipeEnv, *diffObserver, *pipeClient) {
	e, obs := reconnectEnv(t)
	c := e.connect("app")
	c.send(before...)
	synctest.Wait()
	return e, obs, c
}

// scriptReconnect scripts the fake to answer the commands whose state a reconnect restores.
func scriptReconnect(f *fakeUpstream) {
	ok := func(c *fakeConn, _ []string) { c.reply("+OK\r\n") }
	for _, name := range []string{"SELECT", "READONLY", "WATCH"} {
		f.handle(name, ok)
	}
	f.handle("CLIENT", func(c *fakeConn, args []string) {
		switch strings.ToUpper(args[1]) {
		case "ID":
			c.reply(":" + strconv.FormatInt(c.id, 10) + "\r\n")
		case "SETNAME", "TRACKING", "MAINT_NOTIFICATIONS": // the last as Redis Enterprise answers it
			c.reply("+OK\r\n")
		case "UNBLOCK":
			c.unblock(args)
		default:
			c.reply("-ERR not scripted\r\n")
		}
	})
	for _, name := range []string{"SUBSCRIBE", "PSUBSCRIBE"} {
		f.handle(name, func(c *fakeConn, args []string) {
			for i, ch := range args[1:] {
				c.reply(pubsubFrame(c.proto, strings.ToLower(name), ch, ":"+strconv.Itoa(i+1)+"\r\n"))
			}
		})
	}
}

// pubsubFrame is a pub/sub confirmation or message: kind, channel, and the last element as RESP.
func pubsubFrame(proto int, kind, channel, last string) string {
	head := "*3\r\n"
	if proto == 3 {
		head = ">3\r\n"
	}
	return head + bulkOf(kind) + bulkOf(channel) + last
}

// kill closes the session's current upstream connection from the server's side.
func (e *pipeEnv) kill() {
	conns := e.fake.Conns()
	conns[len(conns)-1].closeWith("killed by the test")
	synctest.Wait()
}

// expectMechanisms fails the test unless the proxy's mechanism counts are exactly want.
func expectMechanisms(t *testing.T, obs *diffObserver, want string) {
	t.Helper()
	if got := obs.String(); got != want {
		t.Errorf("mechanisms: got %q, want %q", got, want)
	}
}

func TestReconnectRestoresState(t *testing.T) {
	for _, tc := range []struct {
		desc   string
		before [][]string // sent and answered before the kill
		want   string     // what the client gets for them
		// restored: what the new upstream receives after its handshake, before after is sent
		restored []string
		after    [][]string
		wantEnd  string // what the client gets in all
		mechs    string
		// push, if set, is written by the new upstream after the commands in after (a published message)
		push string
	}{{
		desc:     "database, name and READONLY",
		before:   [][]string{cmd("SELECT", "2"), cmd("CLIENT", "SETNAME", "app"), cmd("READONLY")},
		want:     "+OK\r\n+OK\r\n+OK\r\n",
		restored: []string{"SELECT 2", "CLIENT SETNAME app", "READONLY"},
		after:    [][]string{cmd("PING")},
		wantEnd:  "+OK\r\n+OK\r\n+OK\r\n+PONG\r\n",
		mechs:    "reconnect_restored=1",
	}, {
		desc:     "RESP2 subscriber",
		before:   [][]string{cmd("SUBSCRIBE", "a"), cmd("PSUBSCRIBE", "p*")},
		want:     pubsubFrame(2, "subscribe", "a", ":1\r\n") + pubsubFrame(2, "psubscribe", "p*", ":1\r\n"),
		restored: []string{"SUBSCRIBE a", "PSUBSCRIBE p*"},
		push:     pubsubFrame(2, "message", "a", bulkOf("after")),
		wantEnd: pubsubFrame(2, "subscribe", "a", ":1\r\n") + pubsubFrame(2, "psubscribe", "p*", ":1\r\n") +
			pubsubFrame(2, "message", "a", bulkOf("after")),
		mechs: "reconnect_restored=1",
	}, {
		desc:     "RESP3 with tracking: the client's cache is told to drop everything",
		before:   [][]string{cmd("HELLO", "3"), cmd("CLIENT", "TRACKING", "on")},
		want:     "%1\r\n+proto\r\n:3\r\n+OK\r\n",
		restored: []string{"HELLO 3", "CLIENT TRACKING on"},
		after:    [][]string{cmd("PING")},
		wantEnd:  "%1\r\n+proto\r\n:3\r\n+OK\r\n" + ">2\r\n$10\r\ninvalidate\r\n_\r\n" + "+PONG\r\n",
		mechs:    "reconnect_restored=1",
	}, {
		desc:     "open MULTI, replayed",
		before:   [][]string{cmd("MULTI"), cmd("PING"), cmd("ECHO", "x")},
		want:     "+OK\r\n+QUEUED\r\n+QUEUED\r\n",
		restored: []string{"MULTI", "PING", "ECHO x"},
		after:    [][]string{cmd("EXEC")},
		wantEnd:  "+OK\r\n+QUEUED\r\n+QUEUED\r\n*2\r\n+PONG\r\n" + bulkOf("x"),
		mechs:    "reconnect_restored=1 tx_replay=1",
	}, {
		desc:    "open MULTI with WATCH: EXEC answers null, nothing runs",
		before:  [][]string{cmd("WATCH", "k"), cmd("MULTI"), cmd("PING")},
		want:    "+OK\r\n+OK\r\n+QUEUED\r\n",
		after:   [][]string{cmd("ECHO", "x"), cmd("EXEC"), cmd("PING")},
		wantEnd: "+OK\r\n+OK\r\n+QUEUED\r\n+QUEUED\r\n*-1\r\n+PONG\r\n",
		// The proxy answers the aborted transaction itself (its place held by PINGs).
		restored: nil,
		mechs:    "reconnect_restored=1 tx_abort=1",
	}, {
		desc:     "a reply after the command SKIP silenced shows it ran",
		before:   [][]string{cmd("CLIENT", "REPLY", "SKIP"), cmd("ECHO", "a"), cmd("ECHO", "b")},
		want:     bulkOf("b"),
		restored: nil,
		after:    [][]string{cmd("PING")},
		wantEnd:  bulkOf("b") + "+PONG\r\n",
		mechs:    "reconnect_restored=1",
	}, {
		desc:    "WATCH outside MULTI: the next transaction is aborted, the one after it runs",
		before:  [][]string{cmd("WATCH", "k")},
		want:    "+OK\r\n",
		after:   [][]string{cmd("MULTI"), cmd("PING"), cmd("EXEC"), cmd("MULTI"), cmd("PING"), cmd("EXEC")},
		wantEnd: "+OK\r\n" + "+OK\r\n+QUEUED\r\n*-1\r\n" + "+OK\r\n+QUEUED\r\n*1\r\n+PONG\r\n",
		// The proxy answers the first transaction itself, its place held by PINGs.
		restored: nil,
		mechs:    "reconnect_restored=1 tx_abort=1",
	}, {
		desc:     "CLIENT REPLY SKIP not yet spent",
		before:   [][]string{cmd("ECHO", "a"), cmd("CLIENT", "REPLY", "SKIP")},
		want:     bulkOf("a"),
		restored: []string{"CLIENT REPLY SKIP"},
		after:    [][]string{cmd("ECHO", "b"), cmd("ECHO", "c")},
		wantEnd:  bulkOf("a") + bulkOf("c"),
		mechs:    "reconnect_restored=1",
	}} {
		t.Run(tc.desc, func(t *testing.T) {
			synctest.Test(t, func(t *testing.T) {
				e, obs, c := reconnectApp(t, tc.before)
				c.expect("before the kill", tc.want)
				e.kill()
				c.expectOpen("after the kill")
				conns := e.fake.Conns()
				if len(conns) != 2 {
					t.Fatalf("%d upstream connections, want the first and one new one", len(conns))
				}
				up := conns[1]
				expectCommands(t, up, "the state restored on the new upstream", append(handshake(1), tc.restored...)...)
				c.send(tc.after...)
				synctest.Wait()
				if tc.push != "" {
					up.write([]byte(tc.push))
					synctest.Wait()
				}
				c.expect("in all", tc.wantEnd)
				c.expectOpen("at the end")
				expectMechanisms(t, obs, tc.mechs)
			})
		})
	}
}

// A client connection whose state can't be restored exactly is closed, as it was before reconnects, and
// counted; a command in flight is never sent again.
func TestReconnectCloses(t *testing.T) {
	for _, tc := range []struct {
		desc   string
		before [][]string
		want   string
		down   bool // no new upstream can be dialed
		mechs  string
	}{
		{"reply outstanding (blocked)", [][]string{cmd("PING"), cmd("BLPOP", "k", "0")}, "+PONG\r\n", false, "reconnect_outstanding=1"},
		{"MONITOR", [][]string{cmd("MONITOR")}, "+OK\r\n", false, "reconnect_unrestorable=1"},
		{"CLIENT REPLY OFF", [][]string{cmd("CLIENT", "REPLY", "OFF"), cmd("PING")}, "", false, "reconnect_unrestorable=1"},
		{"a command whose reply SKIP silenced, none asked for since", [][]string{cmd("CLIENT", "REPLY", "SKIP"), cmd("ECHO", "a")},
			"", false, "reconnect_unrestorable=1"},
		{"no upstream within ReconnectTimeout", [][]string{cmd("PING")}, "+PONG\r\n", true, "reconnect_failed=1"},
	} {
		t.Run(tc.desc, func(t *testing.T) {
			synctest.Test(t, func(t *testing.T) {
				e, obs, c := reconnectApp(t, tc.before)
				e.fake.setDown(tc.down)
				e.kill()
				time.Sleep(31 * time.Second) // past ReconnectTimeout (30 s)
				synctest.Wait()
				c.expect("what the client got", tc.want)
				if err, _ := c.ended(); !errors.Is(err, io.EOF) {
					t.Errorf("the client connection was not closed: %v", err)
				}
				if n := len(e.fake.Conns()); !tc.down && n != 1 {
					t.Errorf("%d upstream connections: nothing may be dialed, let alone sent again", n)
				}
				expectMechanisms(t, obs, tc.mechs)
			})
		})
	}
}

// Commands that arrive while the upstream is being dialed again wait, and run once, on the new upstream.
func TestReconnectHoldsCommands(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		e, obs := reconnectEnv(t)
		c := e.connect("app")
		c.send(cmd("SELECT", "1"))
		synctest.Wait()
		e.fake.setDown(true)
		e.kill()
		// The proxy reads nothing while it reconnects; a pipe, unlike a socket, has no buffer to hold the
		// commands meanwhile, so they are written from another goroutine.
		go c.send(cmd("ECHO", "waited"), cmd("PING"))
		time.Sleep(5 * time.Second)
		synctest.Wait()
		c.expect("while no upstream can be dialed", "+OK\r\n")
		c.expectOpen("while no upstream can be dialed")
		e.fake.setDown(false)
		time.Sleep(3 * time.Second) // more than the longest backoff
		synctest.Wait()
		c.expect("once an upstream could be dialed", "+OK\r\n"+bulkOf("waited")+"+PONG\r\n")
		conns := e.fake.Conns()
		expectCommands(t, conns[0], "the first upstream", append(firstHandshake(), "SELECT 1")...)
		expectCommands(t, conns[len(conns)-1], "the new upstream", append(handshake(1), "SELECT 1", "ECHO waited", "PING")...)
		expectMechanisms(t, obs, "reconnect_restored=1")
	})
}

// azureEvent is an AzureRedisEvents message as Azure publishes it, as a RESP3 pub/sub push (the proxy's
// control connection speaks RESP3).
func azureEventMessage(kind string, replica bool) string {
	msg := "NotificationType|" + kind + "|StartTimeInUTC||IsReplica|" + map[bool]string{false: "False", true: "True"}[replica] +
		"|IPAddress|10.0.0.4|SSLPort|15001|NonSSLPort|13001"
	return pubsubFrame(3, "message", "AzureRedisEvents", bulkOf(msg))
}

// closedByProxy reports whether the proxy closed its end of upstream conn c.
func closedByProxy(c *fakeConn) bool {
	select {
	case <-c.gone:
		return true
	default:
		return false
	}
}

// maintenanceEnv is a reconnectEnv that hears maintenance announcements; it returns the control connection
// subscribed to AzureRedisEvents, on which the test publishes them. scripts script the fake further, before
// the server's first connection.
func maintenanceEnv(t *testing.T, scripts ...func(*fakeUpstream)) (*pipeEnv, *diffObserver, *fakeConn) {
	return controlEnv(t, func(o *proxy.Options) { o.MaintenanceEvents = true }, "SUBSCRIBE AzureRedisEvents", scripts...)
}

// controlEnv is a reconnectEnv with the control connection that on turns on (after the scripts); it
// returns that connection, the one that received marker.
func controlEnv(t *testing.T, on func(*proxy.Options), marker string, scripts ...func(*fakeUpstream)) (*pipeEnv, *diffObserver, *fakeConn) {
	t.Helper()
	obs := &diffObserver{counts: map[string]int{}}
	e := newPipeEnv(t, func(o *proxy.Options) {
		o.Observer, o.ReconnectTimeout = obs, 30*time.Second
		on(o)
		scriptReconnect(o.Dialer.(*fakeUpstream)) // before the server's control connection starts
		for _, script := range scripts {
			script(o.Dialer.(*fakeUpstream))
		}
	})
	synctest.Wait()
	for _, c := range e.fake.Conns() {
		if slices.Contains(c.Commands(), marker) {
			return e, obs, c
		}
	}
	t.Fatalf("no control connection sent %q", marker)
	return nil, nil, nil
}

// The AzureRedisEvents connection speaks RESP3 and takes a new token by AUTH while subscribed: it is not
// dialed again, so a NodeMaintenanceStart published at the moment of a token change is heard (the session
// moves), and so is one after the old token's expiry (when the fake, as Azure, closes the connections
// still on it).
func TestEventsConnectionKeptAtNewToken(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		e, obs, events := maintenanceEnv(t)
		kv := e.connect("kv")
		kv.send(cmd("ECHO", "before"))
		synctest.Wait()
		// start publishes a primary's NodeMaintenanceStart and reports whether the session's upstream moved.
		start := func(when string) {
			t.Helper()
			conns := e.fake.Conns()
			up := conns[len(conns)-1]
			if !events.write([]byte(azureEventMessage("NodeMaintenanceStart", false))) {
				t.Fatalf("%s: the control connection is gone", when)
			}
			synctest.Wait()
			if !closedByProxy(up) {
				t.Errorf("%s: the announcement was not heard: the session did not move", when)
			}
		}
		old, _ := e.toks.Current()
		e.toks.set(e.mint(2 * pipeLife))
		start("at the token change") // no synctest.Wait between: the change and the announcement race
		e.pastExpiry(old)
		start("after the old token's expiry")
		kv.send(cmd("ECHO", "after"))
		synctest.Wait()
		kv.expect("across the maintenances", bulkOf("before")+bulkOf("after"))
		if got, want := strings.Join(events.Commands(), ", "), "HELLO 3, SUBSCRIBE AzureRedisEvents, AUTH oid-1 tok-2, PING"; !strings.Contains(got, want) {
			t.Errorf("the control connection received %q; want %q (then idle PINGs)", got, want)
		}
		n := 0
		for _, c := range e.fake.Conns() {
			if slices.Contains(c.Commands(), "SUBSCRIBE AzureRedisEvents") {
				n++
			}
		}
		if n != 1 {
			t.Errorf("%d connections subscribed to AzureRedisEvents; want 1", n)
		}
		if got := obs.String(); !strings.Contains(got, "maintenance_move=2") {
			t.Errorf("mechanisms %q; want maintenance_move=2", got)
		}
	})
}

// At NodeMaintenanceStart (of a primary), sessions move to new upstream connections at their next safe
// point, before the node closes the old ones: the old connection is closed by the proxy only after the new
// one took over; a session inside MULTI moves after EXEC. Other announcements, and a replica's, move nothing.
func TestMaintenanceMovesSessions(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		e, obs, events := maintenanceEnv(t)
		kv := e.connect("kv")
		kv.send(cmd("SELECT", "2"), cmd("ECHO", "before"))
		tx := e.connect("tx")
		tx.send(cmd("MULTI"), cmd("PING"))
		blk := e.connect("blk")
		blk.send(cmd("BLPOP", "k", "0"))
		synctest.Wait()
		conns := e.fake.Conns()
		kvUp, txUp, blkUp := conns[len(conns)-3], conns[len(conns)-2], conns[len(conns)-1]

		events.write([]byte(azureEventMessage("NodeMaintenanceStarting", false)))
		events.write([]byte(azureEventMessage("NodeMaintenanceStart", true)))
		synctest.Wait()
		if n := len(e.fake.Conns()); n != len(conns) {
			t.Fatalf("%d new upstream connections after Starting and a replica's Start; want none", n-len(conns))
		}
		events.write([]byte(azureEventMessage("NodeMaintenanceStart", false)))
		synctest.Wait()
		if !closedByProxy(kvUp) {
			t.Error("the idle session's old upstream was not closed after the move")
		}
		if closedByProxy(txUp) {
			t.Error("the session inside MULTI moved before EXEC")
		}
		if !closedByProxy(blkUp) {
			t.Error("the blocked session's old upstream was not closed after the move")
		}
		kv.send(cmd("ECHO", "after"))
		tx.send(cmd("EXEC"))
		time.Sleep(2 * time.Second) // the move inside MULTI is tried again each second
		synctest.Wait()
		if !closedByProxy(txUp) {
			t.Error("the session that was inside MULTI did not move after EXEC")
		}
		e.fake.push("k", "v")
		synctest.Wait()
		kv.expect("kv", "+OK\r\n"+bulkOf("before")+bulkOf("after"))
		tx.expect("tx", "+OK\r\n+QUEUED\r\n*1\r\n+PONG\r\n")
		blk.expect("blk: the element pushed after the move, once", "*2\r\n"+bulkOf("k")+bulkOf("v"))
		// Dialed after the announcement: kv's, blk's and tx's new upstreams, and CLIENT UNBLOCK's control
		// connection, in an order that depends on scheduling.
		var got []string
		for _, c := range e.fake.Conns()[len(conns):] {
			got = append(got, strings.Join(c.Commands(), ", "))
		}
		slices.Sort(got)
		hs := strings.Join(handshake(1), ", ")
		want := []string{hs, hs + ", BLPOP k 0", hs + ", CLIENT UNBLOCK " + strconv.FormatInt(blkUp.id, 10) + " TIMEOUT",
			hs + ", SELECT 2, ECHO after"}
		if !slices.Equal(got, want) {
			t.Errorf("connections dialed after the announcement received:\n got  %q\n want %q", got, want)
		}
		expectMechanisms(t, obs, "maintenance_move=3 unblock_reissue=1")
		blk.expectOpen("blk")
		kv.expectOpen("kv")
		tx.expectOpen("tx")
	})
}

// From NodeMaintenanceStarting to NodeMaintenanceEnded a reply may stop halfway for longer than
// StallTimeout (4 times) without its connection being closed; after Ended the usual limit applies again.
func TestMaintenanceRelaxesStallLimit(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		e, _, events := maintenanceEnv(t)
		reply := bulkOf("a value that arrives in two pieces")
		splitReply(e.fake, reply, len(reply), 2*pipeStall) // the second piece 2 StallTimeouts after the first
		// announced publishes kind, then runs a client whose GET's reply stops halfway for 2 StallTimeouts.
		announced := func(kind string) *pipeClient {
			events.write([]byte(azureEventMessage(kind, false)))
			synctest.Wait()
			c := e.connect(kind)
			c.send(cmd("GET", "split:5"))
			time.Sleep(3 * pipeStall)
			synctest.Wait()
			return c
		}
		c := announced("NodeMaintenanceStarting")
		c.expect("a reply that stopped halfway for 2 StallTimeouts during the maintenance", reply)
		c.expectOpen("during the maintenance")
		if err, _ := announced("NodeMaintenanceEnded").ended(); err == nil {
			t.Error("after NodeMaintenanceEnded, a reply that stopped halfway for 2 StallTimeouts did not close the connection")
		}
	})
}

// A close while only the proxy's own AUTH (a re-AUTH at a new token) awaits its reply leaves nothing owed to
// the client: the session is restored on a new upstream, authenticated with the newest token.
func TestReconnectWithReauthInFlight(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		e, obs, c := reconnectApp(t, [][]string{cmd("SELECT", "2"), cmd("ECHO", "before")})
		e.fake.handle("AUTH", func(fc *fakeConn, args []string) {
			if fc.user != "" { // the re-AUTH: the connection closes before it is answered
				fc.closeWith("closed with the re-AUTH in flight")
				return
			}
			fc.auth(args)
		})
		e.rotate()
		time.Sleep(pipeSpread + time.Second)
		synctest.Wait()
		c.send(cmd("ECHO", "after"))
		synctest.Wait()
		c.expect("app", "+OK\r\n"+bulkOf("before")+bulkOf("after"))
		c.expectOpen("app")
		expectMechanisms(t, obs, "reconnect_restored=1")
	})
}

// Where CLIENT UNBLOCK is denied, a blocking command sent during a maintenance goes on a short lease (1 s);
// after NodeMaintenanceStart, at the end of its lease (whose timeout reply shows it took nothing) the session
// moves, and the command goes on the new upstream: the element pushed later reaches the client once.
func TestMaintenanceMovesLeasedCommand(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		e, obs, events := maintenanceEnv(t, denyUnblock)
		events.write([]byte(azureEventMessage("NodeMaintenanceStarting", false)))
		synctest.Wait()
		blk := e.connect("blk")
		blk.send(cmd("BLPOP", "k", "0"))
		synctest.Wait()
		old := e.fake.Conns()[len(e.fake.Conns())-1]
		if !slices.Contains(old.Commands(), "BLPOP k 1.000") {
			t.Fatalf("want BLPOP on a 1 s lease during the maintenance: %q", old.Commands())
		}
		events.write([]byte(azureEventMessage("NodeMaintenanceStart", false)))
		time.Sleep(1500 * time.Millisecond) // past the lease
		synctest.Wait()
		if !closedByProxy(old) {
			t.Error("the leased session did not move at the end of its lease")
		}
		e.fake.push("k", "v")
		synctest.Wait()
		blk.expect("blk: the element pushed after the move, once", "*2\r\n"+bulkOf("k")+bulkOf("v"))
		blk.expectOpen("blk")
		if got := obs.String(); !strings.Contains(got, "maintenance_move=1") || strings.Contains(got, "unblock") {
			t.Errorf("mechanisms %q: want one maintenance_move, no unblock", got)
		}
	})
}
