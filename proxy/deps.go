package proxy

import (
	"context"
	"net"
	"time"

	"github.com/entra-redis-proxy/entra-redis-proxy/tokensource"
)

// Token is tokensource's token, whose String, Format, LogValue and JSON never show the secret: the
// proxy shares it rather than keeping a copy that prints in full.
type Token = tokensource.Token

// TokenSource hands out the current token. *tokensource.Source is one.
type TokenSource interface {
	// Current returns the newest token and a channel that is closed when a newer token
	// replaces it. Before the first token, Secret is empty.
	Current() (Token, <-chan struct{})
	// Refresh fetches a token now (after Azure refused the current one) and returns it.
	Refresh(ctx context.Context) (Token, error)
}

var _ TokenSource = (*tokensource.Source)(nil)

// Dialer opens an authenticated-ready (TLS, not yet AUTHed) connection to the upstream.
type Dialer interface {
	DialContext(ctx context.Context) (net.Conn, error)
}

// Observer receives the proxy's events, for metrics. Methods must be cheap and safe for
// concurrent use. Label values passed in are from small fixed sets.
type Observer interface {
	ClientOpened()
	ClientClosed()
	ClientRejected(reason string) // "max_connections", "shutting_down", "local_auth"
	UpstreamOpened(dial time.Duration)
	UpstreamClosed()
	UpstreamError(kind string) // "dial", "tls", "auth", "closed" (the upstream ended a session), "stalled", "protocol"
	// CommandsDone reports n commands of one name that each took d from being read to their reply being
	// written: the proxy reports a batch's commands read together once. name is a lower-case command name
	// from CommandNames, or "other".
	CommandsDone(name string, d time.Duration, n int)
	BytesIn(n int)        // bytes from clients to the upstream
	BytesOut(n int)       // bytes from the upstream to clients
	ReAuth(result string) // "ok", "error"
	// Mechanism reports one use of a mechanism: "handover", "handover_refused" (the identity may not
	// subscribe to the handover's marker channel: a RESP2 subscriber stays on the old token), "unblock_reissue", "unblock_retry" (a CLIENT
	// UNBLOCK answered 0 is sent again from a new control connection), "unblock_missed" (a rescue gave up on
	// it: the blocked connection stays on the old token), "tx_replay", "tx_abort", "idle_ping", "pool_reuse".
	Mechanism(name string)
}

// NopObserver ignores every event.
type NopObserver struct{}

func (NopObserver) ClientOpened()                           {}
func (NopObserver) ClientClosed()                           {}
func (NopObserver) ClientRejected(string)                   {}
func (NopObserver) UpstreamOpened(time.Duration)            {}
func (NopObserver) UpstreamClosed()                         {}
func (NopObserver) UpstreamError(string)                    {}
func (NopObserver) CommandsDone(string, time.Duration, int) {}
func (NopObserver) BytesIn(int)                             {}
func (NopObserver) BytesOut(int)                            {}
func (NopObserver) ReAuth(string)                           {}
func (NopObserver) Mechanism(string)                        {}
