package proxy

import (
	"bytes"
	"context"
	"errors"
	"io"
	"log/slog"
	"net"
	"testing"
	"time"

	"github.com/entra-redis-proxy/entra-redis-proxy/resp"
)

type fuzzTokens struct{ tok Token }

// refusingDialer is an upstream that can't be reached.
type refusingDialer struct{}

func (refusingDialer) DialContext(context.Context) (net.Conn, error) {
	return nil, errors.New("connection refused")
}

func (f fuzzTokens) Current() (Token, <-chan struct{})      { return f.tok, nil }
func (f fuzzTokens) Refresh(context.Context) (Token, error) { return f.tok, nil }

// FuzzSessionState runs a real session (both loops, the ledger, every tracker) between a client that sends
// arbitrary bytes and an upstream that answers with arbitrary bytes in chunks of an arbitrary size, over
// net.Pipe. Invariants: nothing panics or hangs, the session ends and its goroutines return; what goes
// upstream is a sequence of well-formed commands; the client's credentials never go upstream; the client
// never receives more reply bytes from the upstream than the upstream sent.
func FuzzSessionState(f *testing.F) {
	seeds := []struct{ cmds, replies string }{
		{"*2\r\n$4\r\nAUTH\r\n$6\r\nsecret\r\n*1\r\n$4\r\nPING\r\n", "+PONG\r\n+PONG\r\n"},
		{"MULTI\r\nSET a 1\r\nEXEC\r\n", "+OK\r\n+QUEUED\r\n*1\r\n+OK\r\n"},
		{"SUBSCRIBE a b\r\nUNSUBSCRIBE\r\n", "*3\r\n$9\r\nsubscribe\r\n$1\r\na\r\n:1\r\n*3\r\n$7\r\nmessage\r\n$1\r\na\r\n$1\r\nx\r\n*3\r\n$9\r\nsubscribe\r\n$1\r\nb\r\n:2\r\n"},
		{"HELLO 3 AUTH u secret SETNAME n\r\nSUBSCRIBE c\r\n", "%1\r\n+proto\r\n:3\r\n>3\r\n$9\r\nsubscribe\r\n$1\r\nc\r\n:1\r\n"},
		{"CLIENT REPLY OFF\r\nSET a 1\r\nCLIENT REPLY ON\r\nCLIENT REPLY SKIP\r\nGET a\r\nGET a\r\n", "+OK\r\n$1\r\n1\r\n"},
		{"MONITOR\r\nPING\r\n", "+OK\r\n+1700000000.1 [0 127.0.0.1:1] \"get\"\r\n+PONG\r\n"},
		{"BLPOP k 0\r\nWATCH k\r\nRESET\r\n", "*-1\r\n+OK\r\n+RESET\r\n+OK\r\n"},
		{"GET k\r\nQUIT\r\nGET k\r\n", "$3\r\nabc\r\n+PONG\r\n"},
		{"EVAL x 0\r\n", "*1\r\n*1\r\n*1\r\n*1\r\n*1\r\n*1\r\n*1\r\n*0\r\n"},
	}
	for _, s := range seeds {
		f.Add([]byte(s.cmds), []byte(s.replies))
	}
	f.Fuzz(func(t *testing.T, cmds, replies []byte) {
		// The upstream's close is also lost with replies owed or not, in whatever state the input left: a
		// reconnect is tried (its dials fail) or refused, and either way the session ends.
		srv := &Server{opts: Options{Tokens: fuzzTokens{Token{Username: "oid", Secret: "tok"}}, MaxBulk: 1 << 20,
			WriteTimeout: time.Second, StallTimeout: time.Second, DialTimeout: time.Second,
			Dialer: refusingDialer{}, ReconnectTimeout: 5 * time.Millisecond},
			log: slog.New(slog.NewTextHandler(io.Discard, nil)), obs: NopObserver{}, epoch: time.Now()}
		srv.ctx, srv.cancel = context.WithCancel(context.Background())
		defer srv.cancel()
		client, clientEnd := net.Pipe()
		up, upEnd := net.Pipe()
		s := &session{srv: srv, client: clientEnd, log: srv.log, opened: time.Now()}
		s.init()
		s.cl.up, s.cl.secret = up, "tok"
		s.addConn(up)

		// The client writes its bytes and reads everything; the upstream reads everything and writes its
		// replies in chunks, then closes, which ends the session.
		got := make(chan []byte, 1)
		go func() { b, _ := io.ReadAll(client); got <- b }()
		go func() { client.Write(cmds) }()
		sent := make(chan []byte, 1)
		go func() { b, _ := io.ReadAll(upEnd); sent <- b }()
		go func() {
			chunk := 1
			if len(replies) > 0 {
				chunk = 1 + int(replies[0])%97
			}
			for b := replies; len(b) > 0; {
				n := min(chunk, len(b))
				if _, err := upEnd.Write(b[:n]); err != nil {
					break
				}
				b = b[n:]
			}
			upEnd.Close()
		}()
		done := make(chan struct{})
		go func() { defer close(done); s.serve() }()
		select {
		case <-done:
		case <-time.After(10 * time.Second):
			t.Fatal("the session did not end after the upstream closed")
		}
		client.Close()
		toClient := <-got
		toUpstream := <-sent

		var p resp.CommandParser
		for b := toUpstream; len(b) > 0; {
			cmd, n, err := p.Parse(b)
			if errors.Is(err, resp.ErrIncomplete) {
				break // the last command, cut where the upstream closed while it was being written
			}
			if err != nil || len(cmd.Args) == 0 {
				t.Fatalf("malformed upstream output at %q: %v", b, err)
			}
			b = b[n:]
			switch name := cmd.Args[0]; {
			case equalFold(name, "auth") && (len(cmd.Args) != 3 || string(cmd.Args[1]) != "oid" || string(cmd.Args[2]) != "tok"):
				t.Fatalf("a client AUTH went upstream: %q", cmd.Raw)
			case equalFold(name, "hello") && helloAuthAt(cmd.Args) > 0:
				t.Fatalf("HELLO with AUTH went upstream: %q", cmd.Raw)
			}
		}
		// The proxy's own answers are short lines; beyond them the client only gets upstream bytes.
		local := bytes.Count(cmds, []byte("\n"))*128 + 256
		if len(toClient) > len(replies)+local {
			t.Fatalf("client got %d bytes from %d upstream bytes", len(toClient), len(replies))
		}
	})
}
