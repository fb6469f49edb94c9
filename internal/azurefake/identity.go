package azurefake

import (
	"context"
	"crypto/rand"
	"crypto/subtle"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"strconv"
	"strings"
	"time"
)

// appServiceAPIVersion is the api-version MSAL sends to an App Service identity endpoint
// (microsoft-authentication-library-for-go apps/managedidentity).
const appServiceAPIVersion = "2019-08-01"

// maxTokenHistory bounds the records Tokens returns; the oldest expired ones go first.
const maxTokenHistory = 1000

// Fault is how the identity endpoint misbehaves instead of issuing a token.
type Fault int

const (
	FaultNone      Fault = iota // issue tokens normally
	FaultHang                   // never answer: block until the client gives up or Close
	FaultStatus500              // 500 with an Entra-style JSON error body
	FaultGarbage                // 200 with a body that is not JSON
)

var faultNames = []string{"none", "hang", "500", "garbage"}

// String returns the name ParseFault accepts.
func (f Fault) String() string {
	if f < 0 || int(f) >= len(faultNames) {
		return "Fault(" + strconv.Itoa(int(f)) + ")"
	}
	return faultNames[f]
}

// ParseFault parses "none", "hang", "500" or "garbage".
func ParseFault(s string) (Fault, error) {
	for i, n := range faultNames {
		if s == n {
			return Fault(i), nil
		}
	}
	return FaultNone, fmt.Errorf("unknown fault %q (want one of %s)", s, strings.Join(faultNames, ", "))
}

// IssuedToken describes one token the identity endpoint issued.
type IssuedToken struct {
	Seq       int       // 1 for the first token of this Env, then 2, 3...
	OID       string    // its oid claim, also the name of its ACL user
	Token     string    // the access token (a fake; the AUTH password of user OID)
	IssuedAt  time.Time //
	ExpiresOn time.Time // when the ACL user is deleted; expires_on in the response is this, in whole seconds, rounded down
	Deleted   bool      // the ACL user is gone: the token expired
}

// Stats counts the identity endpoint's work.
type Stats struct {
	Requests int // every request received
	Rejected int // wrong X-IDENTITY-HEADER, method, api-version or resource
	Faults   int // answered with a Fault (SetFault or SetFailEvery)
	Minted   int // tokens issued
}

// SetFault makes every token request misbehave as f until SetFault(FaultNone).
func (e *Env) SetFault(f Fault) {
	e.mu.Lock()
	defer e.mu.Unlock()
	e.fault = f
}

// SetFailEvery makes every n-th valid token request (counting from now) misbehave as f, for
// soak tests; n <= 0 turns it off. A fault set by SetFault takes precedence.
func (e *Env) SetFailEvery(n int, f Fault) {
	e.mu.Lock()
	defer e.mu.Unlock()
	e.failEvery, e.failFault, e.failCount = n, f, 0
}

// SetTokenLifetime sets the lifetime of tokens issued from now on.
func (e *Env) SetTokenLifetime(d time.Duration) {
	e.mu.Lock()
	defer e.mu.Unlock()
	e.lifetime = d
}

// Tokens returns the tokens issued so far, oldest first (at most the last 1000, plus any
// still valid).
func (e *Env) Tokens() []IssuedToken {
	e.mu.Lock()
	defer e.mu.Unlock()
	return append([]IssuedToken(nil), e.tokens...)
}

// Stats returns the identity endpoint's counters.
func (e *Env) Stats() Stats {
	e.mu.Lock()
	defer e.mu.Unlock()
	return e.stats
}

// nextFault counts a valid request and decides whether it gets a fault.
func (e *Env) nextFault() Fault {
	e.mu.Lock()
	defer e.mu.Unlock()
	f := e.fault
	if f == FaultNone && e.failEvery > 0 {
		e.failCount++
		if e.failCount%e.failEvery == 0 {
			f = e.failFault
		}
	}
	if f != FaultNone {
		e.stats.Faults++
	}
	return f
}

func (e *Env) count(f func(*Stats)) {
	e.mu.Lock()
	defer e.mu.Unlock()
	f(&e.stats)
}

// serveToken answers like an App Service managed identity endpoint (api-version 2019-08-01).
func (e *Env) serveToken(w http.ResponseWriter, r *http.Request) {
	e.count(func(s *Stats) { s.Requests++ })
	reject := func(status int, code, desc string) {
		e.count(func(s *Stats) { s.Rejected++ })
		writeError(w, status, code, desc)
	}
	if subtle.ConstantTimeCompare([]byte(r.Header.Get("X-IDENTITY-HEADER")), []byte(e.IdentityHeader)) != 1 {
		reject(http.StatusUnauthorized, "unauthorized_client", "X-IDENTITY-HEADER is missing or wrong")
		return
	}
	if r.Method != http.MethodGet {
		reject(http.StatusMethodNotAllowed, "invalid_request", "use GET")
		return
	}
	q := r.URL.Query()
	if v := q.Get("api-version"); v != appServiceAPIVersion {
		reject(http.StatusBadRequest, "invalid_request", fmt.Sprintf("api-version %q is not supported; use %s", v, appServiceAPIVersion))
		return
	}
	resource := q.Get("resource")
	if resource == "" {
		reject(http.StatusBadRequest, "invalid_request", "resource is required")
		return
	}
	switch e.nextFault() {
	case FaultHang:
		select {
		case <-r.Context().Done():
		case <-e.closing:
			writeError(w, http.StatusServiceUnavailable, "temporarily_unavailable", "azurefake is closing")
		}
		return
	case FaultStatus500:
		writeError(w, http.StatusInternalServerError, "server_error",
			"AADSTS50000: There was an error issuing a token or an issue with our sign-in service. (azurefake fault)")
		return
	case FaultGarbage:
		w.Header().Set("Content-Type", "text/html")
		_, _ = w.Write([]byte("<html><body>502 Bad Gateway (azurefake garbage fault)</body></html>"))
		return
	}
	clientID := q.Get("client_id")
	if clientID == "" {
		clientID = e.clientID
	}
	t, err := e.mint(r.Context(), resource, clientID)
	if err != nil {
		e.logger.Error("could not register token in redis", "err", err)
		writeError(w, http.StatusInternalServerError, "server_error", "azurefake could not register the token in redis: "+err.Error())
		return
	}
	w.Header().Set("Content-Type", "application/json")
	_ = json.NewEncoder(w).Encode(map[string]string{
		"access_token": t.Token,
		"expires_on":   strconv.FormatInt(t.ExpiresOn.Unix(), 10),
		"resource":     resource,
		"token_type":   "Bearer",
		"client_id":    clientID,
	})
}

// writeError writes an Entra-style JSON error body.
func writeError(w http.ResponseWriter, status int, code, desc string) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	_ = json.NewEncoder(w).Encode(map[string]any{
		"error":             code,
		"error_description": desc,
		"error_codes":       []int{50000},
		"timestamp":         time.Now().UTC().Format("2006-01-02 15:04:05Z"),
		"trace_id":          newUUID(),
		"correlation_id":    newUUID(),
	})
}

// mint issues a token with a new oid and registers it, like Azure, as the password of the
// ACL user named by that oid. While redis is stopped the token is only recorded;
// StartRedis registers it.
func (e *Env) mint(ctx context.Context, resource, clientID string) (IssuedToken, error) {
	e.mu.Lock()
	lifetime := e.lifetime
	e.mu.Unlock()
	now := time.Now()
	t := IssuedToken{OID: newUUID(), IssuedAt: now, ExpiresOn: now.Add(lifetime)}
	t.Token = fakeJWT(t, resource, clientID, e.tenantID)

	e.redisMu.Lock()
	defer e.redisMu.Unlock()
	// On every running server of this cache and of those sharing its tokens (none: nothing to do).
	if err := e.setUserLocked(ctx, t); err != nil {
		return IssuedToken{}, err
	}
	e.mu.Lock()
	e.seq++
	t.Seq = e.seq
	e.tokens = append(e.tokens, t)
	e.trimHistoryLocked()
	e.stats.Minted++
	e.mu.Unlock()
	select {
	case e.kick <- struct{}{}:
	default: // the expirer is already due to look
	}
	e.logger.Info("token minted", "token", t.Seq, "oid", t.OID, "valid", lifetime, "expires", t.ExpiresOn.Format(time.TimeOnly))
	return t, nil
}

// setUserLocked creates the ACL user for t on every running server. The caller holds e.redisMu.
func (e *Env) setUserLocked(ctx context.Context, t IssuedToken) error {
	ctx, cancel := context.WithTimeout(ctx, aclTimeout)
	defer cancel()
	args := []any{"ACL", "SETUSER", t.OID, "on", ">" + t.Token, "~*"}
	if ch := strings.TrimSpace(e.allChannels()); ch != "" {
		args = append(args, ch)
	}
	args = append(args, "+@all")
	for _, r := range e.userRules {
		args = append(args, r)
	}
	for _, c := range e.tokenAdmins() {
		if err := c.Do(ctx, args...).Err(); err != nil {
			// A syntax error would echo the modifier, and with it the token.
			return fmt.Errorf("ACL SETUSER %s on %s: %s", t.OID, c.Options().Addr, strings.ReplaceAll(err.Error(), t.Token, "[token]"))
		}
	}
	return nil
}

// trimHistoryLocked drops the oldest deleted records beyond maxTokenHistory.
func (e *Env) trimHistoryLocked() {
	excess := len(e.tokens) - maxTokenHistory
	if excess <= 0 {
		return
	}
	kept := e.tokens[:0]
	for _, t := range e.tokens {
		if excess > 0 && t.Deleted {
			excess--
			continue
		}
		kept = append(kept, t)
	}
	clear(e.tokens[len(kept):])
	e.tokens = kept
}

// expireLoop deletes each token's ACL user when the token expires; Redis then closes the
// connections authenticated as that user, as Azure does. Close ends it.
func (e *Env) expireLoop() {
	defer e.wg.Done()
	timer := time.NewTimer(time.Hour)
	defer timer.Stop()
	for {
		if next, ok := e.nextExpiry(); ok {
			timer.Reset(time.Until(next))
		} else {
			timer.Stop()
		}
		select {
		case <-e.closing:
			return
		case <-e.kick:
		case <-timer.C:
			e.expireDue(time.Now())
		}
	}
}

func (e *Env) nextExpiry() (time.Time, bool) {
	e.mu.Lock()
	defer e.mu.Unlock()
	var next time.Time
	for _, t := range e.tokens {
		if !t.Deleted && (next.IsZero() || t.ExpiresOn.Before(next)) {
			next = t.ExpiresOn
		}
	}
	return next, !next.IsZero()
}

func (e *Env) expireDue(now time.Time) {
	e.mu.Lock()
	var due []IssuedToken
	for _, t := range e.tokens {
		if !t.Deleted && !t.ExpiresOn.After(now) {
			due = append(due, t)
		}
	}
	e.mu.Unlock()
	for _, t := range due {
		err := e.deleteUser(t)
		e.mu.Lock()
		for i := range e.tokens {
			if e.tokens[i].Seq == t.Seq {
				e.tokens[i].Deleted = true
			}
		}
		e.mu.Unlock()
		if err != nil {
			e.logger.Warn("token expired, but ACL DELUSER failed", "token", t.Seq, "oid", t.OID, "err", err)
			continue
		}
		e.logger.Info("token expired, ACL user deleted", "token", t.Seq, "oid", t.OID)
	}
}

// deleteUser runs ACL DELUSER for t's user on every running server; a stopped one has nothing
// to delete.
func (e *Env) deleteUser(t IssuedToken) error {
	e.redisMu.Lock()
	defer e.redisMu.Unlock()
	ctx, cancel := context.WithTimeout(e.ctx, aclTimeout)
	defer cancel()
	var errs []error
	for _, c := range e.tokenAdmins() {
		if err := c.Do(ctx, "ACL", "DELUSER", t.OID).Err(); err != nil {
			errs = append(errs, fmt.Errorf("ACL DELUSER %s on %s: %w", t.OID, c.Options().Addr, err))
		}
	}
	return errors.Join(errs...)
}

// fakeJWT returns a JWT-shaped token (header.payload.signature, base64url without padding)
// with the claims an Entra access token for a managed identity has. The signature is random.
func fakeJWT(t IssuedToken, resource, clientID, tenantID string) string {
	enc := base64.RawURLEncoding
	header, _ := json.Marshal(map[string]string{"alg": "RS256", "typ": "JWT", "kid": "azurefake"})
	payload, _ := json.Marshal(map[string]any{
		"aud":   resource,
		"iss":   "https://sts.windows.net/" + tenantID + "/",
		"iat":   t.IssuedAt.Unix(),
		"nbf":   t.IssuedAt.Unix(),
		"exp":   t.ExpiresOn.Unix(),
		"oid":   t.OID,
		"sub":   t.OID,
		"tid":   tenantID,
		"appid": clientID,
		"idtyp": "app",
		"ver":   "1.0",
	})
	sig := make([]byte, 256) // an RS256 signature's size, so AUTH commands are realistically long
	_, _ = rand.Read(sig)
	return enc.EncodeToString(header) + "." + enc.EncodeToString(payload) + "." + enc.EncodeToString(sig)
}

// newUUID returns a random (version 4) UUID in its usual text form.
func newUUID() string {
	var b [16]byte
	_, _ = rand.Read(b[:])
	b[6] = b[6]&0x0f | 0x40
	b[8] = b[8]&0x3f | 0x80
	h := hex.EncodeToString(b[:])
	return h[0:8] + "-" + h[8:12] + "-" + h[12:16] + "-" + h[16:20] + "-" + h[20:]
}

// randomHex returns n random bytes as hex, for secrets.
func randomHex(n int) string {
	b := make([]byte, n)
	_, _ = rand.Read(b)
	return hex.EncodeToString(b)
}
