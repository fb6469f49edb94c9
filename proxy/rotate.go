package proxy

import (
	"context"
	"math/rand/v2"
	"time"
)

// rotateLoop re-authenticates every live connection after each new token, spread over a jittered window
// that ends well before the old token expires.
func (s *Server) rotateLoop(ctx context.Context) {
	var pending timers // the pokes this loop scheduled: stopped when it returns
	defer pending.stop()
	old, changed := s.opts.Tokens.Current()
	since := time.Now() // when old arrived: its lifetime is measured from there
	for {
		select {
		case <-changed:
		case <-ctx.Done():
			return
		}
		var tok Token
		tok, changed = s.opts.Tokens.Current()
		if s.pool != nil {
			s.pool.nudge()
		}
		window := s.opts.ReauthSpread
		if !old.ExpiresOn.IsZero() {
			window = min(window, time.Until(old.ExpiresOn)/10)
		}
		n := 0
		s.each(func(sess *session) {
			n++
			if window <= 0 {
				sess.poke(pokeReauth)
				return
			}
			pending.after(rand.N(window), func() { sess.poke(pokeReauth) })
		})
		s.log.Info("new token: re-authenticating connections", "username", tok.Username,
			"expires_on", tok.ExpiresOn.UTC().Format(time.RFC3339), "connections", n, "window", window.String())
		if !old.ExpiresOn.IsZero() {
			// Connections that could not take the AUTH in band (blocked, or in MULTI) are rescued at 85% of
			// the old token's life, leaving time before Azure's cut-off.
			deadline := old.ExpiresOn.Add(-old.ExpiresOn.Sub(since) * 15 / 100)
			pending.after(time.Until(deadline), func() { s.each(func(sess *session) { sess.poke(pokeDeadline) }) })
		}
		old, since = tok, time.Now()
	}
}

// timers are scheduled pokes with one owner, which stops those still pending when it is done.
type timers struct {
	list []timer
}

type timer struct {
	t   *time.Timer
	due time.Time
}

// after runs f after d, forgetting timers already due so the list stays as short as what is pending.
func (ts *timers) after(d time.Duration, f func()) {
	now := time.Now()
	kept := ts.list[:0]
	for _, t := range ts.list {
		if t.due.After(now) {
			kept = append(kept, t)
		}
	}
	clear(ts.list[len(kept):])
	ts.list = append(kept, timer{t: time.AfterFunc(d, f), due: now.Add(d)})
}

func (ts *timers) stop() {
	for _, t := range ts.list {
		t.t.Stop()
	}
	ts.list = nil
}

// idleLoop asks sessions whose upstream has been quiet for IdlePing to PING it, so Azure keeps it open.
func (s *Server) idleLoop(ctx context.Context) {
	every := s.opts.IdlePing
	t := time.NewTicker(max(every/4, 10*time.Millisecond))
	defer t.Stop()
	for {
		select {
		case <-t.C:
		case <-ctx.Done():
			return
		}
		now := s.now()
		s.each(func(sess *session) {
			if now-sess.lastSent.Load() >= int64(every) {
				sess.poke(pokePing)
			}
		})
	}
}
