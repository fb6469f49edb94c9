package proxy_test

import (
	"context"
	"fmt"
	"strconv"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
)

// RESP2 subscribers (channels, patterns, shard channels) get every message exactly once, in order, across
// rotations: the proxy hands them over to new connections at a point both message streams share. Before 7.0,
// which has no shard channels, the second subscriber uses SUBSCRIBE and PUBLISH instead.
func TestRESP2PubSubAcrossRotations(t *testing.T) {
	f := newFixture(t, fixtureOpts{lifetime: 3 * time.Second})
	ctx, cancel := context.WithCancel(t.Context())
	defer cancel()

	sub := f.client(t, 2).Subscribe(ctx, "chan")
	if err := sub.PSubscribe(ctx, "pat.*"); err != nil {
		t.Fatal(err)
	}
	pub := f.client(t, 2)
	shard := f.atLeast(7, 0)
	var ssub *redis.PubSub
	if shard {
		ssub = f.client(t, 2).SSubscribe(ctx, "shard")
	} else {
		ssub = f.client(t, 2).Subscribe(ctx, "shard")
	}
	spublish := func(msg any) error {
		if shard {
			return pub.SPublish(ctx, "shard", msg).Err()
		}
		return pub.Publish(ctx, "shard", msg).Err()
	}
	for _, s := range []*redis.PubSub{sub, ssub} {
		if _, err := s.Receive(ctx); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := sub.Receive(ctx); err != nil { // the psubscribe confirmation
		t.Fatal(err)
	}
	got := map[string][]int{}
	collect := func(ch <-chan *redis.Message, done chan<- error) {
		for m := range ch {
			if m.Payload == "end" {
				done <- nil
				return
			}
			n, err := strconv.Atoi(m.Payload)
			if err != nil {
				done <- fmt.Errorf("payload %q", m.Payload)
				return
			}
			key := m.Channel
			if m.Pattern != "" {
				key = "pattern " + m.Pattern
			}
			got[key] = append(got[key], n)
		}
	}
	doneSub, doneShard := make(chan error, 1), make(chan error, 1)
	subCh, shardCh := sub.Channel(redis.WithChannelSize(1<<16)), ssub.Channel(redis.WithChannelSize(1<<16))
	gotShard := map[string][]int{}
	go collect(subCh, doneSub)
	go func() {
		for m := range shardCh {
			if m.Payload == "end" {
				doneShard <- nil
				return
			}
			n, _ := strconv.Atoi(m.Payload)
			gotShard[m.Channel] = append(gotShard[m.Channel], n)
		}
	}()

	target := f.deleted() + 3
	sent := 0
	for ; f.deleted() < target; sent++ {
		for _, c := range []string{"chan", "pat.x"} {
			if err := pub.Publish(ctx, c, sent).Err(); err != nil {
				t.Fatal(err)
			}
		}
		if err := spublish(sent); err != nil {
			t.Fatal(err)
		}
		time.Sleep(2 * time.Millisecond) // a steady publishing rate
	}
	pub.Publish(ctx, "chan", "end")
	spublish("end")
	for _, d := range []chan error{doneSub, doneShard} {
		select {
		case err := <-d:
			if err != nil {
				t.Fatal(err)
			}
		case <-time.After(10 * time.Second):
			t.Fatal("the end message did not arrive")
		}
	}
	want := make([]int, sent)
	for i := range want {
		want[i] = i
	}
	check := func(name string, seq []int) {
		t.Helper()
		if len(seq) != sent {
			t.Errorf("%s: %d messages, want %d", name, len(seq), sent)
		}
		for i, n := range seq {
			if n != i {
				t.Fatalf("%s: message %d is %d: lost, duplicated or reordered", name, i, n)
			}
		}
	}
	check("chan", got["chan"])
	check("pattern pat.*", got["pattern pat.*"])
	check("shard", gotShard["shard"])
	if sent < 100 {
		t.Fatalf("only %d messages sent", sent)
	}
}

// Subscription counts in (un)subscribe replies stay what the client expects after handovers.
func TestRESP2SubscriptionCountsAfterHandover(t *testing.T) {
	f := newFixture(t, fixtureOpts{lifetime: 3 * time.Second})
	r := f.raw(t)
	r.send("SUBSCRIBE a b", "PSUBSCRIBE p*")
	r.expect("*3\r\n$9\r\nsubscribe\r\n$1\r\na\r\n:1\r\n*3\r\n$9\r\nsubscribe\r\n$1\r\nb\r\n:2\r\n*3\r\n$10\r\npsubscribe\r\n$2\r\np*\r\n:3\r\n")
	f.rotations(t, 2)
	r.send("UNSUBSCRIBE a", "PING")
	r.expect("*3\r\n$11\r\nunsubscribe\r\n$1\r\na\r\n:2\r\n*2\r\n$4\r\npong\r\n$0\r\n\r\n")
	r.send("UNSUBSCRIBE", "PUNSUBSCRIBE")
	r.expect("*3\r\n$11\r\nunsubscribe\r\n$1\r\nb\r\n:1\r\n*3\r\n$12\r\npunsubscribe\r\n$2\r\np*\r\n:0\r\n")
	// Out of subscribed mode the connection takes AUTH again and lives on.
	f.rotations(t, 1)
	r.send("ACL WHOAMI")
	f.expectLiveOID(t, r.readBulk())
}

// Clients blocked past a token's life (timeout 0 = forever, or longer than the token) survive rotations: the
// proxy unblocks, re-authenticates and re-issues the command; the element arrives exactly once.
func TestBlockedAcrossRotations(t *testing.T) {
	blockedAcrossRotations(t, newFixture(t, fixtureOpts{lifetime: 3 * time.Second}), "$")
}

// blockedAcrossRotations holds one client blocked in each kind of blocking command across 3 token expiries,
// then gives each its element: each gets exactly that, once, and its connection lives. XREAD reads from
// xreadFrom ("$", or an ID).
func blockedAcrossRotations(t *testing.T, f *fixture, xreadFrom string) {
	ctx := t.Context()
	other := f.client(t, 2)
	blmove := "BLMOVE list3 dst3 LEFT RIGHT 0"
	if !f.atLeast(6, 2) {
		blmove = "BRPOPLPUSH list3 dst3 0" // 6.0's BLMOVE list3 dst3 RIGHT LEFT 0
	}
	cases := []struct {
		desc, cmd string
		push      func() error
		want      string
	}{
		{"BLPOP forever", "BLPOP list1 0", func() error { return other.LPush(ctx, "list1", "v1").Err() },
			"*2\r\n" + bulk("list1") + bulk("v1")},
		{"BRPOP 60s", "BRPOP list2 60", func() error { return other.LPush(ctx, "list2", "v2").Err() },
			"*2\r\n" + bulk("list2") + bulk("v2")},
		{"BLMOVE forever", blmove, func() error { return other.LPush(ctx, "list3", "v3").Err() },
			bulk("v3")},
		{"BZPOPMIN forever", "BZPOPMIN zset4 0", func() error { return other.ZAdd(ctx, "zset4", redis.Z{Score: 1, Member: "m"}).Err() },
			"*3\r\n" + bulk("zset4") + bulk("m") + bulk("1")},
		{"XREAD BLOCK 0 " + xreadFrom, "XREAD BLOCK 0 STREAMS stream5 " + xreadFrom, func() error {
			return other.XAdd(ctx, &redis.XAddArgs{Stream: "stream5", ID: "1-1", Values: []string{"f", "v"}}).Err()
		}, "*1\r\n*2\r\n" + bulk("stream5") + "*1\r\n*2\r\n" + bulk("1-1") + "*2\r\n" + bulk("f") + bulk("v")},
	}
	raws := make([]*raw, len(cases))
	for i, tc := range cases {
		raws[i] = f.raw(t)
		raws[i].send(tc.cmd)
	}
	f.rotations(t, 3)
	for i, tc := range cases {
		t.Run(tc.desc, func(t *testing.T) {
			if err := tc.push(); err != nil {
				t.Fatal(err)
			}
			raws[i].t = t
			raws[i].expect(tc.want)
			raws[i].send("PING")
			raws[i].expect("+PONG\r\n") // exactly one reply came, and the connection lives
		})
	}
	for _, key := range []string{"list1", "list2", "list3", "zset4"} {
		if n, err := other.Exists(ctx, key).Result(); err != nil || n != 0 {
			t.Errorf("%s still exists (%d, %v): an element was delivered twice or not taken", key, n, err)
		}
	}
}

// Elements pushed at random moments, some right at an unblock, each reach the blocked client exactly once.
func TestBlockedRaceWithPushes(t *testing.T) {
	f := newFixture(t, fixtureOpts{lifetime: 2 * time.Second})
	ctx := t.Context()
	other := f.client(t, 2)
	r := f.raw(t)
	target := f.deleted() + 3
	received := 0
	for sent := 0; f.deleted() < target; sent++ {
		r.send("BLPOP race 0")
		time.Sleep(time.Duration(sent%7) * 37 * time.Millisecond) // pushes at varying moments
		if err := other.LPush(ctx, "race", strconv.Itoa(sent)).Err(); err != nil {
			t.Fatal(err)
		}
		r.expect("*2\r\n" + bulk("race") + bulk(strconv.Itoa(sent)))
		received++
	}
	if n, err := other.LLen(ctx, "race").Result(); err != nil || n != 0 {
		t.Fatalf("LLEN race = %d, %v after %d elements: one was not delivered", n, err, received)
	}
}

// A MULTI held open across the token's deadline still gets a correct EXEC.
func TestMultiAcrossDeadline(t *testing.T) {
	f := newFixture(t, fixtureOpts{lifetime: 3 * time.Second})
	ctx := t.Context()
	other := f.client(t, 2)
	t.Run("replayed without WATCH", func(t *testing.T) {
		r := f.raw(t)
		r.send("SET txa 1", "MULTI", "INCR txa", "INCR txa")
		r.expect("+OK\r\n+OK\r\n+QUEUED\r\n+QUEUED\r\n")
		f.rotations(t, 2)
		r.send("INCR txa", "EXEC")
		r.expect("+QUEUED\r\n*3\r\n:2\r\n:3\r\n:4\r\n")
	})
	t.Run("WATCH, key untouched: aborted, nothing runs", func(t *testing.T) {
		r := f.raw(t)
		r.send("WATCH txw", "MULTI", "SET txb 1")
		r.expect("+OK\r\n+OK\r\n+QUEUED\r\n")
		f.rotations(t, 2)
		r.send("SET txb 2", "EXEC", "EXISTS txb")
		r.expect("+QUEUED\r\n*-1\r\n:0\r\n")
	})
	t.Run("WATCH, key changed: aborted", func(t *testing.T) {
		r := f.raw(t)
		r.send("WATCH txw2", "MULTI", "SET txc 1")
		r.expect("+OK\r\n+OK\r\n+QUEUED\r\n")
		if err := other.Set(ctx, "txw2", "changed", 0).Err(); err != nil {
			t.Fatal(err)
		}
		f.rotations(t, 2)
		r.send("EXEC", "EXISTS txc")
		r.expect("*-1\r\n:0\r\n")
	})
}

// An idle client's upstream is kept alive by PINGs the client never sees.
func TestIdleConnectionKeptAlive(t *testing.T) {
	f := newFixture(t, fixtureOpts{idlePing: 300 * time.Millisecond})
	ctx := t.Context()
	if _, err := f.env.Admin(ctx, "CONFIG", "SET", "timeout", "1"); err != nil {
		t.Fatal(err)
	}
	direct := redis.NewClient(&redis.Options{Addr: f.env.RedisAddr, TLSConfig: f.env.ClientTLSConfig(), PoolSize: 1, MaxRetries: -1})
	defer direct.Close()
	user, pass := f.env.AdminCredentials()
	direct.Options().Username, direct.Options().Password = user, pass
	c := f.client(t, 2)
	id, err := c.ClientID(ctx).Result()
	if err != nil {
		t.Fatal(err)
	}
	if err := direct.Ping(ctx).Err(); err != nil {
		t.Fatal(err)
	}
	time.Sleep(3 * time.Second) // the idle period itself: three times redis's idle timeout
	if err := direct.Ping(ctx).Err(); err == nil {
		t.Fatal("a direct idle connection survived: the idle timeout is not in effect, the test proves nothing")
	}
	if got, err := c.ClientID(ctx).Result(); err != nil || got != id {
		t.Fatalf("CLIENT ID = %d, %v; want %d (the same upstream, kept alive)", got, err, id)
	}
}

// The same for a RESP3 client, whose timeout reply is a RESP3 null.
func TestBlockedRESP3AcrossRotations(t *testing.T) {
	f := newFixture(t, fixtureOpts{lifetime: 3 * time.Second})
	ctx := t.Context()
	c, other := f.client(t, 3), f.client(t, 2)
	type result struct {
		v   []string
		err error
	}
	done := make(chan result, 1)
	go func() {
		v, err := c.BLPop(ctx, 0, "list3r").Result()
		done <- result{v, err}
	}()
	f.rotations(t, 3)
	select {
	case r := <-done:
		t.Fatalf("BLPOP returned before any push: %v, %v", r.v, r.err)
	default:
	}
	if err := other.LPush(ctx, "list3r", "v").Err(); err != nil {
		t.Fatal(err)
	}
	select {
	case r := <-done:
		if r.err != nil || len(r.v) != 2 || r.v[1] != "v" {
			t.Fatalf("BLPOP = %v, %v", r.v, r.err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("BLPOP did not return the pushed element")
	}
}
