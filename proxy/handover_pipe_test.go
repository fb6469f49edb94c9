package proxy_test

import (
	"strconv"
	"strings"
	"sync"
	"testing"
	"testing/synctest"
)

// fakePubSub plays redis's pub/sub on the fake upstream: SUBSCRIBE and UNSUBSCRIBE per connection, and
// PUBLISH delivering each message, in one order, to every connection subscribed to its channel at that
// point. Each subscriber's frames go out through its own queue, so a publisher never waits for a reader.
type fakePubSub struct {
	mu   sync.Mutex
	subs map[*fakeConn]*fakeSubscriber
	// atMarker publishes around a handover's marker: before it and after it, in the one order.
	atMarker func(before bool)
}

type fakeSubscriber struct {
	chans []string
	q     chan string
}

// scriptPubSub scripts f's SUBSCRIBE, UNSUBSCRIBE and PUBLISH (channels only).
func scriptPubSub(f *fakeUpstream) *fakePubSub {
	ps := &fakePubSub{subs: map[*fakeConn]*fakeSubscriber{}}
	f.handle("SUBSCRIBE", func(c *fakeConn, args []string) {
		ps.mu.Lock()
		defer ps.mu.Unlock()
		sub := ps.subscriber(c)
		for _, ch := range args[1:] {
			sub.chans = append(sub.chans, ch)
			sub.q <- pubsubFrame(c.proto, "subscribe", ch, ":"+strconv.Itoa(len(sub.chans))+"\r\n")
		}
	})
	f.handle("UNSUBSCRIBE", func(c *fakeConn, args []string) {
		ps.mu.Lock()
		defer ps.mu.Unlock()
		sub := ps.subscriber(c)
		for _, ch := range args[1:] {
			for i, s := range sub.chans {
				if s == ch {
					sub.chans = append(sub.chans[:i], sub.chans[i+1:]...)
					break
				}
			}
			sub.q <- pubsubFrame(c.proto, "unsubscribe", ch, ":"+strconv.Itoa(len(sub.chans))+"\r\n")
		}
	})
	f.handle("PUBLISH", func(c *fakeConn, args []string) {
		marker := strings.HasPrefix(args[1], "__entra_redis_proxy:handover:")
		if marker && ps.atMarker != nil {
			ps.atMarker(true)
		}
		n := ps.publish(args[1], args[2])
		if marker && ps.atMarker != nil {
			ps.atMarker(false)
		}
		c.reply(":" + strconv.Itoa(n) + "\r\n")
	})
	return ps
}

// subscriber returns c's subscriber state, starting its writer. ps.mu is held.
func (ps *fakePubSub) subscriber(c *fakeConn) *fakeSubscriber {
	sub := ps.subs[c]
	if sub == nil {
		sub = &fakeSubscriber{q: make(chan string, 1024)}
		ps.subs[c] = sub
		go func() { // ends with the connection
			for {
				select {
				case p := <-sub.q:
					c.write([]byte(p))
				case <-c.gone:
					return
				}
			}
		}()
	}
	return sub
}

// publish delivers msg to every connection subscribed to channel, and returns how many there were.
func (ps *fakePubSub) publish(channel, msg string) int {
	ps.mu.Lock()
	defer ps.mu.Unlock()
	n := 0
	for c, sub := range ps.subs {
		for _, ch := range sub.chans {
			if ch == channel {
				sub.q <- pubsubFrame(c.proto, "message", channel, bulkOf(msg))
				n++
			}
		}
	}
	return n
}

// At NodeMaintenanceStart a RESP3 subscriber is handed over to a new connection with the marker, as a RESP2
// subscriber is: messages published before the marker come from the old connection, those after it from the
// new one, and the client gets exactly the pushes a subscriber that saw no maintenance gets, then its
// subscription count is right and commands run on the new connection.
func TestMaintenanceHandsOverRESP3Subscriber(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		var ps *fakePubSub
		e, obs, events := maintenanceEnv(t, func(f *fakeUpstream) { ps = scriptPubSub(f) })
		sub := e.connect("sub")
		sub.send(cmd("HELLO", "3"), cmd("SUBSCRIBE", "ch"))
		synctest.Wait()
		conns := e.fake.Conns()
		old := conns[len(conns)-1]
		want := "%1\r\n+proto\r\n:3\r\n" + pubsubFrame(3, "subscribe", "ch", ":1\r\n")
		var mu sync.Mutex // publish runs on the test's goroutine and, at the marker, on the fake's
		seq := 0
		publish := func(n int) {
			mu.Lock()
			defer mu.Unlock()
			for range n {
				ps.publish("ch", strconv.Itoa(seq))
				want += pubsubFrame(3, "message", "ch", bulkOf(strconv.Itoa(seq)))
				seq++
			}
		}
		publish(3)
		ps.atMarker = func(bool) { publish(2) } // right before and right after the marker, on both connections
		// Without IPAddress: the node is not known to differ from the endpoint's (see maintenanceNode).
		events.write([]byte(pubsubFrame(3, "message", "AzureRedisEvents",
			bulkOf("NotificationType|NodeMaintenanceStart|StartTimeInUTC||IsReplica|False"))))
		publish(2) // as the handover begins
		synctest.Wait()
		publish(2)
		synctest.Wait()
		if !closedByProxy(old) {
			t.Error("the subscriber's old upstream was not closed: it was not handed over")
		}
		sub.send(cmd("UNSUBSCRIBE", "ch"))
		synctest.Wait() // (the fake's confirmations go through a queue of their own: PING's reply would pass it)
		sub.send(cmd("PING"))
		synctest.Wait()
		want += pubsubFrame(3, "unsubscribe", "ch", ":0\r\n") + "+PONG\r\n"
		mu.Lock()
		sub.expect("a RESP3 subscriber across a maintenance", want)
		mu.Unlock()
		sub.expectOpen("after the handover")
		oldCmds := old.Commands()
		marker := strings.TrimPrefix(oldCmds[len(oldCmds)-1], "SUBSCRIBE ") // O's last: the marker's subscription
		wantN := "HELLO 3, SUBSCRIBE " + marker + " ch, UNSUBSCRIBE " + marker + ", UNSUBSCRIBE ch, PING"
		handedTo := 0
		for _, c := range e.fake.Conns() {
			if strings.HasSuffix(strings.Join(c.Commands(), ", "), wantN) {
				handedTo++
			}
		}
		if handedTo != 1 {
			t.Errorf("%d upstreams received %q; want 1", handedTo, wantN)
		}
		expectMechanisms(t, obs, "handover=1 maintenance_handover=1")
	})
}
