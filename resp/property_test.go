package resp

import (
	"bytes"
	"errors"
	"fmt"
	"math"
	"math/rand/v2"
	"strconv"
	"testing"
)

// outcome is how a stream of frames ends: the frame boundaries found, then an error or "more needed".
type outcome struct {
	ends []int // offset after each complete frame
	err  string
}

func (o outcome) String() string { return fmt.Sprintf("ends %v, then %s", o.ends, o.err) }

func errString(err error) string {
	var pe *ProtocolError
	switch {
	case err == nil:
		return "more"
	case errors.As(err, &pe):
		return pe.Error()
	case errors.Is(err, ErrInvalidReply):
		return "invalid reply"
	}
	return "unexpected: " + err.Error()
}

// parseStream runs Parse over in, frame after frame, checking each result's own invariants.
func parseStream(t testing.TB, in []byte) outcome {
	var p CommandParser
	var o outcome
	for off := 0; ; {
		rest := in[off:]
		cmd, n, err := p.Parse(rest)
		if err != nil {
			if n != 0 {
				t.Fatalf("Parse returned n %d with err %v", n, err)
			}
			if err == ErrIncomplete {
				err = nil
			}
			o.err = errString(err)
			return o
		}
		if n <= 0 || n > len(rest) {
			t.Fatalf("Parse n %d without error, input %d bytes", n, len(rest))
		}
		switch {
		case len(cmd.Args) == 0 && cmd.Raw != nil:
			t.Fatalf("Parse: skipped command with Raw %q", cmd.Raw)
		case len(cmd.Args) > 0 && rest[0] == '*' && !bytes.Equal(cmd.Raw, rest[:n]):
			t.Fatalf("Parse: Raw %q is not the input %q", cmd.Raw, rest[:n])
		case len(cmd.Args) > 0 && rest[0] != '*':
			// The re-encoded inline command must parse back to the same arguments.
			args := fmt.Sprintf("%q", cmd.Args)
			var q CommandParser
			back, m, err := q.Parse(cmd.Raw)
			if err != nil || m != len(cmd.Raw) || fmt.Sprintf("%q", back.Args) != args {
				t.Fatalf("Parse: inline Raw %q parses back to %q, %d, %v; want %s", cmd.Raw, back.Args, m, err, args)
			}
		}
		off += n
		o.ends = append(o.ends, off)
	}
}

// scanStream runs s over in, in chunks whose sizes come from next (0: the rest of the input).
func scanStream(s *Scanner, in []byte, next func() int) outcome {
	var o outcome
	for off := 0; off < len(in); {
		end := len(in)
		if k := next(); k > 0 {
			end = min(len(in), off+k)
		}
		for off < end {
			n, done, err := s.Scan(in[off:end])
			if err != nil {
				o.err = errString(err)
				return o
			}
			if !done && n != end-off {
				o.err = fmt.Sprintf("unexpected: not done after %d of %d bytes", n, end-off)
				return o
			}
			off += n
			if done {
				o.ends = append(o.ends, off)
			}
		}
	}
	o.err = "more"
	return o
}

func whole() int { return 0 }

// chunker returns chunk sizes from 1 to 16, or to the whole input now and then.
func chunker(rng *rand.Rand) func() int {
	return func() int {
		if rng.IntN(8) == 0 {
			return 1 + rng.IntN(1000)
		}
		return 1 + rng.IntN(16)
	}
}

// checkCommands checks that Parse and the Commands Scanner, whole and in random chunks, agree on in.
func checkCommands(t testing.TB, in []byte, rng *rand.Rand) {
	want := parseStream(t, in)
	s := Scanner{Commands: true}
	if got := scanStream(&s, in, whole); got.String() != want.String() {
		t.Fatalf("input %.200q:\nParse:       %v\nScan whole:  %v", in, want, got)
	}
	s = Scanner{Commands: true}
	if got := scanStream(&s, in, chunker(rng)); got.String() != want.String() {
		t.Fatalf("input %.200q:\nParse:       %v\nScan chunks: %v", in, want, got)
	}
}

// checkReplies checks the reply Scanner whole against in chunks, against the buffered framing of skipElems,
// and PeekHead against both.
func checkReplies(t testing.TB, in []byte, rng *rand.Rand) {
	s := Scanner{MaxBulk: math.MaxInt64}
	want := scanStream(&s, in, whole)
	s = Scanner{MaxBulk: math.MaxInt64}
	if got := scanStream(&s, in, chunker(rng)); got.String() != want.String() {
		t.Fatalf("input %.200q:\nScan whole:  %v\nScan chunks: %v", in, want, got)
	}
	var h Head
	start := 0
	for i := 0; i <= len(want.ends); i++ {
		rest := in[start:]
		n, ok, err := skipElems(rest, 0, 1)
		hok, herr := PeekHead(rest, 3, &h)
		if i < len(want.ends) { // the Scanner found a frame of want.ends[i]-start bytes
			if !ok || err != nil || n != want.ends[i]-start {
				t.Fatalf("input %.200q: Scanner frame %d, skipElems %d, %v, %v", rest, want.ends[i]-start, n, ok, err)
			}
			if !hok || herr != nil || h.AttrLen >= n || h.Type != rest[h.AttrLen] || len(h.Elems) > 3 {
				t.Fatalf("input %.200q: PeekHead on a complete frame = %v, %v, %+v", rest, hok, herr, h)
			}
			start = want.ends[i]
			continue
		}
		// The stream ends with an incomplete frame or an error.
		switch {
		case ok:
			t.Fatalf("input %.200q: skipElems found a frame of %d the Scanner did not (%v)", rest, n, want)
		case err != nil && want.err != "invalid reply":
			t.Fatalf("input %.200q: skipElems error %v, Scanner %v", rest, err, want)
		case herr != nil && want.err != "invalid reply":
			t.Fatalf("input %.200q: PeekHead error %v, Scanner %v", rest, herr, want)
		}
	}
}

// genCommand returns a random client command: mostly valid, sometimes skipped or odd.
func genCommand(rng *rand.Rand) []byte {
	switch rng.IntN(10) {
	case 0: // inline, from the characters that matter to sdssplitargs
		const alphabet = "ab \t\v\r\"'\\x4f"
		var b []byte
		for range rng.IntN(20) {
			b = append(b, alphabet[rng.IntN(len(alphabet))])
		}
		return append(b, '\n')
	case 1: // skipped counts
		return []byte([]string{"*0\r\n", "*-1\r\n", "*-7\r\n", "\r\n", "  \n"}[rng.IntN(5)])
	case 2: // Redis's leniencies
		return []byte([]string{"*1\rX$4\r\nPING\r\n", "*1\r\n$4\rYPING\r\n", "*1\r\n$4\r\nPINGxy"}[rng.IntN(3)])
	}
	args := make([]string, 1+rng.IntN(4))
	for i := range args {
		v := make([]byte, rng.IntN(12))
		for j := range v {
			v[j] = byte(rng.IntN(256))
		}
		args[i] = string(v)
	}
	return AppendCommand(nil, args...)
}

// genReply returns a random RESP2/RESP3 reply nested at most depth deep.
func genReply(rng *rand.Rand, depth int) []byte {
	simple := []string{"+OK\r\n", "-ERR x\r\n", ":-5\r\n", "_\r\n", "#t\r\n", ",1.5\r\n", "(99\r\n", "$-1\r\n", "*-1\r\n"}
	n := rng.IntN(14)
	if depth <= 0 && n >= 9 {
		n %= 9
	}
	switch n {
	case 0, 1, 2:
		return []byte(simple[rng.IntN(len(simple))])
	case 3, 4, 5, 6:
		body := make([]byte, rng.IntN(20))
		for j := range body {
			body[j] = byte(rng.IntN(256))
		}
		t := "$$$!="[rng.IntN(5)]
		b := append([]byte{t}, strconv.Itoa(len(body))...)
		b = append(append(b, "\r\n"...), body...)
		return append(b, "\r\n"...)
	case 7, 8:
		return []byte(simple[rng.IntN(3)])
	}
	t := "**>~%|"[rng.IntN(6)]
	count := rng.IntN(4)
	b := append([]byte{t}, strconv.Itoa(count)...)
	b = append(b, "\r\n"...)
	elems := count
	if t == '%' || t == '|' {
		elems *= 2
	}
	for range elems {
		b = append(b, genReply(rng, depth-1)...)
	}
	if t == '|' {
		b = append(b, genReply(rng, depth-1)...)
	}
	return b
}

// corrupt damages b a little, now and then.
func corrupt(rng *rand.Rand, b []byte) []byte {
	if len(b) == 0 || rng.IntN(4) != 0 {
		return b
	}
	b = bytes.Clone(b)
	switch i := rng.IntN(len(b)); rng.IntN(3) {
	case 0:
		const bad = "\r\n\x00*$:-?0 \"'"
		b[i] = bad[rng.IntN(len(bad))]
	case 1:
		b = append(b[:i], b[i+1:]...)
	default:
		b = b[:i]
	}
	return b
}

func TestPropertyCommands(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	for range 3000 {
		var in []byte
		for range 1 + rng.IntN(5) {
			in = append(in, corrupt(rng, genCommand(rng))...)
		}
		checkCommands(t, in, rng)
	}
	for _, tc := range parseCases {
		checkCommands(t, []byte(tc.in), rng)
	}
}

func TestPropertyReplies(t *testing.T) {
	rng := rand.New(rand.NewPCG(3, 4))
	for range 3000 {
		var in []byte
		for range 1 + rng.IntN(4) {
			in = append(in, corrupt(rng, genReply(rng, 4))...)
		}
		checkReplies(t, in, rng)
	}
	for _, tc := range replyCases {
		checkReplies(t, []byte(tc.in), rng)
	}
}
