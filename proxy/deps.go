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

// EndpointDialer is a Dialer that can also reach the cache at another address, with the same TLS server
// name: where a MOVING maintenance notification sends new connections (notifications.go).
type EndpointDialer interface {
	Dialer
	DialEndpoint(ctx context.Context, addr string) (net.Conn, error)
}

// Observer receives the proxy's events, for metrics. Methods must be cheap and safe for
// concurrent use. Label values passed in are from small fixed sets.
type Observer interface {
	ClientOpened()
	ClientClosed()
	// ClientRejected reports a refused client: "max_connections", "shutting_down", "no_token" (no valid Entra
	// token), "local_auth" (one wrong LOCAL_PASSWORD), "local_auth_closed" (closed after too many).
	ClientRejected(reason string)
	UpstreamOpened(dial time.Duration)
	UpstreamClosed()
	// UpstreamError reports a failed or lost upstream: "dial", "tls", "auth", "closed" (the upstream ended a
	// session), "token_expired" (... after the Entra token expired), "stalled", "protocol".
	UpstreamError(kind string)
	// CommandsDone reports n commands of one name that each took d from being read to their reply being
	// written: the proxy reports a batch's commands read together once. name is a lower-case command name
	// from CommandNames, or "other".
	CommandsDone(name string, d time.Duration, n int)
	BytesIn(n int)        // bytes read from a client
	BytesOut(n int)       // bytes read from an upstream, the proxy's own replies included
	ReAuth(result string) // "ok", "error"
	// Mechanism reports one use of a mechanism: "handover", "handover_refused" (the identity may not
	// subscribe to the handover's marker channel: a RESP2 subscriber stays on the old token), "unblock_reissue", "unblock_retry" (a CLIENT
	// UNBLOCK answered 0 is sent again from a new control connection), "unblock_missed" (a rescue gave up on
	// it: the blocked connection stays on the old token), "lease_renewed" (a blocking command sent again when
	// its lease ran out, for an identity that may not run CLIENT UNBLOCK), "tx_replay", "tx_abort",
	// "idle_ping", "pool_reuse";
	// for an upstream that closed under a session (reconnect.go): "reconnect_restored" (the session goes on, on a
	// new upstream), "reconnect_outstanding" (closed with a reply outstanding), "reconnect_unrestorable"
	// (closed: its state can't be restored exactly), "reconnect_failed" (closed: no new upstream in time); at an announced maintenance (maintenance.go): "maintenance_move" (moved to a
	// new upstream ahead of the close), "maintenance_handover" (a subscriber, RESP2 or RESP3, by the handover),
	// "maintenance_unmoved" (left to the reconnect after the close).
	Mechanism(name string)
	// Announcement reports one maintenance announcement on AzureRedisEvents, by type: one of
	// AnnouncementTypes, or "other".
	Announcement(kind string)
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
func (NopObserver) Announcement(string)                     {}
