package proxy

import (
	"testing"
	"time"
)

// withdraw clears unblocking; it returns the command's result only when the command was answered.
func TestBlockedWithdraw(t *testing.T) {
	args := [][]byte{[]byte("BLPOP"), []byte("k"), []byte("0")}
	now := time.Now()

	t.Run("unanswered", func(t *testing.T) {
		b := newBlocked(args, lookup(args[0]), now)
		b.unblocking.Store(true)
		if res, ok := b.withdraw(); ok {
			t.Fatalf("withdraw = %+v, true; want false for an unanswered command", res)
		}
		if b.unblocking.Load() {
			t.Error("unblocking still set after withdraw")
		}
		select {
		case res := <-b.result:
			t.Errorf("result %+v sent by withdraw", res)
		default:
		}
	})

	t.Run("answered", func(t *testing.T) {
		b := newBlocked(args, lookup(args[0]), now)
		b.unblocking.Store(true)
		want := unblockResult{reissue: true, remaining: time.Minute}
		b.answered.Store(true) // as the reply loop does: answered, then the result
		b.result <- want
		res, ok := b.withdraw()
		if !ok || res != want {
			t.Errorf("withdraw = %+v, %v; want %+v, true", res, ok, want)
		}
		if b.unblocking.Load() {
			t.Error("unblocking still set after withdraw")
		}
	})

	// Racing the reply loop's side of the protocol (read unblocking, set answered, send the result):
	// withdraw returns, and its result is the reply loop's when it reports one; otherwise the result
	// stays in the channel.
	t.Run("racing the reply", func(t *testing.T) {
		for i := range 2000 {
			b := newBlocked(args, lookup(args[0]), now)
			b.unblocking.Store(true)
			sent := make(chan unblockResult, 1)
			go func() {
				res := unblockResult{reissue: b.unblocking.Load()}
				b.answered.Store(true)
				b.result <- res
				sent <- res
			}()
			res, ok := b.withdraw()
			want := <-sent
			switch {
			case ok && res != want:
				t.Fatalf("run %d: withdraw = %+v, want the reply loop's %+v", i, res, want)
			case !ok && len(b.result) != 1:
				t.Fatalf("run %d: withdraw = false, but the result is gone from the channel", i)
			}
		}
	})
}
