package main

import (
	"bytes"
	"log/slog"
	"strings"
	"syscall"
	"testing"
)

func TestDeriveConnLimit(t *testing.T) {
	const maxConnsVar = envPrefix + "_MAX_CONNECTIONS"
	for _, tc := range []struct {
		desc              string
		nofile            uint64
		pool, maxConns    int
		limit             int
		source            string
		lowered, reserved int
		budget            int // for clients and every pool: nofile - 50 - max(32, nofile/16)
	}{
		// reserved = 50 fixed + the pool's ceiling + max(32, nofile/16); limit = (nofile - reserved) / 2
		{"ulimit -n 256", 256, 4, 0, 85, "RLIMIT_NOFILE", 0, 86, 174},
		{"1024", 1024, 4, 0, 453, "RLIMIT_NOFILE", 0, 118, 910},
		{"a large pool", 1024, 100, 0, 405, "RLIMIT_NOFILE", 0, 214, 910},
		{"containerd's 1048576", 1 << 20, 4, 0, 491493, "RLIMIT_NOFILE", 0, 65590, 1<<20 - 50 - 1<<16},
		{"RLIM_INFINITY", ^uint64(0), 4, 0, (1<<30 - (54 + 1<<26)) / 2, "RLIMIT_NOFILE", 0, 54 + 1<<26, 1<<30 - 50 - 1<<26},
		{"MAX_CONNECTIONS below", 256, 4, 10, 10, maxConnsVar, 0, 86, 174},
		{"MAX_CONNECTIONS equal", 256, 4, 85, 85, maxConnsVar, 0, 86, 174},
		{"MAX_CONNECTIONS above is lowered", 256, 4, 86, 85, "RLIMIT_NOFILE", 86, 86, 174},
		{"one client fits", 86 + 2, 4, 0, 1, "RLIMIT_NOFILE", 0, 86, 6},
		{"one client fits, odd", 86 + 3, 4, 0, 1, "RLIMIT_NOFILE", 0, 86, 7},
	} {
		t.Run(tc.desc, func(t *testing.T) {
			cl, err := deriveConnLimit(syscall.Rlimit{Cur: tc.nofile, Max: tc.nofile}, tc.pool, tc.maxConns)
			if err != nil {
				t.Fatal(err)
			}
			if cl.limit != tc.limit || cl.source != tc.source || cl.lowered != tc.lowered || cl.reserved != tc.reserved || cl.budget != tc.budget {
				t.Errorf("limit %d from %s (lowered %d, reserved %d, budget %d), want %d from %s (lowered %d, reserved %d, budget %d)",
					cl.limit, cl.source, cl.lowered, cl.reserved, cl.budget, tc.limit, tc.source, tc.lowered, tc.reserved, tc.budget)
			}
			// At the limit the pools still have their ceiling: the limit leaves it in the budget.
			if cl.budget-cl.limit*fdPerClient < tc.pool {
				t.Errorf("%d clients leave %d of the budget's %d descriptors to pools, want at least %d", cl.limit,
					cl.budget-cl.limit*fdPerClient, cl.budget, tc.pool)
			}
			// The limit and what the proxy keeps fit in the descriptors.
			if n := min(tc.nofile, maxNofile); uint64(cl.limit*fdPerClient+cl.reserved) > n {
				t.Errorf("%d clients and %d reserved need more than %d descriptors", cl.limit, cl.reserved, n)
			}
		})
	}
}

func TestDeriveConnLimitTooFew(t *testing.T) {
	for _, nofile := range []uint64{0, 64, 86, 87} {
		_, err := deriveConnLimit(syscall.Rlimit{Cur: nofile, Max: nofile}, 4, 0)
		if err == nil {
			t.Errorf("RLIMIT_NOFILE %d: accepted, want an error (86 reserved, 2 per client)", nofile)
			continue
		}
		for _, want := range []string{"RLIMIT_NOFILE", "at least 88", "ulimit -n"} {
			if !strings.Contains(err.Error(), want) {
				t.Errorf("RLIMIT_NOFILE %d: error %q lacks %q", nofile, err, want)
			}
		}
	}
}

// The start log says the limit in force, where it came from and how to raise it; a MAX_CONNECTIONS above
// the derived limit is one WARN line naming the variable.
func TestConnLimitLog(t *testing.T) {
	for _, tc := range []struct {
		desc     string
		maxConns int
		want     []string // substrings of the output, in order
		warn     bool
	}{
		{"derived", 0, []string{"level=INFO", `msg="client connection limit"`, "limit=85", "source=RLIMIT_NOFILE", "nofile=256", "nofile_hard=4096", "pool_descriptors=4",
			"ulimit -n", "--ulimit nofile"}, false},
		{"MAX_CONNECTIONS", 10, []string{"level=INFO", "limit=10", "source=" + envPrefix + "_MAX_CONNECTIONS",
			"raise " + envPrefix + "_MAX_CONNECTIONS, up to 85", "ulimit -n"}, false},
		{"MAX_CONNECTIONS lowered", 1000, []string{"level=WARN", envPrefix + "_MAX_CONNECTIONS is above", "max_connections=1000", "limit=85",
			"\n", "level=INFO", "limit=85", "source=RLIMIT_NOFILE"}, true},
	} {
		t.Run(tc.desc, func(t *testing.T) {
			cl, err := deriveConnLimit(syscall.Rlimit{Cur: 256, Max: 4096}, 4, tc.maxConns)
			if err != nil {
				t.Fatal(err)
			}
			var buf bytes.Buffer
			cl.log(slog.New(slog.NewTextHandler(&buf, nil)))
			out := buf.String()
			rest := out
			for _, w := range tc.want {
				i := strings.Index(rest, w)
				if i < 0 {
					t.Fatalf("the log lacks %q (in order):\n%s", w, out)
				}
				rest = rest[i+len(w):]
			}
			if got := strings.Count(out, "level=WARN"); got != map[bool]int{true: 1}[tc.warn] {
				t.Errorf("%d WARN lines, want warn=%v:\n%s", got, tc.warn, out)
			}
			if got := strings.Count(out, "\n"); got != 1+map[bool]int{true: 1}[tc.warn] {
				t.Errorf("%d lines:\n%s", got, out)
			}
		})
	}
}

// withNofile makes serve see rl as RLIMIT_NOFILE for the rest of the test.
func withNofile(t *testing.T, rl syscall.Rlimit) {
	t.Helper()
	old := getNofile
	getNofile = func() (syscall.Rlimit, error) { return rl, nil }
	t.Cleanup(func() { getNofile = old })
}

// An open-file limit that leaves no room for a client stops the start with a line saying how to raise it.
func TestTooFewDescriptorsStopsStart(t *testing.T) {
	withNofile(t, syscall.Rlimit{Cur: 64, Max: 64})
	cleanEnv(t)
	setEnv(t, map[string]string{"UPSTREAM": testUpstream, "HTTP_LISTEN": ""})
	var stdout, stderr bytes.Buffer
	if code := run(nil, &stdout, &stderr); code != exitConfig {
		t.Errorf("exit %d, want %d", code, exitConfig)
	}
	got := stderr.String()
	if strings.Count(got, "\n") != 1 || !strings.Contains(got, "RLIMIT_NOFILE") || !strings.Contains(got, "ulimit -n") {
		t.Errorf("stderr %q, want one line naming RLIMIT_NOFILE and how to raise it", got)
	}
}
