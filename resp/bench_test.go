package resp

import (
	"bytes"
	"testing"
)

func BenchmarkParse(b *testing.B) {
	set := AppendCommand(nil, "SET", "user:1000:session", "0123456789abcdef0123456789abcdef")
	get := AppendCommand(nil, "GET", "user:1000:session")
	var batch []byte
	for range 8 {
		batch = append(append(batch, set...), get...)
	}
	for _, bc := range []struct {
		name string
		in   []byte
		cmds int
	}{
		{"SET", set, 1},
		{"GET", get, 1},
		{"Pipeline16", batch, 16},
		{"Inline", []byte("SET k \"v a\"\r\n"), 1},
	} {
		b.Run(bc.name, func(b *testing.B) {
			var p CommandParser
			b.SetBytes(int64(len(bc.in)))
			b.ReportAllocs()
			for b.Loop() {
				in := bc.in
				for range bc.cmds {
					cmd, n, err := p.Parse(in)
					if err != nil || len(cmd.Args) == 0 {
						b.Fatal(err)
					}
					in = in[n:]
				}
			}
		})
	}
}

func BenchmarkScanReplies(b *testing.B) {
	mixed := []byte("+OK\r\n$5\r\nhello\r\n:1000\r\n$-1\r\n*3\r\n$3\r\nfoo\r\n$3\r\nbar\r\n:7\r\n" +
		"-ERR wrong type\r\n%2\r\n+a\r\n:1\r\n+b\r\n#t\r\n>3\r\n$7\r\nmessage\r\n$2\r\nch\r\n$2\r\nhi\r\n_\r\n")
	large := append([]byte("$102400\r\n"), bytes.Repeat([]byte("x"), 102400)...)
	large = append(large, "\r\n"...)
	for _, bc := range []struct {
		name   string
		in     []byte
		frames int
		chunk  int
	}{
		{"Mixed", mixed, 9, 0},
		{"Bulk100KB", large, 1, 0},
		{"Bulk100KBChunks16KB", large, 1, 16 << 10},
		{"Nested100", []byte(nest(100)), 1, 0},
	} {
		b.Run(bc.name, func(b *testing.B) {
			var s Scanner
			b.SetBytes(int64(len(bc.in)))
			b.ReportAllocs()
			for b.Loop() {
				frames := 0
				for off := 0; off < len(bc.in); {
					end := len(bc.in)
					if bc.chunk > 0 {
						end = min(end, off+bc.chunk)
					}
					n, done, err := s.Scan(bc.in[off:end])
					if err != nil {
						b.Fatal(err)
					}
					off += n
					if done {
						frames++
					}
				}
				if frames != bc.frames {
					b.Fatalf("%d frames, want %d", frames, bc.frames)
				}
			}
		})
	}
}

func BenchmarkScanCommands(b *testing.B) {
	in := AppendCommand(nil, "SET", "k", string(bytes.Repeat([]byte("v"), 100<<10)))
	var s Scanner
	s.Commands = true
	b.SetBytes(int64(len(in)))
	b.ReportAllocs()
	for b.Loop() {
		if n, done, err := s.Scan(in); err != nil || !done || n != len(in) {
			b.Fatal(n, done, err)
		}
	}
}

func BenchmarkPeekHead(b *testing.B) {
	for _, bc := range []struct {
		name string
		in   []byte
		max  int
	}{
		{"Simple", []byte("+OK\r\n"), 0},
		{"Bulk", []byte("$5\r\nhello\r\n"), 0},
		{"PubSubMessage", []byte("*3\r\n$7\r\nmessage\r\n$7\r\nchannel\r\n$5\r\nhello\r\n"), 2},
		{"Push", []byte(">3\r\n$7\r\nmessage\r\n$7\r\nchannel\r\n$5\r\nhello\r\n"), 3},
		{"Attribute", []byte("|1\r\n+key-popularity\r\n%1\r\n$1\r\na\r\n,0.19\r\n*2\r\n:2039123\r\n:9543892\r\n"), 2},
	} {
		b.Run(bc.name, func(b *testing.B) {
			var h Head
			b.ReportAllocs()
			for b.Loop() {
				if ok, err := PeekHead(bc.in, bc.max, &h); !ok || err != nil {
					b.Fatal(ok, err)
				}
			}
		})
	}
}
