package tokensource

import (
	"bytes"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"testing"
	"time"
)

func TestTokenNeverShowsSecret(t *testing.T) {
	const secret = "eyJSECRET.c2VjcmV0.SIGNATURE"
	tok := Token{Username: testOID, Secret: secret, ExpiresOn: time.Date(2030, 1, 2, 3, 4, 5, 0, time.UTC)}
	type wrapper struct {
		Tok Token
		Ptr *Token
	}

	var outputs []string
	for _, verb := range []string{"%v", "%+v", "%#v", "%s", "%q", "%x", "%X", "%d", "%T %[1]v"} {
		for _, arg := range []any{tok, &tok, wrapper{tok, &tok}, []Token{tok}, map[string]Token{"k": tok}} {
			outputs = append(outputs, verb+" "+fmt.Sprintf(verb, arg))
		}
	}
	outputs = append(outputs, fmt.Sprint(tok), fmt.Sprintln(&tok), tok.String(), tok.GoString(),
		fmt.Errorf("wrapped: %v", tok).Error())

	var buf bytes.Buffer
	for _, h := range []slog.Handler{slog.NewJSONHandler(&buf, nil), slog.NewTextHandler(&buf, nil)} {
		l := slog.New(h)
		l.Info("token", "tok", tok, "ptr", &tok, slog.Any("any", tok), slog.Group("g", "tok", tok))
		l.Info("token", "wrapper", wrapper{tok, &tok})
	}
	outputs = append(outputs, buf.String())

	j, err := json.Marshal(wrapper{tok, &tok})
	if err != nil {
		t.Fatal(err)
	}
	outputs = append(outputs, string(j))

	for _, out := range outputs {
		if strings.Contains(out, secret) || strings.Contains(out, "SIGNATURE") {
			t.Errorf("output reveals the secret: %s", out)
		}
	}
	if !strings.Contains(fmt.Sprint(tok), testOID) || !strings.Contains(buf.String(), testOID) || !strings.Contains(string(j), testOID) {
		t.Errorf("outputs lost the username: %s / %s / %s", fmt.Sprint(tok), buf.String(), j)
	}
	if !strings.Contains(fmt.Sprint(tok), redacted) || strings.Contains(fmt.Sprint(Token{}), redacted) {
		t.Errorf("String does not say whether a secret is held: %s / %s", tok, Token{})
	}
}

func TestOIDClaim(t *testing.T) {
	enc := base64.RawURLEncoding.EncodeToString
	head := enc([]byte(`{"alg":"RS256"}`))
	tok := func(payload string) string { return head + "." + payload + ".sig" }
	// A payload whose base64url form contains '-' and '_' (standard base64 would have '+' and '/').
	urlSafe := `{"oid":"` + testOID + `","x":"???>>>~~~"}`
	if p := enc([]byte(urlSafe)); !strings.ContainsAny(p, "-_") {
		t.Fatalf("test payload %s has no url-safe characters", p)
	}
	tcs := []struct {
		desc    string
		token   string
		want    string
		wantErr error // nil: any error
		ok      bool
	}{
		{"no padding", tok(enc([]byte(`{"oid":"` + testOID + `"}`))), testOID, nil, true},
		{"padding tolerated", tok(base64.URLEncoding.EncodeToString([]byte(`{"oid":"a"}`))), "a", nil, true},
		{"url-safe characters", tok(enc([]byte(urlSafe))), testOID, nil, true},
		{"other claims around", tok(enc([]byte(`{"aud":"https://redis.azure.com","oid":"b","tid":"t"}`))), "b", nil, true},
		{"missing oid", tok(enc([]byte(`{"sub":"x"}`))), "", errNoOID, false},
		{"empty oid", tok(enc([]byte(`{"oid":""}`))), "", errNoOID, false},
		{"oid not a string", tok(enc([]byte(`{"oid":5}`))), "", nil, false},
		{"oid with a space", tok(enc([]byte(`{"oid":"a b"}`))), "", nil, false},
		{"standard base64 characters", tok(strings.ReplaceAll(strings.ReplaceAll(enc([]byte(urlSafe)), "-", "+"), "_", "/")), "", nil, false},
		{"payload not JSON", tok(enc([]byte(`oid=a`))), "", nil, false},
		{"payload a JSON array", tok(enc([]byte(`["oid"]`))), "", nil, false},
		{"two parts", head + "." + enc([]byte(`{"oid":"a"}`)), "", nil, false},
		{"opaque token", "not-a-jwt", "", nil, false},
		{"empty", "", "", nil, false},
	}
	for _, tc := range tcs {
		t.Run(tc.desc, func(t *testing.T) {
			got, err := oidClaim(tc.token)
			if tc.ok {
				if err != nil || got != tc.want {
					t.Fatalf("got %q, %v; want %q", got, err, tc.want)
				}
				return
			}
			if err == nil {
				t.Fatalf("got %q, want an error", got)
			}
			if tc.wantErr != nil && !errors.Is(err, tc.wantErr) {
				t.Errorf("err %v, want %v", err, tc.wantErr)
			}
			if tc.token != "" && strings.Contains(err.Error(), tc.token) {
				t.Errorf("error quotes the token: %v", err)
			}
		})
	}
}
