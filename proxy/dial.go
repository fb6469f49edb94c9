package proxy

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"net"
	"strings"
	"sync"
	"time"

	"github.com/entra-redis-proxy/entra-redis-proxy/resp"
)

// TLSDialer dials the upstream over TLS 1.2 or newer, verifying its certificate. A dial resumes the TLS
// session of an earlier one when the server allows it: a new connection then skips the certificate exchange
// and its signatures, which is most of a handshake's cost on both sides.
type TLSDialer struct {
	Addr string // host:port
	// Config has ServerName, RootCAs; MinVersion is raised to TLS 1.2. Without a ClientSessionCache, the
	// dialer keeps its own. It must not change after the first dial.
	Config *tls.Config

	cfgOnce sync.Once
	cfg     *tls.Config // Config as dials use it: one copy shared by every connection (each holds it)
}

// sessionCacheSize bounds the dialer's TLS session cache: a dialer reaches one server name, whose entry
// each handshake replaces.
const sessionCacheSize = 4

// DialError says which step of reaching the upstream failed: "dial" or "tls".
type DialError struct {
	Stage string
	Addr  string
	Err   error
}

func (e *DialError) Error() string {
	if e.Stage == "tls" {
		return fmt.Sprintf("TLS handshake with %s: %v", e.Addr, e.Err)
	}
	return fmt.Sprintf("connect to %s: %v", e.Addr, e.Err)
}

func (e *DialError) Unwrap() error { return e.Err }

// DialContext implements Dialer.
func (d *TLSDialer) DialContext(ctx context.Context) (net.Conn, error) {
	return d.DialEndpoint(ctx, d.Addr)
}

// DialEndpoint implements EndpointDialer: it reaches addr, verifying the certificate against the same
// server name as every other dial.
func (d *TLSDialer) DialEndpoint(ctx context.Context, addr string) (net.Conn, error) {
	nd := net.Dialer{KeepAlive: 30 * time.Second}
	raw, err := nd.DialContext(ctx, "tcp", addr)
	if err != nil {
		return nil, &DialError{Stage: "dial", Addr: addr, Err: err}
	}
	d.cfgOnce.Do(func() {
		d.cfg = d.Config.Clone()
		d.cfg.MinVersion = max(d.cfg.MinVersion, tls.VersionTLS12)
		if d.cfg.ClientSessionCache == nil {
			d.cfg.ClientSessionCache = tls.NewLRUClientSessionCache(sessionCacheSize)
		}
	})
	c := tls.Client(raw, d.cfg)
	if err := c.HandshakeContext(ctx); err != nil {
		raw.Close()
		return nil, &DialError{Stage: "tls", Addr: addr, Err: err}
	}
	return c, nil
}

// AuthError is the upstream's refusal of a token.
type AuthError struct {
	Username string
	Reply    string // redis's error line, e.g. "WRONGPASS invalid username-password pair ..."
}

func (e *AuthError) Error() string {
	return fmt.Sprintf("upstream refused AUTH for username %s: %s", e.Username, e.Reply)
}

// handshake authenticates a fresh upstream connection and asks its CLIENT ID (0 if the cache refuses to say).
// When Azure refuses the token with WRONGPASS, it tries once more with a freshly fetched one. It returns
// the token that was accepted.
func (c *ctrlConn) handshake(ctx context.Context, tok Token, tokens TokenSource) (int64, Token, error) {
	for attempt := 0; ; attempt++ {
		rs, err := c.pipeline(ctx, resp.AppendCommand(appendAuthCmd(nil, tok), "CLIENT", "ID"), 2)
		if err != nil {
			return 0, tok, fmt.Errorf("AUTH: %w", err)
		}
		if rs[0].typ == '-' {
			authErr := &AuthError{Username: tok.Username, Reply: rs[0].text}
			if attempt > 0 || !strings.HasPrefix(authErr.Reply, "WRONGPASS") {
				return 0, tok, authErr
			}
			fresh, ferr := tokens.Refresh(ctx)
			if ferr != nil || fresh.Secret == tok.Secret {
				return 0, tok, authErr
			}
			tok = fresh
			continue
		}
		if err := rs[0].expect('+'); err != nil {
			return 0, tok, fmt.Errorf("AUTH: %w", err)
		}
		var id int64
		if rs[1].typ == ':' {
			id = rs[1].num
		}
		return id, tok, nil
	}
}

func truncate(s string, n int) string {
	if len(s) > n {
		return s[:n] + "..."
	}
	return s
}

// clientMessage is the error a client gets when its upstream could not be set up: what failed, without
// secrets, on one line.
func clientMessage(err error) string {
	msg := strings.NewReplacer("\r", " ", "\n", " ").Replace(err.Error())
	var ae *AuthError
	if errors.As(err, &ae) && strings.HasPrefix(ae.Reply, "WRONGPASS") {
		return "WRONGPASS entra-redis-proxy: " + msg
	}
	return "ERR entra-redis-proxy: " + msg
}

// Remedy says what an operator can do about a failure, in the terms of Azure's troubleshooting guide.
func Remedy(err error) string {
	var ae *AuthError
	var de *DialError
	switch {
	case errors.As(err, &ae):
		return remedyFor(ae.Reply)
	case errors.As(err, &de) && de.Stage == "tls":
		return "check ENTRA_REDIS_PROXY_UPSTREAM is the cache's host name (*.redis.cache.windows.net); behind a private endpoint IP set ENTRA_REDIS_PROXY_TLS_SERVER_NAME to that name; for a private CA set ENTRA_REDIS_PROXY_TLS_CA_FILE"
	case errors.As(err, &de):
		return "check ENTRA_REDIS_PROXY_UPSTREAM (host and port: 6380 for Azure Cache for Redis, 10000 for Azure Managed Redis) and that this network can reach it"
	case errors.Is(err, context.DeadlineExceeded):
		return "no Entra token or no upstream answer in time: check the identity configuration (ENTRA_REDIS_PROXY_CREDENTIAL; managed identity works only inside Azure) and the network path to the cache"
	}
	return ""
}

// remedyFor explains a redis error reply to an AUTH or a command.
func remedyFor(reply string) string {
	switch {
	case strings.HasPrefix(reply, "WRONGPASS"):
		return "the cache does not accept this identity: in the Azure portal check that Microsoft Entra Authentication is enabled on the cache and that a data access policy is assigned to this identity (its object ID is the AUTH username; set ENTRA_REDIS_PROXY_USERNAME only if it differs)"
	case strings.HasPrefix(reply, "NOPERM"):
		return "authenticated, but the data access policy of this identity does not allow this command: assign Data Owner/Contributor or extend the custom policy"
	}
	return ""
}

// Probe runs the steps of every upstream connection once (dial, TLS, AUTH with tok, PING), for the check
// command. It returns the upstream's CLIENT ID.
func Probe(ctx context.Context, d Dialer, tok Token) (int64, error) {
	c, err := d.DialContext(ctx)
	if err != nil {
		return 0, err
	}
	defer c.Close()
	cc := newCtrlConn(c)
	id, _, err := cc.handshake(ctx, tok, fixedToken(tok))
	if err != nil {
		return 0, err
	}
	r, err := cc.do(ctx, "PING")
	if err != nil {
		return 0, &probeError{err}
	}
	if r.typ != '+' || r.text != "PONG" {
		return 0, &probeError{fmt.Errorf("PING answered %s", r)}
	}
	return id, nil
}

type probeError struct{ err error }

func (e *probeError) Error() string { return "PING: " + e.err.Error() }
func (e *probeError) Unwrap() error { return e.err }

// ProbeStep names the step of Probe that err comes from.
func ProbeStep(err error) string {
	var de *DialError
	var pe *probeError
	switch {
	case errors.As(err, &de):
		return de.Stage
	case errors.As(err, &pe):
		return "ping"
	}
	return "auth"
}

// fixedToken is a TokenSource of one token, which Refresh cannot improve on.
type fixedToken Token

func (t fixedToken) Current() (Token, <-chan struct{})      { return Token(t), nil }
func (t fixedToken) Refresh(context.Context) (Token, error) { return Token(t), nil }
