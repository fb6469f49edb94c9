package proxy_test

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/entra-redis-proxy/entra-redis-proxy/proxy"
	"github.com/entra-redis-proxy/entra-redis-proxy/resp"
)

// raceEnabled is set by raceon_test.go: the race detector makes the 400 MiB transfer too slow, so it is
// reduced to 64 MiB there.
var raceEnabled bool

// plainRedis starts a plain (no TLS, no ACL) redis-server on a free loopback port, for comparing the proxy
// with redis's own handling of the same bytes. It is killed in Cleanup.
func plainRedis(t *testing.T, args ...string) string {
	t.Helper()
	path, err := exec.LookPath("redis-server")
	if err != nil {
		t.Fatalf("redis-server not on PATH (install it with: sudo apt-get install -y redis-server): %v", err)
	}
	for attempt := 0; attempt < 5; attempt++ {
		addr := closedPort(t)
		_, port, _ := net.SplitHostPort(addr)
		cmd := exec.Command(path, append([]string{"--port", port, "--bind", "127.0.0.1", "--save", "",
			"--appendonly", "no", "--dir", t.TempDir()}, args...)...)
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		exited := make(chan struct{})
		go func() { cmd.Wait(); close(exited) }()
		t.Cleanup(func() {
			cmd.Process.Kill()
			<-exited
		})
		deadline := time.Now().Add(10 * time.Second)
		for time.Now().Before(deadline) {
			select {
			case <-exited:
				deadline = time.Time{} // the port was taken meanwhile: try another
				continue
			default:
			}
			c := redis.NewClient(&redis.Options{Addr: addr, MaxRetries: -1, DialTimeout: time.Second, DisableIdentity: true})
			err := c.Ping(t.Context()).Err()
			c.Close()
			if err == nil {
				return addr
			}
			time.Sleep(20 * time.Millisecond) // redis-server is starting: poll again
		}
	}
	t.Fatal("redis-server did not start")
	return ""
}

// exchange sends p on a new connection to addr in one write and returns every byte that comes back until
// the connection is closed, or until the reply to a final ECHO of marker shows the connection still serves.
func exchange(t *testing.T, addr string, p []byte, marker string) (reply []byte, closed bool) {
	t.Helper()
	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	go c.Write(p) // a large p may fill the socket buffers before the peer gives up reading
	c.SetReadDeadline(time.Now().Add(10 * time.Second))
	want := []byte(bulk(marker))
	buf := make([]byte, 4096)
	for {
		n, err := c.Read(buf)
		reply = append(reply, buf[:n]...)
		if bytes.HasSuffix(reply, want) {
			return reply, false
		}
		if err != nil {
			if errors.Is(err, os.ErrDeadlineExceeded) {
				t.Fatalf("%s: no close and no marker within 10s; got %q", addr, reply)
			}
			return reply, true // EOF, or a reset after redis closed with unread input
		}
	}
}

// Malformed commands get redis's own answer, byte for byte: the replies to the commands before, then the
// protocol error, then the connection is closed (or, for what redis ignores, nothing and the connection
// serves on). Other clients don't notice.
func TestMalformedInputLikeRedis(t *testing.T) {
	const maxBulk = 1 << 20 // redis's smallest proto-max-bulk-len
	direct := plainRedis(t, "--proto-max-bulk-len", strconv.Itoa(maxBulk))
	f := newFixture(t, fixtureOpts{proxyOpt: func(o *proxy.Options) { o.MaxBulk = maxBulk }})
	ctx := t.Context()
	other := f.client(t, 3)
	otherID, err := other.ClientID(ctx).Result()
	if err != nil {
		t.Fatal(err)
	}

	long := strings.Repeat("a", 70<<10)
	digits := strings.Repeat("1", 70<<10)
	cases := []struct {
		desc    string
		bad     string // followed by an ECHO unless it ends a line
		wantErr string // redis's error, checked too so that a case cannot pass by both sides misbehaving alike
	}{
		{"multibulk count beyond int32", "*3000000000\r\n", "invalid multibulk length"},
		{"multibulk count not a number", "*abc\r\n", "invalid multibulk length"},
		{"negative multibulk count is ignored", "*-10\r\n", ""},
		{"zero multibulk count is ignored", "*0\r\n", ""},
		{"integer instead of bulk", "*1\r\n:5\r\n", "expected '$', got ':'"},
		{"negative bulk length", "*1\r\n$-5\r\n", "invalid bulk length"},
		{"absurd bulk length", "*1\r\n$99999999999999999\r\n", "invalid bulk length"},
		{"bulk length not a number", "*1\r\n$x\r\n", "invalid bulk length"},
		{"bulk over the max", fmt.Sprintf("*2\r\n$4\r\nECHO\r\n$%d\r\n", maxBulk+1), "invalid bulk length"},
		{"multibulk count line over 64 KiB", "*" + digits, "too big mbulk count string"},
		{"bulk length line over 64 KiB", "*1\r\n$" + digits, "too big bulk count string"},
		{"inline line over 64 KiB", long, "too big inline request"},
		{"unbalanced quotes", "SET k \"v\r\n", "unbalanced quotes in request"},
		{"unbalanced single quotes", "SET k 'v\r\n", "unbalanced quotes in request"},
		{"closing quote not followed by space", "SET k \"v\"x\r\n", "unbalanced quotes in request"},
	}
	for i, tc := range cases {
		t.Run(tc.desc, func(t *testing.T) {
			marker := "still-serving-" + strconv.Itoa(i)
			var p []byte
			p = resp.AppendCommand(p, "SET", "bad:before", strconv.Itoa(i))
			p = resp.AppendCommand(p, "GET", "bad:before")
			p = append(p, tc.bad...)
			if strings.HasSuffix(tc.bad, "\n") {
				// (After an unterminated line, redis's answer would depend on how its reads split the input.)
				p = resp.AppendCommand(p, "ECHO", marker)
			}

			want, wantClosed := exchange(t, direct, p, marker)
			got, gotClosed := exchange(t, f.addr, p, marker)
			if string(got) != string(want) || gotClosed != wantClosed {
				t.Errorf("through the proxy: %q (closed %v)\nredis-server:      %q (closed %v)",
					trunc(got), gotClosed, trunc(want), wantClosed)
			}
			prefix := "+OK\r\n" + bulk(strconv.Itoa(i))
			switch {
			case tc.wantErr == "" && string(want) != prefix+bulk(marker):
				t.Errorf("redis-server answered %q; the test expects it to ignore the input", trunc(want))
			case tc.wantErr != "" && string(want) != prefix+"-ERR Protocol error: "+tc.wantErr+"\r\n":
				t.Errorf("redis-server answered %q; the test expects %q", trunc(want), tc.wantErr)
			}
			if id, err := other.ClientID(ctx).Result(); err != nil || id != otherID {
				t.Errorf("other client: CLIENT ID = %d, %v; want %d (unaffected)", id, err, otherID)
			}
		})
	}
}

func trunc(b []byte) string {
	if len(b) > 300 {
		return string(b[:300]) + fmt.Sprintf("...(%d bytes)", len(b))
	}
	return string(b)
}

// heapWatch samples the heap until stopped and reports the highest HeapInuse and Sys it saw.
type heapWatch struct {
	stop      chan struct{}
	done      chan struct{}
	peakInuse uint64
	peakSys   uint64
}

func watchHeap() *heapWatch {
	h := &heapWatch{stop: make(chan struct{}), done: make(chan struct{})}
	go func() {
		defer close(h.done)
		tick := time.NewTicker(20 * time.Millisecond)
		defer tick.Stop()
		for {
			var ms runtime.MemStats
			runtime.ReadMemStats(&ms)
			h.peakInuse, h.peakSys = max(h.peakInuse, ms.HeapInuse), max(h.peakSys, ms.Sys)
			select {
			case <-h.stop:
				return
			case <-tick.C:
			}
		}
	}()
	return h
}

func (h *heapWatch) end() {
	close(h.stop)
	<-h.done
}

func heapNow() (inuse, sys uint64) {
	runtime.GC()
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	return ms.HeapInuse, ms.Sys
}

// repeatReader yields n bytes of a repeated pattern without holding them.
type repeatReader struct {
	chunk []byte
	pos   int // where in chunk the next byte comes from
	left  int64
}

func (r *repeatReader) Read(p []byte) (int, error) {
	if r.left == 0 {
		return 0, io.EOF
	}
	n := 0
	for n < len(p) && r.left > 0 {
		k := copy(p[n:], r.chunk[r.pos:])
		if int64(k) > r.left {
			k = int(r.left)
		}
		n += k
		r.left -= int64(k)
		r.pos = (r.pos + k) % len(r.chunk)
	}
	return n, nil
}

// Values up to the bound pass whole, and the proxy streams them: for the largest its heap grows by a small
// part of the value's size, never by a copy of it.
func TestLargeValueStreams(t *testing.T) {
	huge := int64(400 << 20)
	if raceEnabled {
		huge = 64 << 20
	}
	f := newFixture(t, fixtureOpts{})
	chunk := bytes.Repeat([]byte("0123456789abcdef"), 4096)
	for _, size := range []int64{17 << 10, 1 << 20, huge} {
		t.Run(fmt.Sprintf("%d KiB", size>>10), func(t *testing.T) {
			r := f.raw(t)
			r.send("PING")
			r.expect("+PONG\r\n")
			baseInuse, baseSys := heapNow()
			watch := watchHeap()
			start := time.Now()
			r.c.SetWriteDeadline(time.Now().Add(2 * time.Minute))
			w := bufio.NewWriterSize(r.c, 64<<10)
			fmt.Fprintf(w, "*3\r\n$3\r\nSET\r\n$5\r\nlarge\r\n$%d\r\n", size)
			if _, err := io.Copy(w, &repeatReader{chunk: chunk, left: size}); err != nil {
				watch.end()
				t.Fatal(err)
			}
			w.WriteString("\r\n")
			if err := w.Flush(); err != nil {
				watch.end()
				t.Fatal(err)
			}
			r.c.SetReadDeadline(time.Now().Add(2 * time.Minute))
			if line, err := r.r.ReadString('\n'); err != nil || line != "+OK\r\n" {
				watch.end()
				t.Fatalf("SET of %d bytes: %q, %v", size, line, err)
			}
			setTime := time.Since(start)

			r.send("GET large")
			line, err := r.r.ReadString('\n')
			if err != nil || line != fmt.Sprintf("$%d\r\n", size) {
				watch.end()
				t.Fatalf("GET: header %q, %v; want a bulk of %d bytes", line, err, size)
			}
			// Compare as it arrives: the test must not hold the value either.
			want := &repeatReader{chunk: chunk, left: size}
			got, exp := make([]byte, 64<<10), make([]byte, 64<<10)
			for left := size; left > 0; {
				n, err := r.r.Read(got[:min(int64(len(got)), left)])
				if err != nil {
					watch.end()
					t.Fatalf("GET: %v after %d bytes", err, size-left)
				}
				io.ReadFull(want, exp[:n])
				if !bytes.Equal(got[:n], exp[:n]) {
					watch.end()
					t.Fatalf("GET: value differs at offset about %d", size-left)
				}
				left -= int64(n)
			}
			r.expect("\r\n")
			watch.end()
			t.Logf("%d KiB: SET %v, SET+GET %v; heap in use %d -> peak %d MiB, sys %d -> peak %d MiB", size>>10,
				setTime.Round(time.Millisecond), time.Since(start).Round(time.Millisecond),
				baseInuse>>20, watch.peakInuse>>20, baseSys>>20, watch.peakSys>>20)
			if size < 64<<20 {
				return
			}
			// A streaming proxy holds buffers of kilobytes; one copy of the value would be size.
			if grew := int64(watch.peakInuse) - int64(baseInuse); grew > size/8 {
				t.Errorf("heap in use grew by %d MiB while passing a %d MiB value: the proxy buffers it", grew>>20, size>>20)
			}
			if grew := int64(watch.peakSys) - int64(baseSys); grew > size/4 {
				t.Errorf("memory from the OS grew by %d MiB while passing a %d MiB value", grew>>20, size>>20)
			}
		})
	}
}

// A pipeline of many small commands with one 10 MiB value among them gets every reply, in order.
func TestPipelineWithLargeValue(t *testing.T) {
	f := newFixture(t, fixtureOpts{})
	r := f.raw(t)
	big := strings.Repeat("x", 10<<20)
	const n = 2000
	var p []byte
	var want strings.Builder
	for i := range n {
		k := "pipe:" + strconv.Itoa(i)
		if i == n/2 {
			p = resp.AppendCommand(p, "SET", "pipe:big", big)
			p = resp.AppendCommand(p, "STRLEN", "pipe:big")
			want.WriteString("+OK\r\n:" + strconv.Itoa(len(big)) + "\r\n")
		}
		p = resp.AppendCommand(p, "SET", k, strconv.Itoa(i))
		p = resp.AppendCommand(p, "INCR", k)
		want.WriteString("+OK\r\n:" + strconv.Itoa(i+1) + "\r\n")
	}
	p = resp.AppendCommand(p, "GET", "pipe:big")
	want.WriteString(bulk(big))

	var wg sync.WaitGroup
	wg.Add(1)
	var werr error
	go func() { // write while reading, as a pipelining client does
		defer wg.Done()
		r.c.SetWriteDeadline(time.Now().Add(time.Minute))
		_, werr = r.c.Write(p)
	}()
	r.c.SetReadDeadline(time.Now().Add(time.Minute))
	got := make([]byte, want.Len())
	_, err := io.ReadFull(r.r, got)
	wg.Wait()
	if werr != nil || err != nil {
		t.Fatalf("write: %v; read: %v", werr, err)
	}
	if string(got) != want.String() {
		i := 0
		for i < len(got) && got[i] == want.String()[i] {
			i++
		}
		t.Fatalf("replies differ at byte %d: got %q, want %q", i, trunc(got[i:]), trunc([]byte(want.String()[i:])))
	}
	// The connection serves on.
	r.send("PING")
	r.expect("+PONG\r\n")
}

// A client that sends its commands and then half-closes the connection still gets every reply, as with
// redis-server (e.g. `redis-cli < file`, or printf ... | nc).
func TestHalfCloseGetsReplies(t *testing.T) {
	f := newFixture(t, fixtureOpts{})
	for i := range 20 {
		t.Run(strconv.Itoa(i), func(t *testing.T) {
			r := f.raw(t)
			r.send("SET half "+strconv.Itoa(i), "GET half", "PING")
			if err := r.c.(*net.TCPConn).CloseWrite(); err != nil {
				t.Fatal(err)
			}
			r.c.SetReadDeadline(time.Now().Add(10 * time.Second))
			got, err := io.ReadAll(r.r)
			if want := "+OK\r\n" + bulk(strconv.Itoa(i)) + "+PONG\r\n"; err != nil || string(got) != want {
				t.Fatalf("read %q, %v; want %q", got, err, want)
			}
		})
	}
}

// SYNC, PSYNC and REPLCONF would turn the connection into a replication stream, which cannot be framed as
// replies: the proxy answers each with an error saying so, and the connection stays usable.
func TestReplicationCommandsRefused(t *testing.T) {
	f := newFixture(t, fixtureOpts{})
	r := f.raw(t)
	r.send("SYNC", "psync ? -1", "REPLCONF listening-port 6380", "PING")
	var want string
	for _, name := range []string{"SYNC", "PSYNC", "REPLCONF"} {
		want += "-ERR entra-redis-proxy: " + name + " is not supported through the proxy (replication cannot be proxied; Azure Cache for Redis refuses it too)\r\n"
	}
	r.expect(want + "+PONG\r\n")
}
