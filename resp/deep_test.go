package resp

import (
	"bytes"
	"errors"
	"math/rand/v2"
	"strconv"
	"strings"
	"testing"
)

// deepWraps are the ways genDeep nests an element one level deeper: the bytes before it and after it.
// Together they mix RESP2 and RESP3 aggregates, attributes around and inside aggregates, elements before
// and after the nested one, and levels with one element left (which all end at once) or several.
var deepWraps = []struct{ head, tail string }{
	{"*1\r\n", ""},
	{"*2\r\n", ":2\r\n"},
	{"*2\r\n+a\r\n", ""},
	{"%1\r\n$1\r\nk\r\n", ""},                         // the value of a map
	{"%2\r\n", "_\r\n+k2\r\n#t\r\n"},                  // the first key of a map
	{"~3\r\n", ",1.5\r\n(12\r\n"},                     // a set
	{">2\r\n$7\r\nmessage\r\n", ""},                   // a push
	{"|1\r\n+ttl\r\n:3\r\n*1\r\n", ""},                // an array annotated by an attribute
	{"|1\r\n", "+v\r\n=5\r\ntxt:x\r\n"},               // the key of an attribute, then the annotated value
	{"*3\r\n|0\r\n", "!3\r\nERR\r\n$-1\r\n"},          // after an empty attribute
	{"|1\r\n+a\r\n|1\r\n+b\r\n", "$1\r\nc\r\n+d\r\n"}, // an attribute's value, in an attribute's value
}

// genDeep returns one reply frame nested depth levels deep, built without recursion so that its length
// (the frame's end) is known independently of the framing code under test. The outermost level is
// deepWraps[first] when first >= 0, else random like the others.
func genDeep(rng *rand.Rand, depth, first int) []byte {
	var frame []byte
	tails := make([]string, 0, depth)
	for i := range depth {
		w := deepWraps[rng.IntN(len(deepWraps))]
		if i == 0 && first >= 0 {
			w = deepWraps[first]
		}
		frame = append(frame, w.head...)
		tails = append(tails, w.tail)
	}
	frame = append(frame, "$5\r\nhello\r\n"...)
	for i := len(tails) - 1; i >= 0; i-- {
		frame = append(frame, tails[i]...)
	}
	return frame
}

// checkDeepFrame checks that the Scanner (whole, byte by byte and in 4 KiB chunks), skipElems and
// PeekHead all find frame to be one frame of its own length, followed by another.
func checkDeepFrame(t *testing.T, frame []byte) {
	t.Helper()
	in := append(bytes.Clone(frame), "+NEXT\r\n"...)
	want := outcome{ends: []int{len(frame), len(in)}, err: "more"}
	for _, chunk := range []int{0, 1, 4096} {
		var s Scanner
		next := func() int { return chunk }
		if got := scanStream(&s, in, next); got.String() != want.String() {
			t.Fatalf("chunk %d: Scanner %v, want %v", chunk, got, want)
		}
	}
	if n, ok, err := skipElems(in, 0, 1); n != len(frame) || !ok || err != nil {
		t.Fatalf("skipElems = %d, %v, %v; want %d, true, nil", n, ok, err, len(frame))
	}
	var h Head
	if ok, err := PeekHead(in, 3, &h); !ok || err != nil || h.AttrLen >= len(frame) {
		t.Fatalf("PeekHead = %v, %v, %+v", ok, err, h)
	}
}

func TestScanDeep(t *testing.T) {
	rng := rand.New(rand.NewPCG(5, 6))
	for _, tc := range []struct {
		name  string
		frame []byte
	}{
		{"array 200", []byte(nest(200))},
		{"array 100k", []byte(nest(100_000))},
		{"lua stack limit", []byte(strings.Repeat("*1\r\n", 7995) + "-ERR reached lua stack limit\r\n")},
		{"map 100k", []byte(strings.Repeat("%1\r\n+k\r\n", 100_000) + ":1\r\n")},
		{"two left 100k", []byte(strings.Repeat("*2\r\n", 100_000) + strings.Repeat(":1\r\n", 100_001))},
		{"mixed 200", genDeep(rng, 200, -1)},
		{"mixed 100k", genDeep(rng, 100_000, -1)},
		{"mixed in attribute 100k", genDeep(rng, 100_000, 8)},
		{"attributes 100k", []byte(strings.Repeat("|1\r\n", 100_000) + strings.Repeat("+a\r\n", 200_001))},
	} {
		t.Run(tc.name, func(t *testing.T) { checkDeepFrame(t, tc.frame) })
	}
}

// TestScanDeepNoAlloc checks that depth costs the Scanner no memory.
func TestScanDeepNoAlloc(t *testing.T) {
	in := genDeep(rand.New(rand.NewPCG(7, 8)), 10_000, -1)
	var s Scanner
	allocs := testing.AllocsPerRun(10, func() {
		if n, done, err := s.Scan(in); n != len(in) || !done || err != nil {
			t.Fatalf("Scan = %d, %v, %v", n, done, err)
		}
	})
	if allocs != 0 {
		t.Fatalf("Scan of a frame 10000 deep allocates %v times", allocs)
	}
}

// TestScanDeepSplit splits a moderately deep frame at every byte and checks that the Scanner resumes
// exactly, and that skipElems and PeekHead ask for more on every prefix.
func TestScanDeepSplit(t *testing.T) {
	rng := rand.New(rand.NewPCG(9, 10))
	for _, first := range []int{-1, 8} { // random outermost level, or an attribute holding the rest
		frame := genDeep(rng, 300, first)
		in := append(bytes.Clone(frame), "+NEXT\r\n"...)
		for k := 0; k <= len(frame); k++ {
			var s Scanner
			n1, done1, err := s.Scan(in[:k])
			if err != nil || done1 != (k == len(frame)) || n1 != k {
				t.Fatalf("split at %d of %d: first Scan = %d, %v, %v", k, len(frame), n1, done1, err)
			}
			if !done1 {
				n2, done2, err := s.Scan(in[k:])
				if err != nil || !done2 || k+n2 != len(frame) {
					t.Fatalf("split at %d of %d: second Scan = %d, %v, %v", k, len(frame), n2, done2, err)
				}
			}
			if s.InFrame() {
				t.Fatalf("split at %d: InFrame after the frame", k)
			}
			if k == len(frame) {
				break
			}
			if n, ok, err := skipElems(in[:k], 0, 1); ok || err != nil {
				t.Fatalf("skipElems on %d of %d bytes = %d, %v, %v; want more", k, len(frame), n, ok, err)
			}
			var h Head
			if _, err := PeekHead(in[:k], 3, &h); err != nil {
				t.Fatalf("PeekHead on %d of %d bytes: %v", k, len(frame), err)
			}
		}
	}
}

// TestScanPendingBound checks the one bound on replies whatever their depth: the elements announced and
// still to come (here 2^41-1 more per header) stop short of overflowing the count.
func TestScanPendingBound(t *testing.T) {
	hdr := []byte("%" + strconv.Itoa(maxAggregate) + "\r\n")
	var s Scanner
	var err error
	headers := 0
	for err == nil && headers <= 1<<22 {
		_, _, err = s.Scan(hdr)
		headers++
	}
	// 2^21 headers announce 2^62 - 2^21 elements after the first, the next one more than maxPending.
	if !errors.Is(err, ErrInvalidReply) || headers != 1<<21+1 {
		t.Fatalf("after %d headers: %v; want ErrInvalidReply after %d", headers, err, 1<<21+1)
	}
	if n, ok, err := skipElems(bytes.Repeat(hdr, 1000), 0, 1); ok || err != nil {
		t.Fatalf("skipElems = %d, %v, %v; want more", n, ok, err)
	}
}
