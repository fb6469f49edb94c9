package resp

import (
	"bytes"
	"context"
	"errors"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"
)

// TestRedisConformance sends raw client input to a real redis-server and checks that what it answers,
// and whether it closes the connection, is what Parse predicts (evaluating PING and ECHO itself).
//
// One known difference is left out: Redis accepts an inline line longer than 64 KiB when its end arrives
// in the same read as its 64th KiB, and Parse never does (see the package doc). Parse follows 7.0; against an
// older server one more is expected: Redis 6.0 refuses multibulk counts above 1048576 (7.0: above INT_MAX).
func TestRedisConformance(t *testing.T) {
	sock := startRedis(t)
	before7 := redisMajor(t) < 7
	inputs := []string{
		"*1\r\n$4\r\nPING\r\n*2\r\n$4\r\nECHO\r\n$5\r\na\r\n\x00b\r\n",
		"*2\r\n$4\r\nECHO\r\n$0\r\n\r\n",
		"*1\r\n$4\r\nPINGXY*1\r\n$4\r\nPING\r\n",
		"*1\rX$4\r\nPING\r\n",
		"*1\r\n$4\rYPING\r\n",
		"*0\r\n*-10\r\n*-1\r\n*-9223372036854775808\r\n*1\r\n$4\r\nPING\r\n",
		"*2147483647\r\n",
		"*1048576\r\n",
		"*1\r\n$4\r\nPI",
		"*1\r\nX\r",
		"*1\x00\r\n$4\r\nPING\r\n",
		"*2147483648\r\n",
		"*-0\r\n",
		"*01\r\n",
		"*+1\r\n",
		"*\r\n",
		"* 1\r\n",
		"*1 \r\n",
		"*99999999999999999999\r\n",
		"*-9223372036854775809\r\n",
		"*" + big(65535) + "\r\n",
		"*" + big(65536),
		"*1\x00" + big(65535),
		"*1\r\nX\rY",
		"*1\r\n:1\r\n",
		"*1\r\n\r\n",
		"*1\r\n\n\r\n",
		"*1\r\n\xff\r\n",
		"*2\r\n$4\r\nECHO\r\nk\r\n",
		"*1\r\n$-1\r\n",
		"*1\r\n$01\r\n",
		"*1\r\n$\r\n",
		"*1\r\n$536870913\r\n",
		"*3\r\n$4\r\nECHO\r\n$x\r\n",
		"*1\r\n" + big(65537),
		"*2\r\n$4\r\nPING\r\n" + big(65537),
		"*1\r\n$" + big(65535) + "\r\n",
		"PING\r\nPING\nECHO  \t\"b c\" \r\n",
		"\r\n\n \t\v\f\r\nPING\n",
		"ECHO a\"b c\"\r\n",
		"ECHO \"\\x41\\x4g\\n\\a\\q\\b\\t\\r\\\"\"\n",
		"ECHO \"\\x4\"\n",
		"ECHO '\\''\nECHO 'a\\b'\n",
		"ECHO '\\\\'\n",
		"ECHO \"a\\\\\"\r\n",
		"ECHO \"\"\n",
		"ECHO \"a\"b\r\n",
		"ECHO 'a'x\n",
		"ECHO \"a\n",
		"ECHO \"\\\n",
		"ECHO \"a\r\"\r\n",
		"ECHO \"a\"\r\r\n",
		"ECHO a\vb\n",
		"ECHO \"a\"\v\n",
		"ECHO \"\\",
		"ECHO a\x00b\n",
		"\x00\n*1\r\n$4\r\nPING\r\n",
		"ECHO " + big(65531) + "\n",
		"ECHO a\x00" + big(65530) + "\n",
		big(65537),
	}
	for i, in := range inputs {
		t.Run(strconv.Itoa(i), func(t *testing.T) {
			t.Parallel()
			want, wantClosed := predict(t, []byte(in))
			if before7 && overRedis6Multibulk(in) {
				want, wantClosed = []byte("-ERR Protocol error: invalid multibulk length\r\n"), true
			}
			got, closed := exchange(t, sock, []byte(in), len(want), wantClosed)
			if !bytes.Equal(got, want) || closed != wantClosed {
				t.Fatalf("input %.80q:\nredis-server: %.200q, closed %v\nours:         %.200q, closed %v", in, got, closed, want, wantClosed)
			}
		})
	}
}

// overRedis6Multibulk reports whether in starts with a multibulk count that Redis 7.0 accepts and 6.0 does not.
func overRedis6Multibulk(in string) bool {
	line, _, ok := strings.Cut(in, "\r\n")
	if !ok || !strings.HasPrefix(line, "*") {
		return false
	}
	n, err := strconv.ParseInt(line[1:], 10, 64)
	return err == nil && n > 1<<20 && n <= maxMultibulk
}

// redisMajor returns the major version of the redis-server on PATH.
func redisMajor(t *testing.T) int {
	out, err := exec.Command("redis-server", "--version").Output()
	if err != nil {
		t.Fatalf("redis-server --version: %v", err)
	}
	m := regexp.MustCompile(`\bv=(\d+)\.`).FindSubmatch(out)
	if m == nil {
		t.Fatalf("redis-server --version: no version in %q", out)
	}
	n, _ := strconv.Atoi(string(m[1]))
	return n
}

// predict returns what Redis should answer to in according to Parse, and whether it should close.
func predict(t *testing.T, in []byte) ([]byte, bool) {
	var p CommandParser
	var out []byte
	for {
		cmd, n, err := p.Parse(in)
		var pe *ProtocolError
		switch {
		case errors.As(err, &pe):
			return AppendError(out, "ERR "+pe.Error()), true
		case err == ErrIncomplete:
			return out, false
		case err != nil:
			t.Fatalf("Parse: %v", err)
		}
		in = in[n:]
		switch {
		case len(cmd.Args) == 0:
		case len(cmd.Args) == 1 && string(cmd.Args[0]) == "PING":
			out = append(out, "+PONG\r\n"...)
		case len(cmd.Args) == 2 && string(cmd.Args[0]) == "ECHO":
			out = append(out, '$')
			out = strconv.AppendInt(out, int64(len(cmd.Args[1])), 10)
			out = append(append(append(out, "\r\n"...), cmd.Args[1]...), "\r\n"...)
		default:
			t.Fatalf("test input may only hold PING and ECHO, got %q", cmd.Args)
		}
	}
}

// sendTo opens a connection to redis-server, with a 10 s deadline for everything on it, and writes in.
func sendTo(t *testing.T, sock string, in []byte) net.Conn {
	t.Helper()
	c, err := net.Dial("unix", sock)
	if err != nil {
		t.Fatalf("dial redis-server: %v", err)
	}
	if err := c.SetDeadline(time.Now().Add(10 * time.Second)); err != nil {
		c.Close()
		t.Fatal(err)
	}
	if _, err := c.Write(in); err != nil {
		c.Close()
		t.Fatalf("write: %v", err)
	}
	return c
}

// exchange writes in on a new connection and returns what comes back: until the server closes the
// connection when closing is expected, else want bytes and then nothing for a short quiet period.
func exchange(t *testing.T, sock string, in []byte, want int, wantClosed bool) ([]byte, bool) {
	c := sendTo(t, sock, in)
	defer c.Close()
	var out []byte
	buf := make([]byte, 4096)
	quiet := false
	for {
		if !wantClosed && len(out) >= want && !quiet {
			// Everything expected arrived: anything more, or a close, must show within the quiet period.
			quiet = true
			if err := c.SetReadDeadline(time.Now().Add(300 * time.Millisecond)); err != nil {
				t.Fatal(err)
			}
		}
		n, err := c.Read(buf)
		out = append(out, buf[:n]...)
		var ne net.Error
		switch {
		case err == nil:
		case errors.Is(err, io.EOF):
			return out, true
		case quiet && errors.As(err, &ne) && ne.Timeout():
			return out, false
		default:
			t.Fatalf("read after %.200q: %v", out, err)
		}
	}
}

// startRedis runs a redis-server on a Unix socket for the test and returns the socket's path.
func startRedis(t *testing.T) string {
	path, err := exec.LookPath("redis-server")
	if err != nil {
		t.Fatalf("redis-server is needed for this test (apt-get install redis-server): %v", err)
	}
	dir := t.TempDir()
	sock := filepath.Join(dir, "redis.sock")
	ctx, cancel := context.WithCancel(context.Background())
	cmd := exec.CommandContext(ctx, path, "--port", "0", "--unixsocket", sock, "--save", "",
		"--appendonly", "no", "--dir", dir, "--logfile", filepath.Join(dir, "redis.log"))
	if err := cmd.Start(); err != nil {
		cancel()
		t.Fatalf("start redis-server: %v", err)
	}
	t.Cleanup(func() {
		cancel()
		_ = cmd.Wait()
	})
	for deadline := time.Now().Add(10 * time.Second); ; {
		c, err := net.Dial("unix", sock)
		if err == nil {
			c.Close()
			return sock
		}
		if time.Now().After(deadline) {
			log, _ := os.ReadFile(filepath.Join(dir, "redis.log"))
			t.Fatalf("redis-server did not accept connections: %v\n%s", err, log)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// TestRedisDeepReplies runs Lua scripts returning deeply nested tables on a real redis-server and checks
// that the Scanner, fed each read as it arrives, frames the exact reply as one frame: it must end where
// the PONG pipelined after it begins. Redis 7.0 turns a Lua table into a reply recursively and stops at
// its Lua stack limit (about 8000 levels): it then sends "-ERR reached lua stack limit" in place of the
// table it could not descend into, so the reply stays well formed.
func TestRedisDeepReplies(t *testing.T) {
	sock := startRedis(t)
	const chain = "local a={} local c=a for i=1,tonumber(ARGV[1]) do local n={} c[1]=n c=n end return a"
	// Levels cycle through an array of two (the nested table, then i), an array of one, and a map
	// {k = nested} (a RESP3 map for a RESP3 client, a flat array of two for a RESP2 one).
	const mixed = "redis.setresp(3) local a={} local c=a for i=1,tonumber(ARGV[1]) do local n={} " +
		"if i%3==0 then c.map={k=n} elseif i%3==1 then c[1]=n c[2]=i else c[1]=n end c=n end return a"
	const limitErr = "-ERR reached lua stack limit\r\n"
	for _, tc := range []struct {
		name   string
		resp3  bool
		script string
		depth  int
		want   []byte // the exact reply, or nil to ask check instead
		check  func(t *testing.T, reply []byte) bool
	}{
		{name: "array 200", script: chain, depth: 200, want: []byte(strings.Repeat("*1\r\n", 200) + "*0\r\n")},
		{name: "mixed RESP2 300", script: mixed, depth: 300, want: luaMixedReply(300, false)},
		{name: "mixed RESP3 300", resp3: true, script: mixed, depth: 300, want: luaMixedReply(300, true)},
		{name: "array at the Lua limit", script: chain, depth: 100_000, check: func(t *testing.T, reply []byte) bool {
			levels := bytes.Count(reply, []byte("*1\r\n"))
			t.Logf("Redis nested %d levels, then %q", levels, reply[4*levels:])
			return levels > 1000 && string(reply) == strings.Repeat("*1\r\n", levels)+limitErr
		}},
		{name: "mixed RESP3 at the Lua limit", resp3: true, script: mixed, depth: 100_000, check: func(t *testing.T, reply []byte) bool {
			return bytes.Count(reply, []byte("%1\r\n")) > 1000 && bytes.Contains(reply, []byte(limitErr))
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var in []byte
			frames := 2
			if tc.resp3 {
				in = AppendCommand(in, "HELLO", "3")
				frames++
			}
			in = AppendCommand(in, "EVAL", tc.script, "0", strconv.Itoa(tc.depth))
			in = AppendCommand(in, "PING")
			data, ends := redisFrames(t, sock, in, frames)
			start := 0
			if tc.resp3 {
				start = ends[0]
			}
			reply, after := data[start:ends[frames-2]], data[ends[frames-2]:]
			if string(after) != "+PONG\r\n" {
				t.Fatalf("after the reply (%d bytes): %.200q, want the PONG", len(reply), after)
			}
			switch {
			case tc.want != nil && !bytes.Equal(reply, tc.want):
				t.Fatalf("reply %d bytes, want %d:\n%.300q\nwant\n%.300q", len(reply), len(tc.want), reply, tc.want)
			case tc.check != nil && !tc.check(t, reply):
				t.Fatalf("unexpected reply of %d bytes: %.300q ... %.300q", len(reply), reply, reply[max(0, len(reply)-300):])
			}
		})
	}
}

// luaMixedReply is the reply to TestRedisDeepReplies's mixed script, below Lua's limit.
func luaMixedReply(depth int, resp3 bool) []byte {
	var reply []byte
	var ints []int
	for i := 1; i <= depth; i++ {
		switch {
		case i%3 == 0 && resp3:
			reply = append(reply, "%1\r\n$1\r\nk\r\n"...)
		case i%3 == 0:
			reply = append(reply, "*2\r\n$1\r\nk\r\n"...)
		case i%3 == 1:
			reply = append(reply, "*2\r\n"...)
			ints = append(ints, i)
		default:
			reply = append(reply, "*1\r\n"...)
		}
	}
	reply = append(reply, "*0\r\n"...)
	for i := len(ints) - 1; i >= 0; i-- {
		reply = append(strconv.AppendInt(append(reply, ':'), int64(ints[i]), 10), "\r\n"...)
	}
	return reply
}

// redisFrames writes in on a new connection and feeds what comes back to a reply Scanner read by read,
// until frames frames have ended. It returns the bytes read, which must end with the last frame, and
// where each frame ended.
func redisFrames(t *testing.T, sock string, in []byte, frames int) ([]byte, []int) {
	t.Helper()
	c := sendTo(t, sock, in)
	defer c.Close()
	var s Scanner
	var data []byte
	var ends []int
	buf := make([]byte, 4096)
	for len(ends) < frames {
		n, err := c.Read(buf)
		for off := 0; off < n; {
			if len(ends) == frames {
				t.Fatalf("more bytes after the last frame: %.200q", buf[off:n])
			}
			k, done, serr := s.Scan(buf[off:n])
			if serr != nil {
				t.Fatalf("Scan after %d bytes: %v", len(data)+off+k, serr)
			}
			off += k
			if done {
				ends = append(ends, len(data)+off)
			}
		}
		data = append(data, buf[:n]...)
		if err != nil && len(ends) < frames {
			t.Fatalf("read after %d bytes and %d frames: %v", len(data), len(ends), err)
		}
	}
	return data, ends
}
