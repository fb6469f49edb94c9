package proxy

import (
	"sync/atomic"

	"github.com/entra-redis-proxy/entra-redis-proxy/resp"
)

// Some commands change a connection's state without a reply that says so (CLIENT REPLY OFF and SKIP), or
// exist only on some servers (RESET: not on Redis 6.0, which Azure Cache for Redis runs, nor on Redis
// Enterprise). Whether they take effect depends on the server and on the identity's data access policy,
// which is the same for every connection of the process. So the proxy learns each such fact once, the
// first time a client's command depends on it, from a hidden probe sent on that client's own connection in
// order with its commands, and waits for the answer before it goes on.

// fact is something learned about the server and the identity's policy.
type fact uint32

const (
	factUnknown fact = iota
	factYes
	factNo
)

// probe says which fact a probe's reply answers (entry.arg of an actProbe entry).
type probe int32

const (
	probeClientReply probe = iota // CLIENT REPLY ON: may this identity run CLIENT REPLY?
	probeReset                    // COMMAND INFO RESET: does the server have RESET?
	probeUnblock                  // CLIENT UNBLOCK 0: may this identity run CLIENT UNBLOCK? (on the first dial; no also once it missed, rescue.go)
	probeCount
)

// facts are what the Server learned, per probe.
type facts [probeCount]atomic.Uint32

func (f *facts) get(p probe) fact { return fact(f[p].Load()) }

func (f *facts) set(p probe, v fact) { f[p].Store(uint32(v)) }

// learn records what the reply p (its first bytes, at least one) to probe pr says; it returns false when
// it needs more bytes to tell.
func (f *facts) learn(pr probe, p []byte) bool {
	v := factYes
	switch {
	case p[0] == '-':
		v = factNo
		if pr == probeReset {
			v = factUnknown // COMMAND itself refused: RESET may still exist
		}
	case pr == probeReset:
		// "*1\r\n*-1\r\n" (RESP2) or "*1\r\n_\r\n" (RESP3): no such command; else its description.
		if len(p) < 6 {
			return false
		}
		if p[4] == '_' || (p[4] == '*' && p[5] == '-') {
			v = factNo
		}
	}
	if v != factUnknown {
		f.set(pr, v)
	}
	return true
}

// know returns the fact pr, probing for it on this session's connection first if it is not known yet and
// the connection can answer now (replies on, not in RESP2 subscribed mode, where redis refuses both
// probes). It returns factUnknown if it could not probe.
func (s *session) know(pr probe) fact {
	if v := s.srv.facts.get(pr); v != factUnknown {
		return v
	}
	c := &s.cl
	if c.mode != replyOn || c.tx.open() || s.knowSubscribed() {
		return factUnknown
	}
	switch pr {
	case probeClientReply:
		c.out = resp.AppendCommand(c.out, "CLIENT", "REPLY", "ON") // the permission covers OFF and SKIP too
	case probeReset:
		c.out = resp.AppendCommand(c.out, "COMMAND", "INFO", "RESET")
	}
	c.entries = append(c.entries, entry{act: actProbe, arg: int32(pr), cmd: cmdOther, start: s.srv.now()})
	if s.flush() == nil {
		s.led.waitIdle(forever)
	}
	return s.srv.facts.get(pr)
}
