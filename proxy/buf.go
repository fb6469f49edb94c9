package proxy

import (
	"errors"
	"net"
	"sync"
)

// errBufferFull means a caller read again without consuming or growing a full buffer: a bug, not input.
var errBufferFull = errors.New("proxy: read buffer full")

const (
	smallBufSize = 512      // what a quiet connection holds per direction
	bigBufSize   = 16 << 10 // borrowed from a pool while data flows
)

var bigBufs = sync.Pool{New: func() any { b := make([]byte, bigBufSize); return &b }}

// readBuf is one direction's read buffer. A quiet connection reads into a small buffer; once a read fills it,
// the connection borrows a large one from a pool, and gives it back as soon as everything read was handled.
// That keeps thousands of idle connections cheap without slowing busy ones.
type readBuf struct {
	buf   []byte  // buf[r:w] is read but not yet handled
	big   *[]byte // the pooled buffer while borrowed
	small [smallBufSize]byte
	r, w  int
	// filled reports that the last read filled the buffer: the peer is sending in bulk.
	filled bool
}

// readFrom reads once from c after making room.
func (b *readBuf) readFrom(c net.Conn) (int, error) {
	if b.buf == nil {
		b.buf = b.small[:]
	}
	if b.r == b.w {
		b.r, b.w = 0, 0
		switch {
		case b.filled && len(b.buf) < bigBufSize:
			// The last read filled the buffer: more is waiting, read it in large chunks.
			b.big = bigBufs.Get().(*[]byte)
			b.buf = *b.big
		case b.filled:
		case b.big != nil:
			bigBufs.Put(b.big)
			b.big, b.buf = nil, b.small[:]
		case len(b.buf) > bigBufSize:
			b.buf = b.small[:] // an oversized buffer is dropped once it is drained
		}
	}
	if b.w == len(b.buf) {
		b.makeRoom()
		if b.w == len(b.buf) {
			return 0, errBufferFull
		}
	}
	n, err := c.Read(b.buf[b.w:])
	b.w += n
	b.filled = b.w == len(b.buf)
	return n, err
}

// makeRoom moves unhandled bytes to the front, or moves them to a pooled buffer when they fill the small one.
func (b *readBuf) makeRoom() {
	if b.r > 0 {
		b.w = copy(b.buf, b.buf[b.r:b.w])
		b.r = 0
		return
	}
	if len(b.buf) < bigBufSize {
		b.big = bigBufs.Get().(*[]byte)
		b.w = copy(*b.big, b.buf[:b.w])
		b.buf = *b.big
	}
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
