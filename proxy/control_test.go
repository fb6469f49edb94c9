package proxy

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"reflect"
	"strings"
	"testing"
	"testing/synctest"
	"time"

	"github.com/entra-redis-proxy/entra-redis-proxy/resp"
)

// step is one exchange of a scripted upstream: the exact bytes it must receive, then the bytes it answers.
type step struct{ want, reply string }

// scriptedPeer plays the upstream on c. It writes each reply one byte at a time, so that every byte
// boundary of a reply is also a read boundary on the other end, unless whole is set. It closes c at the
// end of the script; the returned channel gets the first mismatch, or nil.
func scriptedPeer(c net.Conn, whole bool, steps ...step) <-chan error {
	done := make(chan error, 1)
	go func() {
		defer c.Close()
		for i, s := range steps {
			got := make([]byte, len(s.want))
			if _, err := io.ReadFull(c, got); err != nil {
				done <- fmt.Errorf("step %d: read: %v", i, err)
				return
			}
			if string(got) != s.want {
				done <- fmt.Errorf("step %d: got %q, want %q", i, got, s.want)
				return
			}
			if whole {
				if _, err := c.Write([]byte(s.reply)); err != nil {
					done <- fmt.Errorf("step %d: write: %v", i, err)
					return
				}
				continue
			}
			for j := range len(s.reply) {
				if _, err := c.Write([]byte{s.reply[j]}); err != nil {
					done <- fmt.Errorf("step %d: write: %v", i, err)
					return
				}
			}
		}
		done <- nil
	}()
	return done
}

func cmd(args ...string) string { return string(resp.AppendCommand(nil, args...)) }

// bulks encodes a RESP2 array of bulk strings; an element starting with '*' or ':' is put in as is.
func bulks(elems ...string) string {
	s := fmt.Sprintf("*%d\r\n", len(elems))
	for _, e := range elems {
		if strings.HasPrefix(e, "*") || strings.HasPrefix(e, ":") {
			s += e
		} else {
			s += fmt.Sprintf("$%d\r\n%s\r\n", len(e), e)
		}
	}
	return s
}

// xinfo is XINFO STREAM's RESP2 reply as redis 7.0 sends it for a stream of one entry.
var xinfo = bulks("length", ":1\r\n", "radix-tree-keys", ":1\r\n", "radix-tree-nodes", ":2\r\n",
	"last-generated-id", "1700000000000-3", "max-deleted-entry-id", "0-0", "entries-added", ":1\r\n",
	"recorded-first-entry-id", "1700000000000-3", "groups", ":0\r\n",
	"first-entry", bulks("1700000000000-3", bulks("f", "v")), "last-entry", bulks("1700000000000-3", bulks("f", "v")))

// Each reply is read whole and decoded, however the reads split it.
func TestControlReplies(t *testing.T) {
	tcs := []struct {
		desc  string
		reply string
		want  reply
	}{
		{"status", "+OK\r\n", reply{typ: '+', text: "OK"}},
		{"error", "-WRONGPASS invalid username-password pair or user is disabled.\r\n",
			reply{typ: '-', text: "WRONGPASS invalid username-password pair or user is disabled."}},
		{"integer", ":-42\r\n", reply{typ: ':', text: "-42", num: -42}},
		{"bulk", "$4\r\na\r\nb\r\n", reply{typ: '$', text: "a\r\nb"}},
		{"empty bulk", "$0\r\n\r\n", reply{typ: '$'}},
		{"null bulk", "$-1\r\n", reply{typ: '$', null: true}},
		{"null array", "*-1\r\n", reply{typ: '*', null: true}},
		{"resp3 null", "_\r\n", reply{typ: '_', null: true}},
		{"subscribe confirmation", bulks("subscribe", "ch", ":1\r\n"),
			reply{typ: '*', elems: []string{"subscribe", "ch", "1"}}},
		{"xinfo stream", xinfo, reply{typ: '*', elems: []string{"length", "1", "radix-tree-keys", "1",
			"radix-tree-nodes", "2", "last-generated-id", "1700000000000-3", "max-deleted-entry-id", "0-0",
			"entries-added", "1", "recorded-first-entry-id", "1700000000000-3", "groups", "0",
			"first-entry", "", "last-entry", ""}}},
		{"map with a nested aggregate", "%2\r\n+last-generated-id\r\n$3\r\n1-0\r\n$5\r\nentry\r\n*1\r\n:1\r\n",
			reply{typ: '%', elems: []string{"last-generated-id", "1-0", "entry", ""}}},
		{"attribute before the value", "|1\r\n+key\r\n+val\r\n:5\r\n", reply{typ: ':', text: "5", num: 5}},
		{"attribute on an element", "*2\r\n|1\r\n+a\r\n+b\r\n$1\r\nx\r\n+y\r\n", reply{typ: '*', elems: []string{"x", "y"}}},
		{"null elements", "*2\r\n$-1\r\n_\r\n", reply{typ: '*', elems: []string{"", ""}}},
	}
	for _, tc := range tcs {
		t.Run(tc.desc, func(t *testing.T) {
			synctest.Test(t, func(t *testing.T) {
				a, b := net.Pipe()
				defer a.Close()
				peer := scriptedPeer(b, false, step{cmd("PING"), tc.reply})
				c := newCtrlConn(a)
				got, err := c.do(context.Background(), "PING")
				if err != nil {
					t.Fatal(err)
				}
				if !reflect.DeepEqual(got, tc.want) {
					t.Errorf("got %#v, want %#v", got, tc.want)
				}
				if len(c.buffered()) != 0 {
					t.Errorf("%q left after the reply", c.buffered())
				}
				if err := <-peer; err != nil {
					t.Error(err)
				}
			})
		})
	}
}

// A pipeline writes its commands in one write and takes one reply per command; what comes after stays
// buffered for the next read.
func TestControlPipeline(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		a, b := net.Pipe()
		defer a.Close()
		push := ">3\r\n$7\r\nmessage\r\n$2\r\nch\r\n$2\r\nhi\r\n"
		peer := scriptedPeer(b, true,
			step{cmd("AUTH", "oid", "tok") + cmd("CLIENT", "ID"), "+OK\r\n:7\r\n" + bulks("subscribe", "ch", ":1\r\n") + push})
		c := newCtrlConn(a)
		rs, err := c.pipeline(context.Background(), resp.AppendCommand(appendAuthCmd(nil, Token{Username: "oid", Secret: "tok"}), "CLIENT", "ID"), 2)
		if err != nil {
			t.Fatal(err)
		}
		if len(rs) != 2 || rs[0].expect('+') != nil || rs[1].num != 7 {
			t.Fatalf("replies %v", rs)
		}
		r, err := c.read(context.Background())
		if err != nil || r.elems[0] != "subscribe" {
			t.Fatalf("read: %v, %v", r, err)
		}
		if string(c.buffered()) != push {
			t.Errorf("buffered %q, want the push %q", c.buffered(), push)
		}
		if err := <-peer; err != nil {
			t.Error(err)
		}
	})
}

// expect and err turn replies the caller did not want into errors, error replies into *replyError.
func TestControlExpect(t *testing.T) {
	wrong := reply{typ: '-', text: "WRONGPASS invalid"}
	var re *replyError
	if err := wrong.expect('+'); !errors.As(err, &re) || re.line != "WRONGPASS invalid" {
		t.Errorf("expect on an error reply: %v", err)
	}
	if err := (reply{typ: ':', text: "0", num: 0}).expect('+'); err == nil || !strings.Contains(err.Error(), `unexpected reply ":0"`) {
		t.Errorf("expect on the wrong type: %v", err)
	}
	if err := (reply{typ: '+', text: "OK"}).expect('+'); err != nil {
		t.Errorf("expect on the wanted type: %v", err)
	}
	if err := (reply{typ: '+', text: "OK"}).err(); err != nil {
		t.Errorf("err on a status: %v", err)
	}
	id, ok := reply{typ: '*', elems: []string{"length", "1", "last-generated-id", "5-1"}}.field("last-generated-id")
	if !ok || id != "5-1" {
		t.Errorf("field: %q, %v", id, ok)
	}
	if _, ok := (reply{typ: '*', elems: []string{"length", "1", "last-generated-id"}}).field("last-generated-id"); ok {
		t.Error("field found a key without a value")
	}
}

// Malformed replies are errors wrapping resp.ErrInvalidReply.
func TestControlMalformed(t *testing.T) {
	for _, bad := range []string{"?what\r\n", ":12x\r\n", "$3\r\nabcd\r\n", "*1\r\n$1\r\nab\r\n"} {
		t.Run(bad, func(t *testing.T) {
			synctest.Test(t, func(t *testing.T) {
				a, b := net.Pipe()
				defer a.Close()
				peer := scriptedPeer(b, false, step{cmd("PING"), bad})
				_, err := newCtrlConn(a).do(context.Background(), "PING")
				if !errors.Is(err, resp.ErrInvalidReply) {
					t.Errorf("got %v, want ErrInvalidReply", err)
				}
				a.Close()
				<-peer
			})
		})
	}
}

// A reply longer than the bound is refused; the buffer never grows past the bound.
func TestControlTooLarge(t *testing.T) {
	for _, long := range []string{
		"$100\r\n" + strings.Repeat("x", 100) + "\r\n",
		"+" + strings.Repeat("x", 100) + "\r\n",
		bulks(strings.Split(strings.Repeat("x", 50), "")...),
	} {
		synctest.Test(t, func(t *testing.T) {
			a, b := net.Pipe()
			defer a.Close()
			peer := scriptedPeer(b, false, step{cmd("PING"), long})
			c := newCtrlConn(a)
			c.max = 64
			_, err := c.do(context.Background(), "PING")
			if !errors.Is(err, errReplyTooLarge) {
				t.Errorf("got %v, want errReplyTooLarge", err)
			}
			if len(c.buf) > c.max {
				t.Errorf("buffer grew to %d bytes, bound %d", len(c.buf), c.max)
			}
			a.Close()
			<-peer
		})
	}
}

// With skipLarge, a reply longer than the bound is read through and returned with the elements that fit,
// and the connection stays in step.
func TestControlSkipLarge(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		a, b := net.Pipe()
		defer a.Close()
		big := strings.Repeat("p", 1000)
		peer := scriptedPeer(b, false,
			step{cmd("SUBSCRIBE", "ch"), bulks("message", "ch", big) + bulks("subscribe", "ch", ":1\r\n")},
			step{cmd("PING"), "$1000\r\n" + big + "\r\n+PONG\r\n"})
		c := newCtrlConn(a)
		c.max, c.skipLarge = 64, true
		ctx := context.Background()
		if err := c.send(ctx, []byte(cmd("SUBSCRIBE", "ch"))); err != nil {
			t.Fatal(err)
		}
		r, err := c.read(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if want := (reply{typ: '*', elems: []string{"message", "ch"}, truncated: true}); !reflect.DeepEqual(r, want) {
			t.Errorf("long message: %#v, want %#v", r, want)
		}
		if r, err = c.read(ctx); err != nil || !reflect.DeepEqual(r.elems, []string{"subscribe", "ch", "1"}) {
			t.Errorf("confirmation after it: %v, %v", r, err)
		}
		rs, err := c.pipeline(ctx, []byte(cmd("PING")), 2)
		if err != nil {
			t.Fatal(err)
		}
		if want := (reply{typ: '$', truncated: true}); !reflect.DeepEqual(rs[0], want) {
			t.Errorf("long bulk: %#v, want %#v", rs[0], want)
		}
		if rs[1].typ != '+' || rs[1].text != "PONG" {
			t.Errorf("reply after it: %v", rs[1])
		}
		if len(c.buf) > c.max {
			t.Errorf("buffer grew to %d bytes, bound %d", len(c.buf), c.max)
		}
		if err := <-peer; err != nil {
			t.Error(err)
		}
	})
}

// silentPeer reads and discards everything, never answering, until c is closed.
func silentPeer(c net.Conn) <-chan struct{} {
	done := make(chan struct{})
	go func() {
		io.Copy(io.Discard, c)
		c.Close()
		close(done)
	}()
	return done
}

// Every step ends at the context's deadline (or ctrlTimeout without one), or as soon as it is cancelled.
func TestControlDeadline(t *testing.T) {
	tcs := []struct {
		desc    string
		ctx     func() (context.Context, context.CancelFunc)
		silent  bool // the peer reads but never answers; else it never reads (the write blocks)
		wantErr error
		after   time.Duration
	}{
		{"read, context deadline", func() (context.Context, context.CancelFunc) {
			return context.WithTimeout(context.Background(), 3*time.Second)
		}, true, context.DeadlineExceeded, 3 * time.Second},
		{"write, context deadline", func() (context.Context, context.CancelFunc) {
			return context.WithTimeout(context.Background(), 3*time.Second)
		}, false, context.DeadlineExceeded, 3 * time.Second},
		{"read, no deadline", func() (context.Context, context.CancelFunc) {
			return context.WithCancel(context.Background())
		}, true, context.DeadlineExceeded, ctrlTimeout},
		{"read, cancelled", func() (context.Context, context.CancelFunc) {
			ctx, cancel := context.WithCancel(context.Background())
			time.AfterFunc(time.Second, cancel)
			return ctx, cancel
		}, true, context.Canceled, time.Second},
		{"write, cancelled", func() (context.Context, context.CancelFunc) {
			ctx, cancel := context.WithCancel(context.Background())
			time.AfterFunc(time.Second, cancel)
			return ctx, cancel
		}, false, context.Canceled, time.Second},
	}
	for _, tc := range tcs {
		t.Run(tc.desc, func(t *testing.T) {
			synctest.Test(t, func(t *testing.T) {
				a, b := net.Pipe()
				var done <-chan struct{}
				if tc.silent {
					done = silentPeer(b)
				} else {
					closed := make(chan struct{})
					close(closed)
					done = closed
					defer b.Close()
				}
				ctx, cancel := tc.ctx()
				defer cancel()
				start := time.Now()
				_, err := newCtrlConn(a).do(ctx, "PING")
				if !errors.Is(err, tc.wantErr) {
					t.Errorf("got %v, want %v", err, tc.wantErr)
				}
				if d := time.Since(start); d != tc.after {
					t.Errorf("returned after %v, want %v", d, tc.after)
				}
				a.Close()
				<-done
			})
		})
	}
}

// A call that is over leaves no deadline on the connection, so it can be handed on.
func TestControlDeadlineCleared(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		a, b := net.Pipe()
		defer a.Close()
		peer := scriptedPeer(b, false, step{cmd("PING"), "+PONG\r\n"}, step{"", "+late\r\n"})
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		defer cancel()
		if _, err := newCtrlConn(a).do(ctx, "PING"); err != nil {
			t.Fatal(err)
		}
		time.Sleep(2 * time.Second) // past the call's deadline
		got := make([]byte, len("+late\r\n"))
		if _, err := io.ReadFull(a, got); err != nil {
			t.Fatalf("read after the call: %v", err)
		}
		if err := <-peer; err != nil {
			t.Error(err)
		}
	})
}

// refreshing is a TokenSource whose Refresh hands out next.
type refreshing struct {
	cur, next Token
	refreshes int
}

func (r *refreshing) Current() (Token, <-chan struct{}) { return r.cur, nil }
func (r *refreshing) Refresh(context.Context) (Token, error) {
	r.refreshes++
	return r.next, nil
}

// The handshake sends AUTH and CLIENT ID in one write; on WRONGPASS it tries once more with a fresh token.
func TestControlHandshake(t *testing.T) {
	old := Token{Username: "oid", Secret: "old-secret"}
	fresh := Token{Username: "oid", Secret: "fresh-secret"}
	hello := func(tok Token) string { return cmd("AUTH", tok.Username, tok.Secret) + cmd("CLIENT", "ID") }
	const wrongpass = "-WRONGPASS invalid username-password pair or user is disabled.\r\n"
	tcs := []struct {
		desc      string
		next      Token // what Refresh returns
		steps     []step
		wantID    int64
		wantTok   Token
		refreshes int
		wantErr   string // "" for success
	}{
		{"accepted", fresh, []step{{hello(old), "+OK\r\n:12\r\n"}}, 12, old, 0, ""},
		{"CLIENT ID refused", fresh, []step{{hello(old), "+OK\r\n-ERR unknown command 'CLIENT'\r\n"}}, 0, old, 0, ""},
		{"WRONGPASS, then the fresh token", fresh,
			[]step{{hello(old), wrongpass + ":7\r\n"}, {hello(fresh), "+OK\r\n:9\r\n"}}, 9, fresh, 1, ""},
		{"WRONGPASS twice", fresh,
			[]step{{hello(old), wrongpass + ":7\r\n"}, {hello(fresh), wrongpass + ":8\r\n"}}, 0, fresh, 1,
			"upstream refused AUTH for username oid: WRONGPASS"},
		{"WRONGPASS, no newer token", old, []step{{hello(old), wrongpass + ":7\r\n"}}, 0, old, 1,
			"upstream refused AUTH for username oid: WRONGPASS"},
		{"other refusal: no retry", fresh, []step{{hello(old), "-ERR AUTH <password> called without any password configured\r\n:7\r\n"}}, 0, old, 0,
			"upstream refused AUTH for username oid: ERR AUTH"},
		{"AUTH answered oddly", fresh, []step{{hello(old), ":1\r\n:7\r\n"}}, 0, old, 0, `AUTH: unexpected reply ":1"`},
	}
	for _, tc := range tcs {
		t.Run(tc.desc, func(t *testing.T) {
			synctest.Test(t, func(t *testing.T) {
				a, b := net.Pipe()
				defer a.Close()
				peer := scriptedPeer(b, false, tc.steps...)
				src := &refreshing{cur: old, next: tc.next}
				ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
				defer cancel()
				id, tok, err := newCtrlConn(a).handshake(ctx, old, src)
				if tc.wantErr == "" && err != nil || tc.wantErr != "" && (err == nil || !strings.Contains(err.Error(), tc.wantErr)) {
					t.Fatalf("error %v, want %q", err, tc.wantErr)
				}
				if err != nil && (strings.Contains(err.Error(), old.Secret) || strings.Contains(err.Error(), fresh.Secret)) {
					t.Errorf("the error reveals a token: %v", err)
				}
				if id != tc.wantID || tok != tc.wantTok || src.refreshes != tc.refreshes {
					t.Errorf("id %d, token %v, %d refreshes; want %d, %v, %d", id, tok, src.refreshes, tc.wantID, tc.wantTok, tc.refreshes)
				}
				if err := <-peer; err != nil {
					t.Error(err)
				}
			})
		})
	}
}

// pipeDialer hands out one end of a pipe whose other end plays the script.
type pipeDialer struct {
	whole bool
	steps []step
	peer  <-chan error
}

func (d *pipeDialer) DialContext(context.Context) (net.Conn, error) {
	a, b := net.Pipe()
	d.peer = scriptedPeer(b, d.whole, d.steps...)
	return a, nil
}

// Probe authenticates, pings, and says which step failed.
func TestProbeScripted(t *testing.T) {
	tok := Token{Username: "oid", Secret: "secret"}
	hello := cmd("AUTH", "oid", "secret") + cmd("CLIENT", "ID")
	tcs := []struct {
		desc     string
		steps    []step
		wantStep string // "" for success
	}{
		{"ok", []step{{hello, "+OK\r\n:31\r\n"}, {cmd("PING"), "+PONG\r\n"}}, ""},
		{"auth refused", []step{{hello, "-WRONGPASS invalid\r\n:31\r\n"}}, "auth"},
		{"PING refused", []step{{hello, "+OK\r\n:31\r\n"}, {cmd("PING"), "-NOPERM this user has no permissions\r\n"}}, "ping"},
		{"connection closed before PONG", []step{{hello, "+OK\r\n:31\r\n"}, {cmd("PING"), "+PO"}}, "ping"},
	}
	for _, tc := range tcs {
		t.Run(tc.desc, func(t *testing.T) {
			synctest.Test(t, func(t *testing.T) {
				ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
				defer cancel()
				d := &pipeDialer{steps: tc.steps}
				id, err := Probe(ctx, d, tok)
				if tc.wantStep == "" {
					if err != nil || id != 31 {
						t.Errorf("Probe: %d, %v", id, err)
					}
				} else if err == nil || ProbeStep(err) != tc.wantStep {
					t.Errorf("Probe: %v (step %q), want a failure at %q", err, ProbeStep(err), tc.wantStep)
				}
				if err := <-d.peer; err != nil {
					t.Error(err)
				}
			})
		})
	}
}

// The one AUTH builder writes AUTH <username> <secret>, and printing the token never shows the secret.
func TestAuthCmd(t *testing.T) {
	tok := Token{Username: "oid", Secret: "s3cret"}
	if got, want := string(appendAuthCmd([]byte("x"), tok)), "x*3\r\n$4\r\nAUTH\r\n$3\r\noid\r\n$6\r\ns3cret\r\n"; got != want {
		t.Errorf("got %q, want %q", got, want)
	}
	var b bytes.Buffer
	fmt.Fprintf(&b, "%v %+v %#v %s", tok, tok, tok, tok)
	if strings.Contains(b.String(), "s3cret") {
		t.Errorf("a printed Token shows its secret: %s", b.String())
	}
}

// decodeReply never panics on what the Scanner frames, whole or truncated at any point.
func FuzzControlDecode(f *testing.F) {
	for _, s := range []string{"+OK\r\n", ":1\r\n", "$3\r\nabc\r\n", xinfo, "%1\r\n+a\r\n*1\r\n:1\r\n", "|1\r\n+a\r\n+b\r\n:5\r\n", "*2\r\n$-1\r\n_\r\n"} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, p []byte) {
		var sc resp.Scanner
		sc.MaxBulk = skipMaxBulk
		n, done, err := sc.Scan(p)
		if err != nil {
			return
		}
		if done {
			if _, err := decodeReply(p[:n], false); err != nil && !errors.Is(err, resp.ErrInvalidReply) {
				t.Errorf("whole frame %q: %v", p[:n], err)
			}
		}
		for i := range n {
			decodeReply(p[:i], true)
		}
	})
}
