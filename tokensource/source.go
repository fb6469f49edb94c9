// Package tokensource keeps one always-fresh Microsoft Entra access token for the proxy, which sends
// `AUTH <username> <token>` on every live upstream connection. It is the only package that imports
// azidentity.
//
// # Schedule
//
// For a token received at time A that expires at E, its lifetime is L = E - A. Run asks for the next
// token at A + L/2 (or at the token's RefreshOn, if that is earlier). Half-life leaves the proxy the
// rest of the lifetime to re-authenticate every connection well before 90% of L, and leaves minutes to
// hours before expiry for long tokens (30-45 minutes for 60-90 minute user and service principal
// tokens, 12 hours for 24-hour managed identity tokens, 1 second for the 2-second tokens of tests).
//
// azidentity's credentials (through MSAL) hand back their cached token until 5 minutes before it
// expires, or until its RefreshOn if the issuer set one; a token that lives less than 5 minutes is never
// cached. For a 60-minute token that is after 90% of L. So an attempt made while the cache would still
// hand back the current token (more than 5 minutes before it expires) uses a credential without it: a
// new one from newCred, whose in-memory cache is empty, marked so that the "managed-identity"
// credential of NewCredential skips MSAL's process-wide managed identity cache. Credentials that cache
// outside this process cannot be bypassed this way: the Azure CLI, and DefaultAzureCredential when it
// resolves to a managed identity (use the "managed-identity" kind there). For them the Source keeps
// asking (see below) and takes the new token when the cache lets go, about 5 minutes before expiry.
//
// An attempt that fails, or that gets the same token back ("not yet"), is retried with exponential
// backoff and full jitter (a random wait up to 1s, 2s, 4s, ... 30s), each wait capped at half the
// time left on the current token so that retries keep landing before it expires, and never below 50ms.
// Every attempt after "the same token" uses a fresh credential. Retries go on for as long as it takes;
// Run never gives up on fetch errors. Each GetToken call has Options.RequestTimeout, cut to half the time
// left on the current token (but not below 7 s), so that no request outlives the token by more than 7 s.
//
// While no valid token is held (the current one expired, or none came yet) and the last attempt failed,
// the Source is in an outage: a new attempt starts every second, without waiting for the ones still out,
// up to 8 at once, each bounded by 7 s. A hanging identity endpoint therefore costs no recovery time: the
// proxy holds a token within about a second of the endpoint answering again. LastError says why there is
// none meanwhile; the log says it once a minute (with the number of failed attempts), not every second.
//
// Refresh fetches at once (after Azure refused a token), with a fresh credential; concurrent callers
// and Run share one fetch, and a Refresh less than 5 seconds after the end of the last fetch returns
// the current token instead of asking again.
package tokensource

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"sync"
	"time"

	"github.com/Azure/azure-sdk-for-go/sdk/azcore"
	"github.com/Azure/azure-sdk-for-go/sdk/azcore/policy"
)

// Results reported to Options.OnRefresh.
const (
	ResultOK        = "ok"        // a new token replaced the current one
	ResultUnchanged = "unchanged" // the credential handed back the current token again
	ResultError     = "error"     // the attempt failed
)

const (
	// msalCacheHold is how long before expiry MSAL stops handing out a cached token
	// (storage.AccessToken.Validate in microsoft-authentication-library-for-go).
	msalCacheHold = 5 * time.Minute
	// backoffBase and backoffMax bound the retry waits (full jitter: a random wait up to the bound).
	backoffBase = time.Second
	backoffMax  = 30 * time.Second
	// minRetryWait keeps retries apart even when the current token is about to expire.
	minRetryWait = 50 * time.Millisecond
	// refreshMinInterval is how long after a fetch Refresh returns the current token instead of asking again.
	refreshMinInterval = 5 * time.Second
	// defaultRequestTimeout bounds a GetToken call when Options.RequestTimeout is zero.
	defaultRequestTimeout = 30 * time.Second
	// outageEvery is how often an attempt starts during an outage (no valid token, the last attempt
	// failed), whether or not earlier ones have answered: recovery comes within about this long of the
	// endpoint answering again.
	outageEvery = time.Second
	// maxOutageAttempts bounds the attempts in flight at once during an outage; outageRequestTimeout
	// bounds each, so that in a hang one has timed out before the next is due and a slot is always free.
	// Eight match the token fetches the proxy's descriptor budget reserves (cmd/entra-redis-proxy/limits.go).
	maxOutageAttempts    = 8
	outageRequestTimeout = (maxOutageAttempts - 1) * outageEvery
)

// Options configure a Source.
type Options struct {
	// Scope is the OAuth scope to request, e.g. https://redis.azure.com/.default. Required.
	Scope string
	// Username, if set, is the AUTH username instead of each token's oid claim.
	Username string
	// Logger receives one info line per new token and a warning per failed attempt. Nil means slog.Default().
	Logger *slog.Logger
	// OnRefresh, if set, is called after each fetch attempt with ResultOK, ResultUnchanged or ResultError,
	// and the current token's expiry (zero before the first token). For metrics; it must be quick.
	OnRefresh func(result string, expires time.Time)
	// RequestTimeout bounds each GetToken call; zero means 30s.
	RequestTimeout time.Duration
}

// Source holds the current token and renews it. Its methods are safe for concurrent use.
type Source struct {
	newCred func() (azcore.TokenCredential, error)
	opts    Options
	log     *slog.Logger
	jitter  func(ceiling time.Duration) time.Duration // a random wait in [0, ceiling]
	ready   chan struct{}                             // closed by the first adopted token

	mu        sync.Mutex // guards the fields below
	cur       Token
	acquired  time.Time              // when cur arrived: the start of its lifetime
	refreshOn time.Time              // cur's AccessToken.RefreshOn, if the issuer set one
	changed   chan struct{}          // closed and replaced when cur is replaced
	cred      azcore.TokenCredential // nil until the first fetch builds one
	stale     bool                   // the last attempt got cur again: the next one needs a fresh credential
	inflight  *call                  // the fetch in progress, shared by all who ask meanwhile
	lastFetch time.Time              // when the last fetch ended
	lastErr   error                  // the last fetch's error, nil after a success
	// For logFailure: when it last logged, and the failures since.
	loggedAt time.Time
	unlogged int
	running  bool // Run is active
}

// call is one fetch, shared by Run and concurrent Refresh callers.
type call struct {
	done     chan struct{} // closed when the fields below are set
	tok      Token         // the current token after the fetch
	err      error
	canceled bool // the fetch stopped because its owner's context ended; others should try again
}

// New returns a Source that gets tokens from credentials built by newCred. The Source calls newCred
// for its first fetch and again whenever it needs a credential whose cache does not hold the current
// token; when such a later call fails, the Source logs it and keeps using the previous credential.
func New(newCred func() (azcore.TokenCredential, error), opts Options) (*Source, error) {
	if newCred == nil {
		return nil, errors.New("tokensource: newCred is nil")
	}
	if opts.Scope == "" {
		return nil, errors.New("tokensource: the scope is empty")
	}
	if opts.RequestTimeout < 0 {
		return nil, fmt.Errorf("tokensource: the request timeout %v is negative", opts.RequestTimeout)
	}
	if opts.RequestTimeout == 0 {
		opts.RequestTimeout = defaultRequestTimeout
	}
	log := opts.Logger
	if log == nil {
		log = slog.Default()
	}
	return &Source{
		newCred: newCred,
		opts:    opts,
		log:     log,
		jitter:  func(d time.Duration) time.Duration { return rand.N(d + 1) },
		ready:   make(chan struct{}),
		changed: make(chan struct{}),
	}, nil
}

// Current returns the newest token (the zero Token before the first) and a channel that is closed when
// a newer token replaces it.
func (s *Source) Current() (Token, <-chan struct{}) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.cur, s.changed
}

// Ready returns a channel that is closed once the first token is held.
func (s *Source) Ready() <-chan struct{} {
	return s.ready
}

// Valid reports whether a token is held and has not expired, for a readiness check.
func (s *Source) Valid() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.cur.Secret != "" && time.Now().Before(s.cur.ExpiresOn)
}

// Run fetches the first token at once and then renews it on the schedule of the package comment. It
// returns nil when ctx is done; fetch errors are logged and retried, never returned. It returns an
// error only if another Run of the same Source is active.
func (s *Source) Run(ctx context.Context) error {
	s.mu.Lock()
	if s.running {
		s.mu.Unlock()
		return errors.New("tokensource: Run is already active")
	}
	s.running = true
	s.mu.Unlock()
	defer func() {
		s.mu.Lock()
		s.running = false
		s.mu.Unlock()
	}()

	// Attempts started during an outage run on their own; Run cancels them and waits before it returns.
	var outage outageAttempts
	outage.renew(ctx)
	defer outage.stop()

	failures := 0           // attempts since the last new token
	var lastStart time.Time // when the last attempt started
	for {
		now := time.Now()
		s.mu.Lock()
		wait := s.nextWait(now, failures)
		inOutage := s.inOutage(now)
		changed := s.changed
		s.mu.Unlock()

		if inOutage {
			wait = max(0, lastStart.Add(outageEvery).Sub(now))
			if wait == 0 {
				if outage.start(s) {
					lastStart = now
				}
				wait = outageEvery // (with every slot taken: look again when the next start is due)
			}
		}
		timer := time.NewTimer(wait)
		select {
		case <-ctx.Done():
			timer.Stop()
			return nil
		case <-changed: // a new token (from an outage attempt or Refresh): plan from it
			timer.Stop()
			failures = 0
			outage.renew(ctx) // the outage is over: its attempts still out are not needed
			continue
		case <-timer.C:
		}
		if inOutage {
			continue
		}
		lastStart = time.Now()
		if _, err := s.fetch(ctx, false); err != nil && ctx.Err() != nil {
			return nil
		}
		s.mu.Lock()
		if s.changed == changed {
			failures++
		} else {
			failures = 0
		}
		s.mu.Unlock()
	}
}

// outageLogEvery is how often a failure is logged during an outage, when attempts fail every second.
const outageLogEvery = time.Minute

// logFailure logs a failed attempt: each one while a valid token is held, and during an outage one a minute,
// with the number of failures it stands for.
func (s *Source) logFailure(err error, expires time.Time) {
	s.mu.Lock()
	now := time.Now()
	s.unlogged++
	if s.inOutage(now) && now.Sub(s.loggedAt) < outageLogEvery {
		s.mu.Unlock()
		return
	}
	n := s.unlogged
	s.unlogged, s.loggedAt = 0, now
	s.mu.Unlock()
	s.log.Warn("getting an Entra token failed; retrying", "error", err, "current_expires_on", expires, "failures", n)
}

// outageAttempts are the attempts Run starts during an outage without waiting for them.
type outageAttempts struct {
	ctx    context.Context // ends when the outage does (a new token) or Run returns
	cancel context.CancelFunc
	wg     sync.WaitGroup
	slots  chan struct{} // one per attempt in flight
}

// renew cancels the attempts in flight and starts a new set under parent.
func (o *outageAttempts) renew(parent context.Context) {
	if o.cancel != nil {
		o.cancel()
	}
	if o.slots == nil {
		o.slots = make(chan struct{}, maxOutageAttempts)
	}
	o.ctx, o.cancel = context.WithCancel(parent)
}

// start starts an attempt unless maxOutageAttempts are in flight.
func (o *outageAttempts) start(s *Source) bool {
	select {
	case o.slots <- struct{}{}:
	default:
		return false
	}
	ctx := o.ctx
	o.wg.Go(func() {
		defer func() { <-o.slots }()
		s.attempt(ctx, &call{done: make(chan struct{})}, false)
	})
	return true
}

func (o *outageAttempts) stop() {
	o.cancel()
	o.wg.Wait()
}

// inOutage reports whether no valid token is held and the last attempt failed. s.mu must be held.
func (s *Source) inOutage(now time.Time) bool {
	return s.lastErr != nil && (s.cur.Secret == "" || !now.Before(s.cur.ExpiresOn))
}

// LastError returns the error of the last attempt, or nil if it succeeded (or none ended yet). With an
// expired token (or none), it is why the proxy has no valid one.
func (s *Source) LastError() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.lastErr
}

// nextWait is how long Run waits before its next attempt, failures attempts after the last new token.
// s.mu must be held.
func (s *Source) nextWait(now time.Time, failures int) time.Duration {
	if failures == 0 {
		if s.cur.Secret == "" {
			return 0
		}
		return max(0, s.due().Sub(now))
	}
	ceiling := backoffMax
	if failures <= 6 { // 1s << 5 = 32s already exceeds backoffMax
		ceiling = min(backoffMax, backoffBase<<(failures-1))
	}
	if left := s.cur.ExpiresOn.Sub(now); s.cur.Secret != "" && left > 0 {
		ceiling = min(ceiling, left/2)
	}
	return max(minRetryWait, s.jitter(ceiling))
}

// due is when the current token should be replaced: at half its lifetime, or at its RefreshOn if
// that is earlier. s.mu must be held.
func (s *Source) due() time.Time {
	due := s.acquired.Add(s.cur.ExpiresOn.Sub(s.acquired) / 2)
	if !s.refreshOn.IsZero() && s.refreshOn.After(s.acquired) && s.refreshOn.Before(due) {
		due = s.refreshOn
	}
	return due
}

// requestTimeout bounds one GetToken call: Options.RequestTimeout, but no more than half the time left on
// a valid token, or outageRequestTimeout if that is longer (a short-lived token must still leave a request
// time to be answered), so that a hung request ends soon after the token does and the outage's attempts
// take over. s.mu must be held.
func (s *Source) requestTimeout(now time.Time) time.Duration {
	left := time.Duration(0)
	if s.cur.Secret != "" {
		left = s.cur.ExpiresOn.Sub(now)
	}
	return min(s.opts.RequestTimeout, max(left/2, outageRequestTimeout))
}

// cacheWouldHold reports whether MSAL would still hand back the current token at now. s.mu must be held.
func (s *Source) cacheWouldHold(now time.Time) bool {
	return s.cur.Secret != "" && s.cur.ExpiresOn.Sub(now) > msalCacheHold
}

// Refresh fetches a token now, for use after Azure refused the current one, and returns the current
// token afterwards. The fetch uses a credential without the current token in its cache. Concurrent
// callers and Run share one fetch; less than 5 seconds after the last fetch ended, Refresh returns the
// current token (or, if there is none yet, the last fetch's error) without asking again. If the
// identity hands back the same token, Refresh returns it without an error.
func (s *Source) Refresh(ctx context.Context) (Token, error) {
	s.mu.Lock()
	if s.inflight == nil && !s.lastFetch.IsZero() && time.Since(s.lastFetch) < refreshMinInterval {
		tok, err := s.cur, s.lastErr
		s.mu.Unlock()
		if tok.Secret == "" {
			if err == nil {
				err = errors.New("no token yet")
			}
			return Token{}, fmt.Errorf("refresh: no token yet, the last attempt ended less than %v ago: %w", refreshMinInterval, err)
		}
		return tok, nil
	}
	s.mu.Unlock()
	tok, err := s.fetch(ctx, true)
	if err != nil {
		return tok, fmt.Errorf("refresh: %w", err)
	}
	return tok, nil
}

// fetch runs one attempt, or waits for the one in progress, and returns the current token after it.
// fresh asks for a credential without the current token in its cache.
func (s *Source) fetch(ctx context.Context, fresh bool) (Token, error) {
	for {
		s.mu.Lock()
		c := s.inflight
		if c == nil {
			c = &call{done: make(chan struct{})}
			s.inflight = c
			s.mu.Unlock()
			s.attempt(ctx, c, fresh)
			return c.tok, c.err
		}
		s.mu.Unlock()
		select {
		case <-ctx.Done():
			return Token{}, ctx.Err()
		case <-c.done:
		}
		if !c.canceled {
			return c.tok, c.err
		}
	}
}

// attempt performs call c: one GetToken with a timeout, then adopts the token if it is new.
func (s *Source) attempt(ctx context.Context, c *call, fresh bool) {
	s.mu.Lock()
	started := time.Now()
	cred := s.cred
	fresh = fresh || s.stale || s.cacheWouldHold(started)
	timeout := s.requestTimeout(started)
	s.mu.Unlock()

	result := ResultError
	var tok azcore.AccessToken
	err := func() error {
		if cred == nil || fresh {
			nc, err := s.newCred()
			switch {
			case err == nil:
				cred = nc
			case cred == nil:
				return fmt.Errorf("build credential: %w", err)
			default:
				s.log.Warn("could not build a fresh Entra credential; using the previous one", "error", err)
			}
		}
		gctx, cancel := context.WithTimeout(ctx, timeout)
		defer cancel()
		if fresh {
			gctx = withBypassCache(gctx)
		}
		var err error
		tok, err = cred.GetToken(gctx, policy.TokenRequestOptions{Scopes: []string{s.opts.Scope}})
		if err != nil && ctx.Err() == nil && errors.Is(gctx.Err(), context.DeadlineExceeded) {
			return fmt.Errorf("get token for %s: no answer within %v: %w", s.opts.Scope, timeout, err)
		}
		if err != nil {
			return fmt.Errorf("get token for %s: %w", s.opts.Scope, err)
		}
		if tok.Token == "" {
			return fmt.Errorf("get token for %s: the credential returned an empty token", s.opts.Scope)
		}
		return nil
	}()

	now := time.Now()
	var next Token
	if err == nil {
		next = Token{Username: s.opts.Username, Secret: tok.Token, ExpiresOn: tok.ExpiresOn}
		s.mu.Lock()
		same := next.Secret == s.cur.Secret
		s.mu.Unlock()
		switch {
		case same:
			result = ResultUnchanged
		case !next.ExpiresOn.After(now):
			err = fmt.Errorf("get token for %s: the token expired at %s, before it arrived (check the clock)",
				s.opts.Scope, next.ExpiresOn.Format(time.RFC3339))
		case next.Username == "":
			if next.Username, err = oidClaim(next.Secret); err == nil {
				result = ResultOK
			}
		default:
			result = ResultOK
		}
	}

	s.mu.Lock()
	// The owner gave up, or (during an outage, attempts overlap) a newer attempt already brought a token:
	// no failure to count.
	canceled := err != nil && (ctx.Err() != nil || s.acquired.After(started))
	s.cred = cred
	if !canceled {
		s.lastFetch, s.lastErr = now, err
		s.stale = result == ResultUnchanged || (result == ResultError && s.stale)
	}
	first, unlogged := false, 0
	if result == ResultOK {
		first = s.cur.Secret == ""
		unlogged, s.unlogged = s.unlogged, 0
		s.cur, s.acquired, s.refreshOn = next, now, tok.RefreshOn
		close(s.changed)
		s.changed = make(chan struct{})
	}
	c.tok, c.err = s.cur, err
	c.canceled = canceled
	expires := s.cur.ExpiresOn
	if s.inflight == c {
		s.inflight = nil
	}
	s.mu.Unlock()
	close(c.done)

	switch result {
	case ResultOK:
		if first {
			close(s.ready)
		}
		s.log.Info("new Entra token", "username", next.Username, "expires_on", next.ExpiresOn,
			"lifetime", next.ExpiresOn.Sub(now).Round(time.Second), "fresh_credential", fresh,
			"failures_not_logged", unlogged)
	case ResultUnchanged:
		s.log.Debug("Entra credential returned the current token again; retrying later with a fresh credential",
			"expires_on", expires, "fresh_credential", fresh)
	default:
		if !canceled {
			s.logFailure(err, expires)
		}
	}
	if s.opts.OnRefresh != nil && !canceled {
		s.opts.OnRefresh(result, expires)
	}
}
