package resp

import (
	"bytes"
	"fmt"
)

const (
	// maxAggregate bounds an aggregate's count, far above anything Redis sends (a list holds at most
	// 2^32-1 elements), so that counts and their doubling for maps cannot overflow.
	maxAggregate = 1 << 40
	// maxPending bounds the elements a reply has announced and not yet sent. A reply that reached it
	// would need 2^62 more elements of at least 3 bytes each; the bound only keeps the count (which
	// grows by at most 2*maxAggregate per header) from overflowing.
	maxPending = 1 << 62
)

// Scanner finds where frames end, a chunk at a time, without buffering them: a 400 MiB value streams
// through in pieces the size of the caller's reads. It works in two modes:
//   - Commands: client input. A frame is a multibulk command ('*' followed by '$' bulk strings) or an
//     inline line, with exactly Parse's rules and protocol errors (*ProtocolError), so that a command too
//     large to buffer is framed as Parse would frame it.
//   - replies (Commands false): any RESP2 or RESP3 frame from a server: + - : $ * _ # , ( ! = % ~ > and
//     attributes; an attribute '|' and the value it annotates are one frame. Streamed strings and
//     aggregates ("$?", "*?") are rejected, since Redis never sends them. Errors wrap ErrInvalidReply.
//     Simple lines are only checked for their CRLF end; bulk bodies must be followed by CRLF.
//     Nesting is not limited and costs no memory: to find where a frame ends the Scanner only needs to
//     count the elements still to come, an aggregate adding its own. Redis sends deep replies (a Lua
//     script's nested tables reach about 8000 levels; a module's are limited by nothing).
//
// To stream a command that Parse could not buffer whole, feed the Scanner from the command's first byte.
// The zero value scans replies with the default bounds. After an error the state is undefined: Reset it
// (or drop the connection, which is what both kinds of error call for).
type Scanner struct {
	Commands bool  // scan client commands instead of replies
	MaxBulk  int64 // largest bulk length; 0 means DefaultMaxBulk

	state   uint8
	inFrame bool
	typ     byte // type byte of the header line being read (replies)
	first   byte // first byte of the header line being read (commands)
	hdrLen  int  // bytes of the current command header or inline line so far
	nul     bool // a NUL byte hid the rest of the current command line from Redis's strchr
	lastCR  bool // the previous byte of the current line was '\r'
	numLen  int  // bytes of the number in the current header line (may exceed len(num))
	num     [20]byte
	left    int64 // bulk arguments still to come (commands)
	body    int64 // bulk body bytes still to skip (plus the two trailer bytes, for commands)
	quote   uint8 // inline quote state
	elems   int64 // elements of the reply still to come after the one being read, at any depth
}

const (
	stFrame      uint8 = iota // before a frame
	stCmdCount                // in "*<count>" up to '\r'
	stCmdCountLF              // the byte after its '\r'
	stCmdBulk                 // in "$<len>" up to '\r'
	stCmdBulkLF               // the byte after its '\r'
	stCmdBody                 // in a bulk body or its two trailer bytes
	stInline                  // in an inline line
	stType                    // before an element of a reply
	stSimple                  // in a simple line (+ - : , ( # _)
	stHeader                  // in a length line ($ ! = * ~ > % |)
	stBody                    // in a bulk body
	stBodyCR                  // the '\r' after it
	stBodyLF                  // the '\n' after it
)

// Inline quote states: sdssplitargs run a byte at a time.
const (
	qSpace  uint8 = iota // between arguments
	qWord                // in an unquoted part
	qDQ                  // in double quotes
	qDQEsc               // after a backslash in double quotes
	qSQ                  // in single quotes
	qSQEsc               // after a backslash in single quotes
	qClosed              // just after a closing quote: a space or the end must follow
	qBad                 // unbalanced; reported at the end of the line
)

// Scan consumes bytes of the current frame from p: the first n bytes of p belong to it, and done reports
// that the frame ended at p[n-1]; the scanner is then ready for the next frame. When done is false and err
// is nil, n == len(p). On error, n counts the bytes up to the offending one.
func (s *Scanner) Scan(p []byte) (n int, done bool, err error) {
	if s.Commands {
		return s.scanCommand(p)
	}
	return s.scanReply(p)
}

// InFrame reports whether a frame has begun and not yet ended.
func (s *Scanner) InFrame() bool { return s.inFrame }

// Reset forgets any frame in progress; the configuration fields are kept.
func (s *Scanner) Reset() {
	s.state = stFrame
	s.inFrame = false
	s.elems = 0
}

func (s *Scanner) maxBulk() int64 {
	if s.MaxBulk > 0 {
		return s.MaxBulk
	}
	return DefaultMaxBulk
}

func (s *Scanner) endFrame() {
	s.state = stFrame
	s.inFrame = false
}

// startLine prepares for a new header or inline line.
func (s *Scanner) startLine() {
	s.hdrLen, s.numLen, s.nul, s.lastCR = 0, 0, false, false
}

// number returns the integer of the current header line, by Redis's string2ll rules.
func (s *Scanner) number() (int64, bool) {
	if s.numLen > len(s.num) {
		return 0, false
	}
	return parseInt(s.num[:s.numLen])
}

// cmdHeaderByte feeds one byte of a command header line and reports whether it is the line's '\r', or
// the line has grown too big (see headerEnd).
func (s *Scanner) cmdHeaderByte(c byte) (cr, tooBig bool) {
	s.hdrLen++
	if s.hdrLen == 1 {
		s.first = c
	}
	if c == '\r' && !s.nul {
		return true, false
	}
	if s.hdrLen > inlineMax {
		return false, true
	}
	switch {
	case c == 0:
		s.nul = true
	case s.hdrLen > 1 && !s.nul:
		if s.numLen < len(s.num) {
			s.num[s.numLen] = c
		}
		s.numLen++
	}
	return false, false
}

func (s *Scanner) scanCommand(p []byte) (int, bool, error) {
	i := 0
	for i < len(p) {
		switch s.state {
		case stFrame:
			s.inFrame = true
			s.startLine()
			if p[i] == '*' {
				s.state = stCmdCount
			} else {
				s.state = stInline
				s.quote = qSpace
			}
		case stCmdCount, stCmdBulk:
			// Header lines are short unless hostile; byte at a time keeps the NUL and size rules exact.
			c := p[i]
			i++
			cr, tooBig := s.cmdHeaderByte(c)
			switch {
			case tooBig && s.state == stCmdCount:
				return i, false, errTooBigMultibulk
			case tooBig:
				return i, false, errTooBigBulk
			case cr:
				s.state++ // to the matching LF state
			}
		case stCmdCountLF:
			i++
			count, ok := s.number()
			if !ok || count > maxMultibulk {
				return i, false, errInvalidMultibulk
			}
			if count <= 0 {
				s.endFrame()
				return i, true, nil
			}
			s.left = count
			s.startLine()
			s.state = stCmdBulk
		case stCmdBulkLF:
			i++
			if s.first != '$' {
				return i, false, errExpectedDollar(s.first)
			}
			size, ok := s.number()
			if !ok || size < 0 || size > s.maxBulk() {
				return i, false, errInvalidBulk
			}
			s.body = size + 2 // Redis does not check the two trailer bytes
			s.state = stCmdBody
		case stCmdBody:
			k := min(int64(len(p)-i), s.body)
			i += int(k)
			s.body -= k
			if s.body > 0 {
				break
			}
			if s.left--; s.left == 0 {
				s.endFrame()
				return i, true, nil
			}
			s.startLine()
			s.state = stCmdBulk
		case stInline:
			c := p[i]
			i++
			s.hdrLen++
			if c == '\n' && !s.nul {
				bad := s.quote != qSpace && s.quote != qWord && s.quote != qClosed
				s.endFrame()
				if bad {
					return i, false, errUnbalancedQuotes
				}
				return i, true, nil
			}
			if s.hdrLen > inlineMax {
				return i, false, errTooBigInline
			}
			switch {
			case s.nul:
			case c == 0:
				s.nul = true
			case c == '\r':
				// Only a '\r' right before the '\n' ends the line; any other is part of it.
				if s.lastCR {
					s.quoteByte('\r')
				}
				s.lastCR = true
			default:
				if s.lastCR {
					s.quoteByte('\r')
					s.lastCR = false
				}
				s.quoteByte(c)
			}
		}
	}
	return i, false, nil
}

// quoteByte advances the inline quote state over c, as sdssplitargs would.
func (s *Scanner) quoteByte(c byte) {
	switch s.quote {
	case qSpace:
		if isSpace(c) {
			return
		}
		s.quote = qWord
		s.quoteByte(c)
	case qWord:
		switch c {
		case ' ', '\r', '\t':
			s.quote = qSpace
		case '"':
			s.quote = qDQ
		case '\'':
			s.quote = qSQ
		}
	case qDQ:
		switch c {
		case '\\':
			s.quote = qDQEsc
		case '"':
			s.quote = qClosed
		}
	case qDQEsc:
		// "\x41" needs no special case: the hex digits that follow are plain characters.
		s.quote = qDQ
	case qSQ:
		switch c {
		case '\\':
			s.quote = qSQEsc
		case '\'':
			s.quote = qClosed
		}
	case qSQEsc:
		if c == '\'' {
			s.quote = qSQ // \' is an escaped quote; any other backslash is literal
			return
		}
		s.quote = qSQ
		s.quoteByte(c)
	case qClosed:
		if isSpace(c) {
			s.quote = qSpace
		} else {
			s.quote = qBad
		}
	}
}

func (s *Scanner) scanReply(p []byte) (int, bool, error) {
	i := 0
	for i < len(p) {
		switch s.state {
		case stFrame, stType:
			s.inFrame = true
			c := p[i]
			i++
			s.typ = c
			s.lastCR = false
			switch c {
			case '+', '-', ':', ',', '(', '#', '_':
				s.state = stSimple
			case '$', '!', '=', '*', '~', '>', '%', '|':
				s.numLen = 0
				s.state = stHeader
			default:
				return i, false, fmt.Errorf("%w: unexpected type byte %q", ErrInvalidReply, c)
			}
		case stSimple:
			j := bytes.IndexByte(p[i:], '\n')
			if j < 0 {
				s.lastCR = p[len(p)-1] == '\r'
				i = len(p)
				break
			}
			cr := s.lastCR
			if j > 0 {
				cr = p[i+j-1] == '\r'
			}
			i += j + 1
			if !cr {
				return i, false, fmt.Errorf("%w: %q line not ended by CRLF", ErrInvalidReply, s.typ)
			}
			if s.elementDone() {
				return i, true, nil
			}
		case stHeader:
			c := p[i]
			i++
			switch {
			case c == '\n' && s.lastCR:
				done, err := s.header()
				if err != nil || done {
					return i, done, err
				}
			case s.lastCR || c == '\n':
				return i, false, fmt.Errorf("%w: %q length line not ended by CRLF", ErrInvalidReply, s.typ)
			case c == '\r':
				s.lastCR = true
			case s.numLen == len(s.num):
				return i, false, fmt.Errorf("%w: %q length line too long", ErrInvalidReply, s.typ)
			default:
				s.num[s.numLen] = c
				s.numLen++
			}
		case stBody:
			k := min(int64(len(p)-i), s.body)
			i += int(k)
			if s.body -= k; s.body == 0 {
				s.state = stBodyCR
			}
		case stBodyCR, stBodyLF:
			want := byte('\r')
			if s.state == stBodyLF {
				want = '\n'
			}
			if p[i] != want {
				return i + 1, false, fmt.Errorf("%w: %q body not followed by CRLF", ErrInvalidReply, s.typ)
			}
			i++
			if s.state == stBodyCR {
				s.state = stBodyLF
			} else if s.elementDone() {
				return i, true, nil
			}
		}
	}
	return i, false, nil
}

// header acts on a complete length line of a reply.
func (s *Scanner) header() (done bool, err error) {
	if s.numLen == 1 && s.num[0] == '?' {
		return false, fmt.Errorf("%w: streamed %q not supported", ErrInvalidReply, s.typ)
	}
	n, ok := parseInt(s.num[:s.numLen])
	if !ok {
		return false, fmt.Errorf("%w: bad %q length %q", ErrInvalidReply, s.typ, s.num[:s.numLen])
	}
	switch s.typ {
	case '$', '!', '=':
		if n == -1 && s.typ == '$' {
			return s.elementDone(), nil
		}
		if n < 0 || n > s.maxBulk() {
			return false, fmt.Errorf("%w: %q length %d out of range", ErrInvalidReply, s.typ, n)
		}
		s.body = n
		s.state = stBody
		if n == 0 {
			s.state = stBodyCR
		}
		return false, nil
	}
	if n == -1 && s.typ == '*' {
		return s.elementDone(), nil
	}
	if n < 0 || n > maxAggregate {
		return false, fmt.Errorf("%w: %q count %d out of range", ErrInvalidReply, s.typ, n)
	}
	if s.typ == '%' || s.typ == '|' {
		n *= 2
	}
	s.state = stType
	switch {
	case s.typ == '|':
		// An attribute is not an element: its n elements come first, then the value it annotates.
		s.elems += n
	case n == 0:
		return s.elementDone(), nil
	default:
		// The aggregate's first element takes its place; the other n-1 come after.
		s.elems += n - 1
	}
	if s.elems > maxPending {
		return false, fmt.Errorf("%w: more than %d elements pending", ErrInvalidReply, int64(maxPending))
	}
	return false, nil
}

// elementDone records the end of an element that holds no others and reports whether it ended the frame.
func (s *Scanner) elementDone() bool {
	s.state = stType
	if s.elems > 0 {
		s.elems--
		return false
	}
	s.endFrame()
	return true
}
