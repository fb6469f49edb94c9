package proxy

import "sync/atomic"

// ConnLimit is a client connection budget shared by every Server given it (Options.Limit): LISTEN's,
// each cluster node listener's, each configured cache's. The process's descriptors are one budget
// (two per client, whichever listener accepted it), so the limit is the process's, not a listener's.
type ConnLimit struct {
	max int64 // most client connections at once; 0 = unlimited
	n   atomic.Int64
}

// NewConnLimit returns a budget of max client connections; 0 means unlimited.
func NewConnLimit(max int) *ConnLimit { return &ConnLimit{max: int64(max)} }

// acquire takes one connection from the budget; false when it is spent. Listeners accept
// concurrently, so taking and checking are one step.
func (l *ConnLimit) acquire() bool {
	if l.n.Add(1) > l.max && l.max > 0 {
		l.n.Add(-1)
		return false
	}
	return true
}

func (l *ConnLimit) release() { l.n.Add(-1) }

// Max returns the limit (0: unlimited).
func (l *ConnLimit) Max() int { return int(l.max) }

// AtLimit reports whether every connection of the budget is in use (for readiness).
func (l *ConnLimit) AtLimit() bool { return l.max > 0 && l.n.Load() >= l.max }
