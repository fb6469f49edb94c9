package proxy

import (
	"context"
	"io"
	"log/slog"
	"net"
	"testing"
	"time"

	"github.com/entra-redis-proxy/entra-redis-proxy/resp"
)

type fuzzTokens struct{ tok Token }

func (f fuzzTokens) Current() (Token, <-chan struct{})      { return f.tok, nil }
func (f fuzzTokens) Refresh(context.Context) (Token, error) { return f.tok, nil }

// FuzzSessionState drives a session's state tracking with arbitrary client commands, then arbitrary upstream
// replies, without a network. Invariants: nothing panics; what goes upstream is a sequence of well-formed
// commands; the client's own AUTH never goes upstream; no more replies are expected than commands
// were sent; the reply side consumes every well-formed frame and never forwards one the proxy owns.
func FuzzSessionState(f *testing.F) {
	seeds := []struct{ cmds, replies string }{
		{"*2\r\n$4\r\nAUTH\r\n$6\r\nsecret\r\n*1\r\n$4\r\nPING\r\n", "+PONG\r\n+PONG\r\n"},
		{"MULTI\r\nSET a 1\r\nEXEC\r\n", "+OK\r\n+QUEUED\r\n*1\r\n+OK\r\n"},
		{"SUBSCRIBE a b\r\nUNSUBSCRIBE\r\n", "*3\r\n$9\r\nsubscribe\r\n$1\r\na\r\n:1\r\n*3\r\n$7\r\nmessage\r\n$1\r\na\r\n$1\r\nx\r\n*3\r\n$9\r\nsubscribe\r\n$1\r\nb\r\n:2\r\n"},
		{"HELLO 3 AUTH u secret SETNAME n\r\nSUBSCRIBE c\r\n", "%1\r\n+proto\r\n:3\r\n>3\r\n$9\r\nsubscribe\r\n$1\r\nc\r\n:1\r\n"},
		{"CLIENT REPLY OFF\r\nSET a 1\r\nCLIENT REPLY ON\r\nCLIENT REPLY SKIP\r\nGET a\r\nGET a\r\n", "+OK\r\n$1\r\n1\r\n"},
		{"MONITOR\r\nPING\r\n", "+OK\r\n+1700000000.1 [0 127.0.0.1:1] \"get\"\r\n+PONG\r\n"},
		{"BLPOP k 0\r\nWATCH k\r\nRESET\r\n", "*-1\r\n+OK\r\n+RESET\r\n+OK\r\n"},
	}
	for _, s := range seeds {
		f.Add([]byte(s.cmds), []byte(s.replies))
	}
	f.Fuzz(func(t *testing.T, cmds, replies []byte) {
		srv := &Server{opts: Options{Tokens: fuzzTokens{Token{Username: "oid", Secret: "tok"}}, MaxBulk: 1 << 20},
			log: slog.New(slog.NewTextHandler(io.Discard, nil)), obs: NopObserver{}, epoch: time.Now()}
		client, other := net.Pipe()
		defer client.Close()
		defer other.Close()
		s := &session{srv: srv, client: client, log: srv.log, proto: 2, authed: true}
		s.pend.init()

		// Client side: every complete command, as the client loop handles them.
		var p resp.CommandParser
		p.MaxBulk = 1 << 20
		sent := 0
		for b := cmds; len(b) > 0; {
			cmd, n, err := p.Parse(b)
			if err != nil {
				break
			}
			b = b[n:]
			if len(cmd.Args) == 0 {
				continue
			}
			s.handleCommand(cmd, srv.now())
			sent++
		}
		var up resp.CommandParser
		upCmds := 0
		for b := s.out; len(b) > 0; {
			cmd, n, err := up.Parse(b)
			if err != nil || len(cmd.Args) == 0 {
				t.Fatalf("malformed upstream output at %q: %v", b, err)
			}
			b = b[n:]
			upCmds++
			// The client's credentials never go upstream: only the proxy's own AUTH, and HELLO without AUTH.
			switch name := cmd.Args[0]; {
			case equalFold(name, "auth") && (len(cmd.Args) != 3 || string(cmd.Args[1]) != "oid" || string(cmd.Args[2]) != "tok"):
				t.Fatalf("a client AUTH went upstream: %q", cmd.Raw)
			case equalFold(name, "hello") && helloAuthAt(cmd.Args) > 0:
				t.Fatalf("HELLO with AUTH went upstream: %q", cmd.Raw)
			}
		}
		if len(s.entries) > upCmds {
			t.Fatalf("%d replies expected for %d commands sent upstream", len(s.entries), upCmds)
		}
		if !s.pend.push(s.entries) {
			t.Fatal("push failed")
		}

		// Reply side: classify and frame every reply, as the reply loop does.
		sc := resp.Scanner{MaxBulk: 1 << 20, MaxDepth: 128}
		var h resp.Head
		for b := replies; len(b) > 0; {
			ok, err := s.classify(b, &h)
			if err != nil || !ok {
				return // malformed or incomplete upstream input: the loop would close or read more
			}
			if s.curReply && s.curFwd && (s.cur.act == actAuth || s.cur.act == actDrop || s.cur.act == actFail || s.cur.act == actMarker) {
				t.Fatalf("a reply the proxy owns (action %d) would reach the client: %q", s.cur.act, b)
			}
			sc.Reset()
			n, done, err := sc.Scan(b)
			if err != nil || !done {
				return
			}
			if s.curFwd {
				s.emit(b[:n])
			}
			s.frameDone()
			b = b[n:]
		}
		if n := s.pend.len(); n < 0 || n > upCmds {
			t.Fatalf("%d replies pending for %d commands sent (%d from the client)", n, upCmds, sent)
		}
	})
}
