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
// rotations: the proxy hands them over to new connections at a point both message streams share.
func TestRESP2PubSubAcrossRotations(t *testing.T) {
	f := newFixture(t, fixtureOpts{lifetime: 3 * time.Second})
	ctx, cancel := context.WithCancel(t.Context())
	defer cancel()

	sub := f.client(t, 2).Subscribe(ctx, "chan")
	if err := sub.PSubscribe(ctx, "pat.*"); err != nil {
		t.Fatal(err)
	}
	ssub := f.client(t, 2).SSubscribe(ctx, "shard")
	for _, s := range []*redis.PubSub{sub, ssub} {
		if _, err := s.Receive(ctx); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := sub.Receive(ctx); err != nil { // the psubscribe confirmation
		t.Fatal(err)
	}
	pub := f.client(t, 2)
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
		if err := pub.SPublish(ctx, "shard", sent).Err(); err != nil {
			t.Fatal(err)
		}
		time.Sleep(2 * time.Millisecond) // a steady publishing rate
	}
	pub.Publish(ctx, "chan", "end")
	pub.SPublish(ctx, "shard", "end")
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
