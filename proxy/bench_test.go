package proxy_test

import (
	"bufio"
	"bytes"
	"context"
	"crypto/tls"
	"io"
	"net"
	"testing"
	"time"

	"github.com/entra-redis-proxy/entra-redis-proxy/internal/azurefake"
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
