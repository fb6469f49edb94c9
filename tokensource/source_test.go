package tokensource

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"sync"
	"testing"
	"testing/synctest"
	"time"

	"github.com/Azure/azure-sdk-for-go/sdk/azcore"
	"github.com/Azure/azure-sdk-for-go/sdk/azcore/policy"
)

// The schedule tests run in synctest bubbles: time is fake and jumps ahead whenever every goroutine of the
// bubble waits, so hours of token lifetimes take microseconds.

func TestScheduleRotatesAtHalfLife(t *testing.T) {
	tcs := []struct {
		desc     string
		lifetime time.Duration
		mode     cacheMode
	}{
		{"2s test token, not cached", 2 * time.Second, cacheNone},
		{"4m token, not cached", 4 * time.Minute, cacheNone},
		{"60m user token, per-credential cache", 60 * time.Minute, cachePerCred},
		{"90m service principal token, per-credential cache", 90 * time.Minute, cachePerCred},
		{"24h managed identity token, process-wide cache", 24 * time.Hour, cacheGlobal},
	}
	for _, tc := range tcs {
		t.Run(tc.desc, func(t *testing.T) {
			synctest.Test(t, func(t *testing.T) {
				is := &issuer{t: t, lifetime: tc.lifetime, mode: tc.mode}
				s, rl, _ := newTestSource(t, is, Options{})
				start := time.Now()
				toks, times := collect(t, s, 4, 4*tc.lifetime)
				for i, tok := range toks {
					if tok.Username != testOID {
						t.Errorf("token %d: username %q, want %q", i, tok.Username, testOID)
					}
					if i > 0 && tok.Secret == toks[i-1].Secret {
						t.Errorf("token %d is the same as token %d", i, i-1)
					}
					// Each token arrives exactly at half the lifetime of the one before it.
					if want := start.Add(time.Duration(i) * tc.lifetime / 2); !times[i].Equal(want) {
						t.Errorf("token %d arrived at +%v, want +%v", i, times[i].Sub(start), want.Sub(start))
					}
				}
				if n := len(is.callTimes()); n != 4 {
					t.Errorf("%d GetToken calls for 4 tokens, want 4 (no wasted attempts)", n)
				}
				if n := rl.count(ResultOK); n != 4 {
					t.Errorf("OnRefresh reported %d ok, want 4", n)
				}
			})
		})
	}
}

// An Azure CLI-like credential hands back the old token until 5 minutes before it expires, whatever we
// do: the Source must keep asking without spinning and take the new token as soon as it comes.
func TestSameTokenAgainIsRetriedWithoutSpinning(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		const lifetime = 60 * time.Minute
		is := &issuer{t: t, lifetime: lifetime, mode: cacheSticky}
		s, rl, logs := newTestSource(t, is, Options{})
		start := time.Now()
		toks, times := collect(t, s, 2, lifetime)
		got := times[1].Sub(start)
		// The cache lets go at 55m; the next retry comes within 30s (the backoff cap).
		if got < 55*time.Minute || got > 55*time.Minute+backoffMax {
			t.Errorf("second token arrived at +%v, want within %v after +55m", got, backoffMax)
		}
		if !toks[1].ExpiresOn.After(toks[0].ExpiresOn) {
			t.Errorf("second token expires %v, not after the first (%v)", toks[1].ExpiresOn, toks[0].ExpiresOn)
		}
		calls := is.callTimes()
		for i := 1; i < len(calls); i++ {
			if gap := calls[i].Sub(calls[i-1]); gap < minRetryWait {
				t.Fatalf("calls %d and %d only %v apart: spinning", i-1, i, gap)
			}
		}
		// 25 minutes of retries with waits of 15s on average: about 100 calls.
		if len(calls) > 400 {
			t.Errorf("%d GetToken calls, want far fewer", len(calls))
		}
		if n := rl.count(ResultUnchanged); n != len(calls)-2 {
			t.Errorf("OnRefresh reported %d unchanged, want %d", n, len(calls)-2)
		}
		if strings.Contains(logs.String(), `"level":"WARN"`) {
			t.Errorf("same token again was logged as a warning:\n%s", logs)
		}
	})
}

// The schedule for a credential whose cache would keep the old token too long: the Source must use a
// fresh credential (or skip the process-wide cache) at the scheduled attempt, and only then.
func TestFreshCredentialWhenCacheWouldHold(t *testing.T) {
	tcs := []struct {
		desc       string
		lifetime   time.Duration
		wantBypass bool
	}{
		{"4m token: MSAL does not cache it", 4 * time.Minute, false},
		{"8m token: the cache lets go before half-life", 8 * time.Minute, false},
		{"20m token: the cache would hold it to 75%", 20 * time.Minute, true},
		{"60m token: the cache would hold it to 92%", 60 * time.Minute, true},
	}
	for _, tc := range tcs {
		t.Run(tc.desc, func(t *testing.T) {
			synctest.Test(t, func(t *testing.T) {
				is := &issuer{t: t, lifetime: tc.lifetime, mode: cachePerCred}
				s, _, _ := newTestSource(t, is, Options{})
				collect(t, s, 3, 2*tc.lifetime)
				is.mu.Lock()
				defer is.mu.Unlock()
				for i, b := range is.bypassed[1:] {
					if b != tc.wantBypass {
						t.Errorf("rotation %d: bypass %v, want %v", i+1, b, tc.wantBypass)
					}
				}
				wantCreds := 1
				if tc.wantBypass {
					wantCreds = 3
				}
				if is.creds != wantCreds {
					t.Errorf("newCred called %d times, want %d", is.creds, wantCreds)
				}
			})
		})
	}
}

// A cache that holds tokens longer than predicted hands back the current token: the next attempt, soon
// after, must use a fresh credential.
func TestUnchangedThenFreshCredential(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		const lifetime = 8 * time.Minute // due at 4m, when MSAL would no longer serve it from its cache
		is := &issuer{t: t, lifetime: lifetime, mode: cachePerCred, hold: time.Minute}
		s, rl, _ := newTestSource(t, is, Options{})
		start := time.Now()
		_, times := collect(t, s, 2, lifetime)
		if got := times[1].Sub(start); got < lifetime/2 || got > lifetime/2+backoffBase {
			t.Errorf("second token at +%v, want within %v after +%v", got, backoffBase, lifetime/2)
		}
		is.mu.Lock()
		defer is.mu.Unlock()
		if want := []bool{false, false, true}; fmt.Sprint(is.bypassed) != fmt.Sprint(want) || is.creds != 2 {
			t.Errorf("bypassed %v, credentials %d; want %v, 2", is.bypassed, is.creds, want)
		}
		if n := rl.count(ResultUnchanged); n != 1 {
			t.Errorf("%d unchanged, want 1", n)
		}
	})
}

func TestFailuresAreRetriedWithBackoffBeforeExpiry(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		const lifetime = 60 * time.Minute
		start := time.Now()
		is := &issuer{t: t, lifetime: lifetime, mode: cacheNone}
		// The first 3 calls fail (no token yet), then calls from +30m to +58m fail.
		is.fail = func(n int) error {
			at := time.Since(start)
			if n < 3 || (at >= 30*time.Minute && at < 58*time.Minute) {
				return errors.New("AADSTS7000215: Invalid client secret provided.")
			}
			return nil
		}
		s, rl, logs := newTestSource(t, is, Options{})
		if s.Valid() {
			t.Error("Valid before the first token")
		}
		_, times := collect(t, s, 2, 2*lifetime)
		if !s.Valid() {
			t.Error("not Valid with a token")
		}
		select {
		case <-s.Ready():
		default:
			t.Error("Ready not closed")
		}
		calls := is.callTimes()
		// Before the first token: waits up to 1s, 2s, 4s.
		for i, ceiling := range []time.Duration{backoffBase, 2 * backoffBase, 4 * backoffBase} {
			if gap := calls[i+1].Sub(calls[i]); gap < minRetryWait || gap > ceiling {
				t.Errorf("wait %d before the first token: %v, want in [%v, %v]", i+1, gap, minRetryWait, ceiling)
			}
		}
		first := times[0]
		expiry := first.Add(lifetime)
		var last time.Time
		for i := 6; i < len(calls); i++ { // calls[5] is the scheduled one at +30m
			left := expiry.Sub(calls[i-1])
			gap := calls[i].Sub(calls[i-1])
			if gap > backoffMax || gap > max(minRetryWait, left/2) {
				t.Errorf("retry %d at +%v waited %v with %v left", i, calls[i].Sub(start), gap, left)
			}
			last = calls[i]
		}
		if got := times[1].Sub(start); got < 58*time.Minute || got > 58*time.Minute+backoffMax {
			t.Errorf("new token at +%v, want within %v after the failures end at +58m", got, backoffMax)
		}
		if !last.Before(expiry) {
			t.Errorf("last attempt at +%v, after expiry", last.Sub(start))
		}
		// Each failure is logged while a token is held; the 3 before the first one are an outage, whose
		// failures make one line a minute (here the first), counting them.
		warns := strings.Count(logs.String(), `"level":"WARN"`)
		if warns != rl.count(ResultError)-2 || warns < 1+50 {
			t.Errorf("%d warnings for %d errors", warns, rl.count(ResultError))
		}
		if !strings.Contains(logs.String(), "AADSTS7000215: Invalid client secret provided.") {
			t.Errorf("warnings do not carry Entra's error text:\n%.2000s", logs)
		}
	})
}

// With a 2s token and an endpoint that keeps failing, retries must crowd in before expiry (each wait at
// most half the time left) and go on after it.
func TestRetriesLandBeforeExpiry(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		const lifetime = 2 * time.Second
		is := &issuer{t: t, lifetime: lifetime}
		is.fail = func(n int) error {
			if n > 0 {
				return errors.New("connection refused")
			}
			return nil
		}
		s, _, _ := newTestSource(t, is, Options{})
		ctx, cancel := context.WithCancel(context.Background())
		done := make(chan error, 1)
		go func() { done <- s.Run(ctx) }()
		<-s.Ready()
		tok, _ := s.Current()
		time.Sleep(lifetime + time.Minute)
		cancel()
		if err := <-done; err != nil {
			t.Fatalf("Run: %v", err)
		}
		var near, after int
		for _, c := range is.callTimes() {
			left := tok.ExpiresOn.Sub(c)
			if left > 0 && left < 200*time.Millisecond {
				near++
			}
			if left < 0 {
				after++
			}
		}
		if near == 0 {
			t.Error("no attempt in the last 200ms before expiry")
		}
		if after < 3 {
			t.Errorf("%d attempts after expiry, want Run to keep trying", after)
		}
		if s.Valid() {
			t.Error("Valid with an expired token")
		}
	})
}

func TestRequestTimeout(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		is := &issuer{t: t, lifetime: time.Hour, gate: make(chan struct{})} // never answers
		s, _, logs := newTestSource(t, is, Options{RequestTimeout: 5 * time.Second})
		ctx, cancel := context.WithCancel(context.Background())
		done := make(chan error, 1)
		go func() { done <- s.Run(ctx) }()
		time.Sleep(time.Minute)
		cancel()
		<-done
		if n := len(is.callTimes()); n < 3 {
			t.Errorf("%d calls in a minute against a hanging endpoint, want Run to time out and retry", n)
		}
		if !strings.Contains(logs.String(), "no answer within 5s") {
			t.Errorf("no timeout warning:\n%.1000s", logs)
		}
	})
}

func TestRefreshCoalesces(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		is := &issuer{t: t, lifetime: time.Hour, mode: cachePerCred, gate: make(chan struct{})}
		s, _, _ := newTestSource(t, is, Options{})

		const callers = 10
		var wg sync.WaitGroup
		got := make([]Token, callers)
		for i := range callers {
			wg.Go(func() {
				tok, err := s.Refresh(context.Background())
				if err != nil {
					t.Errorf("Refresh %d: %v", i, err)
				}
				got[i] = tok
			})
		}
		synctest.Wait() // every caller waits on the one fetch
		close(is.gate)
		wg.Wait()
		if n := len(is.callTimes()); n != 1 {
			t.Fatalf("%d concurrent Refresh calls made %d GetToken calls, want 1", callers, n)
		}
		for i := range got {
			if got[i].Secret == "" || got[i].Secret != got[0].Secret {
				t.Fatalf("caller %d got a different token", i)
			}
		}

		// Within 5s of the last fetch: the current token, no call.
		time.Sleep(refreshMinInterval - time.Second)
		if tok, err := s.Refresh(context.Background()); err != nil || tok.Secret != got[0].Secret {
			t.Fatalf("Refresh soon after: %v, %v", tok, err)
		}
		if n := len(is.callTimes()); n != 1 {
			t.Fatalf("Refresh within %v of the last fetch called GetToken", refreshMinInterval)
		}

		// Later: a real fetch that skips the cache, so the refused token is not handed back.
		time.Sleep(2 * time.Second)
		tok, err := s.Refresh(context.Background())
		if err != nil {
			t.Fatal(err)
		}
		if tok.Secret == got[0].Secret {
			t.Error("Refresh returned the cached token")
		}
		is.mu.Lock()
		defer is.mu.Unlock()
		if len(is.calls) != 2 || !is.bypassed[1] || is.creds != 2 {
			t.Errorf("calls %d, bypassed %v, credentials %d; want 2 calls, the second with a fresh credential", len(is.calls), is.bypassed, is.creds)
		}
	})
}

// Run and Refresh share one fetch, and Run plans from a token that Refresh got.
func TestRunFollowsRefresh(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		const lifetime = time.Hour
		is := &issuer{t: t, lifetime: lifetime}
		s, _, _ := newTestSource(t, is, Options{})
		ctx, cancel := context.WithCancel(context.Background())
		done := make(chan error, 1)
		go func() { done <- s.Run(ctx) }()
		<-s.Ready()
		time.Sleep(10 * time.Minute)
		tok, err := s.Refresh(ctx)
		if err != nil {
			t.Fatal(err)
		}
		refreshed := time.Now()
		// Run's next attempt is due 30m of bubble time later, which cannot pass while this goroutine
		// runs, so the token held now is still the one Refresh returned.
		cur, changed := s.Current()
		if cur.Secret != tok.Secret {
			t.Fatal("the token changed between Refresh and Current")
		}
		<-changed
		cancel()
		<-done
		calls := is.callTimes()
		if len(calls) != 3 {
			t.Fatalf("%d calls, want 3", len(calls))
		}
		if want := refreshed.Add(lifetime / 2); !calls[2].Equal(want) {
			t.Errorf("Run's next attempt at %v after Refresh, want %v", calls[2].Sub(refreshed), lifetime/2)
		}
		if got, _ := s.Current(); got.Secret == tok.Secret {
			t.Error("token not replaced")
		}
	})
}

func TestRefreshWithoutTokenReportsLastError(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		is := &issuer{t: t, lifetime: time.Hour, fail: func(int) error { return errors.New("AADSTS700016: application not found") }}
		s, _, _ := newTestSource(t, is, Options{})
		if _, err := s.Refresh(context.Background()); err == nil || !strings.Contains(err.Error(), "AADSTS700016") {
			t.Fatalf("Refresh: %v, want the Entra error", err)
		}
		_, err := s.Refresh(context.Background())
		if err == nil || !strings.Contains(err.Error(), "AADSTS700016") {
			t.Fatalf("second Refresh: %v, want the last error", err)
		}
		if n := len(is.callTimes()); n != 1 {
			t.Errorf("%d calls, want 1", n)
		}
	})
}

func TestUsername(t *testing.T) {
	tcs := []struct {
		desc     string
		claims   map[string]any
		override string
		want     string
		wantErr  string
	}{
		{"oid claim", map[string]any{"oid": testOID}, "", testOID, ""},
		{"override wins", map[string]any{"oid": testOID}, "alice", "alice", ""},
		{"override without oid", map[string]any{"sub": "x"}, "alice", "alice", ""},
		{"no oid", map[string]any{"sub": "x"}, "", "", "ENTRA_REDIS_PROXY_USERNAME"},
	}
	for _, tc := range tcs {
		t.Run(tc.desc, func(t *testing.T) {
			synctest.Test(t, func(t *testing.T) {
				secret := jwt(t, tc.claims)
				cred := func() (azcore.TokenCredential, error) { return staticCred(secret), nil }
				s, err := New(cred, Options{Scope: testScope, Username: tc.override, Logger: discardLogger()})
				if err != nil {
					t.Fatal(err)
				}
				tok, err := s.Refresh(context.Background())
				if tc.wantErr != "" {
					if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
						t.Fatalf("err %v, want one mentioning %s", err, tc.wantErr)
					}
					if strings.Contains(err.Error(), secret) {
						t.Fatal("error contains the token")
					}
					return
				}
				if err != nil || tok.Username != tc.want {
					t.Fatalf("got %q, %v; want %q", tok.Username, err, tc.want)
				}
			})
		})
	}
}

func TestNewRejectsBadOptions(t *testing.T) {
	cred := func() (azcore.TokenCredential, error) { return staticCred("x"), nil }
	tcs := []struct {
		desc    string
		newCred func() (azcore.TokenCredential, error)
		opts    Options
	}{
		{"nil newCred", nil, Options{Scope: testScope}},
		{"no scope", cred, Options{}},
		{"negative timeout", cred, Options{Scope: testScope, RequestTimeout: -time.Second}},
	}
	for _, tc := range tcs {
		t.Run(tc.desc, func(t *testing.T) {
			if _, err := New(tc.newCred, tc.opts); err == nil {
				t.Error("New succeeded")
			}
		})
	}
}

func TestRunTwice(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		s, _, _ := newTestSource(t, &issuer{t: t, lifetime: time.Hour}, Options{})
		ctx, cancel := context.WithCancel(context.Background())
		done := make(chan error, 1)
		go func() { done <- s.Run(ctx) }()
		<-s.Ready()
		if err := s.Run(ctx); err == nil {
			t.Error("second Run did not fail")
		}
		cancel()
		if err := <-done; err != nil {
			t.Errorf("Run: %v", err)
		}
	})
}

// outageCred answers by the time of the call: a token until failFrom, then hangs (until the request's
// context ends) until answerFrom, then tokens again. It records how many calls are in flight at most.
type outageCred struct {
	t                    testing.TB
	lifetime             time.Duration
	failFrom, answerFrom time.Time

	mu             sync.Mutex
	inflight, peak int
	issued         int
}

func (c *outageCred) GetToken(ctx context.Context, _ policy.TokenRequestOptions) (azcore.AccessToken, error) {
	c.mu.Lock()
	c.inflight++
	c.peak = max(c.peak, c.inflight)
	c.mu.Unlock()
	defer func() {
		c.mu.Lock()
		c.inflight--
		c.mu.Unlock()
	}()
	if now := time.Now(); !now.Before(c.failFrom) && now.Before(c.answerFrom) {
		<-ctx.Done() // a hung endpoint: the answer never comes
		return azcore.AccessToken{}, ctx.Err()
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	c.issued++
	return azcore.AccessToken{Token: jwt(c.t, map[string]any{"oid": testOID, "n": c.issued}),
		ExpiresOn: time.Now().Add(c.lifetime)}, nil
}

// An identity endpoint that hangs past the token's life: once it answers again, a token arrives within
// outageEvery (no request is waited out), with at most maxOutageAttempts requests out at once, and
// LastError says why there was none meanwhile.
func TestOutageRecoversWithinASecondAfterAHang(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		start := time.Now()
		cred := &outageCred{t: t, lifetime: time.Minute, failFrom: start.Add(time.Second),
			answerFrom: start.Add(10 * time.Minute)}
		s, _, logs := newTestSource(t, &issuer{t: t}, Options{})
		s.newCred = func() (azcore.TokenCredential, error) { return cred, nil }
		ctx, cancel := context.WithCancel(context.Background())
		done := make(chan error, 1)
		go func() { done <- s.Run(ctx) }()
		<-s.Ready()
		first, changed := s.Current()

		time.Sleep(time.Until(first.ExpiresOn.Add(time.Second)))
		if s.Valid() {
			t.Fatal("Valid after the token expired")
		}
		if err := s.LastError(); err == nil || !strings.Contains(err.Error(), "no answer within") {
			t.Errorf("LastError during the outage = %v, want the timeout", err)
		}
		<-changed
		if got := time.Since(cred.answerFrom); got > outageEvery {
			t.Errorf("new token %v after the endpoint answered again, want at most %v", got, outageEvery)
		}
		if s.LastError() != nil {
			t.Errorf("LastError after recovery = %v, want nil", s.LastError())
		}
		cancel()
		if err := <-done; err != nil {
			t.Fatalf("Run: %v", err)
		}
		if cred.peak > maxOutageAttempts {
			t.Errorf("%d requests in flight at once, want at most %d", cred.peak, maxOutageAttempts)
		}
		if cred.peak < 2 {
			t.Errorf("at most %d request in flight: the outage's attempts did not overlap", cred.peak)
		}
		// Some failures before expiry (each logged), then 9 minutes of one a second: a line a minute, each
		// with its count (the last minute's are not logged: the token came first).
		var lines, counted int
		for _, l := range strings.Split(strings.TrimSpace(logs.String()), "\n") {
			var rec struct {
				Level    string
				Failures int
			}
			if json.Unmarshal([]byte(l), &rec) == nil && rec.Level == "WARN" {
				lines++
				counted += rec.Failures
			}
		}
		if lines > 20 || counted < 400 {
			t.Errorf("%d warning lines counting %d failures during a 9-minute outage, want about one a minute counting each", lines, counted)
		}
	})
}
