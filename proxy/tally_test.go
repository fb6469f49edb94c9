package proxy

import (
	"context"
	"log/slog"
	"strings"
	"sync"
	"testing"
	"testing/synctest"
	"time"
)

// recorder is a slog handler that keeps each record as "msg key=value ...".
type recorder struct {
	mu   sync.Mutex
	recs []string
}

func (r *recorder) Enabled(context.Context, slog.Level) bool { return true }
func (r *recorder) WithAttrs([]slog.Attr) slog.Handler       { return r }
func (r *recorder) WithGroup(string) slog.Handler            { return r }

func (r *recorder) Handle(_ context.Context, rec slog.Record) error {
	line := rec.Message
	rec.Attrs(func(a slog.Attr) bool {
		line += " " + a.String()
		return true
	})
	r.mu.Lock()
	defer r.mu.Unlock()
	r.recs = append(r.recs, line)
	return nil
}

func (r *recorder) lines() []string {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]string(nil), r.recs...)
}

// A flood makes one line per interval per key: with lead, the first event at once and each interval's
// count at its end; a key that goes quiet for an interval is forgotten, so its next event leads again.
func TestTallyLead(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		var out recorder
		ta := newTally(slog.New(&out), slog.LevelWarn, "wrong password", time.Minute, true)
		defer ta.stop()
		for range 100 {
			ta.add("10.0.0.1", "client", "10.0.0.1:1")
		}
		ta.add("10.0.0.2", "client", "10.0.0.2:1")
		if got := out.lines(); len(got) != 2 || !strings.Contains(got[0], "count=1") {
			t.Fatalf("at once: %q, want the first event of each key", got)
		}
		time.Sleep(time.Minute + time.Second)
		got := out.lines()
		if len(got) != 3 || !strings.Contains(got[2], "count=99") || !strings.Contains(got[2], "client=10.0.0.1:1") {
			t.Fatalf("after a minute: %q, want one more line counting the other 99", got)
		}
		time.Sleep(time.Minute) // a quiet interval: both keys forgotten
		ta.add("10.0.0.1", "client", "10.0.0.1:2")
		if got := out.lines(); len(got) != 4 || !strings.Contains(got[3], "count=1") {
			t.Fatalf("after a quiet minute: %q, want the next event at once", got)
		}
	})
}

// Without lead, one line at the end of the window counts every event in it; stop flushes what is counted.
func TestTallyWindowAndStop(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		var out recorder
		ta := newTally(slog.New(&out), slog.LevelWarn, "dropped", time.Second, false)
		for range 5 {
			ta.add("")
		}
		if got := out.lines(); len(got) != 0 {
			t.Fatalf("before the window ends: %q", got)
		}
		time.Sleep(2 * time.Second)
		if got := out.lines(); len(got) != 1 || !strings.Contains(got[0], "count=5") {
			t.Fatalf("after the window: %q, want one line with count=5", got)
		}
		ta.add("")
		ta.add("")
		ta.stop()
		if got := out.lines(); len(got) != 2 || !strings.Contains(got[1], "count=2") {
			t.Fatalf("after stop: %q, want the 2 counted flushed", got)
		}
		ta.add("")
		if got := out.lines(); len(got) != 3 || !strings.Contains(got[2], "count=1") {
			t.Fatalf("after stop, events are logged one by one: %q", got)
		}
	})
}

// Keys are bounded: beyond maxTallyKeys, events are counted under one key.
func TestTallyBoundsKeys(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		ta := newTally(slog.New(slog.DiscardHandler), slog.LevelWarn, "x", time.Minute, false)
		defer ta.stop()
		for i := range maxTallyKeys + 50 {
			ta.add(strings.Repeat("k", i+1))
		}
		ta.mu.Lock()
		n, other := len(ta.keys), ta.keys[overflowKey]
		ta.mu.Unlock()
		if n > maxTallyKeys+1 || other == nil || other.n != 50 {
			t.Errorf("%d keys, overflow %+v; want at most %d and 50 events under %s", n, other, maxTallyKeys+1, overflowKey)
		}
	})
}
