package proxy_test

// The Server's lifecycle as net/http has it: Serve returns ErrServerClosed after Shutdown or Close and closes
// its listener, returns a real Accept failure, retries a temporary one, and refuses a client that Accept
// handed over after Shutdown began. No client reaches an upstream here, so no redis is needed.

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/entra-redis-proxy/entra-redis-proxy/proxy"
)

type lifecycleTokens struct{}

func (lifecycleTokens) Current() (proxy.Token, <-chan struct{}) {
	return proxy.Token{Username: "oid", Secret: "tok"}, make(chan struct{})
}

func (lifecycleTokens) Refresh(context.Context) (proxy.Token, error) {
	return proxy.Token{Username: "oid", Secret: "tok"}, nil
}

type lifecycleDialer struct{}

func (lifecycleDialer) DialContext(context.Context) (net.Conn, error) {
	return nil, errors.New("no upstream in this test")
}

// rejections records the reasons of ClientRejected.
type rejections struct {
	proxy.NopObserver
	mu      sync.Mutex
	reasons []string
}

func (r *rejections) ClientRejected(reason string) {
	r.mu.Lock()
	r.reasons = append(r.reasons, reason)
	r.mu.Unlock()
}

func (r *rejections) get() []string {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]string(nil), r.reasons...)
}

func newServer(t *testing.T, obs proxy.Observer) *proxy.Server {
	t.Helper()
	srv, err := proxy.New(proxy.Options{Tokens: lifecycleTokens{}, Dialer: lifecycleDialer{}, Observer: obs,
		Logger: slog.New(slog.NewTextHandler(io.Discard, nil))})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { srv.Close() })
	return srv
}

// serveErr runs srv.Serve(ln) and returns the channel its result arrives on.
func serveErr(srv *proxy.Server, ln net.Listener) <-chan error {
	done := make(chan error, 1)
	go func() { done <- srv.Serve(ln) }()
	return done
}

func awaitErr(t *testing.T, done <-chan error) error {
	t.Helper()
	select {
	case err := <-done:
		return err
	case <-time.After(10 * time.Second):
		t.Fatal("Serve did not return")
		return nil
	}
}

func TestServeReturnsErrServerClosed(t *testing.T) {
	for _, tc := range []struct {
		name string
		stop func(*proxy.Server)
	}{
		{"Shutdown", func(s *proxy.Server) { s.Shutdown(context.Background()) }},
		{"Close", func(s *proxy.Server) { s.Close() }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			srv := newServer(t, nil)
			ln, err := net.Listen("tcp", "127.0.0.1:0")
			if err != nil {
				t.Fatal(err)
			}
			done := serveErr(srv, ln)
			// A client served before the stop: the listener is in use.
			if c, err := net.Dial("tcp", ln.Addr().String()); err != nil {
				t.Fatal(err)
			} else {
				c.Close()
			}
			tc.stop(srv)
			if err := awaitErr(t, done); !errors.Is(err, proxy.ErrServerClosed) {
				t.Errorf("Serve after %s: %v, want ErrServerClosed", tc.name, err)
			}
			if c, err := net.Dial("tcp", ln.Addr().String()); !errors.Is(err, syscall.ECONNREFUSED) {
				if c != nil {
					c.Close()
				}
				t.Errorf("dial after %s: %v, want the listener closed (connection refused)", tc.name, err)
			}

			// Serve on a stopped server closes the listener and returns at once.
			ln2, err := net.Listen("tcp", "127.0.0.1:0")
			if err != nil {
				t.Fatal(err)
			}
			if err := srv.Serve(ln2); !errors.Is(err, proxy.ErrServerClosed) {
				t.Errorf("Serve on a stopped server: %v, want ErrServerClosed", err)
			}
			if _, err := ln2.Accept(); !errors.Is(err, net.ErrClosed) {
				t.Errorf("the listener given to a stopped server: Accept = %v, want it closed", err)
			}
		})
	}
}

// scriptedListener hands out the connections and errors the test sends on next; Close is observable, and
// Accept keeps returning what the test sends after it (a connection accepted as the listener closed).
type scriptedListener struct {
	next      chan any      // net.Conn or error
	accepting chan struct{} // receives when Accept is called
	closed    chan struct{}
	closeOnce sync.Once
}

func newScriptedListener() *scriptedListener {
	return &scriptedListener{next: make(chan any), accepting: make(chan struct{}, 1), closed: make(chan struct{})}
}

func (l *scriptedListener) Accept() (net.Conn, error) {
	select {
	case l.accepting <- struct{}{}:
	default:
	}
	v, ok := <-l.next
	if !ok {
		return nil, fmt.Errorf("accept scripted: %w", net.ErrClosed)
	}
	if err, ok := v.(error); ok {
		return nil, err
	}
	return v.(net.Conn), nil
}

func (l *scriptedListener) Close() error {
	l.closeOnce.Do(func() { close(l.closed) })
	return nil
}

func (l *scriptedListener) Addr() net.Addr {
	return &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1), Port: 6379}
}

func TestServeReturnsAcceptFailure(t *testing.T) {
	srv := newServer(t, nil)
	ln := newScriptedListener()
	done := serveErr(srv, ln)
	// Out of file descriptors is retried (after a short backoff): Serve takes the next Accept's result.
	ln.next <- &net.OpError{Op: "accept", Net: "tcp", Err: syscall.EMFILE}
	broken := &net.OpError{Op: "accept", Net: "tcp", Err: syscall.EINVAL}
	select {
	case ln.next <- broken:
	case err := <-done:
		t.Fatalf("Serve returned %v after a temporary Accept error; want a retry", err)
	}
	if err := awaitErr(t, done); !errors.Is(err, broken) {
		t.Errorf("Serve after a failed Accept: %v, want %v", err, broken)
	}
	select {
	case <-ln.closed:
	default:
		t.Error("Serve returned without closing its listener")
	}
}

// A client that Accept returns after Shutdown began is refused with a redis error and the shutting_down
// reason, like one over the connection limit.
func TestShutdownRefusesLateClient(t *testing.T) {
	obs := &rejections{}
	srv := newServer(t, obs)
	ln := newScriptedListener()
	done := serveErr(srv, ln)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	shut := make(chan int, 1)
	<-ln.accepting // Serve is running: it will see the Shutdown rather than refuse to start
	go func() { shut <- srv.Shutdown(ctx) }()
	<-ln.closed // Shutdown has begun: it closes the listeners after leaving the serving state

	client, server := net.Pipe()
	defer client.Close()
	ln.next <- server
	client.SetDeadline(time.Now().Add(10 * time.Second))
	r := bufio.NewReader(client)
	line, err := r.ReadString('\n')
	if line != "-ERR entra-redis-proxy: shutting down\r\n" {
		t.Errorf("late client: %q, %v; want -ERR entra-redis-proxy: shutting down", line, err)
	}
	if _, err := r.ReadByte(); !errors.Is(err, io.EOF) {
		t.Errorf("late client after the error: %v, want EOF", err)
	}
	close(ln.next)
	if err := awaitErr(t, done); !errors.Is(err, proxy.ErrServerClosed) {
		t.Errorf("Serve: %v, want ErrServerClosed", err)
	}
	if got := obs.get(); len(got) != 1 || got[0] != "shutting_down" {
		t.Errorf("ClientRejected reasons %q, want [shutting_down]", got)
	}
	if cut := <-shut; cut != 0 {
		t.Errorf("Shutdown cut %d connections, want 0", cut)
	}
}
