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
	"strconv"
	"testing"
	"time"
)

// TestRedisConformance sends raw client input to a real redis-server and checks that what it answers,
// and whether it closes the connection, is what Parse predicts (evaluating PING and ECHO itself).
//
// One known difference is left out: Redis accepts an inline line longer than 64 KiB when its end arrives
// in the same read as its 64th KiB, and Parse never does (see the package doc).
func TestRedisConformance(t *testing.T) {
	sock := startRedis(t)
	inputs := []string{
		"*1\r\n$4\r\nPING\r\n*2\r\n$4\r\nECHO\r\n$5\r\na\r\n\x00b\r\n",
		"*2\r\n$4\r\nECHO\r\n$0\r\n\r\n",
		"*1\r\n$4\r\nPINGXY*1\r\n$4\r\nPING\r\n",
		"*1\rX$4\r\nPING\r\n",
		"*1\r\n$4\rYPING\r\n",
		"*0\r\n*-10\r\n*-1\r\n*-9223372036854775808\r\n*1\r\n$4\r\nPING\r\n",
		"*2147483647\r\n",
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
			got, closed := exchange(t, sock, []byte(in), len(want), wantClosed)
			if !bytes.Equal(got, want) || closed != wantClosed {
				t.Fatalf("input %.80q:\nredis-server: %.200q, closed %v\nours:         %.200q, closed %v", in, got, closed, want, wantClosed)
			}
		})
	}
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

// exchange writes in on a new connection and returns what comes back: until the server closes the
// connection when closing is expected, else want bytes and then nothing for a short quiet period.
func exchange(t *testing.T, sock string, in []byte, want int, wantClosed bool) ([]byte, bool) {
	c, err := net.Dial("unix", sock)
	if err != nil {
		t.Fatalf("dial redis-server: %v", err)
	}
	defer c.Close()
	if err := c.SetDeadline(time.Now().Add(10 * time.Second)); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Write(in); err != nil {
		t.Fatalf("write: %v", err)
	}
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
