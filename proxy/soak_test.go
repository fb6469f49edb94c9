package proxy_test

import (
	"errors"
	"fmt"
	"os"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/entra-redis-proxy/entra-redis-proxy/internal/azurefake"
)

// soakDuration is how long TestSoak runs its load: PROXY_SOAK (a Go duration), default 60s.
func soakDuration(t *testing.T) time.Duration {
	v := os.Getenv("PROXY_SOAK")
	if v == "" {
		return 60 * time.Second
	}
	d, err := time.ParseDuration(v)
	if err != nil || d <= 0 {
		t.Fatalf("PROXY_SOAK=%q: want a positive Go duration such as 10m", v)
	}
	return d
}

// soak is the shared bookkeeping of TestSoak's workers.
type soak struct {
	f    *fixture
	stop chan struct{} // closed when the producers should stop

	mu   sync.Mutex
	errs []error

	published [2]atomic.Int64 // per publisher: messages sent (sequence numbers 0..n-1)
	pushed    atomic.Int64
	popped    sync.Map // element -> count
	nPopped   atomic.Int64
	ops       atomic.Int64

	closers []func() error // every client and subscription, closed before the leak check
}

func (s *soak) fail(who string, err error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if len(s.errs) < 20 {
		s.errs = append(s.errs, fmt.Errorf("%s: %w", who, err))
	}
}

func (s *soak) stopped() bool {
	select {
	case <-s.stop:
		return true
	default:
		return false
	}
}

func (s *soak) client(t *testing.T, proto int) *redis.Client {
	// No retries: every error the proxy causes must show.
	c := redis.NewClient(&redis.Options{Addr: s.f.addr, Protocol: proto, PoolSize: 1, MaxRetries: -1,
		ReadTimeout: 10 * time.Second, DisableIdentity: true})
	t.Cleanup(func() { c.Close() })
	s.closers = append(s.closers, c.Close)
	return c
}

// Dozens of clients mixing pipelines, transactions, pub/sub (RESP2 and RESP3) and blocking reads, while
// tokens rotate every 3 seconds and the identity endpoint fails every fifth request: no client sees an
// error, no message is lost, duplicated or reordered, every element pushed is popped once, and afterwards
// the proxy's goroutines and heap are back near where they started.
func TestSoak(t *testing.T) {
	dur := soakDuration(t)
	const lifetime = 6 * time.Second // refreshed at half-life: a new token every 3s
	f := newFixture(t, fixtureOpts{lifetime: lifetime, reqTimeout: time.Second})
	f.env.SetFailEvery(5, azurefake.FaultStatus500)
	baseG := runtime.NumGoroutine() // the fixture's own: redis, identity endpoint, token source, proxy
	baseHeap, _ := heapNow()
	s := &soak{f: f, stop: make(chan struct{})}
	ctx := t.Context()
	var producers, consumers sync.WaitGroup

	// 4 subscribers, RESP2 and RESP3, subscribed before anything is published.
	const subscribers = 4
	received := make([][2]atomic.Int64, subscribers) // per subscriber, per publisher: next sequence expected
	subsDone := make(chan struct{})
	for i := range subscribers {
		proto := 2 + i%2
		c := s.client(t, proto)
		ps := c.Subscribe(ctx, "soak:news")
		t.Cleanup(func() { ps.Close() })
		s.closers = append(s.closers, ps.Close)
		if _, err := ps.Receive(ctx); err != nil {
			t.Fatalf("subscriber %d: %v", i, err)
		}
		consumers.Add(1)
		go func() {
			defer consumers.Done()
			who := fmt.Sprintf("subscriber %d (RESP%d)", i, proto)
			for {
				m, err := ps.ReceiveMessage(ctx)
				if err != nil {
					select {
					case <-subsDone:
						return // closed at the end
					default:
					}
					s.fail(who, err)
					return
				}
				p, seq, ok := strings.Cut(m.Payload, ":")
				pub, err1 := strconv.Atoi(p)
				n, err2 := strconv.ParseInt(seq, 10, 64)
				if !ok || err1 != nil || err2 != nil || pub < 0 || pub > 1 {
					s.fail(who, fmt.Errorf("message %q is not one of ours", m.Payload))
					return
				}
				if want := received[i][pub].Load(); n != want {
					s.fail(who, fmt.Errorf("publisher %d: message %d, want %d (lost, duplicated or reordered)", pub, n, want))
					return
				}
				received[i][pub].Add(1)
			}
		}()
	}

	run := func(who string, f func() error) {
		producers.Add(1)
		go func() {
			defer producers.Done()
			for !s.stopped() {
				if err := f(); err != nil {
					s.fail(who, err)
					return
				}
				s.ops.Add(1)
			}
		}()
	}
	// 2 publishers.
	for p := range 2 {
		c := s.client(t, 2+p)
		run(fmt.Sprintf("publisher %d", p), func() error {
			n := s.published[p].Load()
			if err := c.Publish(ctx, "soak:news", fmt.Sprintf("%d:%d", p, n)).Err(); err != nil {
				return err
			}
			s.published[p].Add(1)
			return nil
		})
	}
	// 8 pipelining clients.
	for i := range 8 {
		c := s.client(t, 2+i%2)
		round := 0
		run(fmt.Sprintf("pipeline %d", i), func() error {
			round++
			pipe := c.Pipeline()
			var gets []*redis.StringCmd
			for k := range 20 {
				key := fmt.Sprintf("soak:p%d:%d", i, k)
				pipe.Set(ctx, key, fmt.Sprintf("%d-%d", round, k), 0)
				gets = append(gets, pipe.Get(ctx, key))
			}
			if _, err := pipe.Exec(ctx); err != nil {
				return err
			}
			for k, g := range gets {
				if want := fmt.Sprintf("%d-%d", round, k); g.Val() != want {
					return fmt.Errorf("reply %d = %q, want %q", k, g.Val(), want)
				}
			}
			return nil
		})
	}
	// 4 transaction clients: each MULTI increments its counter once, and EXEC shows it.
	for i := range 4 {
		c := s.client(t, 2+i%2)
		key := fmt.Sprintf("soak:tx%d", i)
		var n int64
		run(fmt.Sprintf("multi %d", i), func() error {
			var incr *redis.IntCmd
			var get *redis.StringCmd
			if _, err := c.TxPipelined(ctx, func(p redis.Pipeliner) error {
				incr = p.Incr(ctx, key)
				get = p.Get(ctx, key)
				return nil
			}); err != nil {
				return err
			}
			n++
			if incr.Val() != n || get.Val() != strconv.FormatInt(n, 10) {
				return fmt.Errorf("EXEC: INCR %d, GET %q; want %d", incr.Val(), get.Val(), n)
			}
			return nil
		})
	}
	// 3 pushers and 3 blocking poppers.
	for i := range 3 {
		c := s.client(t, 2+i%2)
		var n int
		run(fmt.Sprintf("pusher %d", i), func() error {
			if err := c.RPush(ctx, "soak:q", fmt.Sprintf("%d:%d", i, n)).Err(); err != nil {
				return err
			}
			n++
			s.pushed.Add(1)
			if n%8 == 0 { // let the poppers block now and then
				select {
				case <-time.After(50 * time.Millisecond):
				case <-s.stop:
				}
			}
			return nil
		})
	}
	popDone := make(chan struct{})
	for i := range 3 {
		c := s.client(t, 3-i%2)
		consumers.Add(1)
		go func() {
			defer consumers.Done()
			who := fmt.Sprintf("popper %d", i)
			for {
				select {
				case <-popDone:
					return
				default:
				}
				kv, err := c.BLPop(ctx, 2*time.Second, "soak:q").Result()
				if errors.Is(err, redis.Nil) {
					continue // timed out: nothing to pop
				}
				if err != nil {
					s.fail(who, err)
					return
				}
				if prev, dup := s.popped.LoadOrStore(kv[1], i); dup {
					s.fail(who, fmt.Errorf("element %q popped twice (first by popper %v)", kv[1], prev))
					return
				}
				s.nPopped.Add(1)
			}
		}()
	}

	// Let it run, reporting errors as soon as they come.
	minted, deleted := f.minted(), f.deleted()
	end := time.After(dur)
	for running := true; running; {
		select {
		case <-end:
			running = false
		case <-time.After(time.Second):
			s.mu.Lock()
			failed := len(s.errs) > 0
			s.mu.Unlock()
			if failed {
				running = false
			}
		}
	}
	close(s.stop)
	producers.Wait()
	// Everything sent must arrive.
	waitFor(t, 20*time.Second, "every message and element to arrive", func() bool {
		s.mu.Lock()
		failed := len(s.errs) > 0
		s.mu.Unlock()
		if failed {
			return true
		}
		for i := range subscribers {
			for p := range 2 {
				if received[i][p].Load() != s.published[p].Load() {
					return false
				}
			}
		}
		return s.nPopped.Load() == s.pushed.Load()
	})
	close(subsDone)
	close(popDone)
	stats := f.env.Stats()
	t.Logf("%v: %d operations, %d+%d messages to %d subscribers, %d elements pushed, %d popped; %d tokens minted, %d expired; identity endpoint: %d requests, %d faults",
		dur, s.ops.Load(), s.published[0].Load(), s.published[1].Load(), subscribers, s.pushed.Load(), s.nPopped.Load(),
		f.minted()-minted, f.deleted()-deleted, stats.Requests, stats.Faults)
	for _, err := range s.errs {
		t.Error(err)
	}
	if t.Failed() {
		return
	}
	if got := f.deleted() - deleted; got < int(dur/lifetime)-1 {
		t.Errorf("only %d tokens expired in %v: the load did not live through the rotations", got, dur)
	}
	if stats.Faults == 0 {
		t.Error("the identity endpoint never failed: the test proves less than it says")
	}

	// Afterwards: all clients closed, the proxy's goroutines and heap go back near where they started.
	for _, c := range s.closers {
		c()
	}
	consumers.Wait()
	waitFor(t, 10*time.Second, "the proxy to see every client leave", func() bool { return f.srv.Clients() == 0 })
	var g int
	waitFor(t, 20*time.Second, "goroutines to settle near the baseline", func() bool {
		g = runtime.NumGoroutine()
		return g <= baseG+2
	})
	heap, _ := heapNow()
	t.Logf("goroutines: %d before, %d after; heap in use: %d KiB before, %d KiB after", baseG, g, baseHeap>>10, heap>>10)
	if heap > baseHeap+16<<20 {
		t.Errorf("heap in use %d KiB after the soak, %d KiB before: not back near the baseline", heap>>10, baseHeap>>10)
	}
}
