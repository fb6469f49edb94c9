package proxy

import "errors"

// drain asks the session to close its client connection at the next safe point. Shutdown calls it once on
// every client connection open when the drain begins; the server relies on exactly this contract, which a
// new session core must keep:
//
//   - It returns at once. It may be called from any goroutine, at any time from accept on: while the session
//     still connects its upstream, while it serves, after it ended, and more than once.
//   - The session stops reading commands: it serves what it has read, and what already waits in the socket
//     when it next reads, and reads nothing after that. A client that keeps sending therefore gets the
//     replies to what reached the proxy before its first read that finds nothing, then EOF; a command not
//     received whole gets no reply.
//   - Every reply to a command it read is written to the client; then the session closes the client
//     connection (the client sees EOF after its last reply) and run returns, with no further help from the
//     server. A session still connecting serves what its client sent before, or is refused if the dial
//     fails, and ends the same way. Pub/sub and MONITOR connections have no reply outstanding: they close at
//     once.
//   - Replies that never come (BLPOP k 0) keep the session open until Shutdown's context ends and Close cuts
//     it, which Shutdown counts.
//
// Today's core, tiny on purpose: the client's read side is shut down (shutdown(2) SHUT_RD), so the client
// loop's next read that finds nothing queued returns EOF, and the loop handles it like a client that
// half-closed: it waits for the outstanding replies, then ends the session. That wait is bounded by
// drainOnEOF (5 s), unlike the contract: a reply slower than that is lost, and the session ends as drained,
// not cut. A client connection without CloseRead (not TCP or unix) is closed at once.
func (s *session) drain() {
	if c, ok := s.client.(interface{ CloseRead() error }); ok {
		c.CloseRead() // fails only if the connection is closed already: then the session ends anyway
		return
	}
	s.close(errDrainCut)
}

var errDrainCut = errors.New("proxy shutting down: the connection cannot be drained")
