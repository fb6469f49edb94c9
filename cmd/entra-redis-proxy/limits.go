package main

import (
	"fmt"
	"log/slog"
	"syscall"
)

// The client connection limit comes from the open-file limit (RLIMIT_NOFILE): at that limit accept(2) fails,
// clients wait unanswered in the backlog, and token fetches and probes fail with them. Refusing clients
// first keeps descriptors for the proxy's own work:
//
//	limit = (soft RLIMIT_NOFILE - reserved) / 2            two per client: its socket and its upstream's
//	reserved = fdFixed + pool + max(fdControlMin, soft/fdControlShare)
//
// where pool is the most LISTEN's pool may hold (POOL_MAX, or POOL_SIZE if larger) times the caches. With the
// default pool (32): 256 descriptors allow 71 clients, 1024 allow 439, 1048576 allow 491479.
// Clients and every pool (LISTEN's and the cluster node listeners', whose number is not known at start)
// then share one budget of soft - fdFixed - control descriptors (proxy.NewDescriptorBudget): pools fill only
// within what clients leave, so at the limit they hold at most pool, and limit and pools together never
// exceed the open-file limit.
// Go raises the soft limit to the hard one (less one) when the process starts, so the hard limit is the one
// to raise.
const (
	// fdFixed: stdin, stdout, stderr; the client, HTTP and admin listeners; the runtime's poller; up to 8 token
	// fetches (azidentity's connections to Entra or the managed identity endpoint); up to 32 HTTP connections
	// (probes, scrapes, admin). Headroom, not bounds: nothing else stops more HTTP connections.
	fdFixed = 3 + 3 + 4 + 8 + 32
	// Control connections: a rotation opens a CLIENT UNBLOCK connection per blocked client and a second
	// upstream per subscribed client, spread over the re-AUTH window. (A pool's dial is counted in the budget.)
	fdControlMin   = 32
	fdControlShare = 16 // one descriptor in 16
	fdPerClient    = 2
)

// connLimit is the client connection limit in force and where it came from.
type connLimit struct {
	limit    int    // most client connections at once
	source   string // the variable or resource that set it
	derived  int    // what RLIMIT_NOFILE allows
	reserved int    // descriptors kept for other than clients
	budget   int    // descriptors shared by clients (two each) and pooled upstream connections (one each)
	soft     uint64 // RLIMIT_NOFILE
	hard     uint64
	lowered  int // MAX_CONNECTIONS when it was above derived and lowered to it; 0 otherwise
}

// maxNofile caps RLIM_INFINITY and other huge limits so the arithmetic stays in an int.
const maxNofile = 1 << 30

// deriveConnLimit computes the limit from the open-file limit rl, the pool's ceiling and MAX_CONNECTIONS (0:
// none).
// It fails when rl leaves no descriptor for a client.
func deriveConnLimit(rl syscall.Rlimit, pool, maxConns int) (connLimit, error) {
	soft := min(rl.Cur, maxNofile)
	budget := int(soft) - fdFixed - max(fdControlMin, int(soft/fdControlShare))
	reserved := int(soft) - budget + pool
	derived := (budget - pool) / fdPerClient
	if derived < 1 {
		return connLimit{}, fmt.Errorf("the open-file limit (RLIMIT_NOFILE) is %d: the proxy keeps %d descriptors for "+
			"itself and needs %d per client, so at least %d; %s", rl.Cur, reserved, fdPerClient, reserved+fdPerClient, raiseNofile)
	}
	cl := connLimit{limit: derived, source: "RLIMIT_NOFILE", derived: derived, reserved: reserved, budget: budget, soft: rl.Cur, hard: rl.Max}
	switch {
	case maxConns > derived:
		cl.lowered = maxConns
	case maxConns > 0:
		cl.limit, cl.source = maxConns, envPrefix+"_MAX_CONNECTIONS"
	}
	return cl, nil
}

// raiseNofile says how to raise the open-file limit.
const raiseNofile = "raise it with ulimit -n before starting the proxy (the hard limit: Go raises the soft one to it), " +
	"docker run --ulimit nofile=N:N, or the container runtime's default (LimitNOFILE of containerd or CRI-O)"

// log writes the start lines: the limit in force, where it came from and how to raise it; a WARN when
// MAX_CONNECTIONS was above what the descriptors allow.
func (cl connLimit) log(log *slog.Logger) {
	if cl.lowered > 0 {
		log.Warn(fmt.Sprintf("%s_MAX_CONNECTIONS is above what the open-file limit allows: using the derived limit", envPrefix),
			"max_connections", cl.lowered, "limit", cl.limit, "nofile", cl.soft, "raise", raiseNofile)
	}
	raise := raiseNofile
	if cl.source != "RLIMIT_NOFILE" {
		raise = fmt.Sprintf("raise %s_MAX_CONNECTIONS, up to %d (the open-file limit's); beyond that, %s", envPrefix, cl.derived, raiseNofile)
	}
	log.Info("client connection limit", "limit", cl.limit, "source", cl.source, "nofile", cl.soft, "nofile_hard", cl.hard,
		"per_client", fdPerClient, "reserved", cl.reserved, "pool_descriptors", cl.budget-cl.limit*fdPerClient, "raise", raise)
}

// getNofile reads RLIMIT_NOFILE; tests replace it to run the proxy under a small limit.
var getNofile = func() (syscall.Rlimit, error) {
	var rl syscall.Rlimit
	err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &rl)
	return rl, err
}
