package proxy

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math/big"
	"net"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"testing/synctest"
	"time"

	"github.com/entra-redis-proxy/entra-redis-proxy/resp"
)

// AwaitPool waits until cond holds for the pool's idle upstream CLIENT IDs (most recently returned last) and
// the number of loans still counted against its size. It wakes at each change of the pool, so a test waits
// for the event itself. For the tests of package proxy_test.
func AwaitPool(t testing.TB, s *Server, what string, cond func(idle []int64, lent int) bool) {
	t.Helper()
	timeout := time.NewTimer(10 * time.Second)
	defer timeout.Stop()
	for {
		idle, lent, changed := s.pool.watch()
		if cond(idle, lent) {
			return
		}
		select {
		case <-changed:
		case <-timeout.C:
			t.Fatalf("timed out waiting for the pool to have %s: idle %v, %d lent", what, idle, lent)
		}
	}
}

// fakeUpstream is a scripted redis over net.Pipe: AUTH is +OK, CLIENT ID the connection's number, PING
// pingReply (default +PONG).
type fakeUpstream struct {
	mu        sync.Mutex
	nextID    int64
	ends      map[int64]net.Conn // the server end of each open connection
	dials     int
	pings     int
	gate      chan struct{} // while set, dials wait until it is closed
	pingReply string
}

func (u *fakeUpstream) DialContext(ctx context.Context) (net.Conn, error) {
	u.mu.Lock()
	gate := u.gate
	u.mu.Unlock()
	if gate != nil {
		select {
		case <-gate:
		case <-ctx.Done():
			return nil, ctx.Err()
		}
	}
	cli, srv := net.Pipe()
	u.mu.Lock()
	u.dials++
	u.nextID++
	id := u.nextID
	u.ends[id] = srv
	u.mu.Unlock()
	go u.serve(id, srv)
	return cli, nil
}

func (u *fakeUpstream) serve(id int64, c net.Conn) {
	defer func() {
		c.Close()
		u.mu.Lock()
		delete(u.ends, id)
		u.mu.Unlock()
	}()
	var p resp.CommandParser
	var buf []byte
	tmp := make([]byte, 4096)
	for {
		n, err := c.Read(tmp)
		if err != nil {
			return
		}
		buf = append(buf, tmp[:n]...)
		for {
			cmd, k, err := p.Parse(buf)
			if err != nil {
				break
			}
			buf = buf[k:]
			if len(cmd.Args) == 0 {
				continue
			}
			reply := "-ERR unknown command\r\n"
			switch strings.ToUpper(string(cmd.Args[0])) {
			case "AUTH":
				reply = "+OK\r\n"
			case "CLIENT":
				reply = fmt.Sprintf(":%d\r\n", id)
			case "PING":
				u.mu.Lock()
				u.pings++
				reply = u.pingReply
				u.mu.Unlock()
				if reply == "" {
					reply = "+PONG\r\n"
				}
			}
			if _, err := c.Write([]byte(reply)); err != nil {
				return
			}
		}
	}
}

// kill closes the server end of connections, as CLIENT KILL does.
func (u *fakeUpstream) kill(ids ...int64) {
	u.mu.Lock()
	defer u.mu.Unlock()
	for _, id := range ids {
		u.ends[id].Close()
	}
}

func (u *fakeUpstream) hold() {
	u.mu.Lock()
	u.gate = make(chan struct{})
	u.mu.Unlock()
}

func (u *fakeUpstream) unhold() {
	u.mu.Lock()
	close(u.gate)
	u.gate = nil
	u.mu.Unlock()
}

func (u *fakeUpstream) stats() (dials, open, pings int) {
	u.mu.Lock()
	defer u.mu.Unlock()
	return u.dials, len(u.ends), u.pings
}

// gaugeObserver keeps the upstream_connections gauge and notes if it ever goes negative.
type gaugeObserver struct {
	NopObserver
	opened, closed atomic.Int64
	negative       atomic.Bool
}

func (o *gaugeObserver) UpstreamOpened(time.Duration) { o.opened.Add(1) }
func (o *gaugeObserver) UpstreamClosed() {
	if o.closed.Add(1) > o.opened.Load() {
		o.negative.Store(true)
	}
}

func (o *gaugeObserver) open() int64 { return o.opened.Load() - o.closed.Load() }

// startFakePool runs a Server with a pool of size over a fakeUpstream, in the test's synctest bubble.
func startFakePool(t *testing.T, size int, idlePing time.Duration) (*fakeUpstream, *gaugeObserver, *Server) {
	t.Helper()
	return startFakePoolWith(t, Options{PoolSize: size, PoolMax: size, IdlePing: idlePing})
}

// startFakePoolWith is startFakePool with o's pool and limit settings, and o.Dialer if it is a fakeUpstream.
func startFakePoolWith(t *testing.T, o Options) (*fakeUpstream, *gaugeObserver, *Server) {
	t.Helper()
	up, ok := o.Dialer.(*fakeUpstream)
	if !ok {
		up = &fakeUpstream{ends: map[int64]net.Conn{}}
	}
	obs := &gaugeObserver{}
	o.Tokens, o.Dialer, o.Observer = fixedToken(Token{Username: "oid", Secret: "token"}), up, obs
	o.Logger = slog.New(slog.NewTextHandler(t.Output(), nil))
	srv, err := New(o)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		srv.Close()
		// Connections a failed test still holds: their server ends would keep the bubble from ending.
		up.mu.Lock()
		for _, c := range up.ends {
			c.Close()
		}
		up.mu.Unlock()
		if obs.negative.Load() {
			t.Error("more upstream closes reported than opens")
		}
		if n := obs.open(); n != 0 {
			t.Errorf("%d upstream connections reported open after Close", n)
		}
	})
	return up, obs, srv
}

func wantPool(t *testing.T, srv *Server, idle, lent int) []int64 {
	t.Helper()
	ids, l, _ := srv.pool.watch()
	if len(ids) != idle || l != lent {
		t.Fatalf("pool has %d idle (%v) and %d lent, want %d and %d", len(ids), ids, l, idle, lent)
	}
	return ids
}

func wantDials(t *testing.T, up *fakeUpstream, want int) {
	t.Helper()
	if d, _, _ := up.stats(); d != want {
		t.Fatalf("%d dials, want %d", d, want)
	}
}

// A loan stops counting against the pool after loanWindow: the pool dials a replacement, and takes the
// connection back later only if there is room.
func TestPoolLoanWindow(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		up, obs, srv := startFakePool(t, 2, 0)
		synctest.Wait()
		wantPool(t, srv, 2, 0)
		wantDials(t, up, 2)

		long := srv.pool.get() // a long-lived client's
		time.Sleep(loanWindow - time.Millisecond)
		synctest.Wait()
		wantPool(t, srv, 1, 1) // a young loan still counts: a connect-per-request client brings it back
		wantDials(t, up, 2)
		time.Sleep(time.Millisecond)
		synctest.Wait()
		wantPool(t, srv, 2, 0)
		wantDials(t, up, 3)

		// Back when the pool is full: closed.
		if srv.pool.put(long) {
			t.Fatal("a late return was kept in a full pool")
		}
		synctest.Wait()
		if _, open, _ := up.stats(); open != 2 {
			t.Fatalf("%d upstream connections open, want the 2 idle", open)
		}

		// Back when there is room: kept.
		long = srv.pool.get()
		time.Sleep(loanWindow)
		synctest.Wait()
		wantDials(t, up, 4)
		up.hold()
		gone := srv.pool.get() // a session that closes its connection: room for one
		gone.conn.Close()
		obs.UpstreamClosed()
		synctest.Wait() // the replacement's dial waits at the gate
		if !srv.pool.put(long) {
			t.Fatal("a late return was closed though the pool had room")
		}
		up.unhold()
		synctest.Wait() // the replacement finds the pool full and is closed
		wantDials(t, up, 5)
		if ids := wantPool(t, srv, 2, 0); ids[1] != long.id {
			t.Fatalf("idle %v, want the returned %d last", ids, long.id)
		}
		if _, open, _ := up.stats(); open != 2 || obs.open() != 2 {
			t.Fatalf("%d upstream connections open, %d by the gauge; want 2", open, obs.open())
		}
	})
}

// The pool grows at once when connects find no connection ready, up to its ceiling, holds the size while
// the connect rate keeps it in use, and halves it per quiet window back to POOL_SIZE, closing what it no
// longer needs.
func TestPoolSizedFromConnectRate(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		up, _, srv := startFakePoolWith(t, Options{PoolSize: 2, PoolMax: 8})
		synctest.Wait()
		wantPool(t, srv, 2, 0)

		// A burst of 12 clients: 2 get a connection, 10 find none (and dial their own). The pool grows to
		// its ceiling, 8, not to 2 + 2 lent + 10 missed. Its dials wait at the gate until the burst is
		// over: a burst comes faster than a dial (here they would race the pool's own goroutine).
		up.hold()
		var out []*pooled
		for range 2 {
			out = append(out, srv.pool.get())
		}
		for range 10 {
			if srv.pool.get() != nil {
				t.Fatal("a connection lent from an empty pool")
			}
		}
		up.unhold()
		synctest.Wait()
		wantPool(t, srv, 6, 2)
		for _, c := range out {
			srv.pool.put(c)
		}
		wantPool(t, srv, 8, 0)

		// While 6 clients connect per request in every window, the size stays.
		for range 3 {
			time.Sleep(poolWindow)
			var out []*pooled
			for range 6 {
				out = append(out, srv.pool.get())
			}
			for _, c := range out {
				srv.pool.put(c)
			}
			synctest.Wait()
			wantPool(t, srv, 8, 0)
		}
		dials, _, _ := up.stats()

		// Quiet: halved per window, down to POOL_SIZE, and no further.
		for _, want := range []int{8, 4, 2, 2} {
			time.Sleep(poolWindow)
			synctest.Wait()
			wantPool(t, srv, want, 0)
			if _, open, _ := up.stats(); open != want {
				t.Fatalf("%d upstream connections open, want %d", open, want)
			}
		}
		wantDials(t, up, dials)
	})
}

// Connections that connect-per-request clients bring back within the window are reused, however many
// long-lived clients keep theirs.
func TestPoolReuseBesideLongLivedLoans(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		up, _, srv := startFakePool(t, 2, 0)
		synctest.Wait()
		var long []*pooled
		for range 4 { // twice the pool's size, each past its window
			long = append(long, srv.pool.get())
			time.Sleep(loanWindow)
			synctest.Wait()
			wantPool(t, srv, 2, 0)
		}
		wantDials(t, up, 6)
		for range 100 {
			c := srv.pool.get()
			if c == nil {
				t.Fatal("no pooled connection for a short client")
			}
			time.Sleep(time.Millisecond)
			if !srv.pool.put(c) {
				t.Fatal("a connection returned within the window was closed")
			}
		}
		synctest.Wait()
		wantDials(t, up, 6)
		for _, c := range long {
			c.conn.Close() // the session reports these closes
			srv.obs.UpstreamClosed()
		}
	})
}

// get never hands out a connection the server closed while it was idle.
func TestPoolGetSkipsDeadConnections(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		up, obs, srv := startFakePool(t, 2, 0)
		synctest.Wait()
		killed := wantPool(t, srv, 2, 0)
		up.kill(killed...)
		synctest.Wait()
		up.hold() // else the upkeep loop may refill while get discards, and get hands out a new connection
		if c := srv.pool.get(); c != nil {
			t.Fatalf("got upstream %d; want none, the server closed %v", c.id, killed)
		}
		if n := obs.closed.Load(); n != 2 {
			t.Fatalf("%d closes reported, want the 2 dead connections", n)
		}
		up.unhold()
		synctest.Wait()
		wantDials(t, up, 4)
		c := srv.pool.get()
		if c == nil || slices.Contains(killed, c.id) {
			t.Fatalf("got %v after refill, want a new connection", c)
		}
		r, err := newCtrlConn(c.conn).do(t.Context(), "PING")
		if err != nil || r.text != "PONG" {
			t.Fatalf("PING on the new connection: %v, %v", r, err)
		}
		srv.pool.put(c)
	})
}

// The upkeep loop closes idle connections that the server closed or that answer out of step, and replaces
// them, without waiting for a client.
func TestPoolTendReplacesBrokenConnections(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		const idlePing = 10 * time.Second // idle connections are checked every 5s, PINGed after 10s
		up, obs, srv := startFakePool(t, 2, idlePing)
		synctest.Wait()
		killed := wantPool(t, srv, 2, 0)
		up.kill(killed...)
		time.Sleep(idlePing / 2)
		synctest.Wait()
		wantDials(t, up, 4)
		ids := wantPool(t, srv, 2, 0)
		if slices.ContainsFunc(ids, func(id int64) bool { return slices.Contains(killed, id) }) {
			t.Fatalf("idle %v still holds a killed connection of %v", ids, killed)
		}
		if n := obs.closed.Load(); n != 2 {
			t.Fatalf("%d closes reported, want 2", n)
		}

		// A PING answered with more than its reply: out of step, closed.
		up.mu.Lock()
		up.pingReply = "+PONG\r\n-ERR late\r\n"
		up.mu.Unlock()
		time.Sleep(idlePing)
		synctest.Wait()
		if _, _, pings := up.stats(); pings != 2 {
			t.Fatalf("%d PINGs, want 2", pings)
		}
		wantDials(t, up, 6)
		if n := obs.closed.Load(); n != 4 {
			t.Fatalf("%d closes reported, want 4", n)
		}
		wantPool(t, srv, 2, 0)
	})
}

// checkIdle tells, without blocking, an idle connection that is open and silent from one the peer closed or
// wrote to, over real sockets, with and without TLS; the check leaves a healthy connection usable.
func TestPoolCheckIdle(t *testing.T) {
	cert := selfSignedCert(t)
	for _, withTLS := range []bool{false, true} {
		for _, tc := range []struct {
			desc string
			peer func(net.Conn)
			want func(error) bool
		}{
			{"silent", func(net.Conn) {}, func(err error) bool { return err == nil }},
			{"unsolicited", func(c net.Conn) { c.Write([]byte("+late\r\n")) }, func(err error) bool { return errors.Is(err, errUnsolicited) }},
			// With TLS the close_notify alert is what waits on the socket.
			{"closed", func(c net.Conn) { c.Close() }, func(err error) bool {
				return errors.Is(err, io.EOF) || withTLS && errors.Is(err, errUnsolicited)
			}},
		} {
			t.Run(fmt.Sprintf("tls=%v/%s", withTLS, tc.desc), func(t *testing.T) {
				cli, srv := socketPair(t, withTLS, cert)
				// A round trip first, as after AUTH: it takes what a TLS 1.3 server sends after the handshake.
				pingPong(t, cli, srv)
				tc.peer(srv)
				err := checkIdle(cli) // the connections have no deadline: a check that waited would hang here
				if !tc.want(err) {
					t.Fatalf("checkIdle: %v", err)
				}
				if err == nil {
					pingPong(t, cli, srv)
				}
			})
		}
	}
}

func pingPong(t *testing.T, cli, srv net.Conn) {
	t.Helper()
	cli.SetDeadline(time.Now().Add(5 * time.Second))
	srv.SetDeadline(time.Now().Add(5 * time.Second))
	defer cli.SetDeadline(time.Time{})
	defer srv.SetDeadline(time.Time{})
	errc := make(chan error, 1)
	go func() {
		b := make([]byte, 64)
		_, err := srv.Read(b)
		if err == nil {
			_, err = srv.Write([]byte("+PONG\r\n"))
		}
		errc <- err
	}()
	r, err := newCtrlConn(cli).do(t.Context(), "PING")
	if err != nil || r.text != "PONG" {
		t.Fatalf("PING: %v, %v", r, err)
	}
	if err := <-errc; err != nil {
		t.Fatal(err)
	}
}

// socketPair connects two ends over a Unix socket, whose writes and closes reach the peer before they return,
// so a check right after one sees it.
func socketPair(t *testing.T, withTLS bool, cert tls.Certificate) (cli, srv net.Conn) {
	t.Helper()
	ln, err := net.Listen("unix", filepath.Join(t.TempDir(), "s"))
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	accepted := make(chan net.Conn, 1)
	go func() {
		c, _ := ln.Accept()
		accepted <- c
	}()
	cli, err = net.Dial("unix", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	srv = <-accepted
	if srv == nil {
		t.Fatal("accept failed")
	}
	if withTLS {
		roots := x509.NewCertPool()
		roots.AddCert(cert.Leaf)
		tcli := tls.Client(cli, &tls.Config{ServerName: "pool.test", RootCAs: roots})
		tsrv := tls.Server(srv, &tls.Config{Certificates: []tls.Certificate{cert}})
		errc := make(chan error, 1)
		go func() { errc <- tsrv.Handshake() }()
		if err := tcli.Handshake(); err != nil {
			t.Fatal(err)
		}
		if err := <-errc; err != nil {
			t.Fatal(err)
		}
		cli, srv = tcli, tsrv
	}
	t.Cleanup(func() { cli.Close(); srv.Close() })
	return cli, srv
}

func selfSignedCert(t *testing.T) tls.Certificate {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1), DNSNames: []string{"pool.test"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	leaf, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key, Leaf: leaf}
}
