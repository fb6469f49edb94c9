package resp

import (
	"bytes"
	"fmt"
)

// Head is the start of a reply frame, decoded for classification.
type Head struct {
	// AttrLen is the length of the attributes ('|') that precede the value described here; they were
	// skipped, and belong to the same frame.
	AttrLen int
	// Type is the value's type byte.
	Type byte
	// Len is the length of a bulk ($ ! =) or the count of an aggregate (* ~ > %, pairs for %); -1 for a
	// RESP2 null ("$-1", "*-1"); 0 for other types.
	Len int64
	// Line is the text after the type byte for + - : , ( # _ (a sub-slice of the input).
	Line []byte
	// Elems holds, for * > ~ aggregates, up to maxElems leading elements that are bulk strings, simple
	// strings, integers or nulls, as text (sub-slices of the input; a null is nil). Decoding stops at the
	// first element of another type, so len(Elems) may be less than asked. PeekHead reuses its storage:
	// keep one Head per connection and nothing is allocated in the steady state.
	Elems [][]byte
}

// PeekHead decodes the head of the reply frame at the start of p into h, with up to maxElems leading
// elements of an aggregate. ok is false when p does not yet hold enough bytes for what was asked: the whole
// of any leading attribute, the value's header line and maxElems elements (or all of them, if fewer); the
// caller reads more, or gives up classifying if its buffer is full. Errors wrap ErrInvalidReply and are
// the Scanner's, except that PeekHead applies neither MaxBulk nor the bound on pending elements (past it
// PeekHead asks for more). PeekHead only reads; framing the reply is the Scanner's job.
func PeekHead(p []byte, maxElems int, h *Head) (ok bool, err error) {
	*h = Head{Elems: h.Elems[:0]}
	off := 0
	for off < len(p) && p[off] == '|' {
		n, ok, err := skipAttr(p[off:])
		if !ok || err != nil {
			return false, err
		}
		off += n
	}
	h.AttrLen = off
	if off == len(p) {
		return false, nil
	}
	h.Type = p[off]
	line, next, ok, err := replyLine(p, off+1)
	if !ok || err != nil {
		return false, err
	}
	switch h.Type {
	case '+', '-', ':', ',', '(', '#', '_':
		h.Line = line
		return true, nil
	case '$', '!', '=', '*', '~', '>', '%':
		if h.Len, err = replyLength(h.Type, line); err != nil {
			return false, err
		}
	default:
		return false, fmt.Errorf("%w: unexpected type byte %q", ErrInvalidReply, h.Type)
	}
	if h.Type != '*' && h.Type != '>' && h.Type != '~' {
		return true, nil
	}
	for i := int64(0); i < h.Len && len(h.Elems) < maxElems; i++ {
		elem, n, ok, err := simpleElem(p[next:])
		if !ok || err != nil {
			return false, err
		}
		if n == 0 {
			break // not a simple element
		}
		h.Elems = append(h.Elems, elem)
		next += n
	}
	return true, nil
}

// simpleElem decodes the element at the start of p when it is a bulk string, simple string, integer or
// null. n is 0 for any other element type.
func simpleElem(p []byte) (elem []byte, n int, ok bool, err error) {
	if len(p) == 0 {
		return nil, 0, false, nil
	}
	t := p[0]
	switch t {
	case '$', '+', ':', '_', '*':
	default:
		return nil, 0, true, nil
	}
	line, next, ok, err := replyLine(p, 1)
	if !ok || err != nil {
		return nil, 0, false, err
	}
	switch t {
	case '+', ':':
		return line, next, true, nil
	case '_':
		return nil, next, true, nil
	}
	size, err := replyLength(t, line)
	if err != nil {
		return nil, 0, false, err
	}
	switch {
	case size == -1:
		return nil, next, true, nil
	case t == '*':
		return nil, 0, true, nil // a nested array
	}
	end, ok, err := bulkEnd(p, t, next, size)
	if !ok || err != nil {
		return nil, 0, false, err
	}
	return p[next : next+int(size) : next+int(size)], end, true, nil
}

// replyLine returns the line starting at p[from] up to its CRLF, and the offset after it.
func replyLine(p []byte, from int) (line []byte, next int, ok bool, err error) {
	j := bytes.IndexByte(p[from:], '\n')
	if j < 0 {
		return nil, 0, false, nil
	}
	if j == 0 || p[from+j-1] != '\r' {
		return nil, 0, false, fmt.Errorf("%w: %q line not ended by CRLF", ErrInvalidReply, p[from-1])
	}
	return p[from : from+j-1], from + j + 1, true, nil
}

// replyLength decodes the length line of a bulk or aggregate of type t, with the Scanner's rules.
func replyLength(t byte, line []byte) (int64, error) {
	if len(line) == 1 && line[0] == '?' {
		return 0, fmt.Errorf("%w: streamed %q not supported", ErrInvalidReply, t)
	}
	n, ok := parseInt(line)
	switch {
	case !ok:
		return 0, fmt.Errorf("%w: bad %q length %q", ErrInvalidReply, t, line)
	case n == -1 && (t == '$' || t == '*'):
		return n, nil
	case n < 0 || (n > maxAggregate && t != '$' && t != '!' && t != '='):
		return 0, fmt.Errorf("%w: %q length %d out of range", ErrInvalidReply, t, n)
	}
	return n, nil
}

// bulkEnd returns the offset after the body of size bytes starting at p[from] and its CRLF.
func bulkEnd(p []byte, t byte, from int, size int64) (int, bool, error) {
	if int64(len(p)-from) < size+2 {
		return 0, false, nil
	}
	end := from + int(size)
	if p[end] != '\r' || p[end+1] != '\n' {
		return 0, false, fmt.Errorf("%w: %q body not followed by CRLF", ErrInvalidReply, t)
	}
	return end + 2, true, nil
}

// skipAttr returns the length of the attribute at the start of p (its header and pairs, not the value it
// annotates).
func skipAttr(p []byte) (int, bool, error) {
	line, next, ok, err := replyLine(p, 1)
	if !ok || err != nil {
		return 0, false, err
	}
	n, err := replyLength('|', line)
	if err != nil {
		return 0, false, err
	}
	return skipElems(p, next, 2*n)
}

// skipElems returns the offset after count elements starting at p[from], attributes included. It is the
// Scanner's framing for buffered elements, and like it needs no stack at any depth: an aggregate's elements
// replace it in the count of elements still to skip, and an attribute adds its own before the value.
func skipElems(p []byte, from int, count int64) (int, bool, error) {
	for count > 0 {
		if from == len(p) {
			return 0, false, nil
		}
		t := p[from]
		switch t {
		case '+', '-', ':', ',', '(', '#', '_', '$', '!', '=', '*', '~', '>', '%', '|':
		default:
			return 0, false, fmt.Errorf("%w: unexpected type byte %q", ErrInvalidReply, t)
		}
		line, next, ok, err := replyLine(p, from+1)
		if !ok || err != nil {
			return 0, false, err
		}
		from = next
		switch t {
		case '+', '-', ':', ',', '(', '#', '_':
			count--
			continue
		}
		n, err := replyLength(t, line)
		switch {
		case err != nil:
			return 0, false, err
		case n == -1:
			count--
		case t == '$' || t == '!' || t == '=':
			if from, ok, err = bulkEnd(p, t, next, n); !ok || err != nil {
				return 0, false, err
			}
			count--
		case t == '|':
			count += 2 * n
		case t == '%':
			count += 2*n - 1
		default:
			count += n - 1
		}
		// A count this large cannot reach 0 within any buffer: saturate rather than overflow, and let
		// the input run out (the Scanner reports such a reply as an error).
		count = min(count, maxPending)
	}
	return from, true, nil
}
