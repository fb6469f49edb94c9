package proxy

import (
	"errors"
	"io"
	"net"
	"os"
	"sync"
	"syscall"
	"time"
)

// errBufferFull means a caller read again without consuming or growing a full buffer: a bug, not input.
var errBufferFull = errors.New("proxy: read buffer full")

const (
	smallBufSize = 512      // what a quiet connection holds per direction
	bigBufSize   = 16 << 10 // borrowed from a pool while data flows
)

var bigBufs = sync.Pool{New: func() any { b := make([]byte, bigBufSize); return &b }}

// readBuf is one direction's read buffer, for one connection. A quiet connection reads into a small buffer.
// A read that fills it means the peer sends in bulk: the connection borrows a large buffer from a pool,
// moving what is not handled yet there rather than compacting, so that a pipelined batch is read, and
// forwarded, in one piece. The large buffer is given back as soon as everything read was handled, except:
//   - on a socket it reads directly (the client's TCP or Unix socket), it is kept from batch to batch while
//     batches are at least smallBufSize, and given back whenever a read would wait: an idle connection holds
//     only the small buffer, however it was used before;
//   - elsewhere (TLS, pipes: nothing tells whether a read will wait) it is kept only while reads fill it,
//     and a read that fills the small buffer is followed at once by one that must not wait (readNow): on
//     TLS the rest of the record is usually decrypted already, so the batch is still handled in one piece.
type readBuf struct {
	buf   []byte  // buf[r:w] is read but not yet handled
	big   *[]byte // the pooled buffer while borrowed
	small [smallBufSize]byte
	r, w  int
	// filled reports that the last read filled the buffer: the peer is sending in bulk.
	filled bool
	// batch counts the bytes read since the buffer was last empty; bulk says the last such batch was at
	// least smallBufSize, so the next one is read into a large buffer.
	batch int
	bulk  bool
	src   rawState
	rc    syscall.RawConn // the socket, when src is rawSocket
	// readSocket's callback and its results.
	onReady func(fd uintptr) bool
	n       int
	rerr    error
	waiting func() // if set (by tests), called on the reading goroutine each time a read is about to wait
}

// rawState says whether a readBuf's connection is a socket it can read directly.
type rawState uint8

const (
	rawUnknown rawState = iota // not looked at yet
	rawNone                    // no socket to read directly: read through net.Conn.Read
	rawSocket
)

// readFrom reads once from c after making room. c must be the same connection at every call.
func (b *readBuf) readFrom(c net.Conn) (int, error) {
	if b.src == rawUnknown {
		b.src, b.rc = rawNone, rawConnOf(c)
		if b.rc != nil {
			b.src = rawSocket
		}
	}
	if b.src == rawSocket {
		return b.readSocket(c)
	}
	b.choose(false)
	if b.w == len(b.buf) {
		return 0, errBufferFull
	}
	n, err := c.Read(b.buf[b.w:])
	b.took(n)
	return n, err
}

// readNow follows a read that filled the small buffer: it moves what waits to a large buffer and reads
// whatever c gives without waiting, through a read deadline in the past (a TLS connection returns what it
// already holds, or fails before any system call), then sets c's read deadline to restore. A deadline error
// is no error here.
func (b *readBuf) readNow(c net.Conn, restore time.Time) (int, error) {
	b.choose(false)
	if b.w == len(b.buf) {
		return 0, nil // the caller grows the buffer or consumes first
	}
	c.SetReadDeadline(pokeTime)
	n, err := c.Read(b.buf[b.w:])
	c.SetReadDeadline(restore)
	b.took(n)
	if isDeadline(err) {
		err = nil
	}
	return n, err
}

// readSocket reads once from c's socket, holding no large buffer while it waits for input.
func (b *readBuf) readSocket(c net.Conn) (int, error) {
	if b.onReady == nil {
		b.onReady = b.readReady // made once: a method value passed on each read would be allocated each time
	}
	b.n, b.rerr = 0, nil
	err := b.rc.Read(b.onReady)
	n, rerr := b.n, b.rerr
	b.rerr = nil
	switch {
	case err != nil: // a deadline, or the connection was closed
		return 0, err
	case rerr == errBufferFull:
		return 0, rerr
	case rerr != nil:
		return 0, &net.OpError{Op: "read", Net: c.LocalAddr().Network(), Source: c.LocalAddr(), Addr: c.RemoteAddr(),
			Err: os.NewSyscallError("read", rerr)}
	case n == 0:
		return 0, io.EOF
	}
	b.took(n)
	return n, nil
}

// readReady is readSocket's step each time the socket may have input: it reads, or, when there is none,
// gives back a large buffer and asks to wait.
func (b *readBuf) readReady(fd uintptr) bool {
	b.choose(true)
	if b.w == len(b.buf) {
		b.rerr = errBufferFull
		return true
	}
	b.n, b.rerr = readFD(fd, b.buf[b.w:])
	if errors.Is(b.rerr, syscall.EAGAIN) || errors.Is(b.rerr, syscall.EWOULDBLOCK) {
		b.n, b.rerr = 0, nil
		b.settle()
		if b.waiting != nil {
			b.waiting()
		}
		return false
	}
	return true
}

// took accounts for a read of n bytes.
func (b *readBuf) took(n int) {
	b.w += n
	b.batch += n
	b.filled = b.w == len(b.buf)
}

// isSmall reports whether buf is the small buffer (or a smaller one a caller set).
func (b *readBuf) isSmall() bool { return len(b.buf) < bigBufSize }

// choose picks the buffer for the next read. With sticky, a bulk connection gets a large buffer even when
// the last read did not fill its buffer.
func (b *readBuf) choose(sticky bool) {
	if b.buf == nil {
		b.buf = b.small[:]
	}
	if b.r == b.w {
		b.r, b.w = 0, 0
		if b.batch > 0 {
			b.bulk, b.batch = b.batch >= smallBufSize, 0
		}
	}
	wantBig := b.filled || (sticky && b.bulk)
	switch {
	case b.r == b.w && !wantBig:
		b.useSmall()
	case b.isSmall() && (wantBig || b.w == len(b.buf)):
		// More is coming: move what waits to a large buffer rather than compacting, so that the rest of
		// the batch is read at once.
		b.borrow()
	case b.w == len(b.buf) && b.r > 0:
		b.w = copy(b.buf, b.buf[b.r:b.w])
		b.r = 0
	}
}

// borrow moves the unhandled bytes to a pooled buffer.
func (b *readBuf) borrow() {
	big := bigBufs.Get().(*[]byte)
	b.w = copy(*big, b.buf[b.r:b.w])
	b.r = 0
	b.big, b.buf = big, *big
}

// useSmall gives back a large buffer (pooled, or grown: dropped) for the small one; the buffer is empty.
func (b *readBuf) useSmall() {
	if b.big != nil {
		bigBufs.Put(b.big)
		b.big = nil
	}
	b.buf, b.r, b.w = b.small[:], 0, 0
}

// settle is called before a read waits: a large buffer is given back if what it holds fits the small one.
func (b *readBuf) settle() {
	if b.isSmall() || b.w-b.r > smallBufSize {
		return
	}
	n := copy(b.small[:], b.buf[b.r:b.w])
	b.useSmall()
	b.w = n
	b.filled = false
}

// full reports whether unhandled bytes fill the buffer: the caller must consume some or grow it.
func (b *readBuf) full() bool { return b.r == 0 && b.w == len(b.buf) && len(b.buf) >= bigBufSize }

// grow doubles a full buffer, up to limit; it reports false at the limit.
func (b *readBuf) grow(limit int) bool {
	if 2*len(b.buf) > limit {
		return false
	}
	nb := make([]byte, 2*len(b.buf))
	b.w = copy(nb, b.buf[b.r:b.w])
	b.r = 0
	if b.big != nil {
		bigBufs.Put(b.big)
		b.big = nil
	}
	b.buf = nb
	return true
}

// release gives a borrowed buffer back.
func (b *readBuf) release() {
	if b.big != nil && len(b.buf) == bigBufSize {
		bigBufs.Put(b.big)
	}
	b.big, b.buf, b.r, b.w = nil, nil, 0, 0
}
