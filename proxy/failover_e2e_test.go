package proxy_test

import (
	"strings"
	"testing"
	"time"

	"github.com/entra-redis-proxy/entra-redis-proxy/internal/azurefake"
	"github.com/entra-redis-proxy/entra-redis-proxy/proxy"
)

// A Standard/Premium cache's failovers: a real primary and replica (replication over TLS, every token's ACL
// user on both) behind a relay playing Azure's load balancer. Three failovers with 3 s tokens rotating
// meanwhile: announced (AzureRedisEvents, the proxy's control connection on the old primary), unannounced,
// announced. After each, the proxy's sessions are on the new primary: no client error, every message
// published after the restore and every list element once; the client blocked in BLPOP 0 is moved at an
// announced failover, and closed at an unannounced one (its command's outcome is unknown: as on a direct
// connection), then opened again.
func TestFailovers(t *testing.T) {
	env := azurefake.StartT(t, azurefake.Options{TokenLifetime: 3 * time.Second, Replica: true})
	lb, err := env.StartRelay(env.RedisAddr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { lb.Close() })
	obs := newRestoredObserver()
	f := newProxyFor(t, env, fixtureOpts{lifetime: 3 * time.Second, upstream: lb.Addr, proxyOpt: func(o *proxy.Options) {
		o.Observer, o.ReconnectTimeout, o.MaintenanceEvents = obs, 30*time.Second, true
	}})
	select {
	case <-proxy.EventsListening(f.srv):
	case <-time.After(10 * time.Second):
		t.Fatal("the proxy did not subscribe to AzureRedisEvents within 10 s")
	}
	ctx := t.Context()
	cs := f.reconnectClients(t, ctx)
	minted := f.minted()
	for round, announced := range []bool{true, false, true} {
		before := env.PrimaryAddr()
		if err := env.RunFailover(ctx, azurefake.Maintenance{Starting: 100 * time.Millisecond, Close: time.Second,
			Failover: 300 * time.Millisecond}, announced, lb.SetTarget); err != nil {
			t.Fatal(err)
		}
		if env.PrimaryAddr() == before {
			t.Fatalf("round %d: no failover", round)
		}
		if announced {
			obs.await(t, 2) // the RESP3 subscriber and the open MULTI; the others moved before the close
		} else {
			obs.await(t, 5) // every session but the blocked one
			expectClosed(t, cs.blk, 5*time.Second)
			cs.blk = f.raw(t)
			cs.blk.send("PING", "BLPOP rc:never 0")
			cs.blk.expect("+PONG\r\n")
		}
		cs.afterRound(t, ctx, f, round, cs.kv[:])
	}
	expectRounds(t, ctx, cs.kv[:], 3)
	cs.tx.send("EXEC", "GET rc:tx")
	cs.tx.expect("*2\r\n+OK\r\n:1\r\n" + bulk("inside"))
	if f.minted() <= minted {
		t.Error("no token rotation during the failovers")
	}
	events := obs.String()
	if !strings.Contains(events, "reconnect_outstanding=1 ") {
		t.Errorf("proxy events %q: want the one blocked command of the unannounced failover closed", events)
	}
	t.Logf("proxy events: %s", events)
}
