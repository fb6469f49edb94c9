package topology

import (
	"bytes"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"

	"github.com/entra-redis-proxy/entra-redis-proxy/resp"
)

// The captures in testdata are redis-server 7.0's replies in the 3+3 TLS cluster of
// internal/azurefake (tls-cluster yes, port 0), to a RESP2 and a RESP3 (HELLO 3) connection.
var capturedPorts = []string{"39561", "35275", "35367", "41947", "45581", "37279"}

// capturedMap sends the captured nodes to [::1]:6380... : a host of another length than
// 127.0.0.1 and ports of fewer digits, so that every length must be recomputed.
func capturedMap() Map {
	return Map{Connected: "127.0.0.1", Local: func(up string) (string, bool) {
		i := slices.Index(capturedPorts, strings.TrimPrefix(up, "127.0.0.1:"))
		if i < 0 {
			return "", false
		}
		return "[::1]:" + strconv.Itoa(6380+i), true
	}}
}

func bulk(s string) string { return "$" + strconv.Itoa(len(s)) + "\r\n" + s + "\r\n" }

// wantCaptured is the expected rewrite of a capture, made by replacing text in it.
func wantCaptured(t *testing.T, name string, in []byte) string {
	s := string(in)
	for i, p := range capturedPorts {
		lp := strconv.Itoa(6380 + i)
		switch {
		case strings.HasPrefix(name, "cluster-slots"):
			s = strings.ReplaceAll(s, bulk("127.0.0.1")+":"+p+"\r\n", bulk("::1")+":"+lp+"\r\n")
		case strings.HasPrefix(name, "cluster-shards"):
			s = strings.ReplaceAll(s, bulk("tls-port")+":"+p+"\r\n", bulk("port")+":"+lp+"\r\n")
		case strings.HasPrefix(name, "cluster-nodes"):
			s = strings.ReplaceAll(s, " 127.0.0.1:"+p+"@", " ::1:"+lp+"@")
		}
	}
	switch {
	case strings.HasPrefix(name, "cluster-shards"):
		s = strings.ReplaceAll(s, bulk("ip")+bulk("127.0.0.1"), bulk("ip")+bulk("::1"))
		s = strings.ReplaceAll(s, bulk("endpoint")+bulk("127.0.0.1"), bulk("endpoint")+bulk("::1"))
	case strings.HasPrefix(name, "cluster-nodes"):
		_, body, _ := strings.Cut(s, "\r\n")
		body = strings.TrimSuffix(body, "\r\n")
		s = s[:1] + strconv.Itoa(len(body)) + "\r\n" + body + "\r\n"
	}
	if s == string(in) {
		t.Fatalf("%s: the expectation changed nothing", name)
	}
	return s
}

// oneFrame fails unless b is exactly one complete reply frame for resp's Scanner.
func oneFrame(t testing.TB, b []byte) {
	t.Helper()
	var sc resp.Scanner
	n, done, err := sc.Scan(b)
	if err != nil || !done || n != len(b) {
		t.Fatalf("not one reply frame (n=%d of %d, done=%v, err=%v): %q", n, len(b), done, err, b)
	}
}

func TestCaptured(t *testing.T) {
	files, err := filepath.Glob("testdata/*.resp")
	if err != nil || len(files) != 6 {
		t.Fatalf("captures: %v, %v", files, err)
	}
	for _, f := range files {
		name := filepath.Base(f)
		t.Run(name, func(t *testing.T) {
			in, err := os.ReadFile(f)
			if err != nil {
				t.Fatal(err)
			}
			rewrite := map[string]func(Map, []byte) (Result, error){"cluster-slots": Slots, "cluster-shards": Shards, "cluster-nodes": Nodes}[name[:strings.LastIndexByte(name, '-')]]
			res, err := rewrite(capturedMap(), in)
			if err != nil || len(res.Unknown) != 0 {
				t.Fatalf("err %v, unknown %v", err, res.Unknown)
			}
			if want := wantCaptured(t, name, in); string(res.Out) != want {
				t.Fatalf("got\n%q\nwant\n%q", res.Out, want)
			}
			oneFrame(t, res.Out)
			for _, p := range capturedPorts {
				if bytes.Contains(res.Out, []byte(p)) {
					t.Errorf("upstream port %s still in the reply", p)
				}
			}
			// Nothing known: nothing changes, and every node is reported once.
			none := Map{Connected: "127.0.0.1", Local: func(string) (string, bool) { return "", false }}
			res, err = rewrite(none, in)
			if err != nil || !bytes.Equal(res.Out, in) || len(res.Unknown) != 6 {
				t.Fatalf("with no listener: err %v, unknown %v, changed %v", err, res.Unknown, !bytes.Equal(res.Out, in))
			}
		})
	}
}

// local maps "h:p" to "local-h:p+1000": a longer host, a longer port.
var local = Map{Connected: "10.0.0.9", Local: func(up string) (string, bool) {
	if strings.HasPrefix(up, "10.9.9.9:") { // a node without a listener
		return "", false
	}
	i := strings.LastIndexByte(up, ':')
	p, _ := strconv.Atoi(up[i+1:])
	return net.JoinHostPort("local-"+strings.Trim(up[:i], "[]"), strconv.Itoa(p+1000)), true
}}

func TestRedirect(t *testing.T) {
	for _, tc := range []struct {
		in, want, unknown string
		changed           bool
	}{
		{in: "-MOVED 3999 10.0.0.1:6379\r\n", want: "-MOVED 3999 local-10.0.0.1:7379\r\n", changed: true},
		{in: "-ASK 3999 10.0.0.1:6379\r\n", want: "-ASK 3999 local-10.0.0.1:7379\r\n", changed: true},
		{in: "-MOVED 1 :8500\r\n", want: "-MOVED 1 local-10.0.0.9:9500\r\n", changed: true}, // the connected host
		{in: "-MOVED 1 fe80::1:6379\r\n", want: "-MOVED 1 local-fe80::1:7379\r\n", changed: true},
		{in: "-MOVED 1 10.9.9.9:6379\r\n", want: "-MOVED 1 10.9.9.9:6379\r\n", unknown: "10.9.9.9:6379"},
		{in: "-ERR MOVED 1 10.0.0.1:6379\r\n", want: "-ERR MOVED 1 10.0.0.1:6379\r\n"},
		{in: "-MOVED 1 10.0.0.1:x\r\n", want: "-MOVED 1 10.0.0.1:x\r\n"},
		{in: "-MOVED 1 10.0.0.1\r\n", want: "-MOVED 1 10.0.0.1\r\n"},
		{in: "-MOVED 1 10.0.0.1:6379", want: "-MOVED 1 10.0.0.1:6379"},
		{in: "+MOVED 1 10.0.0.1:6379\r\n", want: "+MOVED 1 10.0.0.1:6379\r\n"},
	} {
		out, unknown, changed := Redirect(local, []byte(tc.in))
		if string(out) != tc.want || unknown != tc.unknown || changed != tc.changed {
			t.Errorf("Redirect(%q) = %q, %q, %v; want %q, %q, %v", tc.in, out, unknown, changed, tc.want, tc.unknown, tc.changed)
		}
	}
}

func TestEndpoint(t *testing.T) {
	for _, tc := range []struct {
		in, want, unknown string
		ok                bool
	}{
		{in: "10.0.0.1:6379", want: "local-10.0.0.1:7379", ok: true},
		{in: ":8500", want: "local-10.0.0.9:9500", ok: true}, // the connected host
		{in: "?:8500", want: "local-10.0.0.9:9500", ok: true},
		{in: "fe80::1:6379", want: "local-fe80::1:7379", ok: true},
		{in: "10.9.9.9:6379", unknown: "10.9.9.9:6379"},
		{in: "10.0.0.1"},
		{in: "10.0.0.1:x"},
		{in: ""},
	} {
		got, unknown, ok := Endpoint(local, tc.in)
		if got != tc.want || unknown != tc.unknown || ok != tc.ok {
			t.Errorf("Endpoint(%q) = %q, %q, %v; want %q, %q, %v", tc.in, got, unknown, ok, tc.want, tc.unknown, tc.ok)
		}
	}
}

func arr(elems ...string) string {
	return fmt.Sprintf("*%d\r\n%s", len(elems), strings.Join(elems, ""))
}
func mapOf(elems ...string) string {
	return fmt.Sprintf("%%%d\r\n%s", len(elems)/2, strings.Join(elems, ""))
}
func num(n int) string { return ":" + strconv.Itoa(n) + "\r\n" }

func TestSlots(t *testing.T) {
	for _, tc := range []struct {
		desc, in, want string
		unknown        []string
	}{
		{
			desc: "RESP3 metadata with hostname and ip",
			in:   arr(arr(num(0), num(5), arr(bulk("10.0.0.1"), num(6379), bulk("id1"), mapOf(bulk("hostname"), bulk("h1"), bulk("ip"), bulk("10.0.0.1"))))),
			want: arr(arr(num(0), num(5), arr(bulk("local-10.0.0.1"), num(7379), bulk("id1"), mapOf(bulk("hostname"), bulk("local-10.0.0.1"), bulk("ip"), bulk("local-10.0.0.1"))))),
		},
		{
			desc: "RESP2 metadata as a flat array, unknown-endpoint '?' is the connected host",
			in:   arr(arr(num(0), num(5), arr(bulk("?"), num(8500), bulk("id1"), arr(bulk("ip"), bulk("10.0.0.9"))))),
			want: arr(arr(num(0), num(5), arr(bulk("local-10.0.0.9"), num(9500), bulk("id1"), arr(bulk("ip"), bulk("local-10.0.0.9"))))),
		},
		{
			desc: "redis 6: three fields, null host",
			in:   arr(arr(num(0), num(5), arr("$-1\r\n", num(1), bulk("id1")))),
			want: arr(arr(num(0), num(5), arr(bulk("local-10.0.0.9"), num(1001), bulk("id1")))),
		},
		{
			desc:    "an unknown node is left and reported once",
			in:      arr(arr(num(0), num(5), arr(bulk("10.9.9.9"), num(1), bulk("a"))), arr(num(6), num(9), arr(bulk("10.9.9.9"), num(1), bulk("a")))),
			want:    arr(arr(num(0), num(5), arr(bulk("10.9.9.9"), num(1), bulk("a"))), arr(num(6), num(9), arr(bulk("10.9.9.9"), num(1), bulk("a")))),
			unknown: []string{"10.9.9.9:1"},
		},
		{desc: "an error passes", in: "-NOPERM no\r\n", want: "-NOPERM no\r\n"},
		{desc: "empty", in: "*0\r\n", want: "*0\r\n"},
	} {
		res, err := Slots(local, []byte(tc.in))
		if err != nil || string(res.Out) != tc.want || !slices.Equal(res.Unknown, tc.unknown) {
			t.Errorf("%s: got %q, %v, %v; want %q, %v", tc.desc, res.Out, res.Unknown, err, tc.want, tc.unknown)
		}
	}
}

func TestShards(t *testing.T) {
	node := func(kv ...string) string { return mapOf(kv...) }
	for _, tc := range []struct{ desc, in, want string }{
		{
			desc: "port and tls-port both: both local",
			in:   arr(mapOf(bulk("slots"), arr(num(0), num(5)), bulk("nodes"), arr(node(bulk("id"), bulk("x"), bulk("port"), num(1), bulk("tls-port"), num(2), bulk("ip"), bulk("10.0.0.1"), bulk("endpoint"), bulk("10.0.0.1"), bulk("hostname"), bulk(""))))),
			want: arr(mapOf(bulk("slots"), arr(num(0), num(5)), bulk("nodes"), arr(node(bulk("id"), bulk("x"), bulk("port"), num(1002), bulk("tls-port"), num(1002), bulk("ip"), bulk("local-10.0.0.1"), bulk("endpoint"), bulk("local-10.0.0.1"), bulk("hostname"), bulk(""))))),
		},
		{
			desc: "port only, hostname set, endpoint '?' falls back to ip",
			in:   arr(mapOf(bulk("nodes"), arr(node(bulk("port"), num(1), bulk("ip"), bulk("10.0.0.1"), bulk("endpoint"), bulk("?"), bulk("hostname"), bulk("h"))))),
			want: arr(mapOf(bulk("nodes"), arr(node(bulk("port"), num(1001), bulk("ip"), bulk("local-10.0.0.1"), bulk("endpoint"), bulk("local-10.0.0.1"), bulk("hostname"), bulk("local-10.0.0.1"))))),
		},
	} {
		res, err := Shards(local, []byte(tc.in))
		if err != nil || string(res.Out) != tc.want || len(res.Unknown) != 0 {
			t.Errorf("%s: got %q, %v, %v; want %q", tc.desc, res.Out, res.Unknown, err, tc.want)
		}
	}
}

func TestNodes(t *testing.T) {
	verbatim := func(s string) string { return "=" + strconv.Itoa(len(s)+4) + "\r\ntxt:" + s + "\r\n" }
	lines := "a 10.0.0.1:6379@16379,h1 myself,master - 0 0 1 connected 0-5\n" +
		"b 10.0.0.2:6379@16379, slave a 0 0 1 connected\n" +
		"c :0@0 noaddr,master - 0 0 0 disconnected\n" +
		"d 10.9.9.9:1@2 master - 0 0 0 connected\n"
	want := "a local-10.0.0.1:7379@16379,local-10.0.0.1 myself,master - 0 0 1 connected 0-5\n" +
		"b local-10.0.0.2:7379@16379, slave a 0 0 1 connected\n" +
		"c local-10.0.0.9:1000@0 noaddr,master - 0 0 0 disconnected\n" +
		"d 10.9.9.9:1@2 master - 0 0 0 connected\n"
	for _, tc := range []struct{ desc, in, want string }{
		{"bulk", bulk(lines), bulk(want)},
		{"verbatim", verbatim(lines), verbatim(want)},
		{"CLUSTER REPLICAS", arr(bulk(lines), bulk(lines)), arr(bulk(want), bulk(want))},
	} {
		res, err := Nodes(local, []byte(tc.in))
		if err != nil || string(res.Out) != tc.want || !slices.Equal(res.Unknown, []string{"10.9.9.9:1"}) {
			t.Errorf("%s: got %q, %v, %v; want %q", tc.desc, res.Out, res.Unknown, err, tc.want)
		}
	}
}

func TestBadInput(t *testing.T) {
	for _, tc := range []struct {
		desc, in string
		want     error
	}{
		{"incomplete", "*1\r\n*3\r\n:0\r\n", ErrMalformed},
		{"trailing bytes", "*0\r\n*0\r\n", ErrMalformed},
		{"huge count", "*2147483647\r\n", ErrMalformed},
		{"huge map", "%1000\r\n:1\r\n", ErrMalformed},
		{"bulk without CRLF", "$3\r\nabcd\r\n", ErrMalformed},
		{"too deep", strings.Repeat("*1\r\n", 20) + ":1\r\n", ErrMalformed},
		{"not an array", ":1\r\n", ErrMalformed},
		{"too large", "$" + strconv.Itoa(MaxReply) + "\r\n" + strings.Repeat("x", MaxReply) + "\r\n", ErrTooLarge},
	} {
		for name, f := range map[string]func(Map, []byte) (Result, error){"Slots": Slots, "Shards": Shards} {
			if _, err := f(local, []byte(tc.in)); !errors.Is(err, tc.want) {
				t.Errorf("%s %s: err %v, want %v", name, tc.desc, err, tc.want)
			}
		}
	}
}

// FuzzRewrite: no input panics; ParseSlots's nodes have an address, an id and slots; what is
// rewritten is one valid frame; a map that knows no node
// changes nothing; rewriting twice with the same map changes nothing more.
func FuzzRewrite(f *testing.F) {
	files, _ := filepath.Glob("testdata/*.resp")
	for _, name := range files {
		b, err := os.ReadFile(name)
		if err != nil {
			f.Fatal(err)
		}
		f.Add(b)
	}
	for _, s := range []string{"10.0.0.1:6379", "::1:6380", ":7000", "-MOVED 1 :6380\r\n", "-ASK 2 10.0.0.1:6379\r\n", "=17\r\ntxt:a 1.2.3.4:5@6\n\r\n",
		"*1\r\n%1\r\n$5\r\nnodes\r\n*1\r\n%2\r\n$8\r\ntls-port\r\n:1\r\n$8\r\nendpoint\r\n$1\r\n?\r\n"} {
		f.Add([]byte(s))
	}
	none := Map{Connected: "h", Local: func(string) (string, bool) { return "", false }}
	// fixed maps every address to one of its own, so that a second pass finds it known.
	fixed := Map{Connected: "10.0.0.9", Local: func(up string) (string, bool) {
		if strings.HasPrefix(up, "[::1]:") {
			return up, true
		}
		return "[::1]:" + strconv.Itoa(len(up)), true
	}}
	f.Fuzz(func(t *testing.T, in []byte) {
		for _, rewrite := range []func(Map, []byte) (Result, error){Slots, Shards, Nodes} {
			res, err := rewrite(fixed, in)
			if err != nil {
				continue
			}
			oneFrame(t, res.Out)
			if again, err := rewrite(fixed, res.Out); err != nil || !bytes.Equal(again.Out, res.Out) {
				t.Fatalf("second pass changed %q to %q (%v)", res.Out, again.Out, err)
			}
			if res, err := rewrite(none, in); err != nil || !bytes.Equal(res.Out, in) {
				t.Fatalf("no node known, yet %q became %q (%v)", in, res.Out, err)
			}
		}
		if topo, err := ParseSlots("h", in); err == nil {
			for _, n := range topo.Nodes {
				if _, _, err := net.SplitHostPort(n.Addr); err != nil || n.ID == "" || len(n.Slots) == 0 {
					t.Fatalf("ParseSlots(%q): node %+v", in, n)
				}
			}
		}
		if local, unknown, ok := Endpoint(fixed, string(in)); ok != (unknown == "" && local != "") {
			t.Fatalf("Endpoint(%q) = %q, %q, %v", in, local, unknown, ok)
		} else if ok {
			if again, _, _ := Endpoint(fixed, local); again != local {
				t.Fatalf("Endpoint(%q) = %q, then %q", in, local, again)
			}
		}
		out, _, changed := Redirect(fixed, in)
		if changed {
			oneFrame(t, out)
			if out[0] != '-' || bytes.Count(out, []byte("\r\n")) != 1 {
				t.Fatalf("redirect %q became %q", in, out)
			}
		} else if !bytes.Equal(out, in) {
			t.Fatalf("unchanged redirect %q came back as %q", in, out)
		}
	})
}
