package azurefake

import (
	"bytes"
	"crypto/tls"
	"fmt"
	"net"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/entra-redis-proxy/entra-redis-proxy/resp"
)

// Relay is a RESP relay in front of a redis-server of the Env, playing what stands between a client and
// Azure's redis: a Redis Enterprise endpoint that sends maintenance notifications (Azure Managed Redis),
// or Azure's load balancer, which a failover points at another node. It terminates TLS with the Env's
// server certificate and reaches its target over TLS, so a client sees the cache's certificate either way.
//
// It answers CLIENT MAINT_NOTIFICATIONS as Redis Enterprise does (+OK), by sending the target a command
// with the same reply (CLIENT REPLY ON), so the reply keeps its place among the others; Push sends a
// notification to every connection that turned them on, between two whole replies.
type Relay struct {
	Addr string // "127.0.0.1:port" to dial

	env     *Env
	ln      net.Listener
	tlsConf *tls.Config
	optedIn chan struct{} // told each time a connection turns notifications on
	dialed  atomic.Int64  // connections made to the relay, in all

	mu     sync.Mutex
	target string
	conns  map[*relayConn]struct{}
	closed bool
	wg     sync.WaitGroup // accept loop and each connection's two pumps
}

// relayConn is one client connection and its connection to the target.
type relayConn struct {
	client, up net.Conn
	wmu        sync.Mutex // the client's write side: whole replies and pushes, never interleaved
	notify     atomic.Bool
}

// relayMaxFrame bounds a frame the relay buffers whole.
const relayMaxFrame = 64 << 20

// StartRelay starts a Relay forwarding to target (a TLS address of this Env's servers).
func (e *Env) StartRelay(target string) (*Relay, error) {
	cert, err := tls.LoadX509KeyPair(e.path("server.pem"), e.path("server-key.pem"))
	if err != nil {
		return nil, fmt.Errorf("relay: server certificate: %w", err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, fmt.Errorf("relay: listen: %w", err)
	}
	r := &Relay{Addr: ln.Addr().String(), env: e, ln: ln, target: target, conns: map[*relayConn]struct{}{},
		tlsConf: &tls.Config{Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS12},
		optedIn: make(chan struct{}, 64)}
	r.wg.Add(1)
	go r.accept()
	return r, nil
}

// SetTarget makes new connections go to addr; open ones stay where they are (CloseConns closes them).
func (r *Relay) SetTarget(addr string) {
	r.mu.Lock()
	r.target = addr
	r.mu.Unlock()
}

// OptedIn is told each time a connection turns notifications on.
func (r *Relay) OptedIn() <-chan struct{} { return r.optedIn }

// Dialed returns how many connections were made to the relay so far.
func (r *Relay) Dialed() int64 { return r.dialed.Load() }

// Push sends a RESP3 push of args to every connection that turned notifications on, between two whole
// replies: an int is an integer, a string a bulk string, nil a null. It returns how many got it.
func (r *Relay) Push(args ...any) int {
	frame := []byte(">" + strconv.Itoa(len(args)) + "\r\n")
	for _, a := range args {
		switch v := a.(type) {
		case int:
			frame = append(frame, ":"+strconv.Itoa(v)+"\r\n"...)
		case string:
			frame = append(frame, "$"+strconv.Itoa(len(v))+"\r\n"+v+"\r\n"...)
		case nil:
			frame = append(frame, "_\r\n"...)
		default:
			panic(fmt.Sprintf("relay: push element %T", a))
		}
	}
	n := 0
	for _, c := range r.snapshot() {
		if !c.notify.Load() {
			continue
		}
		c.wmu.Lock()
		c.client.SetWriteDeadline(time.Now().Add(5 * time.Second))
		_, err := c.client.Write(frame)
		c.client.SetWriteDeadline(time.Time{})
		c.wmu.Unlock()
		if err == nil {
			n++
		}
	}
	return n
}

// CloseConns closes every open connection, as a node going away does, and returns how many there were.
func (r *Relay) CloseConns() int {
	cs := r.snapshot()
	for _, c := range cs {
		c.close()
	}
	return len(cs)
}

// Close stops the relay, closes its connections, and waits for its goroutines.
func (r *Relay) Close() error {
	r.mu.Lock()
	r.closed = true
	r.mu.Unlock()
	err := r.ln.Close()
	r.CloseConns()
	r.wg.Wait()
	return err
}

func (r *Relay) snapshot() []*relayConn {
	r.mu.Lock()
	defer r.mu.Unlock()
	cs := make([]*relayConn, 0, len(r.conns))
	for c := range r.conns {
		cs = append(cs, c)
	}
	return cs
}

func (r *Relay) accept() {
	defer r.wg.Done()
	for {
		raw, err := r.ln.Accept()
		if err != nil {
			return // closed
		}
		r.dialed.Add(1)
		r.wg.Add(1)
		go r.serve(raw)
	}
}

// serve connects one client to the target and runs the two pumps until either side closes.
func (r *Relay) serve(raw net.Conn) {
	defer r.wg.Done()
	client := tls.Server(raw, r.tlsConf)
	r.mu.Lock()
	target := r.target
	r.mu.Unlock()
	d := tls.Dialer{NetDialer: &net.Dialer{Timeout: 5 * time.Second}, Config: r.env.ClientTLSConfig()}
	up, err := d.Dial("tcp", target)
	if err != nil {
		raw.Close()
		return
	}
	c := &relayConn{client: client, up: up}
	r.mu.Lock()
	if r.closed {
		r.mu.Unlock()
		c.close()
		return
	}
	r.conns[c] = struct{}{}
	r.mu.Unlock()
	done := make(chan struct{})
	go func() {
		defer close(done)
		c.commands(r.optedIn)
		c.close()
	}()
	c.replies()
	c.close()
	<-done
	r.mu.Lock()
	delete(r.conns, c)
	r.mu.Unlock()
}

func (c *relayConn) close() {
	c.client.Close()
	c.up.Close()
}

// commands forwards the client's commands, answering CLIENT MAINT_NOTIFICATIONS (see Relay).
func (c *relayConn) commands(optedIn chan<- struct{}) {
	var p resp.CommandParser
	var buf []byte
	chunk := make([]byte, 32<<10)
	for {
		n, err := c.client.Read(chunk)
		buf = append(buf, chunk[:n]...)
		var out []byte
		for {
			cmd, k, perr := p.Parse(buf)
			if perr != nil {
				break // incomplete (a protocol error: the target answers it once forwarded as is)
			}
			if a := cmd.Args; len(a) >= 3 && bytes.EqualFold(a[0], []byte("client")) &&
				bytes.EqualFold(a[1], []byte("maint_notifications")) {
				on := bytes.EqualFold(a[2], []byte("on"))
				c.notify.Store(on)
				out = resp.AppendCommand(out, "CLIENT", "REPLY", "ON") // +OK, in its place
				if on {
					select {
					case optedIn <- struct{}{}:
					default:
					}
				}
			} else {
				out = append(out, cmd.Raw...)
			}
			buf = buf[k:]
		}
		if len(buf) > relayMaxFrame {
			return
		}
		if len(out) > 0 {
			if _, werr := c.up.Write(out); werr != nil {
				return
			}
		}
		if err != nil {
			return
		}
	}
}

// replies forwards the target's replies whole, so that a push never lands inside one.
func (c *relayConn) replies() {
	var sc resp.Scanner
	sc.MaxBulk = relayMaxFrame
	var buf []byte
	pos, end := 0, 0 // buf[:end] is whole frames; buf[end:pos] scanned of the next one
	chunk := make([]byte, 32<<10)
	for {
		n, err := c.up.Read(chunk)
		buf = append(buf, chunk[:n]...)
		for pos < len(buf) {
			k, done, serr := sc.Scan(buf[pos:])
			if serr != nil {
				return
			}
			pos += k
			if !done {
				break
			}
			end = pos
		}
		if end > 0 {
			c.wmu.Lock()
			_, werr := c.client.Write(buf[:end])
			c.wmu.Unlock()
			if werr != nil {
				return
			}
			buf = append(buf[:0], buf[end:]...)
			pos -= end
			end = 0
		}
		if len(buf) > relayMaxFrame || err != nil {
			return
		}
	}
}
