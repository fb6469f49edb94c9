//go:build unix

package proxy

import (
	"net"
	"syscall"
)

// rawConnOf returns c's socket when c reads straight from one (TCP, Unix), else nil.
func rawConnOf(c net.Conn) syscall.RawConn {
	sc, ok := c.(syscall.Conn)
	if !ok {
		return nil
	}
	rc, err := sc.SyscallConn()
	if err != nil {
		return nil
	}
	return rc
}

// readFD reads once from a non-blocking socket (Go's sockets are), retrying an interrupted read.
func readFD(fd uintptr, p []byte) (int, error) {
	for {
		n, err := syscall.Read(int(fd), p)
		if err == syscall.EINTR {
			continue
		}
		return max(n, 0), err
	}
}
