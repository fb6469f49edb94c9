package resp

import (
	"errors"
	"strings"
	"testing"
)

// big is a run of n digits: long header and inline lines.
func big(n int) string { return strings.Repeat("1", n) }

// parseCase is one Parse expectation. args nil with err "" means "skipped" (n > 0, no arguments).
type parseCase struct {
	name string
	in   string
	args []string
	n    int    // bytes consumed; 0 means len(in)
	err  string // "" for none, "incomplete", or the ProtocolError message
}

var parseCases = []parseCase{
	// Multibulk commands.
	{name: "get", in: "*2\r\n$3\r\nGET\r\n$1\r\nk\r\n", args: []string{"GET", "k"}},
	{name: "pipelined", in: "*1\r\n$4\r\nPING\r\n*1\r\n$4\r\nPING\r\n", args: []string{"PING"}, n: 14},
	{name: "binary arg", in: "*2\r\n$4\r\nECHO\r\n$5\r\na\r\n\x00b\r\n", args: []string{"ECHO", "a\r\n\x00b"}},
	{name: "empty arg", in: "*2\r\n$4\r\nECHO\r\n$0\r\n\r\n", args: []string{"ECHO", ""}},
	{name: "trailer not checked", in: "*1\r\n$4\r\nPINGXY", args: []string{"PING"}},
	{name: "count LF not checked", in: "*1\rX$4\r\nPING\r\n", args: []string{"PING"}},
	{name: "bulk LF not checked", in: "*1\r\n$4\rYPING\r\n", args: []string{"PING"}},
	{name: "count max", in: "*2147483647\r\n", err: "incomplete"},
	{name: "bulk max", in: "*1\r\n$536870912\r\n", err: "incomplete"},
	// Counts Redis skips without a reply.
	{name: "count zero", in: "*0\r\n*1\r\n$4\r\nPING\r\n", n: 4},
	{name: "count negative", in: "*-10\r\n", n: 6},
	{name: "count minus one", in: "*-1\r\n", n: 5},
	{name: "count min int64", in: "*-9223372036854775808\r\n", n: 23},
	// Incomplete.
	{name: "empty", in: "", err: "incomplete"},
	{name: "star", in: "*", err: "incomplete"},
	{name: "count digits", in: "*1", err: "incomplete"},
	{name: "count CR", in: "*1\r", err: "incomplete"},
	{name: "no bulk", in: "*1\r\n", err: "incomplete"},
	{name: "dollar", in: "*1\r\n$", err: "incomplete"},
	{name: "bulk CR", in: "*1\r\n$4\r", err: "incomplete"},
	{name: "partial body", in: "*1\r\n$4\r\nPI", err: "incomplete"},
	{name: "partial trailer", in: "*1\r\n$4\r\nPING\r", err: "incomplete"},
	{name: "bad bulk line unfinished", in: "*1\r\nX", err: "incomplete"},
	{name: "bad bulk line CR", in: "*1\r\nX\r", err: "incomplete"},
	{name: "second arg missing", in: "*2\r\n$3\r\nGET\r\n", err: "incomplete"},
	{name: "NUL in count", in: "*1\x00\r\n", err: "incomplete"},
	{name: "NUL in bulk length", in: "*1\r\n$4\x00\r\n", err: "incomplete"},
	{name: "long count CR", in: "*" + big(65535) + "\r", err: "incomplete"},
	{name: "count 64 KiB", in: "*" + big(65535), err: "incomplete"},
	// Multibulk count errors.
	{name: "count above INT_MAX", in: "*2147483648\r\n", err: "invalid multibulk length"},
	{name: "count minus zero", in: "*-0\r\n", err: "invalid multibulk length"},
	{name: "count leading zero", in: "*01\r\n", err: "invalid multibulk length"},
	{name: "count plus", in: "*+1\r\n", err: "invalid multibulk length"},
	{name: "count empty", in: "*\r\n", err: "invalid multibulk length"},
	{name: "count space before", in: "* 1\r\n", err: "invalid multibulk length"},
	{name: "count space after", in: "*1 \r\n", err: "invalid multibulk length"},
	{name: "count too long", in: "*99999999999999999999\r\n", err: "invalid multibulk length"},
	{name: "count below min int64", in: "*-9223372036854775809\r\n", err: "invalid multibulk length"},
	{name: "count huge", in: "*3000000000\r\n", err: "invalid multibulk length"},
	{name: "count line 64 KiB", in: "*" + big(65535) + "\r\n", err: "invalid multibulk length"},
	{name: "count line too big", in: "*" + big(65536), err: "too big mbulk count string"},
	{name: "count line too big with CR", in: "*" + big(65536) + "\r\n", err: "too big mbulk count string"},
	{name: "count NUL too big", in: "*1\x00" + big(65535), err: "too big mbulk count string"},
	// Bulk header errors.
	{name: "not dollar", in: "*1\r\nX\rY", err: "expected '$', got 'X'"},
	{name: "not dollar colon", in: "*1\r\n:1\r\n", err: "expected '$', got ':'"},
	{name: "CR for dollar", in: "*1\r\n\r\n", err: "expected '$', got ' '"},
	{name: "LF for dollar", in: "*1\r\n\n\r\n", err: "expected '$', got ' '"},
	{name: "high byte for dollar", in: "*1\r\n\xff\r\n", err: "expected '$', got '\xff'"},
	{name: "second not dollar", in: "*2\r\n$3\r\nGET\r\nk\r\n", err: "expected '$', got 'k'"},
	{name: "bulk negative", in: "*1\r\n$-1\r\n", err: "invalid bulk length"},
	{name: "bulk leading zero", in: "*1\r\n$01\r\n", err: "invalid bulk length"},
	{name: "bulk empty", in: "*1\r\n$\r\n", err: "invalid bulk length"},
	{name: "bulk above max", in: "*1\r\n$536870913\r\n", err: "invalid bulk length"},
	{name: "bulk error before rest", in: "*3\r\n$3\r\nSET\r\n$x\r\n", err: "invalid bulk length"},
	{name: "bulk line too big", in: "*1\r\n" + big(65537), err: "too big bulk count string"},
	{name: "bulk line 64 KiB", in: "*1\r\n" + big(65536), err: "incomplete"},
	{name: "second bulk line too big", in: "*2\r\n$1\r\nx\r\n" + big(65537), err: "too big bulk count string"},
	{name: "bulk line long", in: "*1\r\n$" + big(65535) + "\r\n", err: "invalid bulk length"},
	// Inline commands.
	{name: "inline", in: "PING\r\n", args: []string{"PING"}},
	{name: "inline LF", in: "PING\nPING\n", args: []string{"PING"}, n: 5},
	{name: "inline args", in: "SET  k\tv \r\n", args: []string{"SET", "k", "v"}},
	{name: "inline empty CRLF", in: "\r\n", n: 2},
	{name: "inline empty LF", in: "\n", n: 1},
	{name: "inline blanks", in: " \t\v\f\r\n", n: 6},
	{name: "inline quote in word", in: "ECHO a\"b c\"\r\n", args: []string{"ECHO", "ab c"}},
	{name: "inline escapes", in: "ECHO \"\\x41\\x4g\\n\\a\\q\\b\\t\\r\\\"\"\n", args: []string{"ECHO", "Ax4g\n\aq\b\t\r\""}},
	{name: "inline short hex", in: "ECHO \"\\x4\"\n", args: []string{"ECHO", "x4"}},
	{name: "inline single quote escape", in: "ECHO '\\''\n", args: []string{"ECHO", "'"}},
	{name: "inline single quote backslash", in: "ECHO 'a\\b'\n", args: []string{"ECHO", "a\\b"}},
	{name: "inline single quotes unbalanced", in: "ECHO '\\\\'\n", err: "unbalanced quotes in request"},
	{name: "inline escaped backslash", in: "ECHO \"a\\\\\"\r\n", args: []string{"ECHO", "a\\"}},
	{name: "inline empty quotes", in: "ECHO \"\" ''\n", args: []string{"ECHO", "", ""}},
	{name: "inline text after quote", in: "ECHO \"a\"b\r\n", err: "unbalanced quotes in request"},
	{name: "inline text after single quote", in: "ECHO 'a'x\n", err: "unbalanced quotes in request"},
	{name: "inline unterminated", in: "ECHO \"a\n", err: "unbalanced quotes in request"},
	{name: "inline backslash at end", in: "ECHO \"\\\n", err: "unbalanced quotes in request"},
	{name: "inline CR inside quotes", in: "ECHO \"a\r\"\r\n", args: []string{"ECHO", "a\r"}},
	{name: "inline CR ends quoted line", in: "ECHO \"a\"\r\r\n", args: []string{"ECHO", "a"}},
	{name: "inline CR splits", in: "ECHO a\rb\n", args: []string{"ECHO", "a", "b"}},
	{name: "inline vertical tab in word", in: "ECHO a\vb\n", args: []string{"ECHO", "a\vb"}},
	{name: "inline form feed in word", in: "\vECHO\fb\n", args: []string{"ECHO\fb"}},
	{name: "inline quote then vertical tab", in: "ECHO \"a\"\v\n", args: []string{"ECHO", "a"}},
	{name: "inline not star", in: "$3\r\n", args: []string{"$3"}},
	{name: "inline no LF", in: "PING", err: "incomplete"},
	{name: "inline open quote no LF", in: "ECHO \"\\", err: "incomplete"},
	{name: "inline NUL", in: "ECHO a\x00b\n", err: "incomplete"},
	{name: "inline NUL line", in: "\x00\n*1\r\n$4\r\nPING\r\n", err: "incomplete"},
	{name: "inline 64 KiB", in: big(65536), err: "incomplete"},
	{name: "inline 64 KiB line", in: big(65536) + "\n", args: []string{big(65536)}},
	{name: "inline 64 KiB line CRLF", in: big(65535) + "\r\n", args: []string{big(65535)}},
	{name: "inline too big", in: big(65537), err: "too big inline request"},
	{name: "inline too big line", in: big(65537) + "\n", err: "too big inline request"},
	{name: "inline NUL too big", in: "ECHO a\x00" + big(65530) + "\n", err: "too big inline request"},
}

func TestParse(t *testing.T) {
	var p CommandParser
	for _, tc := range parseCases {
		t.Run(tc.name, func(t *testing.T) {
			cmd, n, err := p.Parse([]byte(tc.in))
			checkParse(t, tc, cmd, n, err)
		})
	}
}

func checkParse(t *testing.T, tc parseCase, cmd Command, n int, err error) {
	t.Helper()
	switch tc.err {
	case "":
		if err != nil {
			t.Fatalf("Parse(%.40q) error %v, want none", tc.in, err)
		}
		want := tc.n
		if want == 0 {
			want = len(tc.in)
		}
		if n != want {
			t.Fatalf("Parse(%.40q) n = %d, want %d", tc.in, n, want)
		}
		if len(cmd.Args) != len(tc.args) {
			t.Fatalf("Parse(%.40q) args %q, want %q", tc.in, cmd.Args, tc.args)
		}
		for i := range tc.args {
			if string(cmd.Args[i]) != tc.args[i] {
				t.Fatalf("Parse(%.40q) args %q, want %q", tc.in, cmd.Args, tc.args)
			}
		}
		switch {
		case len(tc.args) == 0 && cmd.Raw != nil:
			t.Fatalf("Parse(%.40q) Raw %q for a skipped command, want nil", tc.in, cmd.Raw)
		case len(tc.args) > 0 && tc.in[0] == '*' && string(cmd.Raw) != tc.in[:n]:
			t.Fatalf("Parse(%.40q) Raw %q, want the input", tc.in, cmd.Raw)
		case len(tc.args) > 0 && tc.in[0] != '*' && string(cmd.Raw) != string(encode(tc.args)):
			t.Fatalf("Parse(%.40q) Raw %q, want %q", tc.in, cmd.Raw, encode(tc.args))
		}
	case "incomplete":
		if err != ErrIncomplete || n != 0 {
			t.Fatalf("Parse(%.40q) = n %d, err %v; want ErrIncomplete", tc.in, n, err)
		}
	default:
		var pe *ProtocolError
		if !errors.As(err, &pe) || pe.Msg != tc.err || n != 0 {
			t.Fatalf("Parse(%.40q) = n %d, err %v; want protocol error %q", tc.in, n, err, tc.err)
		}
		if want := "Protocol error: " + tc.err; err.Error() != want {
			t.Fatalf("Error() = %q, want %q", err.Error(), want)
		}
	}
}

func encode(args []string) []byte { return AppendCommand(nil, args...) }

func TestParseZeroCopy(t *testing.T) {
	in := []byte("*2\r\n$3\r\nGET\r\n$1\r\nk\r\nrest")
	var p CommandParser
	cmd, n, err := p.Parse(in)
	if err != nil || n != len(in)-4 {
		t.Fatalf("Parse = n %d, err %v", n, err)
	}
	if &cmd.Args[0][0] != &in[8] || &cmd.Raw[0] != &in[0] {
		t.Fatal("Args and Raw must be sub-slices of the input")
	}
	if cap(cmd.Args[0]) != 3 || cap(cmd.Raw) != n {
		t.Fatal("sub-slices must be capped so appending to them cannot overwrite the input")
	}
}

func TestParseMaxBulk(t *testing.T) {
	p := CommandParser{MaxBulk: 10}
	for _, tc := range []parseCase{
		{name: "at max", in: "*1\r\n$10\r\n0123456789\r\n", args: []string{"0123456789"}},
		{name: "above max", in: "*1\r\n$11\r\n", err: "invalid bulk length"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cmd, n, err := p.Parse([]byte(tc.in))
			checkParse(t, tc, cmd, n, err)
		})
	}
}

func TestCommandName(t *testing.T) {
	for _, tc := range []struct {
		in   string
		want string
		ok   bool
	}{
		{"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$100000\r\n", "SET", true},
		{"*3\r\n$3\r\nSET", "SET", true},
		{"*1\rX$4\rYPING", "PING", true},
		{"*3\r\n$3\r\nSE", "", false},
		{"*3\r\n$3\r", "", false},
		{"*3\r\n", "", false},
		{"*0\r\n", "", false},
		{"*-1\r\n", "", false},
		{"*x\r\n$3\r\nSET", "", false},
		{"*3\r\n:3\r\nSET", "", false},
		{"*3\r\n$-3\r\nSET", "", false},
		{"SET k v\r\n", "", false},
		{"", "", false},
	} {
		name, ok := CommandName([]byte(tc.in))
		if ok != tc.ok || string(name) != tc.want {
			t.Errorf("CommandName(%q) = %q, %v; want %q, %v", tc.in, name, ok, tc.want, tc.ok)
		}
	}
}

func TestAppend(t *testing.T) {
	if got := string(AppendCommand([]byte("x"), "AUTH", "user", "")); got != "x*3\r\n$4\r\nAUTH\r\n$4\r\nuser\r\n$0\r\n\r\n" {
		t.Errorf("AppendCommand = %q", got)
	}
	if got := string(AppendError(nil, "ERR a\r\nb")); got != "-ERR a  b\r\n" {
		t.Errorf("AppendError = %q", got)
	}
}

// Redis 7.0 with requirepass answers these before AUTH (compared by hand against redis-server 7.0.15).
func TestParseUnauthenticated(t *testing.T) {
	p := CommandParser{Unauthenticated: true}
	ten := "*10\r\n" + strings.Repeat("$1\r\na\r\n", 10)
	for _, tc := range []parseCase{
		{name: "10 arguments", in: ten, args: strings.Split(strings.Repeat("a", 10), "")},
		{name: "11 arguments", in: "*11\r\n", err: "unauthenticated multibulk length"},
		{name: "bulk at 16384", in: "*1\r\n$16384\r\n" + strings.Repeat("x", 16384) + "\r\n", args: []string{strings.Repeat("x", 16384)}},
		{name: "bulk over 16384", in: "*2\r\n$16385\r\n", err: "unauthenticated bulk length"},
		{name: "invalid first", in: "*1\r\n$-2\r\n", err: "invalid bulk length"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cmd, n, err := p.Parse([]byte(tc.in))
			checkParse(t, tc, cmd, n, err)
		})
	}
}
