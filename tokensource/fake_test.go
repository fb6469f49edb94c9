package tokensource

import (
	"bytes"
	"context"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"log/slog"
	"sync"
	"testing"
	"time"

	"github.com/Azure/azure-sdk-for-go/sdk/azcore"
	"github.com/Azure/azure-sdk-for-go/sdk/azcore/policy"
)

const testOID = "11111111-2222-3333-4444-555555555555"

// jwt returns a JWT-shaped token whose base64url payload holds claims.
func jwt(t testing.TB, claims map[string]any) string {
	t.Helper()
	payload, err := json.Marshal(claims)
	if err != nil {
		t.Fatal(err)
	}
	enc := base64.RawURLEncoding.EncodeToString
	return enc([]byte(`{"alg":"RS256","typ":"JWT"}`)) + "." + enc(payload) + ".c2lnbmF0dXJl"
}

// cacheMode says how a fake credential caches, after the credentials it imitates.
type cacheMode int

const (
	cacheNone    cacheMode = iota // every call issues a new token (lifetimes under 5 minutes in MSAL)
	cachePerCred                  // MSAL confidential client: each credential has its own cache
	cacheGlobal                   // MSAL managed identity: one cache per process, skipped on bypass
	cacheSticky                   // Azure CLI: a cache outside the process that nothing skips
)

// issuer mints tokens for fake credentials and records every GetToken call.
type issuer struct {
	t        testing.TB
	lifetime time.Duration
	mode     cacheMode
	// fail, if set, decides whether call n (0-based) fails.
	fail func(n int) error
	// hold is how long before expiry a cached token stops being served; zero means MSAL's 5 minutes.
	hold time.Duration
	// gate, if set, is received from before each call answers.
	gate chan struct{}

	mu       sync.Mutex
	calls    []time.Time
	bypassed []bool
	issued   int
	creds    int                 // credentials built by newCred
	global   *azcore.AccessToken // the cacheGlobal and cacheSticky cache
}

// newCred is the Source's newCred: each call builds a credential with an empty own cache.
func (is *issuer) newCred() (azcore.TokenCredential, error) {
	is.mu.Lock()
	defer is.mu.Unlock()
	is.creds++
	return &fakeCred{is: is}, nil
}

func (is *issuer) callTimes() []time.Time {
	is.mu.Lock()
	defer is.mu.Unlock()
	return append([]time.Time(nil), is.calls...)
}

type fakeCred struct {
	is  *issuer
	own *azcore.AccessToken // the cachePerCred cache
}

// cacheable is MSAL's rule: a cached token is served until 5 minutes (or is.hold) before it expires.
func (is *issuer) cacheable(tok *azcore.AccessToken) bool {
	hold := is.hold
	if hold == 0 {
		hold = 5 * time.Minute
	}
	return tok != nil && time.Until(tok.ExpiresOn) > hold
}

func (c *fakeCred) GetToken(ctx context.Context, o policy.TokenRequestOptions) (azcore.AccessToken, error) {
	is := c.is
	is.mu.Lock()
	n := len(is.calls)
	is.calls = append(is.calls, time.Now())
	is.bypassed = append(is.bypassed, bypassCache(ctx))
	is.mu.Unlock()
	if len(o.Scopes) != 1 || o.Scopes[0] != testScope {
		return azcore.AccessToken{}, fmt.Errorf("unexpected scopes %q", o.Scopes)
	}
	if is.gate != nil {
		select {
		case <-is.gate:
		case <-ctx.Done():
			return azcore.AccessToken{}, ctx.Err()
		}
	}
	if is.fail != nil {
		if err := is.fail(n); err != nil {
			return azcore.AccessToken{}, err
		}
	}
	is.mu.Lock()
	defer is.mu.Unlock()
	switch {
	case is.mode == cachePerCred && is.cacheable(c.own):
		return *c.own, nil
	case is.mode == cacheGlobal && is.cacheable(is.global) && !bypassCache(ctx):
		return *is.global, nil
	case is.mode == cacheSticky && is.cacheable(is.global):
		return *is.global, nil
	}
	is.issued++
	tok := azcore.AccessToken{
		Token:     jwt(is.t, map[string]any{"oid": testOID, "n": is.issued}),
		ExpiresOn: time.Now().Add(is.lifetime),
	}
	c.own, is.global = &tok, &tok
	return tok, nil
}

const testScope = "https://redis.azure.com/.default"

// refreshLog records OnRefresh calls.
type refreshLog struct {
	mu      sync.Mutex
	results []string
}

func (r *refreshLog) add(result string, _ time.Time) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.results = append(r.results, result)
}

func (r *refreshLog) count(result string) int {
	r.mu.Lock()
	defer r.mu.Unlock()
	n := 0
	for _, x := range r.results {
		if x == result {
			n++
		}
	}
	return n
}

// syncBuffer is a bytes.Buffer for a logger shared by goroutines.
type syncBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *syncBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *syncBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

// newTestSource returns a Source on is, logging JSON to the returned buffer.
func newTestSource(t testing.TB, is *issuer, opts Options) (*Source, *refreshLog, *syncBuffer) {
	t.Helper()
	logs := &syncBuffer{}
	rl := &refreshLog{}
	opts.Scope = testScope
	opts.Logger = slog.New(slog.NewJSONHandler(logs, &slog.HandlerOptions{Level: slog.LevelDebug}))
	opts.OnRefresh = rl.add
	s, err := New(is.newCred, opts)
	if err != nil {
		t.Fatal(err)
	}
	return s, rl, logs
}

// collect runs s until it has received n tokens (the first included) and returns them with the time each
// arrived. It fails the test if that takes more than limit. s must hold no token yet.
func collect(t testing.TB, s *Source, n int, limit time.Duration) ([]Token, []time.Time) {
	t.Helper()
	// Subscribe before Run starts: once it runs, its first token can land before we look, and the
	// channel we got would then announce the second token, not the first.
	cur, changed := s.Current()
	if cur.Secret != "" {
		t.Fatal("collect: the Source already holds a token")
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- s.Run(ctx) }()
	defer func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("Run: %v", err)
		}
	}()
	var (
		toks  []Token
		times []time.Time
	)
	deadline := time.After(limit)
	for len(toks) < n {
		select {
		case <-changed:
		case <-deadline:
			t.Fatalf("got %d of %d tokens within %v", len(toks), n, limit)
		}
		var tok Token
		tok, changed = s.Current()
		toks = append(toks, tok)
		times = append(times, time.Now())
	}
	return toks, times
}

// staticCred always returns its token, valid for an hour from the call.
type staticCred string

func (c staticCred) GetToken(context.Context, policy.TokenRequestOptions) (azcore.AccessToken, error) {
	return azcore.AccessToken{Token: string(c), ExpiresOn: time.Now().Add(time.Hour)}, nil
}

func discardLogger() *slog.Logger { return slog.New(slog.DiscardHandler) }
