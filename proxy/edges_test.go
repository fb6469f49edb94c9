package proxy_test

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"net"
	"strings"
	"syscall"
	"testing"
	"time"
)

// talk sends in on a new connection to addr and reads until the reply ends with end (the connection
// still serves: "open") or the peer closes it ("FIN", or "RST" for a reset).
func talk(t *testing.T, addr, in, end string) (reply []byte, how string) {
	t.Helper()
	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	go c.Write([]byte(in)) // a peer that stops reading must not block the test
	c.SetReadDeadline(time.Now().Add(20 * time.Second))
	buf := make([]byte, 64<<10)
	for {
		n, err := c.Read(buf)
		reply = append(reply, buf[:n]...)
		switch {
		case end != "" && bytes.HasSuffix(reply, []byte(end)):
			return reply, "open"
		case errors.Is(err, io.EOF):
			return reply, "FIN"
		case errors.Is(err, syscall.ECONNRESET):
			return reply, "RST"
		case err != nil:
			t.Fatalf("%s: %v after %q", addr, err, trunc(reply))
		}
	}
}

// Protocol edges as redis-server answers them (issue 14): a channel name over 1 MiB, a command name over
// 128 KiB, and protocol errors inside a command too large to buffer. After a protocol error the proxy
// always closes with a FIN, so the client reads the error, even where redis resets the connection (it
// closes with the client's input unread).
func TestProtocolEdgesLikeRedis(t *testing.T) {
	direct := plainRedis(t)
	f := newFixture(t, fixtureOpts{})
	channel := strings.Repeat("c", 1<<20+10)
	name := strings.Repeat("n", 128<<10+10)
	value := strings.Repeat("v", 20000) // larger than the proxy's buffer: streamed
	junk := strings.Repeat("x", 4<<20)  // unread input when redis closes: it resets
	set := fmt.Sprintf("*3\r\n$3\r\nSET\r\n$%d\r\n%s\r\n", len(value), value)
	// Redis 6.0 quotes names with backquotes: "unknown command `x`, with args beginning with: `a`, ".
	unknown, withArg := "-ERR unknown command 'nnnn", "with args beginning with: 'a'"
	if !serverVersion(t).AtLeast(7, 0) {
		unknown, withArg = "-ERR unknown command `nnnn", "with args beginning with: `a`"
	}
	for _, tc := range []struct {
		desc, in, end, wantErr string
	}{
		{"SUBSCRIBE to a channel over 1 MiB", fmt.Sprintf("*2\r\n$9\r\nSUBSCRIBE\r\n$%d\r\n%s\r\n*1\r\n$4\r\nPING\r\n", len(channel), channel),
			"*2\r\n$4\r\npong\r\n$0\r\n\r\n", ""},
		{"command name over 128 KiB", fmt.Sprintf("*1\r\n$%d\r\n%s\r\n*2\r\n$4\r\nECHO\r\n$2\r\nok\r\n", len(name), name),
			"$2\r\nok\r\n", unknown},
		{"command name over 128 KiB with an argument", fmt.Sprintf("*2\r\n$%d\r\n%s\r\n$1\r\na\r\n*2\r\n$4\r\nECHO\r\n$2\r\nok\r\n", len(name), name),
			"$2\r\nok\r\n", withArg},
		{"invalid bulk length inside a streamed command", strings.TrimSuffix(set, fmt.Sprintf("$%d\r\n%s\r\n", len(value), value)) +
			fmt.Sprintf("$%d\r\n%s\r\n$x\r\n", len(value), value) + junk, "", "-ERR Protocol error: invalid bulk length\r\n"},
		{"integer inside a streamed command", fmt.Sprintf("*3\r\n$3\r\nSET\r\n$%d\r\n%s\r\n:1\r\n", len(value), value), "",
			"-ERR Protocol error: expected '$', got ':'\r\n"},
		{"bulk over the limit inside a streamed command", fmt.Sprintf("*3\r\n$3\r\nSET\r\n$%d\r\n%s\r\n$%d\r\n", len(value), value, 1<<30), "",
			"-ERR Protocol error: invalid bulk length\r\n"},
		{"invalid bulk length with unread input", "*1\r\n$4\r\nPING\r\n*1\r\n$x\r\n" + junk, "", "+PONG\r\n-ERR Protocol error: invalid bulk length\r\n"},
	} {
		t.Run(tc.desc, func(t *testing.T) {
			want, wantHow := talk(t, direct, tc.in, tc.end)
			got, gotHow := talk(t, f.addr, tc.in, tc.end)
			if !bytes.Equal(got, want) {
				t.Errorf("through the proxy: %q\nredis-server:      %q", trunc(got), trunc(want))
			}
			if !bytes.Contains(want, []byte(tc.wantErr)) {
				t.Errorf("redis-server answered %q; the test expects %q", trunc(want), tc.wantErr)
			}
			// Where redis closes, the proxy closes with a FIN; where it serves on, so does the proxy.
			if wantGone := wantHow != "open"; (gotHow != "open") != wantGone || (wantGone && gotHow != "FIN") {
				t.Errorf("the proxy's connection ends %s, redis-server's %s; want FIN where redis closes", gotHow, wantHow)
			}
		})
	}
}
