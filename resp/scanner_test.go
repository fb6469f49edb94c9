package resp

import (
	"errors"
	"slices"
	"strings"
	"testing"
)

// scanAll feeds in to s in chunks of size chunk (0: one call) until a frame ends or an error occurs.
// n is the frame's length when done.
func scanAll(s *Scanner, in []byte, chunk int) (n int, done bool, err error) {
	for off := 0; off < len(in); {
		end := len(in)
		if chunk > 0 {
			end = min(len(in), off+chunk)
		}
		k, done, err := s.Scan(in[off:end])
		if err != nil || done {
			return off + k, done, err
		}
		if k != end-off {
			return off + k, false, errors.New("Scan consumed part of a chunk without ending the frame")
		}
		off = end
	}
	return len(in), false, nil
}

// TestScanCommands checks the Scanner in Commands mode against every Parse expectation, whole and a byte
// at a time.
func TestScanCommands(t *testing.T) {
	for _, tc := range parseCases {
		for _, chunk := range []int{0, 1, 7} {
			t.Run(tc.name, func(t *testing.T) {
				s := Scanner{Commands: true}
				n, done, err := scanAll(&s, []byte(tc.in), chunk)
				switch tc.err {
				case "":
					want := tc.n
					if want == 0 {
						want = len(tc.in)
					}
					if err != nil || !done || n != want {
						t.Fatalf("chunk %d: Scan(%.40q) = %d, %v, %v; want %d, true, nil", chunk, tc.in, n, done, err, want)
					}
					if s.InFrame() {
						t.Fatal("InFrame after the frame ended")
					}
				case "incomplete":
					if err != nil || done {
						t.Fatalf("chunk %d: Scan(%.40q) = %d, %v, %v; want not done", chunk, tc.in, n, done, err)
					}
					if len(tc.in) > 0 && !s.InFrame() {
						t.Fatal("not InFrame in the middle of a frame")
					}
				default:
					var pe *ProtocolError
					if !errors.As(err, &pe) || pe.Msg != tc.err {
						t.Fatalf("chunk %d: Scan(%.40q) = %d, %v, %v; want protocol error %q", chunk, tc.in, n, done, err, tc.err)
					}
				}
			})
		}
	}
}

func TestScanCommandsMaxBulk(t *testing.T) {
	s := Scanner{Commands: true, MaxBulk: 10}
	if _, _, err := s.Scan([]byte("*1\r\n$11\r\n")); err != errInvalidBulk {
		t.Fatalf("Scan = %v, want %v", err, errInvalidBulk)
	}
}

func nest(depth int) string { return strings.Repeat("*1\r\n", depth) + ":1\r\n" }

var replyCases = []struct {
	name string
	in   string
	n    int  // frame length; 0 means len(in)
	more bool // incomplete
	err  bool
}{
	{name: "simple", in: "+OK\r\n"},
	{name: "error", in: "-ERR unknown command\r\n"},
	{name: "integer", in: ":-12\r\n"},
	{name: "bulk", in: "$3\r\nfoo\r\n"},
	{name: "bulk binary", in: "$4\r\n\r\n\r\n\r\n"},
	{name: "bulk empty", in: "$0\r\n\r\n"},
	{name: "bulk null", in: "$-1\r\n"},
	{name: "array null", in: "*-1\r\n"},
	{name: "array empty", in: "*0\r\n"},
	{name: "array", in: "*2\r\n$1\r\na\r\n:2\r\n"},
	{name: "array with nulls", in: "*3\r\n$-1\r\n*-1\r\n_\r\n"},
	{name: "nested", in: "*2\r\n*1\r\n+a\r\n*0\r\n"},
	{name: "nested deep", in: "*2\r\n*2\r\n*1\r\n:1\r\n:2\r\n:3\r\n"},
	{name: "followed by next", in: "*1\r\n+a\r\n+NEXT\r\n", n: 8},
	{name: "resp3 null", in: "_\r\n"},
	{name: "resp3 bool", in: "#t\r\n"},
	{name: "resp3 double", in: ",1.5e10\r\n"},
	{name: "resp3 big number", in: "(3492890328409238509324850943850943825024385\r\n"},
	{name: "resp3 blob error", in: "!21\r\nSYNTAX invalid syntax\r\n"},
	{name: "resp3 verbatim", in: "=15\r\ntxt:Some string\r\n"},
	{name: "resp3 map", in: "%2\r\n+first\r\n:1\r\n+second\r\n:2\r\n"},
	{name: "resp3 empty map", in: "%0\r\n"},
	{name: "resp3 set", in: "~2\r\n+a\r\n+b\r\n"},
	{name: "resp3 push", in: ">3\r\n$7\r\nmessage\r\n$2\r\nch\r\n$2\r\nhi\r\n"},
	{name: "attribute", in: "|1\r\n+key-popularity\r\n%1\r\n$1\r\na\r\n,0.19\r\n*2\r\n:2039123\r\n:9543892\r\n"},
	{name: "attribute empty", in: "|0\r\n:1\r\n"},
	{name: "attribute in array", in: "*2\r\n|1\r\n+a\r\n+b\r\n:1\r\n:2\r\n"},
	{name: "attribute in attribute", in: "|1\r\n|1\r\n+x\r\n+y\r\n+a\r\n+b\r\n:1\r\n"},
	{name: "attribute last in array", in: "*1\r\n|1\r\n+a\r\n+b\r\n:1\r\n"},
	{name: "depth 129", in: nest(129)},
	{name: "depth 200 map", in: "%1\r\n+k\r\n" + nest(199)},
	{name: "depth 200 attribute", in: "|1\r\n+k\r\n" + nest(200) + "+v\r\n"},
	{name: "partial simple", in: "+OK\r", more: true},
	{name: "partial body", in: "$3\r\nfo", more: true},
	{name: "partial trailer", in: "$3\r\nfoo\r", more: true},
	{name: "partial array", in: "*2\r\n:1\r\n", more: true},
	{name: "attribute without value", in: "|1\r\n+a\r\n+b\r\n", more: true},
	{name: "partial header", in: "*12", more: true},
	{name: "bad type", in: "?x\r\n", err: true},
	{name: "bad nested type", in: "*1\r\nX\r\n", err: true},
	{name: "LF only", in: "+OK\n", err: true},
	{name: "header LF only", in: "$3\nfoo\r\n", err: true},
	{name: "header CR alone", in: "$3\rfoo\r\n", err: true},
	{name: "trailer missing", in: "$3\r\nfooXY", err: true},
	{name: "trailer LF missing", in: "$3\r\nfoo\rX", err: true},
	{name: "streamed string", in: "$?\r\n;4\r\nHell\r\n;0\r\n", err: true},
	{name: "streamed array", in: "*?\r\n:1\r\n.\r\n", err: true},
	{name: "bulk negative", in: "$-2\r\n", err: true},
	{name: "array negative", in: "*-2\r\n", err: true},
	{name: "map null", in: "%-1\r\n", err: true},
	{name: "blob error null", in: "!-1\r\n", err: true},
	{name: "length leading zero", in: "$03\r\nfoo\r\n", err: true},
	{name: "length empty", in: "*\r\n", err: true},
	{name: "length too long", in: "$000000000000000000000000\r\n", err: true},
	{name: "bulk above max", in: "$536870913\r\n", err: true},
	{name: "count above max", in: "*1099511627777\r\n", err: true},
	{name: "deep attribute without value", in: "|1\r\n+k\r\n" + nest(200), more: true},
}

func TestScanReplies(t *testing.T) {
	for _, tc := range replyCases {
		for _, chunk := range []int{0, 1, 3} {
			t.Run(tc.name, func(t *testing.T) {
				var s Scanner
				n, done, err := scanAll(&s, []byte(tc.in), chunk)
				want := tc.n
				if want == 0 {
					want = len(tc.in)
				}
				switch {
				case tc.err:
					if err == nil || !errors.Is(err, ErrInvalidReply) {
						t.Fatalf("chunk %d: Scan(%.40q) = %d, %v, %v; want ErrInvalidReply", chunk, tc.in, n, done, err)
					}
				case tc.more:
					if err != nil || done || !s.InFrame() {
						t.Fatalf("chunk %d: Scan(%.40q) = %d, %v, %v, InFrame %v; want more", chunk, tc.in, n, done, err, s.InFrame())
					}
				case err != nil || !done || n != want || s.InFrame():
					t.Fatalf("chunk %d: Scan(%.40q) = %d, %v, %v; want %d, true, nil", chunk, tc.in, n, done, err, want)
				}
			})
		}
	}
}

func TestScanRepliesMaxBulk(t *testing.T) {
	s := Scanner{MaxBulk: 10}
	if _, _, err := s.Scan([]byte("$11\r\n")); !errors.Is(err, ErrInvalidReply) {
		t.Fatalf("Scan = %v, want ErrInvalidReply", err)
	}
}

// TestScanStream scans several frames of one stream in one buffer and checks Reset.
func TestScanStream(t *testing.T) {
	in := []byte("+OK\r\n$3\r\nfoo\r\n*2\r\n:1\r\n:2\r\n_\r\n")
	var s Scanner
	var ends []int
	for off := 0; off < len(in); {
		n, done, err := s.Scan(in[off:])
		if err != nil || !done {
			t.Fatalf("Scan at %d = %d, %v, %v", off, n, done, err)
		}
		off += n
		ends = append(ends, off)
	}
	if want := []int{5, 14, 26, 29}; !slices.Equal(ends, want) {
		t.Fatalf("frame ends %v, want %v", ends, want)
	}
	if _, done, _ := s.Scan([]byte("*2\r\n:1\r\n")); done || !s.InFrame() {
		t.Fatal("want a frame in progress")
	}
	s.Reset()
	if n, done, err := s.Scan([]byte("+OK\r\n")); n != 5 || !done || err != nil {
		t.Fatalf("after Reset: Scan = %d, %v, %v", n, done, err)
	}
}
