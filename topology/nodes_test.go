package topology

import (
	"errors"
	"os"
	"slices"
	"testing"
)

func TestParseSlots(t *testing.T) {
	for _, name := range []string{"testdata/cluster-slots-resp2.resp", "testdata/cluster-slots-resp3.resp"} {
		in, err := os.ReadFile(name)
		if err != nil {
			t.Fatal(err)
		}
		topo, err := ParseSlots("127.0.0.1", in)
		if err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		want := Topology{Covered: 16384, Nodes: []Node{
			{ID: "95af40ebd8ce2dc2c1539f48fa4734008e23754f", Addr: "127.0.0.1:39561", Primary: true, Slots: [][2]int{{0, 5460}}},
			{ID: "d16e56343bc06785a16122976cafdcf15ad1c66c", Addr: "127.0.0.1:35275", Slots: [][2]int{{0, 5460}}},
			{ID: "a3e30f666d7d1947ee5d8ee149c8af46c3b65560", Addr: "127.0.0.1:35367", Primary: true, Slots: [][2]int{{5461, 10921}}},
			{ID: "436a58bc372a333388c9a4edfa13bbcb4c0e94ca", Addr: "127.0.0.1:41947", Slots: [][2]int{{5461, 10921}}},
			{ID: "543478e31c65e58bde2da3f2f3b4dec960de8901", Addr: "127.0.0.1:45581", Primary: true, Slots: [][2]int{{10922, 16383}}},
			{ID: "3087d978e80baa0b071637709b731aaebf29ac8b", Addr: "127.0.0.1:37279", Slots: [][2]int{{10922, 16383}}},
		}}
		if !slices.EqualFunc(topo.Nodes, want.Nodes, func(a, b Node) bool {
			return a.ID == b.ID && a.Addr == b.Addr && a.Primary == b.Primary && slices.Equal(a.Slots, b.Slots)
		}) || topo.Covered != want.Covered {
			t.Fatalf("%s:\n got %v\nwant %v", name, topo, want)
		}
	}
	// Two ranges of one primary, a "?" endpoint, a node without id, a gap in coverage.
	in := arr(arr(num(0), num(9), arr(bulk("?"), num(8500), bulk("a"))), arr(num(20), num(29), arr(bulk("?"), num(8500), bulk("a")), arr(bulk("10.0.0.2"), num(8501))))
	topo, err := ParseSlots("cache", []byte(in))
	if err != nil {
		t.Fatal(err)
	}
	if got := topo.String(); got != "2 nodes, 20 of 16384 slots covered: cache:8500 (primary 0-9 20-29) 10.0.0.2:8501 (replica 20-29)" {
		t.Fatalf("String() = %q", got)
	}
	for _, bad := range []string{"-ERR This instance has cluster support disabled\r\n", ":1\r\n", arr(arr(num(9), num(0))), arr(arr(num(0), num(1), arr(bulk("h"), num(70000))))} {
		if _, err := ParseSlots("h", []byte(bad)); err == nil {
			t.Errorf("ParseSlots(%q): no error", bad)
		}
	}
}

func TestPorts(t *testing.T) {
	for _, tc := range []struct {
		in          string
		first, last int
		ok          bool
	}{
		{"6380-6479", 6380, 6479, true}, {" 1-1 ", 1, 1, true}, {"6380", 0, 0, false}, {"6479-6380", 0, 0, false},
		{"0-10", 0, 0, false}, {"1-65536", 0, 0, false}, {"a-b", 0, 0, false},
	} {
		first, last, err := ParsePortRange(tc.in)
		if (err == nil) != tc.ok || first != tc.first || last != tc.last {
			t.Errorf("ParsePortRange(%q) = %d, %d, %v", tc.in, first, last, err)
		}
	}
	p := NewPorts(7000, 7001)
	assign := func(id string, want int) {
		t.Helper()
		if got, err := p.Assign(id); err != nil || got != want {
			t.Fatalf("Assign(%s) = %d, %v; want %d", id, got, err, want)
		}
	}
	assign("a", 7000)
	assign("b", 7001)
	assign("a", 7000) // stable
	if _, err := p.Assign("c"); !errors.Is(err, ErrNoPort) {
		t.Fatalf("a third node in a range of two: %v", err)
	}
	p.Release("a")
	assign("c", 7000)
	assign("b", 7001)
}
