package topology

import (
	"bytes"
	"fmt"
	"strconv"
)

// maxDepth bounds nesting: topology replies are at most five levels deep (SHARDS: array, shard
// map, nodes array, node map, value). Deeper input is not a topology reply.
const maxDepth = 8

// value is one parsed RESP value of a topology reply, as positions in the input.
type value struct {
	typ        byte   // RESP type byte: + - : , ( # _ $ ! = * ~ > % (attributes are skipped)
	start, end int    // the value's bytes in the input, header to trailing CRLF (after any attribute)
	text       []byte // the line of + - : , ( # _, the body of $ ! =; nil for aggregates and nulls
	kids       []value
}

// str returns v as a string when it is a simple or bulk string (a verbatim string included).
func (v value) str() (string, bool) {
	switch v.typ {
	case '+', '$', '=':
		if v.text != nil {
			return string(v.text), true
		}
	}
	return "", false
}

// num returns v's integer when it is one.
func (v value) num() (int64, bool) {
	if v.typ != ':' {
		return 0, false
	}
	n, err := strconv.ParseInt(string(v.text), 10, 64)
	return n, err == nil
}

// pairs returns the key-value pairs of a map, or of an array laid out as one (RESP2 maps).
func (v value) pairs() ([]value, bool) {
	if (v.typ != '%' && v.typ != '*') || len(v.kids)%2 != 0 {
		return nil, false
	}
	return v.kids, true
}

// parse parses b as exactly one RESP value.
func parse(b []byte) (value, error) {
	if len(b) > MaxReply {
		return value{}, fmt.Errorf("%w: %d bytes", ErrTooLarge, len(b))
	}
	p := parser{b: b}
	v, err := p.value(0)
	if err != nil {
		return value{}, err
	}
	if p.off != len(b) {
		return value{}, fmt.Errorf("%w: %d bytes after the reply", ErrMalformed, len(b)-p.off)
	}
	return v, nil
}

type parser struct {
	b   []byte
	off int
}

// line returns the text from off to the next CRLF and moves past it.
func (p *parser) line() ([]byte, error) {
	i := bytes.Index(p.b[p.off:], []byte("\r\n"))
	if i < 0 {
		return nil, fmt.Errorf("%w: a line without CRLF at byte %d", ErrMalformed, p.off)
	}
	l := p.b[p.off : p.off+i]
	if bytes.ContainsAny(l, "\r\n") { // as resp's Scanner: a line ends at its first CR, which LF must follow
		return nil, fmt.Errorf("%w: a line not ended by CRLF at byte %d", ErrMalformed, p.off)
	}
	p.off += i + 2
	return l, nil
}

// length parses a header's number: a bulk length or an element count, -1 for a RESP2 null. Like
// the proxy's framing (resp), it takes only the canonical form: no '+', no leading zero.
func (p *parser) length(l []byte, typ byte) (int, error) {
	n, err := strconv.Atoi(string(l))
	if err != nil || strconv.Itoa(n) != string(l) || n < -1 || n == -1 && typ != '$' && typ != '*' {
		return 0, fmt.Errorf("%w: bad length %q after %q", ErrMalformed, l, typ)
	}
	// Every element takes at least 3 bytes ("_\r\n"), every map pair 6: a count beyond what is
	// left cannot be right, and must not size an allocation.
	if left := len(p.b) - p.off; n > left {
		return 0, fmt.Errorf("%w: length %d with %d bytes left", ErrMalformed, n, left)
	}
	return n, nil
}

func (p *parser) value(depth int) (value, error) {
	if depth > maxDepth {
		return value{}, fmt.Errorf("%w: nested deeper than %d", ErrMalformed, maxDepth)
	}
	if p.off >= len(p.b) {
		return value{}, fmt.Errorf("%w: ends early", ErrMalformed)
	}
	if p.b[p.off] == '|' { // an attribute annotates the value after it; no endpoint is read from it
		p.off++
		if _, err := p.aggregate('|', depth); err != nil {
			return value{}, err
		}
		return p.value(depth)
	}
	v := value{typ: p.b[p.off], start: p.off}
	p.off++
	l, err := p.line()
	if err != nil {
		return value{}, err
	}
	switch v.typ {
	case '+', '-', ':', ',', '(', '#', '_':
		v.text = l
	case '$', '!', '=':
		n, err := p.length(l, v.typ)
		if err != nil {
			return value{}, err
		}
		if n >= 0 {
			if len(p.b)-p.off < n+2 || p.b[p.off+n] != '\r' || p.b[p.off+n+1] != '\n' {
				return value{}, fmt.Errorf("%w: bulk of %d bytes without its CRLF", ErrMalformed, n)
			}
			v.text = p.b[p.off : p.off+n]
			p.off += n + 2
		}
	case '*', '~', '>', '%':
		n, err := p.length(l, v.typ)
		if err != nil {
			return value{}, err
		}
		if v.kids, err = p.elems(v.typ, n, depth); err != nil {
			return value{}, err
		}
	default:
		return value{}, fmt.Errorf("%w: type byte %q", ErrMalformed, v.typ)
	}
	v.end = p.off
	return v, nil
}

// aggregate parses the rest of an aggregate whose type byte was just read.
func (p *parser) aggregate(typ byte, depth int) ([]value, error) {
	l, err := p.line()
	if err != nil {
		return nil, err
	}
	n, err := p.length(l, typ)
	if err != nil {
		return nil, err
	}
	return p.elems(typ, n, depth)
}

// elems parses an aggregate's n elements (n pairs for maps and attributes).
func (p *parser) elems(typ byte, n, depth int) ([]value, error) {
	if typ == '%' || typ == '|' {
		if n > (len(p.b)-p.off)/2 {
			return nil, fmt.Errorf("%w: %d pairs with %d bytes left", ErrMalformed, n, len(p.b)-p.off)
		}
		n *= 2
	}
	if n <= 0 {
		return nil, nil // "*-1", "*0"
	}
	kids := make([]value, 0, n)
	for range n {
		k, err := p.value(depth + 1)
		if err != nil {
			return nil, err
		}
		kids = append(kids, k)
	}
	return kids, nil
}
