package proxy_test

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
	"github.com/redis/go-redis/v9/maintnotifications"

	"github.com/entra-redis-proxy/entra-redis-proxy/internal/azurefake"
	"github.com/entra-redis-proxy/entra-redis-proxy/proxy"
)

// handoffObserver also tells the test each time a session moved ahead of a close (a move, a pub/sub
// handover, a blocked command sent again).
type handoffObserver struct {
	*restoredObserver
	moved chan string
}

func (o *handoffObserver) Mechanism(name string) {
	o.restoredObserver.Mechanism(name)
	switch name {
	case "maintenance_move", "handover", "unblock_reissue":
		o.moved <- name
	}
}

// awaitMoved waits for at least moves moves (go-redis may open a connection of its own now and then: it
// moves too) and the events named, each as many times as named.
func (o *handoffObserver) awaitMoved(t *testing.T, moves int, events ...string) {
	t.Helper()
	timeout := time.After(20 * time.Second)
	seen, need := map[string]int{}, map[string]int{}
	for _, e := range events {
		need[e]++
	}
	missing := func() bool {
		for e, n := range need {
			if seen[e] < n {
				return true
			}
		}
		return seen["maintenance_move"] < moves
	}
	for missing() {
		select {
		case name := <-o.moved:
			seen[name]++
		case <-timeout:
			t.Fatalf("moves within 20 s: %v (proxy events: %s)", seen, o.String())
		}
	}
}

// drain forgets the moves of a round that is over.
func (o *handoffObserver) drain() {
	for {
		select {
		case <-o.moved:
		case <-o.restored:
		default:
			return
		}
	}
}

// relays starts two relays in front of the Env's redis-server, playing two endpoints of one Azure Managed
// Redis database: a MOVING moves the endpoint (Redis Enterprise's proxy), not the data, so both reach the
// same data set.
func relays(t *testing.T, env *azurefake.Env) [2]*azurefake.Relay {
	t.Helper()
	var rs [2]*azurefake.Relay
	for i := range rs {
		r, err := env.StartRelay(env.RedisAddr)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { r.Close() })
		rs[i] = r
	}
	return rs
}

func awaitOptedIn(t *testing.T, r *azurefake.Relay) {
	t.Helper()
	select {
	case <-r.OptedIn():
	case <-time.After(10 * time.Second):
		t.Fatal("the proxy's control connection did not turn maintenance notifications on within 10 s")
	}
}

// Smart client handoffs (Azure Managed Redis): three MOVINGs in a row, from one endpoint to the other, with
// 3 s tokens rotating meanwhile and clients of every kind (reconnectClients, whose go-redis RESP3 client
// asks for notifications itself) on the proxy. After each MOVING every session that can moves to the new
// endpoint before the old one closes its connections (the RESP2 and RESP3 subscribers by the pub/sub
// handover); the open MULTI is restored there after the close. No client error, every message published after the restore and every list element
// once, no push on an app's connection, and nothing dials the old endpoint after its close.
func TestSmartClientHandoffs(t *testing.T) {
	env := azurefake.StartT(t, azurefake.Options{TokenLifetime: 3 * time.Second})
	rs := relays(t, env)
	obs := &handoffObserver{restoredObserver: newRestoredObserver(), moved: make(chan string, 64)}
	f := newProxyFor(t, env, fixtureOpts{lifetime: 3 * time.Second, upstream: rs[0].Addr, proxyOpt: func(o *proxy.Options) {
		o.Observer, o.ReconnectTimeout, o.MaintNotifications = obs, 30*time.Second, true
	}})
	awaitOptedIn(t, rs[0])
	ctx := t.Context()
	cs := f.reconnectClients(t, ctx)
	// An app that insists on notifications (ModeEnabled fails without them) gets its +OK, and no push.
	strict := redis.NewClient(&redis.Options{Addr: f.addr, Protocol: 3, PoolSize: 1, DisableIdentity: true,
		MaintNotificationsConfig: &maintnotifications.Config{Mode: maintnotifications.ModeEnabled}})
	t.Cleanup(func() { strict.Close() })
	if err := strict.Set(ctx, "sch:strict", "0", 0).Err(); err != nil {
		t.Fatalf("client with maintenance notifications enabled: %v", err)
	}
	clients := append(cs.kv[:], strict)
	minted := f.minted()
	for round := range 3 {
		from, to := rs[round%2], rs[(round+1)%2]
		// A new token first: the control connection, in RESP3, takes it without being closed.
		_, changed := f.src.Current()
		select {
		case <-changed:
		case <-time.After(10 * time.Second):
			t.Fatal("no new token within 10 s")
		}
		// The RESP2 subscriber takes it by a handover: awaited, so that the handoff's is not confused with it.
		obs.awaitMoved(t, 0, "handover")
		obs.drain()
		seq := 10 * round
		if got := from.Push("MIGRATING", seq+1, 5, "1"); got != 1 {
			t.Fatalf("round %d: MIGRATING reached %d connections, want only the proxy's control connection", round, got)
		}
		if got := from.Push("MOVING", seq+2, 5, to.Addr); got != 1 {
			t.Fatalf("round %d: MOVING reached %d connections, want only the proxy's control connection", round, got)
		}
		awaitOptedIn(t, to) // the control connection moved at once
		// The three go-redis clients and the blocked one; the RESP2 and RESP3 subscribers' handovers.
		obs.awaitMoved(t, 4, "handover", "handover", "unblock_reissue")
		from.CloseConns() // the old endpoint goes away
		after := from.Dialed()
		obs.await(t, 1) // the open MULTI, restored on the new endpoint
		if got := to.Push("MIGRATED", seq+3, "1"); got != 1 {
			t.Fatalf("round %d: MIGRATED reached %d connections", round, got)
		}
		cs.afterRound(t, ctx, f, round, clients)
		if got := from.Dialed(); got != after {
			t.Errorf("round %d: %d connections to the old endpoint after its close", round, got-after)
		}
		obs.drain()
	}
	expectRounds(t, ctx, clients, 3)
	cs.tx.send("EXEC", "GET rc:tx")
	cs.tx.expect("*2\r\n+OK\r\n:1\r\n" + bulk("inside"))
	if f.minted() <= minted {
		t.Error("no token rotation during the handoffs")
	}
	// The RESP2 subscriber's move may be a rotation's handover (to the new endpoint): not counted here.
	events := obs.String()
	for _, want := range []string{"announce_MOVING=3", "announce_MIGRATING=3", "announce_MIGRATED=3",
		"unblock_reissue=3", "reconnect_restored=3"} {
		if !strings.Contains(events, want) {
			t.Errorf("proxy events %q lack %s", events, want)
		}
	}
	expectNoLoss(t, events)
}

// Against Redis OSS (Azure Cache for Redis), which does not know CLIENT MAINT_NOTIFICATIONS: an app's
// CLIENT MAINT_NOTIFICATIONS ON gets the server's own error, byte for byte, as on a direct connection.
func TestMaintNotificationsUnknownToServer(t *testing.T) {
	f := newFixture(t, fixtureOpts{proxyOpt: func(o *proxy.Options) { o.MaintNotifications = true }})
	ctx := context.Background()
	user, pass := f.env.AdminCredentials()
	direct := redis.NewClient(&redis.Options{Addr: f.env.RedisAddr, Username: user, Password: pass, Protocol: 3,
		TLSConfig: f.env.ClientTLSConfig(), DisableIdentity: true,
		MaintNotificationsConfig: &maintnotifications.Config{Mode: maintnotifications.ModeDisabled}})
	defer direct.Close()
	want := direct.Do(ctx, "CLIENT", "MAINT_NOTIFICATIONS", "ON", "moving-endpoint-type", "external-ip").Err()
	if want == nil {
		t.Fatal("this redis-server knows CLIENT MAINT_NOTIFICATIONS: the test needs one that does not")
	}
	r := f.raw(t)
	r.send("CLIENT MAINT_NOTIFICATIONS ON moving-endpoint-type external-ip", "PING")
	r.expect("-" + want.Error() + "\r\n+PONG\r\n")
}
