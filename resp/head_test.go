package resp

import (
	"errors"
	"fmt"
	"testing"
)

// nilElem stands for a null element in expectations.
const nilElem = "<nil>"

func TestPeekHead(t *testing.T) {
	for _, tc := range []struct {
		name  string
		in    string
		max   int
		ok    bool
		err   bool
		typ   byte
		len   int64
		line  string
		elems []string
		attr  int
	}{
		{name: "simple", in: "+OK\r\n", ok: true, typ: '+', line: "OK"},
		{name: "error", in: "-ERR no\r\n", ok: true, typ: '-', line: "ERR no"},
		{name: "integer", in: ":42\r\n", ok: true, typ: ':', line: "42"},
		{name: "null", in: "_\r\n", ok: true, typ: '_'},
		{name: "bool", in: "#f\r\n", ok: true, typ: '#', line: "f"},
		{name: "double", in: ",3.14\r\n", ok: true, typ: ',', line: "3.14"},
		{name: "big number", in: "(12345678901234567890\r\n", ok: true, typ: '(', line: "12345678901234567890"},
		{name: "bulk header only", in: "$100000\r\nabc", ok: true, typ: '$', len: 100000},
		{name: "bulk null", in: "$-1\r\n", ok: true, typ: '$', len: -1},
		{name: "blob error", in: "!3\r\nERR\r\n", ok: true, typ: '!', len: 3},
		{name: "verbatim", in: "=8\r\ntxt:abcd\r\n", ok: true, typ: '=', len: 8},
		{name: "array null", in: "*-1\r\n", max: 3, ok: true, typ: '*', len: -1},
		{name: "array empty", in: "*0\r\n", max: 3, ok: true, typ: '*'},
		{name: "pubsub message", in: "*3\r\n$7\r\nmessage\r\n$2\r\nch\r\n$100000\r\n", max: 2, ok: true, typ: '*', len: 3,
			elems: []string{"message", "ch"}},
		{name: "pubsub subscribe", in: "*3\r\n$9\r\nsubscribe\r\n$2\r\nch\r\n:1\r\n", max: 3, ok: true, typ: '*', len: 3,
			elems: []string{"subscribe", "ch", "1"}},
		{name: "unsubscribe no channel", in: "*3\r\n$11\r\nunsubscribe\r\n$-1\r\n:0\r\n", max: 3, ok: true, typ: '*', len: 3,
			elems: []string{"unsubscribe", nilElem, "0"}},
		{name: "push", in: ">3\r\n$7\r\nmessage\r\n$2\r\nch\r\n$2\r\nhi\r\n", max: 5, ok: true, typ: '>', len: 3,
			elems: []string{"message", "ch", "hi"}},
		{name: "push simple and nulls", in: ">4\r\n+pong\r\n_\r\n*-1\r\n$0\r\n\r\n", max: 4, ok: true, typ: '>', len: 4,
			elems: []string{"pong", nilElem, nilElem, ""}},
		{name: "set", in: "~1\r\n+a\r\n", max: 1, ok: true, typ: '~', len: 1, elems: []string{"a"}},
		{name: "map has no elems", in: "%1\r\n+a\r\n:1\r\n", max: 2, ok: true, typ: '%', len: 1},
		{name: "stops at nested array", in: "*3\r\n$1\r\na\r\n*1\r\n:1\r\n$1\r\nb\r\n", max: 3, ok: true, typ: '*', len: 3,
			elems: []string{"a"}},
		{name: "stops at error element", in: "*2\r\n-ERR\r\n:1\r\n", max: 2, ok: true, typ: '*', len: 2},
		{name: "stops at double", in: "*2\r\n:1\r\n,1.5\r\n", max: 2, ok: true, typ: '*', len: 2, elems: []string{"1"}},
		{name: "max zero", in: "*2\r\n", ok: true, typ: '*', len: 2},
		{name: "attribute", in: "|1\r\n+ttl\r\n:3\r\n>2\r\n$7\r\nmessage\r\n", max: 1, ok: true, typ: '>', len: 2,
			elems: []string{"message"}, attr: 14},
		{name: "partial line", in: "+OK\r", max: 1},
		{name: "partial header", in: "*3\r\n$7\r\nmessage\r\n$2\r\nch", max: 2},
		{name: "partial element header", in: "*3\r\n$7", max: 1},
		{name: "partial attribute", in: "|1\r\n+ttl\r\n", max: 1},
		{name: "attribute only", in: "|1\r\n+ttl\r\n:3\r\n", max: 1},
		{name: "empty", in: ""},
		{name: "bad type", in: "x\r\n", err: true},
		{name: "LF only", in: "+OK\n", err: true},
		{name: "streamed", in: "$?\r\n", err: true},
		{name: "bad length", in: "*x\r\n", err: true},
		{name: "negative count", in: ">-1\r\n", err: true},
		{name: "bad element trailer", in: "*1\r\n$1\r\nabc", max: 1, err: true},
		{name: "bad element length", in: "*1\r\n$-5\r\n", max: 1, err: true},
		{name: "bad attribute", in: "|1\r\n?\r\n", err: true},
		{name: "attribute deep", in: "|1\r\n+k\r\n" + nest(200) + "*1\r\n:1\r\n", max: 1, ok: true, typ: '*', len: 1,
			elems: []string{"1"}, attr: 4 + 4 + 4*200 + 4},
		{name: "attribute deep partial", in: "|1\r\n+k\r\n" + nest(200), max: 1},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var h Head
			ok, err := PeekHead([]byte(tc.in), tc.max, &h)
			if tc.err {
				if !errors.Is(err, ErrInvalidReply) || ok {
					t.Fatalf("PeekHead(%q) = %v, %v; want ErrInvalidReply", tc.in, ok, err)
				}
				return
			}
			if ok != tc.ok || err != nil {
				t.Fatalf("PeekHead(%q) = %v, %v; want %v, nil", tc.in, ok, err, tc.ok)
			}
			if !ok {
				return
			}
			if h.Type != tc.typ || h.Len != tc.len || string(h.Line) != tc.line || h.AttrLen != tc.attr {
				t.Fatalf("PeekHead(%q) = %+v", tc.in, h)
			}
			if got := elemStrings(h.Elems); fmt.Sprint(got) != fmt.Sprint(tc.elems) || len(got) != len(tc.elems) {
				t.Fatalf("PeekHead(%q) Elems %q, want %q", tc.in, got, tc.elems)
			}
		})
	}
}

func elemStrings(elems [][]byte) []string {
	var out []string
	for _, e := range elems {
		if e == nil {
			out = append(out, nilElem)
		} else {
			out = append(out, string(e))
		}
	}
	return out
}

// TestPeekHeadReuse checks that a Head's element storage is reused and stale fields are cleared.
func TestPeekHeadReuse(t *testing.T) {
	var h Head
	if ok, err := PeekHead([]byte("*2\r\n+a\r\n+b\r\n"), 2, &h); !ok || err != nil || len(h.Elems) != 2 {
		t.Fatalf("PeekHead = %v, %v, %+v", ok, err, h)
	}
	if ok, err := PeekHead([]byte("+OK\r\n"), 2, &h); !ok || err != nil || len(h.Elems) != 0 || h.Len != 0 {
		t.Fatalf("PeekHead = %v, %v, %+v", ok, err, h)
	}
	in := []byte("*2\r\n+a\r\n+b\r\n")
	allocs := testing.AllocsPerRun(100, func() { _, _ = PeekHead(in, 2, &h) })
	if allocs != 0 {
		t.Fatalf("PeekHead allocates %v times per call with a reused Head", allocs)
	}
}
