package proxy

// OnReauthDue calls f each time a session's client loop takes a re-AUTH that is due, before it acts on it:
// from then on the session is deciding where the AUTH may go.
func OnReauthDue(s *Server, f func(conn uint64)) {
	h := func(conn uint64, bits uint32) {
		if bits&pokeReauth != 0 {
			f(conn)
		}
	}
	s.tookPokes.Store(&h)
}

// EventsListening is closed once the server's AzureRedisEvents subscription is first confirmed.
func EventsListening(s *Server) <-chan struct{} { return s.eventsUp }

// OnNodeRefusing calls f each time a cluster node listener starts (true) or stops (false) refusing
// clients because its node refused a connection.
func OnNodeRefusing(c *Cluster, f func(upstream string, refusing bool)) {
	c.mu.Lock()
	c.onState = func(upstream string, s nodeState) { f(upstream, s == nodeRefusing) }
	c.mu.Unlock()
}

// SetClusterNodes turns c's rewriting on for nodes (upstream host:port) whose local listeners are
// locals, without reading a topology or listening: for tests of the reply path. Do not Shutdown c.
func SetClusterNodes(c *Cluster, locals map[string]string) {
	c.mu.Lock()
	for up, l := range locals {
		c.nodes[up] = &nodeProxy{upstream: up, local: l}
	}
	c.mu.Unlock()
	c.on.Store(true)
}
