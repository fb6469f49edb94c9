package proxy

import "github.com/entra-redis-proxy/entra-redis-proxy/resp"

// inject adds the proxy's own commands to what goes upstream, where redis answers them in order with one
// reply the proxy can consume: not after CLIENT REPLY SKIP (it would take the client's skip), not inside a
// command being streamed, not inside MULTI (it would be queued), not behind a blocked command (it would wait).
// Under CLIENT REPLY OFF an AUTH is sent without expecting a reply. Work that can't be done now stays due.
func (s *session) inject() error {
	c := &s.cl
	if c.mode == replySkip || c.stream.active {
		return nil
	}
	s.syncTx(false)
	if c.want.deadline {
		c.want.deadline = false
		if err := s.rescue(); err != nil {
			return err
		}
	}
	if c.tx.open() {
		return nil
	}
	if c.want.auth && !c.hold.holding() {
		c.want.auth = false
		if err := s.reauth(); err != nil {
			return err
		}
	}
	if c.want.ping {
		c.want.ping = false
		now := s.srv.now()
		if len(c.out) == 0 && !c.hold.holding() && now-s.lastSent.Load() >= int64(s.srv.opts.IdlePing) {
			c.out = resp.AppendCommand(c.out, "PING")
			s.expect(entry{act: actDrop, cmd: cmdOther, start: now})
			s.srv.obs.Mechanism("idle_ping")
		}
	}
	return nil
}

// rescue moves a connection that could not take the new token in band (open MULTI, blocked command) to it
// before the old one expires.
func (s *session) rescue() error {
	tok, _ := s.srv.opts.Tokens.Current()
	if tok.Secret == "" || tok.Secret == s.cl.secret {
		return nil
	}
	s.syncTx(true) // never replay a transaction the server refused
	switch {
	case s.cl.tx.open():
		s.rescueMulti(tok)
	case s.cl.hold.holding():
		if s.cl.hold.cmd.leased {
			return nil // its lease ends before the deadline: it is sent again then, on the newest token
		}
		if err := s.flush(); err != nil {
			return err
		}
		return s.unblock(tok)
	}
	return nil
}

// reauth sends the newest token: in band, or by a handover where redis refuses AUTH (RESP2 subscribed).
func (s *session) reauth() error {
	if s.resp2Sub.Load() && s.maintenanceNode() != "" {
		// A handover's marker can't reach both connections while they may be on different nodes. The close
		// that ends the maintenance comes within seconds, and the reconnect sends the newest token.
		s.retryLater(pokeReauth)
		return nil
	}
	force := s.forceAuth.Swap(false)
	tok, _ := s.srv.opts.Tokens.Current()
	switch {
	case tok.Secret == "" || (tok.Secret == s.cl.secret && !force):
		return nil
	case s.resp2Sub.Load():
		if err := s.flush(); err != nil {
			return err
		}
		return s.handover(tok, pokeReauth)
	}
	s.appendAuth(tok, s.srv.now())
	return nil
}

// appendAuth adds the proxy's AUTH with tok to the commands going upstream; its reply is consumed.
func (s *session) appendAuth(tok Token, now int64) {
	s.cl.out = appendAuthCmd(s.cl.out, tok)
	s.expect(entry{act: actAuth, cmd: cmdOther, start: now})
	s.cl.secret = tok.Secret
}
