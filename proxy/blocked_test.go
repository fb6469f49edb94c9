package proxy

import (
	"strings"
	"testing"
	"time"
)

// newBlocked finds each blocking command's timeout, and again() re-issues it with the time left.
func TestBlockedTimeouts(t *testing.T) {
	now := time.Unix(1000, 0)
	tcs := []struct {
		cmd      string
		blocks   bool
		deadline time.Duration // 0: forever
		again    string        // the command re-issued with 1.5s left (or forever)
	}{
		{"BLPOP a b 0", true, 0, "BLPOP a b 0"},
		{"brpop a 2.5", true, 2500 * time.Millisecond, "brpop a 1.500"},
		{"BLMOVE a b LEFT RIGHT 10", true, 10 * time.Second, "BLMOVE a b LEFT RIGHT 1.500"},
		{"BRPOPLPUSH a b 0", true, 0, "BRPOPLPUSH a b 0"},
		{"BZPOPMIN z 3", true, 3 * time.Second, "BZPOPMIN z 1.500"},
		{"BLMPOP 5 2 a b LEFT", true, 5 * time.Second, "BLMPOP 1.500 2 a b LEFT"},
		{"BZMPOP 0 1 z MIN", true, 0, "BZMPOP 0 1 z MIN"},
		{"XREAD COUNT 1 BLOCK 2000 STREAMS s $", true, 2 * time.Second, "XREAD COUNT 1 BLOCK 1500 STREAMS s $"},
		{"XREADGROUP GROUP g c BLOCK 0 STREAMS s >", true, 0, "XREADGROUP GROUP g c BLOCK 0 STREAMS s >"},
		{"XREAD STREAMS block 0", false, 0, ""}, // "block" here is a stream name, not the option
		{"XREAD COUNT 1 STREAMS s 0", false, 0, ""},
		{"WAIT 1 5000", true, 5 * time.Second, "WAIT 1 1500"},
		{"BLPOP a notanumber", false, 0, ""},
		{"BLPOP a -1", false, 0, ""},
	}
	for _, tc := range tcs {
		t.Run(tc.cmd, func(t *testing.T) {
			var args [][]byte
			for _, f := range strings.Fields(tc.cmd) {
				args = append(args, []byte(f))
			}
			b := newBlocked(args, lookup(args[0]), now)
			if (b != nil) != tc.blocks {
				t.Fatalf("blocks = %v, want %v", b != nil, tc.blocks)
			}
			if b == nil {
				return
			}
			var want time.Time
			if tc.deadline > 0 {
				want = now.Add(tc.deadline)
			}
			if !b.deadline.Equal(want) {
				t.Errorf("deadline %v, want %v", b.deadline, want)
			}
			left := 1500 * time.Millisecond
			if tc.deadline == 0 {
				left = 0
			}
			if got := strings.Join(b.again(left).args, " "); got != tc.again {
				t.Errorf("again = %q, want %q", got, tc.again)
			}
		})
	}
}

func TestIsTimeoutReply(t *testing.T) {
	blpop := &blocked{args: []string{"BLPOP", "a", "0"}}
	wait := &blocked{args: []string{"WAIT", "2", "0"}}
	tcs := []struct {
		b             *blocked
		reply         string
		timeout, done bool
	}{
		{blpop, "*-1\r\n", true, true},
		{blpop, "_\r\n", true, true},
		{blpop, "$-1\r\n", true, true},
		{blpop, "*2\r\n$1\r\na\r\n$1\r\nv\r\n", false, true},
		{blpop, "*-", false, false},
		{wait, ":1\r\n", true, true},
		{wait, ":2\r\n", false, true},
	}
	for _, tc := range tcs {
		timeout, done := tc.b.isTimeoutReply([]byte(tc.reply))
		if timeout != tc.timeout || done != tc.done {
			t.Errorf("%s %q: timeout %v done %v, want %v %v", tc.b.args[0], tc.reply, timeout, done, tc.timeout, tc.done)
		}
	}
}
