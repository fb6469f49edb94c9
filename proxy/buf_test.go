package proxy

import (
	"bytes"
	"errors"
	"io"
	"net"
	"os"
	"testing"
	"time"
)

// tcpPair returns both ends of a loopback TCP connection.
func tcpPair(t *testing.T) (local, peer net.Conn) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	peer, err = net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	local, err = ln.Accept()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { local.Close(); peer.Close() })
	return local, peer
}

// batch is n bytes of a recognisable pattern; seq tells batches apart.
func batch(n int, seq byte) []byte {
	p := make([]byte, n)
	for i := range p {
		p[i] = 'a' + (seq+byte(i))%26
	}
	return p
}

// readBatch reads until want is in b (handling nothing) and returns how many reads it took.
func readBatch(t *testing.T, b *readBuf, c net.Conn, want []byte) int {
	t.Helper()
	c.SetReadDeadline(time.Now().Add(10 * time.Second))
	reads := 0
	for b.w-b.r < len(want) {
		if _, err := b.readFrom(c); err != nil {
			t.Fatalf("read %d: %v", reads+1, err)
		}
		reads++
	}
	if got := b.buf[b.r:b.w]; !bytes.Equal(got, want) {
		t.Fatalf("buffer holds %q, want %q", got, want)
	}
	return reads
}

func write(t *testing.T, c net.Conn, p []byte) {
	t.Helper()
	if _, err := c.Write(p); err != nil {
		t.Fatal(err)
	}
}

// A pipelined batch larger than the small buffer is read into a large one in one piece from the second batch
// on, the large buffer is given back while the connection waits for input, and once batches get small the
// connection reads into the small buffer again.
func TestReadBufSocketPolicy(t *testing.T) {
	local, peer := tcpPair(t)
	var b readBuf
	defer b.release()
	var waits []bool // at each wait: did the buffer hold only the small one?
	var next []byte  // written by the peer when the read waits, so that every read waits first
	b.waiting = func() {
		waits = append(waits, b.isSmall() && b.big == nil)
		if next != nil {
			write(t, peer, next)
			next = nil
		}
	}

	// The first batch finds the small buffer: it fills it, and the rest is read into a large buffer, with
	// the partial command moved there rather than compacted.
	first := batch(720, 0)
	write(t, peer, first)
	if n := readBatch(t, &b, local, first); n != 2 {
		t.Errorf("first batch: %d reads, want 2 (the small buffer, then a large one)", n)
	}
	if b.isSmall() {
		t.Errorf("first batch: still in the small buffer")
	}
	b.r = b.w // handled

	// Batches of the same size are read in one read each, into a large buffer borrowed after each wait.
	for i := range 3 {
		next = batch(720, byte(i+1))
		if n := readBatch(t, &b, local, next); n != 1 {
			t.Errorf("batch %d: %d reads, want 1", i+2, n)
		}
		b.r = b.w
	}

	// Small batches: the next read after a small one is into the small buffer.
	for i := range 2 {
		next = batch(100, byte(i))
		readBatch(t, &b, local, next)
		b.r = b.w
	}
	if !b.isSmall() {
		t.Errorf("after small batches the buffer holds %d bytes, want the small one", len(b.buf))
	}
	for i, small := range waits {
		if !small {
			t.Errorf("wait %d: a large buffer was held while waiting for input", i+1)
		}
	}
	if len(waits) != 5 {
		t.Errorf("%d waits, want 5 (one before each batch but the first)", len(waits))
	}
}

// An idle connection holding the start of a command keeps it in the small buffer if it fits, and in the
// large one otherwise; the bytes survive either way.
func TestReadBufSocketPartialWhileIdle(t *testing.T) {
	for _, tc := range []struct {
		name      string
		unhandled int // of 2000 bytes read
		wantSmall bool
	}{
		{"fits", 300, true},
		{"does not fit", 1500, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			local, peer := tcpPair(t)
			var b readBuf
			defer b.release()
			p := batch(2000, 0)
			write(t, peer, p)
			readBatch(t, &b, local, p)
			b.r = b.w - tc.unhandled
			var small []bool
			more := batch(10, 1)
			b.waiting = func() {
				small = append(small, b.isSmall())
				write(t, peer, more)
			}
			local.SetReadDeadline(time.Now().Add(10 * time.Second))
			if _, err := b.readFrom(local); err != nil {
				t.Fatal(err)
			}
			if len(small) != 1 || small[0] != tc.wantSmall {
				t.Errorf("waits in the small buffer: %v, want [%v]", small, tc.wantSmall)
			}
			if want := append(p[len(p)-tc.unhandled:len(p):len(p)], more...); !bytes.Equal(b.buf[b.r:b.w], want) {
				t.Errorf("buffer holds %d bytes, want the %d unhandled and the 10 new ones", b.w-b.r, tc.unhandled)
			}
		})
	}
}

// Errors from a socket read directly look like net.Conn.Read's: io.EOF, a deadline, net.ErrClosed.
func TestReadBufSocketErrors(t *testing.T) {
	local, peer := tcpPair(t)
	var b readBuf
	defer b.release()
	local.SetReadDeadline(time.Now().Add(-time.Second))
	if _, err := b.readFrom(local); !errors.Is(err, os.ErrDeadlineExceeded) {
		t.Errorf("past deadline: %v, want a deadline error", err)
	}
	local.SetReadDeadline(time.Now().Add(10 * time.Second))
	peer.Close()
	if _, err := b.readFrom(local); err != io.EOF {
		t.Errorf("peer closed: %v, want io.EOF", err)
	}
	local.Close()
	if _, err := b.readFrom(local); !errors.Is(err, net.ErrClosed) {
		t.Errorf("closed: %v, want net.ErrClosed", err)
	}
}

// Where a read can't be seen to wait (TLS, pipes), a batch that fills the small buffer moves to a large one
// without compaction, and the large buffer is kept only while reads fill it.
func TestReadBufPipePolicy(t *testing.T) {
	local, peer := net.Pipe()
	defer local.Close()
	defer peer.Close()
	var b readBuf
	defer b.release()
	first := batch(720, 0)
	go peer.Write(first)
	if n := readBatch(t, &b, local, first); n != 2 {
		t.Errorf("%d reads, want 2 (the small buffer, then a large one)", n)
	}
	if b.isSmall() {
		t.Errorf("the rest of the batch was not read into a large buffer")
	}
	b.r = b.w
	second := batch(100, 1)
	go peer.Write(second)
	readBatch(t, &b, local, second)
	if !b.isSmall() || b.big != nil {
		t.Errorf("after a read that did not fill it, the large buffer is kept")
	}
}

// On TLS, a batch that fills the small buffer is one record whose rest is decrypted already: readNow takes
// it into a large buffer at once, without waiting. With nothing more there it returns nothing at once, and
// the connection's read deadline is back as it was: the next read waits for input.
func TestReadBufTLSReadNow(t *testing.T) {
	cli, srv := socketPair(t, true, selfSignedCert(t))
	pingPong(t, cli, srv) // takes what a TLS 1.3 server sends after the handshake
	var b readBuf
	defer b.release()
	first := batch(900, 0)
	write(t, srv, first) // one write: one record
	if n, err := b.readFrom(cli); err != nil || n != smallBufSize {
		t.Fatalf("first read: %d bytes, %v; want the small buffer filled", n, err)
	}
	if n, err := b.readNow(cli, time.Time{}); err != nil || n != len(first)-smallBufSize {
		t.Fatalf("readNow: %d bytes, %v; want the rest of the record", n, err)
	}
	if got := b.buf[b.r:b.w]; !bytes.Equal(got, first) || b.isSmall() {
		t.Fatalf("buffer (small: %v) holds %q, want the whole batch in a large buffer", b.isSmall(), got)
	}
	if n, err := b.readNow(cli, time.Time{}); err != nil || n != 0 {
		t.Fatalf("readNow with nothing sent: %d bytes, %v; want 0, nil", n, err)
	}
	b.r = b.w
	second := batch(100, 1)
	go srv.Write(second)
	// No deadline set here: a deadline readNow left in the past would fail this read at once.
	if n, err := b.readFrom(cli); err != nil || !bytes.Equal(b.buf[b.r:b.w], second) {
		t.Fatalf("the read after readNow: %d bytes, %v; want the next batch", n, err)
	}
}
