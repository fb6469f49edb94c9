package proxy_test

import (
	"bufio"
	"bytes"
	"context"
	"crypto/tls"
	"fmt"
	"io"
	"net"
	"sync/atomic"
	"testing"
	"time"

	"github.com/entra-redis-proxy/entra-redis-proxy/internal/azurefake"
	"github.com/entra-redis-proxy/entra-redis-proxy/proxy"
	"github.com/entra-redis-proxy/entra-redis-proxy/resp"
)

// The proxy runs in the benchmark's process, so allocs/op counts the proxy's allocations per operation
// too (plus the raw client's, which are none).

// benchValue is a typical small cache value.
const benchValue = "0123456789abcdef0123456789abcdef"

// benchIOLimit bounds each write and read of one benchmark operation.
const benchIOLimit = 10 * time.Second

// BenchmarkRoundTrip is one SET and then one GET, each waiting for its reply, through the proxy over
// loopback: the latency a non-pipelining client sees.
func BenchmarkRoundTrip(b *testing.B) {
	c := dialBench(b, benchProxy(b))
	benchSetGet(b, c)
}

// BenchmarkPipeline16 sends 8 SET and 8 GET in one write through the proxy and reads the 16 replies.
func BenchmarkPipeline16(b *testing.B) {
	c := dialBench(b, benchProxy(b))
	benchPipeline(b, c, 8)
}

// BenchmarkDirectTLS runs the same operations straight against the fake cache over TLS, as its admin
// user, for comparison in the same run.
func BenchmarkDirectTLS(b *testing.B) {
	env := azurefake.StartT(b, azurefake.Options{TokenLifetime: 2 * time.Minute})
	c := dialBench(b, func() (net.Conn, error) {
		d := tls.Dialer{Config: env.ClientTLSConfig()}
		ctx, cancel := context.WithTimeout(b.Context(), benchIOLimit)
		defer cancel()
		return d.DialContext(ctx, "tcp", env.RedisAddr)
	})
	user, pass := env.AdminCredentials()
	c.roundTrip(b, resp.AppendCommand(nil, "AUTH", user, pass), []byte("+OK\r\n"))
	b.Run("RoundTrip", func(b *testing.B) { benchSetGet(b, c) })
	b.Run("Pipeline16", func(b *testing.B) { benchPipeline(b, c, 8) })
}

func benchSetGet(b *testing.B, c *benchConn) {
	set := resp.AppendCommand(nil, "SET", "bench:key", benchValue)
	get := resp.AppendCommand(nil, "GET", "bench:key")
	ok, val := []byte("+OK\r\n"), []byte(bulk(benchValue))
	b.ReportAllocs()
	for b.Loop() {
		c.roundTrip(b, set, ok)
		c.roundTrip(b, get, val)
	}
}

// benchPipeline writes pairs of SET and GET at once and reads all their replies; it also reports the time
// per command.
func benchPipeline(b *testing.B, c *benchConn, pairs int) {
	var cmds, want []byte
	for range pairs {
		cmds = resp.AppendCommand(cmds, "SET", "bench:key", benchValue)
		cmds = resp.AppendCommand(cmds, "GET", "bench:key")
		want = append(append(want, "+OK\r\n"...), bulk(benchValue)...)
	}
	b.ReportAllocs()
	for b.Loop() {
		c.roundTrip(b, cmds, want)
	}
	b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(b.N*2*pairs), "ns/cmd")
}

// benchConn is a raw client connection that checks replies byte for byte without allocating.
type benchConn struct {
	c   net.Conn
	r   *bufio.Reader
	got []byte
}

// dialBench connects with dial and closes the connection when the benchmark ends.
func dialBench(b *testing.B, dial func() (net.Conn, error)) *benchConn {
	b.Helper()
	c, err := dial()
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { c.Close() })
	return &benchConn{c: c, r: bufio.NewReaderSize(c, 64<<10)}
}

// roundTrip writes cmds and reads exactly the bytes of want.
func (c *benchConn) roundTrip(b *testing.B, cmds, want []byte) {
	if err := c.c.SetDeadline(time.Now().Add(benchIOLimit)); err != nil {
		b.Fatal(err)
	}
	if _, err := c.c.Write(cmds); err != nil {
		b.Fatal(err)
	}
	if cap(c.got) < len(want) {
		c.got = make([]byte, len(want))
	}
	got := c.got[:len(want)]
	if _, err := io.ReadFull(c.r, got); err != nil {
		b.Fatalf("reading replies: %v (got %q)", err, got)
	}
	if !bytes.Equal(got, want) {
		b.Fatalf("got %q, want %q", got, want)
	}
}

// benchProxy starts a fixture (a fake cache, the managed identity credential, a proxy) and returns a
// dialer for the proxy.
func benchProxy(b *testing.B) func() (net.Conn, error) {
	b.Helper()
	addr := newFixture(b, fixtureOpts{}).addr
	return func() (net.Conn, error) { return net.DialTimeout("tcp", addr, benchIOLimit) }
}

// BenchmarkPipelineWrites sends batches like redis-benchmark -P N (N commands in one write, then their N
// replies) and reports the proxy's writes per batch in each direction: upstream (each one a TLS record) and
// to the client. One write per direction per batch is the floor, whatever the batch size.
func BenchmarkPipelineWrites(b *testing.B) {
	for _, pairs := range []int{8, 50} {
		b.Run(fmt.Sprintf("P%d", 2*pairs), func(b *testing.B) {
			var up, down writeCount
			f := newFixture(b, fixtureOpts{
				proxyOpt: func(o *proxy.Options) {
					o.Dialer = &countingDialer{tls: o.Dialer.(*proxy.TLSDialer), n: &up}
				},
				listener: func(ln net.Listener) net.Listener { return countingListener{ln, &down} },
			})
			c := dialBench(b, func() (net.Conn, error) { return net.DialTimeout("tcp", f.addr, benchIOLimit) })
			c.roundTrip(b, resp.AppendCommand(nil, "PING"), []byte("+PONG\r\n")) // the upstream is set up
			up0, down0 := up.snapshot(), down.snapshot()
			benchPipeline(b, c, pairs)
			upw, downw := up.snapshot().sub(up0), down.snapshot().sub(down0)
			b.ReportMetric(float64(upw.writes)/float64(b.N), "upwrites/batch")
			b.ReportMetric(float64(upw.bytes)/float64(upw.writes), "B/upwrite")
			b.ReportMetric(float64(downw.writes)/float64(b.N), "clientwrites/batch")
		})
	}
}

// writeCount counts the writes on a set of connections and their bytes.
type writeCount struct{ writes, bytes atomic.Int64 }

type writeTotals struct{ writes, bytes int64 }

func (w *writeCount) add(n int) { w.writes.Add(1); w.bytes.Add(int64(n)) }
func (w *writeCount) snapshot() writeTotals {
	return writeTotals{w.writes.Load(), w.bytes.Load()}
}
func (t writeTotals) sub(u writeTotals) writeTotals {
	return writeTotals{t.writes - u.writes, t.bytes - u.bytes}
}

// countingDialer dials like tls (TLS over TCP) and counts the writes on the TCP connection: one per TLS
// record the proxy sends.
type countingDialer struct {
	tls *proxy.TLSDialer
	n   *writeCount
}

func (d *countingDialer) DialContext(ctx context.Context) (net.Conn, error) {
	var nd net.Dialer
	raw, err := nd.DialContext(ctx, "tcp", d.tls.Addr)
	if err != nil {
		return nil, err
	}
	c := tls.Client(countingConn{raw.(*net.TCPConn), d.n}, d.tls.Config.Clone())
	if err := c.HandshakeContext(ctx); err != nil {
		raw.Close()
		return nil, err
	}
	return c, nil
}

// countingListener accepts TCP connections whose writes are counted; they keep the socket's methods
// (SyscallConn, CloseWrite), so the proxy treats them like plain TCP connections.
type countingListener struct {
	net.Listener
	n *writeCount
}

func (l countingListener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err != nil {
		return nil, err
	}
	return countingConn{c.(*net.TCPConn), l.n}, nil
}

type countingConn struct {
	*net.TCPConn
	n *writeCount
}

func (c countingConn) Write(p []byte) (int, error) {
	c.n.add(len(p))
	return c.TCPConn.Write(p)
}

// BenchmarkUpstreamDial is one new upstream connection (TCP, TLS, AUTH) as proxy.TLSDialer makes it, with
// TLS session resumption (the default) and without, side by side.
func BenchmarkUpstreamDial(b *testing.B) {
	env := azurefake.StartT(b, azurefake.Options{TokenLifetime: 2 * time.Minute})
	user, pass := env.AdminCredentials()
	auth := resp.AppendCommand(nil, "AUTH", user, pass)
	for _, tc := range []struct {
		name   string
		resume bool
	}{{"Resumed", true}, {"Full", false}} {
		b.Run(tc.name, func(b *testing.B) {
			cfg := env.ClientTLSConfig()
			cfg.SessionTicketsDisabled = !tc.resume
			d := &proxy.TLSDialer{Addr: env.RedisAddr, Config: cfg}
			resumed := 0
			b.ReportAllocs()
			for b.Loop() {
				ctx, cancel := context.WithTimeout(b.Context(), benchIOLimit)
				c, err := d.DialContext(ctx)
				cancel()
				if err != nil {
					b.Fatal(err)
				}
				bc := &benchConn{c: c, r: bufio.NewReader(c)}
				bc.roundTrip(b, auth, []byte("+OK\r\n"))
				if c.(*tls.Conn).ConnectionState().DidResume {
					resumed++
				}
				c.Close()
			}
			b.ReportMetric(float64(resumed)/float64(b.N), "resumed/op")
		})
	}
}
