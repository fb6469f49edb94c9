// Command idleclients opens many idle Redis client connections and holds them, for the memory
// row of `make bench`: it connects -n clients to -addr, sends PING on each (so a proxy has dialed
// and authenticated the client's upstream), prints "ready N" once every client has its reply, and
// keeps the connections open, idle, until SIGINT or SIGTERM.
//
//	go run ./scripts/idleclients -addr 127.0.0.1:6379 -n 5000
package main

import (
	"bufio"
	"context"
	"flag"
	"fmt"
	"net"
	"os"
	"os/signal"
	"sync"
	"syscall"
	"time"
)

func main() {
	addr := flag.String("addr", "127.0.0.1:6379", "host:port to connect to")
	n := flag.Int("n", 5000, "number of client connections")
	parallel := flag.Int("parallel", 64, "connections being set up at once")
	timeout := flag.Duration("timeout", 30*time.Second, "limit for one connection's dial and PING reply")
	flag.Parse()

	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	conns, err := openAll(ctx, *addr, *n, *parallel, *timeout)
	defer func() {
		for _, c := range conns {
			c.Close()
		}
	}()
	if err != nil {
		fmt.Fprintln(os.Stderr, "idleclients:", err)
		os.Exit(1)
	}
	fmt.Printf("ready %d\n", len(conns))
	<-ctx.Done()
}

// openAll opens n connections, parallel at a time, and returns those that answered PING; the
// error is the first failure, after which no new connection is started.
func openAll(ctx context.Context, addr string, n, parallel int, timeout time.Duration) ([]net.Conn, error) {
	ctx, cancel := context.WithCancelCause(ctx)
	defer cancel(nil)
	var (
		mu    sync.Mutex
		conns = make([]net.Conn, 0, n)
		wg    sync.WaitGroup
		slots = make(chan struct{}, parallel)
	)
	for i := 0; i < n && ctx.Err() == nil; i++ {
		slots <- struct{}{}
		wg.Add(1)
		go func() { // owned by openAll: ends after one dial and one reply, bounded by timeout
			defer func() { <-slots; wg.Done() }()
			c, err := open(ctx, addr, timeout)
			if err != nil {
				cancel(fmt.Errorf("client %d: %w", i+1, err))
				return
			}
			mu.Lock()
			conns = append(conns, c)
			mu.Unlock()
		}()
	}
	wg.Wait()
	if err := context.Cause(ctx); err != nil {
		return conns, err
	}
	return conns, nil
}

// open dials addr and waits for +PONG, the reply to one PING.
func open(ctx context.Context, addr string, timeout time.Duration) (net.Conn, error) {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	var d net.Dialer
	c, err := d.DialContext(ctx, "tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("dial %s: %w", addr, err)
	}
	deadline, _ := ctx.Deadline()
	if err := c.SetDeadline(deadline); err != nil {
		c.Close()
		return nil, fmt.Errorf("set deadline: %w", err)
	}
	if _, err := c.Write([]byte("*1\r\n$4\r\nPING\r\n")); err != nil {
		c.Close()
		return nil, fmt.Errorf("send PING: %w", err)
	}
	line, err := bufio.NewReaderSize(c, 512).ReadSlice('\n')
	if err != nil {
		c.Close()
		return nil, fmt.Errorf("read PING reply: %w", err)
	}
	if string(line) != "+PONG\r\n" {
		c.Close()
		return nil, fmt.Errorf("PING answered %q, want +PONG", line)
	}
	if err := c.SetDeadline(time.Time{}); err != nil {
		c.Close()
		return nil, fmt.Errorf("clear deadline: %w", err)
	}
	return c, nil
}
