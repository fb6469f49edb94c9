package proxy_test

import (
	"context"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/entra-redis-proxy/entra-redis-proxy/internal/azurefake"
	"github.com/entra-redis-proxy/entra-redis-proxy/proxy"
)

// restoredObserver tells the test each time a session was restored on a new upstream, and counts the
// other outcomes of a lost upstream.
type restoredObserver struct {
	diffObserver
	restored chan struct{}
}

func newRestoredObserver() *restoredObserver {
	return &restoredObserver{diffObserver: diffObserver{counts: map[string]int{}}, restored: make(chan struct{}, 64)}
}

func (o *restoredObserver) Announcement(kind string) { o.diffObserver.add("announce_" + kind) }

func (o *restoredObserver) Mechanism(name string) {
	o.diffObserver.Mechanism(name)
	if name == "reconnect_restored" {
		o.restored <- struct{}{}
	}
}

// await waits for n restored sessions.
func (o *restoredObserver) await(t *testing.T, n int) {
	t.Helper()
	timeout := time.After(20 * time.Second)
	for i := range n {
		select {
		case <-o.restored:
		case <-timeout:
			t.Fatalf("%d of %d sessions restored within 20 s (proxy events: %s)", i, n, o.String())
		}
	}
}

// reconnectClients are clients of every kind, each on its own proxied connection, with state set before an
// upstream close: go-redis RESP2 and RESP3 with a database and a name, RESP2 and RESP3 subscribers, a raw
// client inside MULTI, and one blocked in BLPOP.
type reconnectClients struct {
	kv   [2]*redis.Client // RESP2, RESP3
	subs [2]*redis.PubSub
	tx   *raw
	blk  *raw
}

// reconnectFixture is a proxy with reconnects on (30 s) and maintenance announcements heard, and an
// observer of their outcomes; tokens live for lifetime (0: the fixture's default, no rotation in a test).
func reconnectFixture(t *testing.T, lifetime time.Duration) (*fixture, *restoredObserver) {
	obs := newRestoredObserver()
	f := newFixture(t, fixtureOpts{lifetime: lifetime, proxyOpt: func(o *proxy.Options) {
		o.Observer, o.ReconnectTimeout, o.MaintenanceEvents = obs, 30*time.Second, true
	}})
	select {
	case <-proxy.EventsListening(f.srv):
	case <-time.After(10 * time.Second):
		t.Fatal("the proxy did not subscribe to AzureRedisEvents within 10 s")
	}
	return f, obs
}

func (f *fixture) reconnectClients(t *testing.T, ctx context.Context) *reconnectClients {
	t.Helper()
	var cs reconnectClients
	for i, proto := range []int{2, 3} {
		c := redis.NewClient(&redis.Options{Addr: f.addr, Protocol: proto, PoolSize: 1, MaxRetries: -1, DB: 3,
			ClientName: "app" + strconv.Itoa(proto), ReadTimeout: 10 * time.Second, DisableIdentity: true})
		t.Cleanup(func() { c.Close() })
		if _, err := c.Pipelined(ctx, func(p redis.Pipeliner) error {
			p.Set(ctx, "rc:k"+strconv.Itoa(proto), "before", 0)
			p.Get(ctx, "rc:k"+strconv.Itoa(proto))
			return nil
		}); err != nil {
			t.Fatalf("RESP%d pipeline before: %v", proto, err)
		}
		cs.kv[i] = c
		ps := c.Subscribe(ctx, "rc:seq")
		t.Cleanup(func() { ps.Close() })
		if _, err := ps.Receive(ctx); err != nil {
			t.Fatalf("RESP%d subscribe: %v", proto, err)
		}
		cs.subs[i] = ps
	}
	cs.tx = f.raw(t)
	cs.tx.send("SELECT 5", "MULTI", "SET rc:tx inside", "INCR rc:n")
	cs.tx.expect("+OK\r\n+OK\r\n+QUEUED\r\n+QUEUED\r\n")
	cs.blk = f.raw(t)
	cs.blk.send("PING", "BLPOP rc:never 0") // one batch: once PONG is here, BLPOP was sent upstream
	cs.blk.expect("+PONG\r\n")
	return &cs
}

// publish publishes the sequence numbers from..to-1 on rc:seq from a direct connection.
func (f *fixture) publish(t *testing.T, ctx context.Context, from, to int) {
	t.Helper()
	for i := from; i < to; i++ {
		if _, err := f.env.Admin(ctx, "PUBLISH", "rc:seq", strconv.Itoa(i)); err != nil {
			t.Fatal(err)
		}
	}
}

// receive reads the sequence numbers from..to-1 from each subscriber: each once, in order.
func (cs *reconnectClients) receive(t *testing.T, ctx context.Context, from, to int) {
	t.Helper()
	for i, ps := range cs.subs {
		for want := from; want < to; want++ {
			m, err := ps.ReceiveMessage(ctx)
			if err != nil {
				t.Fatalf("RESP%d subscriber, message %d: %v", i+2, want, err)
			}
			if m.Payload != strconv.Itoa(want) {
				t.Fatalf("RESP%d subscriber: got %q, want %d (lost or duplicated)", i+2, m.Payload, want)
			}
		}
	}
}

// check verifies, once every session with nothing outstanding was restored, that each client's state is
// what it would be had the upstream not closed: messages published after the restore arrive once, in order;
// writes land in the selected database; names are kept; the open transaction runs once; and the client
// blocked in BLPOP is closed (its command's outcome unknown), or, moved ahead of an announced close, gets the
// element pushed after it.
func (cs *reconnectClients) check(t *testing.T, ctx context.Context, f *fixture, obs *restoredObserver, restored int, events string, blockedSurvives bool) {
	t.Helper()
	obs.await(t, restored)
	const n = 50
	f.publish(t, ctx, n, 2*n)
	cs.receive(t, ctx, n, 2*n)
	user, pass := f.env.AdminCredentials()
	db3 := redis.NewClient(&redis.Options{Addr: f.env.RedisAddr, Username: user, Password: pass, DB: 3,
		TLSConfig: f.env.ClientTLSConfig(), DisableIdentity: true})
	defer db3.Close()
	for i, c := range cs.kv {
		proto := strconv.Itoa(i + 2)
		cmds, err := c.Pipelined(ctx, func(p redis.Pipeliner) error {
			p.Set(ctx, "rc:after"+proto, "v", 0)
			p.ClientGetName(ctx)
			return nil
		})
		if err != nil {
			t.Fatalf("RESP%s pipeline after: %v", proto, err)
		}
		if got := cmds[1].(*redis.StringCmd).Val(); got != "app"+proto {
			t.Errorf("RESP%s: CLIENT GETNAME = %q; the name was not restored", proto, got)
		}
		if got, err := db3.Get(ctx, "rc:after"+proto).Result(); got != "v" {
			t.Errorf("RESP%s: the key written after the close is not in database 3 (%q, %v)", proto, got, err)
		}
		if _, err := c.TxPipelined(ctx, func(p redis.Pipeliner) error {
			p.Incr(ctx, "rc:tx"+proto)
			return nil
		}); err != nil {
			t.Errorf("RESP%s MULTI/EXEC after: %v", proto, err)
		}
	}
	cs.tx.send("EXEC", "GET rc:tx")
	cs.tx.expect("*2\r\n+OK\r\n:1\r\n" + bulk("inside"))
	if blockedSurvives { // its BLPOP 0 was unblocked and sent again on the new upstream: it still waits
		if _, err := f.env.Admin(ctx, "RPUSH", "rc:never", "x"); err != nil {
			t.Fatal(err)
		}
		cs.blk.expect("*2\r\n" + bulk("rc:never") + bulk("x"))
	} else {
		expectClosed(t, cs.blk, 5*time.Second)
	}
	if got := obs.String(); got != events {
		t.Errorf("proxy events %q, want %q", got, events)
	}
}

// reconnectEvents: after an unannounced close, every session but the blocked one is restored.
const reconnectEvents = "reconnect_outstanding=1 reconnect_restored=5 tx_replay=1"

// Each way a cache closes the proxy's upstream connections, with clients of every kind in every state
// (reconnectClients) on the proxy: every session with nothing outstanding goes on, on a new upstream, with its
// state; the blocked one is closed, unless the close was announced.
func TestUpstreamCloses(t *testing.T) {
	for _, tc := range []struct {
		desc     string
		close    func(t *testing.T, ctx context.Context, f *fixture)
		restored int    // sessions restored after the close
		events   string // the proxy's events in all
		// blockedSurvives: the client blocked in BLPOP 0 is moved (announced), not closed
		blockedSurvives bool
	}{{
		// CLIENT KILL of every connection of the proxy's identity, as a failover closes them all at once.
		desc: "CLIENT KILL", restored: 5, events: reconnectEvents,
		close: func(t *testing.T, ctx context.Context, f *fixture) {
			if _, err := f.env.Admin(ctx, "CLIENT", "KILL", "USER", f.currentOID()); err != nil {
				t.Fatal(err)
			}
		},
	}, {
		// redis-server restarted on the same port (its data set lost: no persistence).
		desc: "restart", restored: 5, events: reconnectEvents,
		close: func(t *testing.T, ctx context.Context, f *fixture) {
			if err := f.env.StopRedis(); err != nil {
				t.Fatal(err)
			}
			if err := f.env.StartRedis(ctx); err != nil {
				t.Fatal(err)
			}
		},
	}, {
		// An announced maintenance of the primary (the node closes, after NodeMaintenanceStart, every
		// connection it had then): the idle sessions, the RESP2 and RESP3 subscribers (by the handover) and
		// the blocked one (unblocked, then its command sent again) move before the close; the session inside
		// MULTI (which moves after EXEC) is restored after it. Every announcement is counted once, though the
		// control connection itself is closed and dialed again.
		desc: "announced maintenance", restored: 1, blockedSurvives: true,
		events: "announce_NodeMaintenanceEnded=1 announce_NodeMaintenanceFailoverComplete=1 " +
			"announce_NodeMaintenanceScheduled=1 announce_NodeMaintenanceStart=1 announce_NodeMaintenanceStarting=1 " +
			"handover=2 maintenance_handover=2 maintenance_move=3 reconnect_restored=1 " +
			"tx_replay=1 unblock_reissue=1",
		close: func(t *testing.T, ctx context.Context, f *fixture) {
			if err := f.env.RunMaintenance(ctx, azurefake.Maintenance{Starting: 100 * time.Millisecond,
				Close: time.Second, Failover: time.Second}); err != nil {
				t.Fatal(err)
			}
		},
	}} {
		t.Run(tc.desc, func(t *testing.T) {
			f, obs := reconnectFixture(t, 0)
			ctx := t.Context()
			cs := f.reconnectClients(t, ctx)
			f.publish(t, ctx, 0, 50)
			cs.receive(t, ctx, 0, 50)
			tc.close(t, ctx, f)
			cs.check(t, ctx, f, obs, tc.restored, tc.events, tc.blockedSurvives)
		})
	}
}

// Three announced maintenances in a row, with tokens rotating meanwhile (3 s tokens): every client keeps
// working without an error, subscribers get every message published between maintenances once and in
// order, and the client blocked in BLPOP 0 gets each element once. Two more RESP3 subscribers (SUBSCRIBE,
// PSUBSCRIBE) get sequence numbers published without a pause across the three maintenances: each once, in
// order, none lost (they are handed over before each close, as a direct subscriber that saw no
// maintenance).
//
// The close comes 1 s after NodeMaintenanceStart (Azure: up to 5 s): a RESP2 subscriber's handover still in
// progress when its old connection closes can't be completed exactly, and its client is closed.
func TestMaintenancesAndRotations(t *testing.T) {
	f, obs := reconnectFixture(t, 3*time.Second)
	ctx := t.Context()
	cs := f.reconnectClients(t, ctx)
	cont := f.continuous(t, ctx)
	minted := f.minted()
	for round := range 3 {
		if err := f.env.RunMaintenance(ctx, azurefake.Maintenance{Starting: 100 * time.Millisecond,
			Close: time.Second, Failover: 300 * time.Millisecond}); err != nil {
			t.Fatal(err)
		}
		obs.await(t, 1) // the session inside MULTI, restored after the close; the others moved before it
		cs.afterRound(t, ctx, f, round, cs.kv[:])
	}
	cont.stop(t)
	expectRounds(t, ctx, cs.kv[:], 3)
	if f.minted() <= minted {
		t.Error("no token rotation during the maintenances")
	}
	expectNoLoss(t, obs.String())
}

// continuousSubs are RESP3 subscribers to sequence numbers that a direct connection publishes without a
// pause, on rc:cont, until stop.
type continuousSubs struct {
	f         *fixture
	published chan int // the count published, once stopped
	quit      chan struct{}
	got       [2]chan []string // each subscriber's payloads, up to "end"
}

// continuous starts two go-redis RESP3 subscribers, by SUBSCRIBE and by PSUBSCRIBE, and the publisher.
func (f *fixture) continuous(t *testing.T, ctx context.Context) *continuousSubs {
	t.Helper()
	cont := &continuousSubs{f: f, published: make(chan int, 1), quit: make(chan struct{})}
	for i := range cont.got {
		c := redis.NewClient(&redis.Options{Addr: f.addr, Protocol: 3, PoolSize: 1, MaxRetries: -1,
			ReadTimeout: 10 * time.Second, DisableIdentity: true})
		t.Cleanup(func() { c.Close() })
		ps := c.Subscribe(ctx, "rc:cont")
		if i == 1 {
			ps = c.PSubscribe(ctx, "rc:co*")
		}
		t.Cleanup(func() { ps.Close() })
		if _, err := ps.Receive(ctx); err != nil {
			t.Fatalf("RESP3 subscriber %d: %v", i, err)
		}
		got := make(chan []string, 1)
		cont.got[i] = got
		go func() { // ends at "end", or at an error (the test's end closes ps)
			var payloads []string
			for {
				m, err := ps.ReceiveMessage(ctx)
				if err != nil {
					payloads = append(payloads, "error: "+err.Error())
					break
				}
				if m.Payload == "end" {
					break
				}
				payloads = append(payloads, m.Payload)
			}
			got <- payloads
		}()
	}
	go func() { // ends at stop, or at an error
		tick := time.NewTicker(2 * time.Millisecond) // paced: the machine is shared
		defer tick.Stop()
		n := 0
		for ; ; n++ {
			select {
			case <-cont.quit:
				cont.published <- n
				return
			case <-tick.C:
			}
			if _, err := f.env.Admin(ctx, "PUBLISH", "rc:cont", strconv.Itoa(n)); err != nil {
				cont.published <- -n - 1
				return
			}
		}
	}()
	return cont
}

// stop ends the publisher, publishes "end", and checks that each subscriber got every number published,
// once and in order.
func (cont *continuousSubs) stop(t *testing.T) {
	t.Helper()
	close(cont.quit)
	n := <-cont.published
	if n < 0 {
		t.Fatalf("the publisher failed after %d messages", -n-1)
	}
	if _, err := cont.f.env.Admin(t.Context(), "PUBLISH", "rc:cont", "end"); err != nil {
		t.Fatal(err)
	}
	for i, got := range cont.got {
		var payloads []string
		select {
		case payloads = <-got:
		case <-time.After(20 * time.Second):
			t.Fatalf("RESP3 subscriber %d: no end within 20 s", i)
		}
		lost, dup, last := 0, 0, -1
		for _, p := range payloads {
			v, err := strconv.Atoi(p)
			switch {
			case err != nil:
				t.Fatalf("RESP3 subscriber %d: %s", i, p)
			case v <= last:
				dup++
			default:
				lost += v - last - 1
				last = v
			}
		}
		lost += n - 1 - last
		t.Logf("RESP3 subscriber %d: %d published across the maintenances, %d received, %d lost, %d duplicated or out of order",
			i, n, len(payloads), lost, dup)
		if lost != 0 || dup != 0 {
			t.Errorf("RESP3 subscriber %d: %d lost, %d duplicated or out of order, of %d", i, lost, dup, n)
		}
	}
}

// roundMessages is how many messages each round of maintenances publishes.
const roundMessages = 20

// afterRound checks, after a round of maintenances, that every client works exactly: the subscribers get the
// round's messages once and in order, each of clients runs a transaction (counted in rounds:<i>), and the
// blocked client gets the round's element once (and blocks again, but after the last of 3 rounds).
func (cs *reconnectClients) afterRound(t *testing.T, ctx context.Context, f *fixture, round int, clients []*redis.Client) {
	t.Helper()
	f.publish(t, ctx, round*roundMessages, (round+1)*roundMessages)
	cs.receive(t, ctx, round*roundMessages, (round+1)*roundMessages)
	for i, c := range clients {
		if _, err := c.TxPipelined(ctx, func(p redis.Pipeliner) error {
			p.Incr(ctx, "rounds:"+strconv.Itoa(i))
			return nil
		}); err != nil {
			t.Fatalf("round %d, client %d: %v", round, i, err)
		}
	}
	cs.popBlocked(t, ctx, f, round, round < 2)
}

// expectRounds checks that each client's transactions ran once per round.
func expectRounds(t *testing.T, ctx context.Context, clients []*redis.Client, rounds int) {
	t.Helper()
	for i, c := range clients {
		if got, err := c.Get(ctx, "rounds:"+strconv.Itoa(i)).Result(); err != nil || got != strconv.Itoa(rounds) {
			t.Errorf("client %d: %d transactions ran %q times (%v)", i, rounds, got, err)
		}
	}
}

// popBlocked pushes the element of a round to the list the blocked client waits on, which must get it once;
// with again, the client blocks again.
func (cs *reconnectClients) popBlocked(t *testing.T, ctx context.Context, f *fixture, round int, again bool) {
	t.Helper()
	v := "e" + strconv.Itoa(round)
	if _, err := f.env.Admin(ctx, "RPUSH", "rc:never", v); err != nil {
		t.Fatal(err)
	}
	cs.blk.expect("*2\r\n" + bulk("rc:never") + bulk(v))
	if again {
		cs.blk.send("PING", "BLPOP rc:never 0") // once PONG is here, BLPOP was sent upstream
		cs.blk.expect("+PONG\r\n")
	}
}

// expectNoLoss fails the test if the proxy's events show a client connection closed or a blocked command
// that could not be moved.
func expectNoLoss(t *testing.T, events string) {
	t.Helper()
	for _, bad := range []string{"reconnect_outstanding", "reconnect_unrestorable", "reconnect_failed", "unblock_missed"} {
		if strings.Contains(events, bad) {
			t.Errorf("proxy events %q include %s", events, bad)
		}
	}
	t.Logf("proxy events: %s", events)
}
