package proxy

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"strconv"
	"time"

	"github.com/entra-redis-proxy/entra-redis-proxy/resp"
)

const (
	// maxCtrlReply bounds a control reply: far above what the proxy's own commands get back.
	maxCtrlReply = 1 << 20
	// ctrlTimeout bounds each exchange whose context has no deadline.
	ctrlTimeout = 10 * time.Second
	// skipMaxBulk is the Scanner's bound on bulks: the largest a skipLarge connection reads through.
	skipMaxBulk = 1 << 40
)

// errReplyTooLarge is a control reply longer than its connection's bound.
var errReplyTooLarge = errors.New("reply too large")

// appendAuthCmd appends the proxy's AUTH for tok. Every AUTH the proxy sends is built here.
func appendAuthCmd(dst []byte, tok Token) []byte {
	return resp.AppendCommand(dst, "AUTH", tok.Username, tok.Secret)
}

// ctrlConn runs short request/reply exchanges on an upstream connection that the proxy owns, never on a
// client's session: the handshake, PING, PUBLISH, CLIENT UNBLOCK, XINFO, pool upkeep, subscriber
// confirmations. Each request is one write; each command gets exactly one whole reply back, framed by
// resp.Scanner so that a reply may arrive in any number of reads.
//
// Error replies ('-') are replies, not errors: the exchange is still in step, and the caller decides what
// they mean (AUTH's WRONGPASS is retried, XINFO's "no such key" means 0-0); reply.expect turns any reply
// other than the wanted type into an error. The methods' errors are about the connection: I/O, a malformed
// or too large reply, the context's end. After one the connection is out of step: close it.
//
// Every step has the context's deadline (ctrlTimeout if it has none), and cancelling the context
// interrupts a blocked step. The deadline is cleared after each call, so the connection can be handed on.
// A ctrlConn belongs to the one goroutine running the exchange.
type ctrlConn struct {
	conn net.Conn
	// max bounds one reply in bytes. A larger one is an error, unless skipLarge is set: then it is read
	// through and returned truncated, with the elements that fit in max.
	max       int
	skipLarge bool

	buf   []byte // bytes read; buf[r:w] not yet consumed
	r, w  int
	frame []byte       // the last whole reply read, as sent (in buf: valid until the next read)
	sc    resp.Scanner // frames the reply being read
}

func newCtrlConn(c net.Conn) *ctrlConn {
	return &ctrlConn{conn: c, max: maxCtrlReply}
}

// reply is one whole reply to a control command, decoded as far as the callers need.
type reply struct {
	typ  byte   // the RESP type byte: '+', '-', ':', '$', '*', '%', '_', ...
	text string // a simple string's or error's line without the type byte, a bulk string's body
	num  int64  // an integer reply's value
	null bool   // a null ("$-1", "*-1", "_")
	// elems holds an aggregate's top-level elements as text (a map's keys and values alternate, attributes
	// are skipped); a nested aggregate or a null element is "".
	elems []string
	// truncated marks a reply larger than the bound, read through by a skipLarge connection: elems holds
	// only the elements that fit, text is empty for a bulk string.
	truncated bool
}

// replyError is an error reply, when a caller treats it as a failure.
type replyError struct{ line string }

func (e *replyError) Error() string { return e.line }

// err returns the error reply r as an error, or nil if r is not one.
func (r reply) err() error {
	if r.typ == '-' || r.typ == '!' {
		return &replyError{r.text}
	}
	return nil
}

// expect returns nil if r has type typ, the error reply if it is one, or else an error describing r.
func (r reply) expect(typ byte) error {
	switch {
	case r.typ == typ:
		return nil
	case r.err() != nil:
		return r.err()
	}
	return fmt.Errorf("unexpected reply %s", r)
}

// field returns the value after key in an aggregate of alternating keys and values (a map, or a RESP2
// array that stands for one, such as XINFO STREAM's).
func (r reply) field(key string) (string, bool) {
	for i := 0; i+1 < len(r.elems); i += 2 {
		if r.elems[i] == key {
			return r.elems[i+1], true
		}
	}
	return "", false
}

// String describes r briefly, for errors.
func (r reply) String() string {
	var s string
	switch r.typ {
	case '*', '~', '>', '%':
		s = fmt.Sprintf("%c%d %q", r.typ, len(r.elems), r.elems)
	default:
		s = string(r.typ) + r.text
	}
	return strconv.Quote(truncate(s, 80))
}

// do sends one command and returns its reply.
func (c *ctrlConn) do(ctx context.Context, args ...string) (reply, error) {
	rs, err := c.pipeline(ctx, resp.AppendCommand(nil, args...), 1)
	if err != nil {
		return reply{}, err
	}
	return rs[0], nil
}

// pipeline writes cmds, n encoded commands, in one write and returns their n replies.
func (c *ctrlConn) pipeline(ctx context.Context, cmds []byte, n int) ([]reply, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	defer c.arm(ctx)()
	if _, err := c.conn.Write(cmds); err != nil {
		return nil, fmt.Errorf("write: %w", c.cause(ctx, err))
	}
	rs := make([]reply, 0, n)
	for range n {
		r, err := c.next(ctx)
		if err != nil {
			return nil, err
		}
		rs = append(rs, r)
	}
	return rs, nil
}

// send writes cmds without reading, for an exchange whose number of replies the caller works out as they
// come (subscriber confirmations, with messages among them): it reads them with read.
func (c *ctrlConn) send(ctx context.Context, cmds []byte) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	defer c.arm(ctx)()
	if _, err := c.conn.Write(cmds); err != nil {
		return fmt.Errorf("write: %w", c.cause(ctx, err))
	}
	return nil
}

// read returns the next reply.
func (c *ctrlConn) read(ctx context.Context) (reply, error) {
	if err := ctx.Err(); err != nil {
		return reply{}, err
	}
	defer c.arm(ctx)()
	return c.next(ctx)
}

// buffered returns the bytes read after the last reply, for whoever reads the connection next. They stay
// valid until the next call.
func (c *ctrlConn) buffered() []byte { return c.buf[c.r:c.w] }

// arm sets the connection's deadline for one call, and makes ctx's cancellation interrupt it. The returned
// func clears the deadline once nothing can set it any more.
func (c *ctrlConn) arm(ctx context.Context) (disarm func()) {
	deadline, ok := ctx.Deadline()
	if !ok {
		deadline = time.Now().Add(ctrlTimeout)
	}
	c.conn.SetDeadline(deadline)
	interrupted := make(chan struct{})
	stop := context.AfterFunc(ctx, func() {
		c.conn.SetDeadline(time.Unix(1, 0))
		close(interrupted)
	})
	return func() {
		if !stop() {
			<-interrupted
		}
		c.conn.SetDeadline(time.Time{})
	}
}

// cause names an I/O error after the context when the deadline or a cancellation ended the step.
func (c *ctrlConn) cause(ctx context.Context, err error) error {
	if !errors.Is(err, os.ErrDeadlineExceeded) {
		return err
	}
	if cerr := ctx.Err(); cerr != nil {
		return cerr
	}
	return context.DeadlineExceeded // the deadline was the context's, or ctrlTimeout in its place
}

// next reads one whole reply. Its frame must fit in max bytes, unless skipLarge.
func (c *ctrlConn) next(ctx context.Context) (reply, error) {
	c.sc.Reset()
	c.sc.MaxBulk = skipMaxBulk // the buffer bounds the reply; a long bulk is errReplyTooLarge, or read through
	end := c.r                 // c.buf[c.r:end] is scanned
	var big *reply             // the head of a reply too large to hold, while the rest of it is read through
	var rerr error
	for {
		if end < c.w {
			n, done, err := c.sc.Scan(c.buf[end:c.w])
			if err != nil {
				return reply{}, fmt.Errorf("upstream reply: %w", err)
			}
			end += n
			if done {
				frame := c.buf[c.r:end]
				c.r, c.frame = end, frame
				if big != nil {
					return *big, nil
				}
				return decodeReply(frame, false)
			}
			if big != nil {
				c.r, c.w, end = 0, 0, 0 // all of it belongs to the reply being read through
			}
		}
		if rerr != nil {
			return reply{}, fmt.Errorf("read: %w", c.cause(ctx, rerr))
		}
		if big == nil && c.w-c.r >= c.max {
			if !c.skipLarge {
				return reply{}, fmt.Errorf("%w (more than %d bytes)", errReplyTooLarge, c.max)
			}
			r, err := decodeReply(c.buf[c.r:c.w], true)
			if err != nil {
				return reply{}, err
			}
			big = &r
			c.r, c.w, end = 0, 0, 0
		}
		end -= c.makeRoom()
		var k int
		k, rerr = c.conn.Read(c.buf[c.w:])
		c.w += k
	}
}

// makeRoom makes space after c.w, moving the unconsumed bytes to the front and growing the buffer up to
// max. It returns how far the bytes moved.
func (c *ctrlConn) makeRoom() int {
	if c.w < len(c.buf) {
		return 0
	}
	moved := c.r
	if c.r > 0 {
		c.w = copy(c.buf, c.buf[c.r:c.w])
		c.r = 0
		if c.w < len(c.buf) {
			return moved
		}
	}
	nb := make([]byte, min(max(2*len(c.buf), 512), c.max))
	c.w = copy(nb, c.buf[:c.w])
	c.buf = nb
	return moved
}

// decodeReply decodes the reply frame in p. When truncated, p holds only the frame's first bytes, and
// only the aggregate elements that are whole in p are decoded.
func decodeReply(p []byte, truncated bool) (reply, error) {
	var h resp.Head
	ok, err := resp.PeekHead(p, 0, &h)
	if err != nil {
		return reply{}, fmt.Errorf("upstream reply: %w", err)
	}
	if !ok {
		return reply{}, fmt.Errorf("upstream reply: %w: head longer than %d bytes", resp.ErrInvalidReply, len(p))
	}
	r := reply{typ: h.Type, truncated: truncated}
	body := h.AttrLen + bytes.Index(p[h.AttrLen:], []byte("\r\n")) + 2 // after the header line
	switch h.Type {
	case ':':
		if r.num, err = strconv.ParseInt(string(h.Line), 10, 64); err != nil {
			return reply{}, fmt.Errorf("upstream reply: %w: integer %q", resp.ErrInvalidReply, truncate(string(h.Line), 30))
		}
		r.text = string(h.Line)
	case '_':
		r.null = true
	case '$', '!', '=':
		if h.Len < 0 {
			r.null = true
		} else if !truncated {
			r.text = string(p[body : body+int(h.Len)])
		}
	case '*', '~', '>', '%':
		if h.Len < 0 {
			r.null = true
			break
		}
		count := h.Len
		if h.Type == '%' {
			count *= 2
		}
		var sc resp.Scanner
		sc.MaxBulk = skipMaxBulk // p bounds the elements already
		for off := body; int64(len(r.elems)) < count; {
			sc.Reset()
			n, done, err := sc.Scan(p[off:])
			if err != nil {
				return reply{}, fmt.Errorf("upstream reply: %w", err)
			}
			if !done {
				break // truncated: the rest did not fit
			}
			r.elems = append(r.elems, elemText(p[off:off+n]))
			off += n
		}
	default: // + - , ( #
		r.text = string(h.Line)
	}
	return r, nil
}

// elemText is the text of a whole element frame: a simple string's line or a bulk string's body; "" for
// nulls and aggregates.
func elemText(p []byte) string {
	var h resp.Head
	if ok, err := resp.PeekHead(p, 0, &h); !ok || err != nil {
		return ""
	}
	switch h.Type {
	case '+', '-', ':', ',', '(', '#':
		return string(h.Line)
	case '$', '!', '=':
		if h.Len < 0 {
			return ""
		}
		body := h.AttrLen + bytes.Index(p[h.AttrLen:], []byte("\r\n")) + 2
		return string(p[body : body+int(h.Len)])
	}
	return ""
}
