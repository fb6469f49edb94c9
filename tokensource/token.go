package tokensource

import (
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"time"
)

// Token is an Entra access token for Azure Redis, with the username to AUTH it with.
//
// String, GoString, Format (every fmt verb), LogValue (slog) and json.Marshal never reveal Secret.
type Token struct {
	Username  string    `json:"username"`   // the token's oid claim, or Options.Username
	Secret    string    `json:"-"`          // the access token, sent as the AUTH password
	ExpiresOn time.Time `json:"expires_on"` // when Azure stops accepting it
}

// redacted stands in for Secret wherever a Token is printed.
const redacted = "[redacted]"

// String describes the token without its secret.
func (t Token) String() string {
	return fmt.Sprintf("Token{Username:%s ExpiresOn:%s Secret:%s}",
		t.Username, t.ExpiresOn.Format(time.RFC3339), t.secretMark())
}

// GoString serves %#v without the secret.
func (t Token) GoString() string {
	return fmt.Sprintf("tokensource.Token{Username:%q, ExpiresOn:%q, Secret:%q}",
		t.Username, t.ExpiresOn.Format(time.RFC3339), t.secretMark())
}

// Format makes every fmt verb (%v, %+v, %s, %q, %x, ...) print String, and %#v GoString, so that no
// verb reaches the struct fields through reflection.
func (t Token) Format(f fmt.State, verb rune) {
	if verb == 'v' && f.Flag('#') {
		fmt.Fprint(f, t.GoString())
		return
	}
	fmt.Fprint(f, t.String())
}

// LogValue describes the token to slog without its secret.
func (t Token) LogValue() slog.Value {
	return slog.GroupValue(
		slog.String("username", t.Username),
		slog.Time("expires_on", t.ExpiresOn),
		slog.String("secret", t.secretMark()),
	)
}

// secretMark says whether there is a secret without showing it.
func (t Token) secretMark() string {
	if t.Secret == "" {
		return "[none]"
	}
	return redacted
}

// errNoOID is returned for a token without an oid claim when no username override is configured.
var errNoOID = errors.New("the access token has no oid claim: set ENTRA_REDIS_PROXY_USERNAME to the AUTH username (the identity's object ID)")

// oidClaim returns the oid claim of a JWT access token. The payload is base64url without padding
// (RFC 7515); padding is tolerated. Errors never quote the token.
func oidClaim(token string) (string, error) {
	parts := strings.Split(token, ".")
	if len(parts) != 3 {
		return "", fmt.Errorf("the access token is not a JWT (%d dot-separated parts, want 3)", len(parts))
	}
	payload, err := base64.RawURLEncoding.DecodeString(strings.TrimRight(parts[1], "="))
	if err != nil {
		return "", fmt.Errorf("the access token's payload is not base64url: %w", err)
	}
	var claims struct {
		OID *string `json:"oid"`
	}
	if err := json.Unmarshal(payload, &claims); err != nil {
		return "", errors.New("the access token's payload is not a JSON object")
	}
	if claims.OID == nil || *claims.OID == "" {
		return "", errNoOID
	}
	if strings.ContainsAny(*claims.OID, " \r\n") {
		return "", errors.New("the access token's oid claim contains spaces or line breaks")
	}
	return *claims.OID, nil
}
