package proxy

import (
	"io"
	"log/slog"
	"net"
	"testing"
	"time"

	"github.com/entra-redis-proxy/entra-redis-proxy/resp"
)

// The reply loop's side of a handover, frame by frame: on the old connection O, messages pass until the
// marker; then on the new one N, messages are dropped up to N's copy of the marker and passed after it. The
// marker's copies never reach the client, and a marker that arrives after the handover was given up (the
// client loop has already dropped s.cut) neither panics nor switches.
func TestHandoverMarkerCutover(t *testing.T) {
	msg := func(channel, payload string) []byte {
		return resp.AppendCommand(nil, "message", channel, payload) // same bytes as a RESP2 message
	}
	newSession := func() *session {
		srv := &Server{log: slog.New(slog.NewTextHandler(io.Discard, nil)), obs: NopObserver{}, epoch: time.Now()}
		s := &session{srv: srv, log: srv.log}
		s.init()
		s.resp2Sub.Store(true)
		return s
	}
	// pass classifies and finishes one frame; it reports whether the frame went to the client and, after
	// O's copy of the marker, the connection to continue on.
	pass := func(t *testing.T, s *session, frame []byte) (fwd bool, next net.Conn) {
		t.Helper()
		var h resp.Head
		if ok, err := s.classify(frame, &h); !ok || err != nil {
			t.Fatalf("classify %q: %v, %v", frame, ok, err)
		}
		fwd = s.rl.frame.fwd
		s.frameDone()
		next, _ = s.markerPassed()
		return fwd, next
	}

	t.Run("switch", func(t *testing.T) {
		s := newSession()
		n, other := net.Pipe()
		defer n.Close()
		defer other.Close()
		cut := &cutover{marker: "M", subscribed: make(chan struct{}), ready: make(chan struct{}),
			done: make(chan struct{}), conn: n, buf: &readBuf{}}
		close(cut.ready)
		s.cut.Store(cut)
		for _, step := range []struct {
			frame    []byte
			fwd      bool
			switches bool
		}{
			{msg("a", "1"), true, false},   // O, before the marker: passed
			{msg("M", "cut"), false, true}, // O's copy of the marker: hidden, continue on N
			{msg("a", "1"), false, false},  // N, before its copy: O delivered it
			{msg("M", "cut"), false, false},
			{msg("a", "2"), true, false}, // N, after the marker: new
		} {
			fwd, next := pass(t, s, step.frame)
			if fwd != step.fwd || (next != nil) != step.switches {
				t.Fatalf("%q: passed %v, switched %v; want %v, %v", step.frame, fwd, next != nil, step.fwd, step.switches)
			}
		}
		if !cut.switched {
			t.Fatal("the client loop was not told of the switch")
		}
		select {
		case <-cut.done:
		default:
			t.Fatal("done not closed after the switch")
		}
		// N's marker subscription goes; its confirmation is hidden and ends the watch.
		s.led.push([]entry{{act: actMarker}})
		if fwd, _ := pass(t, s, resp.AppendCommand(nil, "unsubscribe", "M")); fwd || s.rl.marker.active() {
			t.Fatalf("marker unsubscription passed %v, still watching %v", fwd, s.rl.marker.active())
		}
	})

	t.Run("given up", func(t *testing.T) {
		s := newSession()
		cut := &cutover{marker: "M", subscribed: make(chan struct{}), ready: make(chan struct{}), done: make(chan struct{})}
		s.cut.Store(cut)
		if fwd, _ := pass(t, s, msg("a", "1")); !fwd {
			t.Fatal("a message before the marker was hidden")
		}
		cut.failed = true
		close(cut.ready)
		s.cut.Store(nil) // the client loop gave up and dropped it
		if fwd, next := pass(t, s, msg("M", "cut")); fwd || next != nil {
			t.Fatalf("late marker: passed %v, switched %v", fwd, next != nil)
		}
		if fwd, _ := pass(t, s, msg("a", "2")); !fwd {
			t.Fatal("a message after a given-up handover was hidden")
		}
	})

	t.Run("a second handover after one whose watch was left", func(t *testing.T) {
		s := newSession()
		old := &cutover{marker: "M1", subscribed: make(chan struct{}), ready: make(chan struct{}), done: make(chan struct{})}
		old.confirmed()
		s.rl.marker = markerState{cut: old} // its last confirmation never seen
		n, other := net.Pipe()
		defer n.Close()
		defer other.Close()
		cut := &cutover{marker: "M2", subscribed: make(chan struct{}), ready: make(chan struct{}),
			done: make(chan struct{}), conn: n, buf: &readBuf{}}
		s.cut.Store(cut)
		s.led.push([]entry{{act: actMarker}, {act: actMarker}})
		pass(t, s, resp.AppendCommand(nil, "subscribe", "M1")) // a late duplicate of the old one: ignored
		pass(t, s, resp.AppendCommand(nil, "subscribe", "M2"))
		select {
		case <-cut.subscribed:
		default:
			t.Fatal("the current handover's confirmation was not recorded")
		}
		close(cut.ready)
		if fwd, _ := pass(t, s, msg("a", "1")); !fwd {
			t.Fatal("a message before the new marker was hidden")
		}
		if fwd, next := pass(t, s, msg("M2", "cut")); fwd || next == nil {
			t.Fatalf("the new marker: passed %v, switched %v", fwd, next != nil)
		}
	})

	// A RESP3 subscriber's handover at a maintenance: the same cut, with confirmations and messages framed
	// as pushes; the marker's (un)subscription confirmations are the replies the ledger waits for.
	t.Run("RESP3 pushes", func(t *testing.T) {
		s := newSession()
		s.resp2Sub.Store(false)
		s.rl.proto = 3
		push := func(args ...string) []byte {
			b := resp.AppendCommand(nil, args...)
			b[0] = '>'
			return b
		}
		n, other := net.Pipe()
		defer n.Close()
		defer other.Close()
		cut := newCutover("M", false)
		cut.conn, cut.buf = n, &readBuf{}
		s.cut.Store(cut)
		s.led.push([]entry{{act: actMarker}})
		step := func(frame []byte, wantFwd, wantSwitch bool) {
			t.Helper()
			fwd, next := pass(t, s, frame)
			if fwd != wantFwd || (next != nil) != wantSwitch {
				t.Fatalf("%q: passed %v, switched %v; want %v, %v", frame, fwd, next != nil, wantFwd, wantSwitch)
			}
		}
		step(push("message", "a", "1"), true, false)    // O, before the marker's confirmation
		step(push("subscribe", "M", "2"), false, false) // O's confirmation of the marker: hidden
		select {
		case <-cut.subscribed:
		default:
			t.Fatal("the marker's confirmation was not recorded")
		}
		if s.led.len() != 0 {
			t.Fatal("the marker's confirmation did not answer its entry")
		}
		close(cut.ready)
		step(push("pmessage", "a*", "a", "2"), true, false) // O, before the marker
		step(push("message", "M", "cut"), false, true)      // O's copy: continue on N
		step(push("message", "a", "1"), false, false)       // N, before its copy: O delivered them
		step(push("pmessage", "a*", "a", "2"), false, false)
		step(push("message", "M", "cut"), false, false)
		step(push("message", "a", "3"), true, false) // N, after the marker: new
		if !cut.switched {
			t.Fatal("the client loop was not told of the switch")
		}
		s.led.push([]entry{{act: actMarker}})
		step(push("unsubscribe", "M", "1"), false, false)
		if s.rl.marker.active() || s.led.len() != 0 {
			t.Fatalf("after the marker's unsubscription: still watching %v, %d entries", s.rl.marker.active(), s.led.len())
		}
		step(push("message", "a", "4"), true, false)
	})
}
