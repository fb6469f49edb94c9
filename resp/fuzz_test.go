package resp

import (
	"bytes"
	"errors"
	"math"
	"math/rand/v2"
	"testing"
)

// fuzzRand derives the chunk sizes for one input from the input, so that a failure reproduces.
func fuzzRand(in []byte) *rand.Rand {
	var h uint64 = 14695981039346656037
	for _, c := range in {
		h = (h ^ uint64(c)) * 1099511628211
	}
	return rand.New(rand.NewPCG(h, uint64(len(in))))
}

// FuzzParse checks Parse's own invariants: results consistent with the input, and decisions that depend
// only on the bytes they cover (a command parses the same from its own bytes, a protocol error stays one
// whatever follows).
func FuzzParse(f *testing.F) {
	for _, tc := range parseCases {
		if len(tc.in) < 1024 {
			f.Add([]byte(tc.in))
		}
	}
	f.Fuzz(func(t *testing.T, in []byte) {
		parseStream(t, in)
		var p CommandParser
		_, n, err := p.Parse(in)
		var pe *ProtocolError
		switch {
		case err == nil:
			if _, m, err := p.Parse(in[:n:n]); m != n || err != nil {
				t.Fatalf("Parse(%q) = %d, but on its own %d bytes %d, %v", in, n, n, m, err)
			}
			if _, _, err := p.Parse(in[: n-1 : n-1]); err != ErrIncomplete {
				t.Fatalf("Parse(%q) = %d, but one byte shorter %v", in, n, err)
			}
		case errors.As(err, &pe):
			more := append(bytes.Clone(in), "\r\n*1\r\n$4\r\nPING\r\n\n"...)
			if _, _, err2 := p.Parse(more); err2 == nil || err2.Error() != err.Error() {
				t.Fatalf("Parse(%q) = %v, but with more input %v", in, err, err2)
			}
		case err != ErrIncomplete:
			t.Fatalf("Parse(%q) unexpected error %v", in, err)
		}
		// Before AUTH, the limits (on multibulk commands only) only add errors: what parses there parses the
		// same after.
		un := CommandParser{Unauthenticated: true}
		cmd, unN, unErr := un.Parse(in)
		multibulk := len(in) > 0 && in[0] == '*'
		switch {
		case unErr == nil && (err != nil || unN != n || (multibulk && len(cmd.Args) > MaxUnauthArgs)):
			t.Fatalf("Parse(%q) before AUTH = %d args, %d bytes; after, %d bytes, %v", in, len(cmd.Args), unN, n, err)
		case unErr != nil && !errors.Is(unErr, errUnauthMultibulk) && !errors.Is(unErr, errUnauthBulk) &&
			(err == nil || unErr.Error() != err.Error()):
			t.Fatalf("Parse(%q) before AUTH: %v; after: %v", in, unErr, err)
		}
		for _, a := range cmd.Args {
			if len(a) > MaxUnauthBulk && multibulk {
				t.Fatalf("Parse(%q) before AUTH passed a %d-byte argument", in, len(a))
			}
		}
	})
}

// FuzzScanCommands checks that the Commands Scanner, whole and in random chunks, frames every input as
// Parse does, with the same protocol errors.
func FuzzScanCommands(f *testing.F) {
	for _, tc := range parseCases {
		if len(tc.in) < 1024 {
			f.Add([]byte(tc.in))
		}
	}
	f.Fuzz(func(t *testing.T, in []byte) {
		checkCommands(t, in, fuzzRand(in))
	})
}

// FuzzScanReplies checks the reply Scanner in random chunks against one call, and against skipElems'
// buffered framing and PeekHead.
func FuzzScanReplies(f *testing.F) {
	for _, tc := range replyCases {
		f.Add([]byte(tc.in))
	}
	f.Fuzz(func(t *testing.T, in []byte) {
		checkReplies(t, in, fuzzRand(in))
	})
}

// FuzzPeekHead checks PeekHead's results against its input and against the Scanner.
func FuzzPeekHead(f *testing.F) {
	for _, tc := range replyCases {
		f.Add([]byte(tc.in), uint8(2))
	}
	f.Add([]byte(">3\r\n$7\r\nmessage\r\n$2\r\nch\r\n$2\r\nhi\r\n"), uint8(3))
	f.Fuzz(func(t *testing.T, in []byte, max uint8) {
		maxElems := int(max % 8)
		var h Head
		ok, err := PeekHead(in, maxElems, &h)
		s := Scanner{MaxBulk: math.MaxInt64}
		n, done, serr := s.Scan(in)
		switch {
		case err != nil && (ok || !errors.Is(err, ErrInvalidReply)):
			t.Fatalf("PeekHead(%q) = %v, %v", in, ok, err)
		case err != nil && serr == nil:
			t.Fatalf("PeekHead(%q) error %v, but the Scanner accepts it", in, err)
		case done && (!ok || err != nil):
			t.Fatalf("PeekHead(%q) = %v, %v on a complete frame of %d bytes", in, ok, err, n)
		case !ok:
			return
		}
		if h.AttrLen >= len(in) || h.Type != in[h.AttrLen] || len(h.Elems) > maxElems ||
			(h.Len < 0 && (h.Len != -1 || (h.Type != '$' && h.Type != '*'))) {
			t.Fatalf("PeekHead(%q) = %+v", in, h)
		}
		if h.Line != nil && !within(in, h.Line) {
			t.Fatalf("PeekHead(%q) Line %q not in the input", in, h.Line)
		}
		for _, e := range h.Elems {
			if e != nil && !within(in, e) {
				t.Fatalf("PeekHead(%q) element %q not in the input", in, e)
			}
		}
	})
}

// within reports whether sub lies inside b's memory.
func within(b, sub []byte) bool {
	if len(sub) == 0 {
		return true
	}
	for i := range b {
		if &b[i] == &sub[0] {
			return i+len(sub) <= len(b)
		}
	}
	return false
}
