package resp

import (
	"bytes"
	"math"

	"github.com/tidwall/redcon"
)

const (
	// DefaultMaxBulk is the largest bulk length accepted when MaxBulk is 0, like Redis's
	// proto-max-bulk-len default.
	DefaultMaxBulk = 512 << 20
	// inlineMax is Redis's PROTO_INLINE_MAX_SIZE: the longest inline line or header line before '\r'.
	inlineMax = 64 << 10
	// maxMultibulk is the largest multibulk count Redis 7.0 accepts (INT_MAX).
	maxMultibulk = math.MaxInt32
	// MaxUnauthArgs and MaxUnauthBulk are Redis's bounds on a multibulk command before AUTH (networking.c).
	MaxUnauthArgs = 10
	MaxUnauthBulk = 16384
	// keepArgs bounds the argument slice a CommandParser keeps between commands, so one huge command
	// does not pin its memory for the life of the connection.
	keepArgs = 1024
)

// CommandParser parses complete client commands, multibulk or inline, from a buffer. The zero value is
// ready to use; a CommandParser belongs to one connection (it reuses its buffers).
type CommandParser struct {
	// MaxBulk is the largest bulk length accepted; 0 means DefaultMaxBulk (Redis's proto-max-bulk-len).
	MaxBulk int64
	// Unauthenticated applies Redis's limits for a client that has not authenticated yet: at most
	// MaxUnauthArgs arguments of at most MaxUnauthBulk bytes in a multibulk command.
	Unauthenticated bool

	args [][]byte // Command.Args storage, reused
	offs []int    // inline arguments as start/end offsets into buf
	buf  []byte   // inline arguments, unescaped
	raw  []byte   // an inline command re-encoded as multibulk
}

// Command is one parsed client command.
type Command struct {
	// Args holds the arguments. For a multibulk command they are sub-slices of the input (zero copy); for
	// an inline command they point into the parser. Valid until the next Parse.
	Args [][]byte
	// Raw is the command as RESP multibulk, to forward: the input bytes themselves for a multibulk command
	// (Redis's leniencies included), re-encoded for an inline command. Nil when Args is empty. Valid until
	// the next Parse.
	Raw []byte
}

// Parse parses the command at the start of b. The results are:
//   - a command: n > 0, err == nil, len(cmd.Args) > 0;
//   - nothing to run, which Redis skips without a reply (an empty inline line, a multibulk count <= 0):
//     n > 0, err == nil, len(cmd.Args) == 0;
//   - more bytes needed: n == 0, err == ErrIncomplete;
//   - a client protocol error: n == 0, err is a *ProtocolError worded as Redis words it. It is reported
//     as soon as Redis itself would report it: a bad header once its line is complete, even when the
//     rest of the command has not arrived; a line (inline, or header up to '\r') once it exceeds 64 KiB.
func (p *CommandParser) Parse(b []byte) (cmd Command, n int, err error) {
	if len(b) == 0 {
		return Command{}, 0, ErrIncomplete
	}
	if b[0] == '*' {
		return p.parseMultibulk(b)
	}
	return p.parseInline(b)
}

func (p *CommandParser) maxBulk() int64 {
	if p.MaxBulk > 0 {
		return p.MaxBulk
	}
	return DefaultMaxBulk
}

func (p *CommandParser) parseMultibulk(b []byte) (Command, int, error) {
	cr, complete, tooBig := headerEnd(b, 0)
	if tooBig {
		return Command{}, 0, errTooBigMultibulk
	}
	if !complete {
		return Command{}, 0, ErrIncomplete
	}
	count, ok := parseInt(b[1:cr])
	if !ok || count > maxMultibulk {
		return Command{}, 0, errInvalidMultibulk
	}
	if p.Unauthenticated && count > MaxUnauthArgs {
		return Command{}, 0, errUnauthMultibulk
	}
	pos := cr + 2
	if count <= 0 {
		return Command{}, pos, nil
	}
	args := p.args[:0]
	defer func() { p.keep(args) }()
	maxBulk := p.maxBulk()
	for ; count > 0; count-- {
		cr, complete, tooBig := headerEnd(b, pos)
		if tooBig {
			return Command{}, 0, errTooBigBulk
		}
		if !complete {
			return Command{}, 0, ErrIncomplete
		}
		if b[pos] != '$' {
			return Command{}, 0, errExpectedDollar(b[pos])
		}
		size, ok := parseInt(b[pos+1 : cr])
		if !ok || size < 0 || size > maxBulk {
			return Command{}, 0, errInvalidBulk
		}
		if p.Unauthenticated && size > MaxUnauthBulk {
			return Command{}, 0, errUnauthBulk
		}
		pos = cr + 2
		// Redis skips the two bytes after the body without checking that they are CRLF.
		if int64(len(b)-pos) < size+2 {
			return Command{}, 0, ErrIncomplete
		}
		end := pos + int(size)
		args = append(args, b[pos:end:end])
		pos = end + 2
	}
	return Command{Args: args, Raw: b[:pos:pos]}, pos, nil
}

// keep keeps args's storage for the next command unless a huge command grew it.
func (p *CommandParser) keep(args [][]byte) {
	if cap(args) > keepArgs {
		args = nil
	}
	p.args = args[:0]
}

// headerEnd finds the '\r' ending the header line that starts at b[from], the way Redis does with
// strchr(querybuf+pos, '\r'): a NUL byte hides any later '\r'. The line is complete once one more byte
// (any byte: Redis does not check it is '\n') follows the '\r'. tooBig reports a line without '\r' in its
// first 64 KiB + 1 bytes.
func headerEnd(b []byte, from int) (cr int, complete, tooBig bool) {
	end := min(len(b), from+inlineMax+1)
	for j := from; j < end; j++ {
		switch b[j] {
		case '\r':
			return j, j+1 < len(b), false
		case 0:
			return 0, false, len(b)-from > inlineMax
		}
	}
	return 0, false, len(b)-from > inlineMax
}

func (p *CommandParser) parseInline(b []byte) (Command, int, error) {
	nl := bytes.IndexByte(b[:min(len(b), inlineMax+1)], '\n')
	if nl >= 0 && bytes.IndexByte(b[:nl], 0) >= 0 {
		nl = -1 // Redis searches the line with strchr, which stops at the NUL
	}
	if nl < 0 {
		if len(b) > inlineMax {
			return Command{}, 0, errTooBigInline
		}
		return Command{}, 0, ErrIncomplete
	}
	line := b[:nl]
	if nl > 0 && line[nl-1] == '\r' {
		line = line[:nl-1]
	}
	var ok bool
	p.buf, p.offs, ok = splitArgs(line, p.buf[:0], p.offs[:0])
	if !ok {
		return Command{}, 0, errUnbalancedQuotes
	}
	if len(p.offs) == 0 {
		return Command{}, nl + 1, nil
	}
	args := p.args[:0]
	p.raw = redcon.AppendArray(p.raw[:0], len(p.offs)/2)
	for i := 0; i < len(p.offs); i += 2 {
		arg := p.buf[p.offs[i]:p.offs[i+1]:p.offs[i+1]]
		args = append(args, arg)
		p.raw = redcon.AppendBulk(p.raw, arg)
	}
	p.keep(args)
	return Command{Args: args, Raw: p.raw}, nl + 1, nil
}

// splitArgs is Redis's sdssplitargs: it appends the unescaped arguments of line to dst and their start
// and end offsets to offs. ok is false for unbalanced quotes, or a closing quote followed by something
// other than a space. line holds no NUL byte (the inline search stops at one).
func splitArgs(line, dst []byte, offs []int) (_ []byte, _ []int, ok bool) {
	p := 0
	for {
		for p < len(line) && isSpace(line[p]) {
			p++
		}
		if p == len(line) {
			return dst, offs, true
		}
		start := len(dst)
		inq, insq := false, false
		for done := false; !done; {
			switch {
			case inq:
				if p == len(line) {
					return dst, offs, false
				}
				c := line[p]
				switch {
				case c == '\\' && p+3 < len(line) && line[p+1] == 'x' && isHex(line[p+2]) && isHex(line[p+3]):
					dst = append(dst, unhex(line[p+2])<<4|unhex(line[p+3]))
					p += 3
				case c == '\\' && p+1 < len(line):
					p++
					switch c = line[p]; c {
					case 'n':
						c = '\n'
					case 'r':
						c = '\r'
					case 't':
						c = '\t'
					case 'b':
						c = '\b'
					case 'a':
						c = '\a'
					}
					dst = append(dst, c)
				case c == '"':
					if p+1 < len(line) && !isSpace(line[p+1]) {
						return dst, offs, false
					}
					done = true
				default:
					dst = append(dst, c)
				}
			case insq:
				if p == len(line) {
					return dst, offs, false
				}
				c := line[p]
				switch {
				case c == '\\' && p+1 < len(line) && line[p+1] == '\'':
					p++
					dst = append(dst, '\'')
				case c == '\'':
					if p+1 < len(line) && !isSpace(line[p+1]) {
						return dst, offs, false
					}
					done = true
				default:
					dst = append(dst, c)
				}
			default:
				if p == len(line) {
					done = true
					break
				}
				switch c := line[p]; c {
				case ' ', '\n', '\r', '\t':
					done = true
				case '"':
					inq = true
				case '\'':
					insq = true
				default:
					dst = append(dst, c)
				}
			}
			if p < len(line) {
				p++
			}
		}
		offs = append(offs, start, len(dst))
	}
}

// isSpace is C's isspace in the "C" locale.
func isSpace(c byte) bool {
	return c == ' ' || (c >= '\t' && c <= '\r')
}

func isHex(c byte) bool {
	return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'f') || (c >= 'A' && c <= 'F')
}

func unhex(c byte) byte {
	switch {
	case c >= 'a':
		return c - 'a' + 10
	case c >= 'A':
		return c - 'A' + 10
	}
	return c - '0'
}

// parseInt is Redis's string2ll: an optional '-', then "0" alone or a digit 1-9 followed by digits, fewer
// than 21 bytes in all, within int64. No '+', no spaces, no leading zeros, no "-0".
func parseInt(b []byte) (int64, bool) {
	if len(b) == 0 || len(b) >= 21 {
		return 0, false
	}
	if len(b) == 1 && b[0] == '0' {
		return 0, true
	}
	neg := b[0] == '-'
	if neg {
		b = b[1:]
		if len(b) == 0 {
			return 0, false
		}
	}
	if b[0] < '1' || b[0] > '9' {
		return 0, false
	}
	var v uint64
	for _, c := range b {
		if c < '0' || c > '9' {
			return 0, false
		}
		if v > math.MaxUint64/10 {
			return 0, false
		}
		v *= 10
		if v > math.MaxUint64-uint64(c-'0') {
			return 0, false
		}
		v += uint64(c - '0')
	}
	if neg {
		if v > 1<<63 {
			return 0, false
		}
		return -int64(v), true // v == 1<<63 wraps to MinInt64, as wanted
	}
	if v > math.MaxInt64 {
		return 0, false
	}
	return int64(v), true
}

// CommandName returns the first argument of the multibulk command starting at b once its bytes are there,
// without looking further: it classifies a command too large to buffer whole. ok is false when b does not
// start with a valid multibulk header and first bulk (per Parse's rules, with DefaultMaxBulk) or ends
// before the name does.
func CommandName(b []byte) (name []byte, ok bool) {
	if len(b) == 0 || b[0] != '*' {
		return nil, false
	}
	cr, complete, _ := headerEnd(b, 0)
	if !complete {
		return nil, false
	}
	if count, ok := parseInt(b[1:cr]); !ok || count <= 0 || count > maxMultibulk {
		return nil, false
	}
	pos := cr + 2
	cr, complete, _ = headerEnd(b, pos)
	if !complete || b[pos] != '$' {
		return nil, false
	}
	size, ok := parseInt(b[pos+1 : cr])
	if !ok || size < 0 || size > DefaultMaxBulk {
		return nil, false
	}
	pos = cr + 2
	if int64(len(b)-pos) < size {
		return nil, false
	}
	return b[pos : pos+int(size) : pos+int(size)], true
}
