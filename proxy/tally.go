package proxy

import (
	"context"
	"log/slog"
	"sync"
	"time"
)

// tally folds a repeated event into one log line per key per interval, with a count: a password guesser, a
// full connection table or an identity outage costs the log a line per interval, not a line per client.
type tally struct {
	log   *slog.Logger
	level slog.Level
	msg   string
	every time.Duration
	// lead logs the first event of a quiet key at once (count 1); the others of the interval make one line
	// at its end. Without it, one line at the end of the interval counts them all.
	lead bool

	mu      sync.Mutex
	keys    map[string]*tallyKey
	stopped bool
	wg      sync.WaitGroup // one per armed timer
}

// tallyKey is one key's events not logged yet, and the timer that ends its interval.
type tallyKey struct {
	n     int
	attrs []any // of the latest event
	t     *time.Timer
}

// maxTallyKeys bounds the keys held at once; events of further keys are counted under overflowKey.
const (
	maxTallyKeys = 1024
	overflowKey  = "(other)"
)

func newTally(log *slog.Logger, level slog.Level, msg string, every time.Duration, lead bool) *tally {
	return &tally{log: log, level: level, msg: msg, every: every, lead: lead, keys: make(map[string]*tallyKey)}
}

// add records one event of key, described by attrs (the latest event's attrs go into the line).
func (t *tally) add(key string, attrs ...any) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.stopped {
		t.emit(1, attrs)
		return
	}
	k := t.keys[key]
	if k == nil && len(t.keys) >= maxTallyKeys {
		key = overflowKey
		k = t.keys[key]
	}
	if k != nil {
		k.n++
		k.attrs = attrs
		return
	}
	k = &tallyKey{}
	t.keys[key] = k
	if t.lead {
		t.emit(1, attrs)
	} else {
		k.n, k.attrs = 1, attrs
	}
	t.wg.Add(1)
	k.t = time.AfterFunc(t.every, func() { t.flush(key) })
}

// flush ends key's interval: it logs the events counted in it, and keeps the key for one more interval if
// there were any (so a steady flood makes one line per interval), or forgets it.
func (t *tally) flush(key string) {
	t.mu.Lock()
	defer t.mu.Unlock()
	defer t.wg.Done()
	k := t.keys[key]
	if k == nil || t.stopped {
		return
	}
	if k.n == 0 {
		delete(t.keys, key)
		return
	}
	t.emit(k.n, k.attrs)
	k.n, k.attrs = 0, nil
	t.wg.Add(1)
	k.t.Reset(t.every)
}

// emit writes one line for n events. t.mu is held: lines of one tally never interleave out of order.
func (t *tally) emit(n int, attrs []any) {
	t.log.Log(context.Background(), t.level, t.msg, append(attrs[:len(attrs):len(attrs)], "count", n, "interval", t.every.String())...)
}

// stop logs what is still counted and stops the timers, waiting for any that already fired. Events after
// it are logged one by one.
func (t *tally) stop() {
	t.mu.Lock()
	t.stopped = true
	for _, k := range t.keys {
		if k.t.Stop() {
			t.wg.Done()
		}
		if k.n > 0 {
			t.emit(k.n, k.attrs)
		}
	}
	clear(t.keys)
	t.mu.Unlock()
	t.wg.Wait()
}
