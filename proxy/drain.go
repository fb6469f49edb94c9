package proxy

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
// The poke reaches the client loop at its next read (a session still connecting finds the bit set when its
// loop starts). It then reads only what already waits in the socket (it peeks at the socket to know),
// sends it, and waits for the ledger's safe point with no bound of its own; the close is a FIN after the last
// reply (closeWriteAndWait).
func (s *session) drain() { s.poke(pokeDrain) }
