package proxy_test

import (
	"bufio"
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"errors"
	"fmt"
	"io"
	"math/big"
	"net"
	"os"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/entra-redis-proxy/entra-redis-proxy/proxy"
	"github.com/entra-redis-proxy/entra-redis-proxy/resp"
)

// A client that pipelines gigabytes of GETs and never reads the replies holds the proxy to one buffer's worth
// of them: the reply loop blocks in its write, stops reading the upstream, and redis keeps the rest. Other
// clients are served meanwhile, and after WriteTimeout without progress the stuck client is closed and
// everything its session held is released.
func TestClientThatNeverReads(t *testing.T) {
	const (
		writeTimeout = time.Second
		valueSize    = 1 << 20
		// 512 MiB of replies: 8 times the bound, 100 times what the kernel buffers. Redis holds what the
		// proxy does not read (normal clients have no output limit) and builds it on one core, so more would
		// only make the test slower.
		gets      = 512
		heapBound = 64 << 20
	)
	f := newFixture(t, fixtureOpts{proxyOpt: func(o *proxy.Options) { o.WriteTimeout = writeTimeout }})
	ctx := t.Context()
	other := f.client(t, 2)
	if err := other.Set(ctx, "bp:big", bytes.Repeat([]byte("x"), valueSize), 0).Err(); err != nil {
		t.Fatal(err)
	}
	baseG := runtime.NumGoroutine() // the fixture's and the other client's session's own

	stuck := f.raw(t)
	// A small receive buffer: the kernel holds little, so the proxy blocks early (loopback autotuning could
	// otherwise hold several MiB).
	if err := stuck.c.(*net.TCPConn).SetReadBuffer(64 << 10); err != nil {
		t.Fatal(err)
	}
	stuck.send("PING")
	stuck.expect("+PONG\r\n")
	var pipeline []byte
	for range gets {
		pipeline = resp.AppendCommand(pipeline, "GET", "bp:big")
	}
	baseInuse, _ := heapNow()
	watch := watchHeap()
	stuck.c.SetWriteDeadline(time.Now().Add(10 * time.Second))
	if _, err := stuck.c.Write(pipeline); err != nil {
		watch.end()
		t.Fatal(err)
	}
	sent := time.Now()
	// Redis builds replies for a whole read of commands before it sends any, which takes a while for hundreds
	// of MiB: time the close from the first reply's arrival. Reading its header takes a few KiB at most.
	stuck.c.SetReadDeadline(time.Now().Add(30 * time.Second))
	if line, err := stuck.r.ReadString('\n'); err != nil || line != fmt.Sprintf("$%d\r\n", valueSize) {
		watch.end()
		t.Fatalf("first reply: %q, %v", line, err)
	}
	firstReply := time.Now()

	// While the stuck client is open, the other is served.
	servedWhileStuck := 0
	// The bound only tells "closed" from "never closed": on a machine loaded 4 times over its cores, the
	// proxy's goroutines were scheduled so late that the close came up to 16 s after the first reply.
	deadline := firstReply.Add(writeTimeout + 30*time.Second)
	for i := 0; f.srv.Clients() == 2; i++ {
		if time.Now().After(deadline) {
			watch.end()
			t.Fatalf("the client that never reads was not closed %v after its first reply (WriteTimeout %v)",
				time.Since(firstReply), writeTimeout)
		}
		v := strconv.Itoa(i)
		if err := other.Set(ctx, "bp:other", v, 0).Err(); err != nil {
			watch.end()
			t.Fatalf("another client's SET while one is stuck: %v", err)
		}
		if got, err := other.Get(ctx, "bp:other").Result(); err != nil || got != v {
			watch.end()
			t.Fatalf("another client's GET while one is stuck: %q, %v; want %q", got, err, v)
		}
		if f.srv.Clients() == 2 {
			servedWhileStuck++
		}
		time.Sleep(10 * time.Millisecond) // the poll interval: the round trip above is the work
	}
	closedAfter := time.Since(sent)
	watch.end()
	grew := int64(watch.peakInuse) - int64(baseInuse)
	t.Logf("first reply after %v, stuck client closed %v after it; %d round trips by another client meanwhile; "+
		"heap in use %d MiB -> peak %d MiB", firstReply.Sub(sent).Round(time.Millisecond),
		time.Since(firstReply).Round(time.Millisecond), servedWhileStuck, baseInuse>>20, watch.peakInuse>>20)
	if grew > heapBound {
		t.Errorf("heap in use grew by %d MiB while a client did not read %d MiB of replies: the proxy buffers them",
			grew>>20, gets*valueSize>>20)
	}
	if servedWhileStuck == 0 {
		t.Error("no round trip by another client completed while the stuck client was open")
	}
	// armWrite re-arms once half the timeout is used, so a write without progress fails after between half
	// of WriteTimeout and all of it (counted from the first write, after the pipeline was sent); sooner means
	// something else closed the client.
	if closedAfter < writeTimeout/2 {
		t.Errorf("stuck client closed %v after sending: sooner than WriteTimeout/2 (%v) allows", closedAfter, writeTimeout/2)
	}

	// The stuck client reads what the kernel still holds, then EOF (or a reset): not every reply.
	stuck.c.SetReadDeadline(time.Now().Add(10 * time.Second))
	drained, err := io.Copy(io.Discard, stuck.r)
	if err != nil && !errors.Is(err, syscall.ECONNRESET) {
		t.Fatalf("stuck client: reading after the close: %v after %d bytes; want EOF or a reset", err, drained)
	}
	if full := int64(gets) * (valueSize + int64(len("$1048576\r\n\r\n"))); drained >= full {
		t.Errorf("stuck client read all %d bytes of replies: it was never cut off", drained)
	}
	t.Logf("stuck client drained %d KiB after the close", drained>>10)

	// A leaked session holds at least two goroutines (its run and its reply loop): allow one of noise.
	var g int
	waitFor(t, 10*time.Second, "goroutines to settle back to the baseline", func() bool {
		g = runtime.NumGoroutine()
		return g <= baseG+1
	})
	if got, err := other.Get(ctx, "bp:other").Result(); err != nil || got == "" {
		t.Fatalf("another client after the stuck one was closed: %q, %v", got, err)
	}
}

// An upstream that stops in the middle of a reply is cut after StallTimeout: the client sees the connection
// close (a partial reply then EOF, which every client library reports as an error) instead of a hang, and
// the session ends.
func TestUpstreamStallsMidReply(t *testing.T) {
	const stallTimeout = 500 * time.Millisecond
	up := startStallingUpstream(t, map[string]string{
		"in-bulk":  "$10\r\nabc",
		"in-head":  "$10",
		"in-array": "*2\r\n$1\r\na\r\n",
	})
	srv, addr := startProxy(t, proxy.Options{
		Tokens: fixedTokens{proxy.Token{Username: "oid", Secret: "secret", ExpiresOn: time.Now().Add(4 * time.Minute)}},
		Dialer: &proxy.TLSDialer{Addr: up.addr, Config: &tls.Config{ServerName: up.serverName, RootCAs: up.roots}},
		Logger: testLogger(t), StallTimeout: stallTimeout,
	})

	for _, tc := range []struct {
		key  string
		want string // what the client receives before the close
	}{
		{"in-bulk", "$10\r\nabc"},
		{"in-head", "$10"},
		{"in-array", "*2\r\n$1\r\na\r\n"},
	} {
		t.Run(tc.key, func(t *testing.T) {
			closedBefore := up.closed.Load()
			c, err := net.Dial("tcp", addr)
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			c.SetDeadline(time.Now().Add(10 * time.Second))
			if _, err := c.Write(resp.AppendCommand(nil, "GET", tc.key)); err != nil {
				t.Fatal(err)
			}
			start := time.Now()
			got, err := io.ReadAll(c)
			took := time.Since(start)
			if err != nil && !errors.Is(err, syscall.ECONNRESET) {
				t.Fatalf("client: %v after %v, having read %q; want the connection closed", err, took, got)
			}
			if string(got) != tc.want {
				t.Errorf("client read %q before the close, want %q", got, tc.want)
			}
			if took < stallTimeout {
				t.Errorf("closed after %v: sooner than StallTimeout (%v)", took, stallTimeout)
			}
			t.Logf("closed after %v", took.Round(time.Millisecond))
			waitFor(t, 5*time.Second, "the session to end", func() bool { return srv.Clients() == 0 })
			waitFor(t, 5*time.Second, "the upstream connection to be closed", func() bool {
				return up.closed.Load() > closedBefore
			})
		})
	}
}

// fixedTokens is a token source whose one token never changes.
type fixedTokens struct{ tok proxy.Token }

func (f fixedTokens) Current() (proxy.Token, <-chan struct{})      { return f.tok, nil }
func (f fixedTokens) Refresh(context.Context) (proxy.Token, error) { return f.tok, nil }

// stallingUpstream is a TLS server that accepts the proxy's handshake, then answers a GET with the start of
// a reply (chosen by the key) and sends nothing more.
type stallingUpstream struct {
	addr       string
	serverName string
	roots      *x509.CertPool
	closed     atomic.Int64 // connections the proxy closed
}

func startStallingUpstream(t *testing.T, replies map[string]string) *stallingUpstream {
	t.Helper()
	const name = "stalling.upstream.test"
	cert, roots := selfSigned(t, name)
	ln, err := tls.Listen("tcp", "127.0.0.1:0", &tls.Config{Certificates: []tls.Certificate{cert}})
	if err != nil {
		t.Fatal(err)
	}
	u := &stallingUpstream{addr: ln.Addr().String(), serverName: name, roots: roots}
	var wg sync.WaitGroup
	t.Cleanup(func() {
		ln.Close()
		wg.Wait()
	})
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			wg.Add(1)
			go func() {
				defer wg.Done()
				defer c.Close()
				if err := u.serve(c, replies); err != nil {
					t.Errorf("stalling upstream: %v", err)
				}
			}()
		}
	}()
	return u
}

// serve answers the handshake and the GET, then waits for the proxy to close the connection.
func (u *stallingUpstream) serve(c net.Conn, replies map[string]string) error {
	// Bounded so that a proxy that never closes the connection still lets the test end.
	c.SetDeadline(time.Now().Add(30 * time.Second))
	r := bufio.NewReader(c)
	for _, want := range []string{"AUTH", "CLIENT"} {
		if cmd, err := readCommand(r); err != nil || !strings.EqualFold(cmd[0], want) {
			return fmt.Errorf("handshake: got %q, %v; want %s", cmd, err, want)
		}
	}
	if _, err := io.WriteString(c, "+OK\r\n:7\r\n"); err != nil {
		return err
	}
	cmd, err := readCommand(r)
	if err == nil && len(cmd) == 3 && strings.EqualFold(cmd[0], "CLIENT") && strings.EqualFold(cmd[1], "UNBLOCK") {
		// The first connection's probe (may this identity unblock?).
		if _, err := io.WriteString(c, ":0\r\n"); err != nil {
			return err
		}
		cmd, err = readCommand(r)
	}
	if err != nil || len(cmd) != 2 || !strings.EqualFold(cmd[0], "GET") {
		return fmt.Errorf("got %q, %v; want GET <key>", cmd, err)
	}
	if _, err := io.WriteString(c, replies[cmd[1]]); err != nil {
		return err
	}
	if _, err := r.ReadByte(); err == nil || errors.Is(err, os.ErrDeadlineExceeded) {
		return fmt.Errorf("after the partial reply: got %v, want the proxy to close the connection", err)
	}
	u.closed.Add(1)
	return nil
}

// readCommand reads one multibulk command.
func readCommand(r *bufio.Reader) ([]string, error) {
	line, err := r.ReadString('\n')
	if err != nil {
		return nil, err
	}
	n, err := strconv.Atoi(strings.TrimSpace(strings.TrimPrefix(line, "*")))
	if err != nil || !strings.HasPrefix(line, "*") || n < 1 || n > 16 {
		return nil, fmt.Errorf("bad command header %q", line)
	}
	args := make([]string, n)
	for i := range args {
		line, err := r.ReadString('\n')
		if err != nil {
			return nil, err
		}
		k, err := strconv.Atoi(strings.TrimSpace(strings.TrimPrefix(line, "$")))
		if err != nil || !strings.HasPrefix(line, "$") || k < 0 || k > 4096 {
			return nil, fmt.Errorf("bad bulk header %q", line)
		}
		b := make([]byte, k+2)
		if _, err := io.ReadFull(r, b); err != nil {
			return nil, err
		}
		args[i] = string(b[:k])
	}
	return args, nil
}

// selfSigned returns a certificate for name that is its own CA, and a pool that trusts it.
func selfSigned(t *testing.T, name string) (tls.Certificate, *x509.CertPool) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	now := time.Now()
	tmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(1),
		Subject:               pkix.Name{CommonName: name},
		DNSNames:              []string{name},
		NotBefore:             now.Add(-time.Hour),
		NotAfter:              now.Add(time.Hour),
		IsCA:                  true,
		BasicConstraintsValid: true,
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageDigitalSignature,
		ExtKeyUsage:           []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	leaf, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	roots := x509.NewCertPool()
	roots.AddCert(leaf)
	return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key, Leaf: leaf}, roots
}
