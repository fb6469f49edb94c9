package proxy

import (
	"errors"
	"fmt"
	"net"
	"time"

	"github.com/entra-redis-proxy/entra-redis-proxy/resp"
)

// Password guessing against LOCAL_PASSWORD: the answer to each wrong password on a connection comes later
// than the one before (the first at once, then after authFailDelay, doubling up to maxAuthFailDelay), and
// the MaxAuthFailures-th is answered at once and closes the connection.
const (
	MaxAuthFailures  = 5 // wrong passwords a client connection may give; the last is answered, then it closes
	authFailDelay    = 100 * time.Millisecond
	maxAuthFailDelay = time.Second
	// preAuthBuf bounds the buffer before AUTH: Redis reads at most 10 arguments of 16 KiB there.
	preAuthBuf = 256 << 10
)

var errTooManyAuthFailures = errors.New("too many wrong LOCAL_PASSWORD attempts")

const (
	noAuth      = "-NOAUTH Authentication required.\r\n"
	noAuthHello = "-NOAUTH HELLO must be called with the client already authenticated, otherwise the HELLO <proto> AUTH <user> <pass> option can be used to authenticate the client and select the RESP protocol version at the same time\r\n"
)

// preAuth serves a client that must give LOCAL_PASSWORD, before any upstream is opened for it: what Redis
// lets an unauthenticated client run (AUTH, HELLO with AUTH, QUIT, RESET) is answered here as Redis answers
// it, with Redis's limits on unauthenticated input, and anything else gets NOAUTH. It returns nil once the
// client has authenticated, leaving what follows its AUTH in s.cl.in (a HELLO that authenticates stays
// there too: its reply is the server's).
func (s *session) preAuth() error {
	b := &s.cl.in
	p := resp.CommandParser{MaxBulk: s.srv.opts.MaxBulk, Unauthenticated: true}
	fails := 0
	var out []byte
	for {
		for b.r < b.w {
			cmd, n, pe, err := parseCommand(&p, b)
			if err != nil {
				return err
			}
			if pe != nil {
				s.writeLocal(resp.AppendError(out, "ERR "+pe.Error()))
				s.closeWriteAndWait()
				return fmt.Errorf("client protocol error: %w", pe)
			}
			if n == 0 {
				break
			}
			if len(cmd.Args) == 0 {
				b.r += n
				continue
			}
			args := cmd.Args
			text, wrong := noAuth, false
			switch lookup(args[0]).sp {
			case spAuth:
				text = s.authReply(args)
				if text == authOK {
					b.r += n
					return s.writeLocal(append(out, authOK...))
				}
				wrong = text == wrongPass
			case spHello:
				i := helloAuthAt(args)
				if i > 0 && s.localAuth(args[i+2]) {
					return s.writeLocal(out)
				}
				text, wrong = noAuthHello, false
				if i > 0 {
					text, wrong = wrongPass, true
				}
			case spQuit:
				s.writeLocal(append(out, "+OK\r\n"...))
				s.closeWriteAndWait()
				return errClientQuit
			case spReset:
				text = "+RESET\r\n" // nothing to reset before AUTH
			}
			b.r += n
			if !wrong {
				out = append(out, text...)
				continue
			}
			if fails++; fails >= MaxAuthFailures {
				s.writeLocal(append(out, text...))
				s.srv.obs.ClientRejected("local_auth_closed") // (logged with the address's count: localAuth)
				s.closeWriteAndWait()
				return errTooManyAuthFailures
			}
			if fails > 1 {
				// The answers so far go out first; the wrong password's waits.
				if err := s.writeLocal(out); err != nil {
					return err
				}
				out = out[:0]
				if !s.pause(min(authFailDelay<<(fails-2), maxAuthFailDelay)) {
					return errors.New("session closed")
				}
			}
			out = append(out, text...)
		}
		if err := s.writeLocal(out); err != nil {
			return err
		}
		out = out[:0]
		if b.full() && !b.grow(preAuthBuf) {
			return errors.New("client command before AUTH does not fit the buffer") // the parser bounds it
		}
		n, err := b.readFrom(s.client)
		s.bytesIn.Add(int64(n))
		switch {
		case err == nil:
		case isDeadline(err):
			// A poke. Cleared before the bits are looked at, so that a drain poked meanwhile sets it again.
			s.client.SetReadDeadline(time.Time{})
			if s.pokes.Load()&pokeDrain != 0 {
				s.closeWriteAndWait() // shutting down: everything read was answered
				return errDrained
			} // (other pokes wait for the client loop)
		default:
			return fmt.Errorf("read client: %w", err)
		}
	}
}

// writeLocal writes what the proxy itself answers to the client, while no reply loop does.
func (s *session) writeLocal(p []byte) error {
	if len(p) == 0 {
		return nil
	}
	s.client.SetWriteDeadline(time.Now().Add(s.srv.opts.WriteTimeout))
	n, err := s.client.Write(p)
	s.bytesOut.Add(int64(n))
	if err != nil {
		return fmt.Errorf("write client: %w", err)
	}
	return nil
}

// pause waits d, or less if the session closes (false) or is asked to drain.
func (s *session) pause(d time.Duration) bool {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
	case <-s.wake:
	case <-s.done:
		return false
	}
	return true
}

// clientHost is the client's address without its port, to count wrong passwords per source.
func clientHost(c net.Conn) string {
	a := c.RemoteAddr().String()
	if h, _, err := net.SplitHostPort(a); err == nil {
		return h
	}
	return a
}
